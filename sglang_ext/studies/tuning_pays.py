"""Does tuning in the simulator pay on the real engine? (issue 6, "tuning pays")

    .venv/bin/python -m analysis.tuning_pays                      # defaults: the README run
    .venv/bin/python -m analysis.tuning_pays --policy dsde --fixed cost_cap=false --grid max_k=1,2,3,4

Four stages, each on real parts:

1. **Record** (tuning traffic): the engine replays requests ``[N, 2N)`` of the source trace (all queued at t = 0,
   ``--batch`` slots, greedy) with the policy's defaults. This records every request's acceptance and the KL of
   every proposed position (:mod:`sglang_ext.engine.replay`), and calibrates the step overhead the profile cannot
   see (:func:`simulator.validate.fit_calibration`).
2. **Tune** in the simulator: :func:`simulator.tune.tune` (differential evolution over the policy's named
   tunables, ``--fixed`` held) on that recording (:class:`~simulator.acceptance.ReplayAcceptance`), with the cost
   model fitted to ``--profile`` plus the calibrated overhead, objective ``throughput`` (output tokens/s of the
   whole burst). The best parameters are written as the policy config file ``--speculative-policy-config`` loads.
3. **Measure** on held-out traffic: requests ``[0, N)`` with other prompt texts. The engine serves them with
   speculation off, the defaults, the tuned config, and every point of ``--grid`` (the small grid an operator
   would otherwise measure by hand), ``--rounds`` times in interleaved order (round r runs every arm once, in an
   order rotated by r), so the machine's drift falls on every arm alike. An arm's figure is its median
   throughput over the rounds.
4. **Verdict**: tuned beats the defaults, and lands within 3 % of the best grid point. Greedy identity on the
   same runs: every arm's outputs must be token-identical to speculation off (the script exits non-zero
   otherwise).

Outputs in ``--out``: ``results.json``, ``results.md``, ``tuned.json`` (the config) and ``tuned.tune.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository (traces, profiles, drafters)
DEFAULT_TRACE = ROOT / "traces" / "tiny_chat.jsonl"
DEFAULT_PROFILE = ROOT / "traces" / "profiles" / "cpu-2core-1thread-smollm2-135m.json"
DEFAULT_DRAFTER = ROOT / "drafters" / "smollm2-135m-eagle"
#: the issue's bar: tuned within 3 % of the best grid point
WITHIN = 0.03


@dataclass
class Arm:
    """One engine configuration of the measurement: a policy (None: static depth / off) and its parameters."""

    name: str
    policy: str | None
    params: dict[str, Any] = field(default_factory=dict)
    num_steps: int = 0  # 0: speculation off
    throughputs: list[float] = field(default_factory=list)
    mean_accept: list[float] = field(default_factory=list)
    identical: list[bool] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.throughputs) if self.throughputs else float("nan")


def _kv(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))) if flag == "--fixed" else [item]:
            k, sep, v = part.partition("=")
            if not sep or not k:
                raise SystemExit(f"{flag} {part!r}: expected NAME=VALUE")
            out[k.strip()] = v.strip()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default="dsde", help="registry name of the policy to tune (default dsde)")
    p.add_argument("--fixed", action="append", default=["cost_cap=false"],
                   help="NAME=VALUE,... held fixed (not tuned) in every arm; default cost_cap=false (DSDE as "
                        "published: the cost cap would otherwise do part of the tuner's job)")
    p.add_argument("--params", default="max_k,init_k,window,sf_alpha",
                   help="comma-separated parameters to tune (default: DSDE's length bounds, warm-up start, window and "
                        "SF steepness: the tunables with a concrete default)")
    p.add_argument("--grid", default="max_k=1,2,3,4", help="NAME=V1,V2,...: the engine grid (one parameter)")
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--requests", type=int, default=24, help="N: requests per stage (tuning and held-out)")
    p.add_argument("--prompt-scale", type=float, default=0.25)
    p.add_argument("--output-scale", type=float, default=0.5)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--max-output-tokens", type=int, default=64)
    p.add_argument("--profile", type=Path, default=DEFAULT_PROFILE)
    p.add_argument("--model-path", default="smollm2-135m")
    p.add_argument("--speculative-draft-model-path", type=Path, default=DEFAULT_DRAFTER)
    p.add_argument("--num-steps", type=int, default=4, help="--speculative-num-steps: the depth every arm is capped at")
    p.add_argument("--batch", type=int, default=8, help="--max-running-requests")
    p.add_argument("--chunked-prefill-size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2, help="interleaved measurement rounds (median per arm)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the profile's)")
    p.add_argument("--maxiter", type=int, default=12, help="differential-evolution generations")
    p.add_argument("--popsize", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="results directory (default analysis/results/tuning-pays-<date>)")
    return p.parse_args(argv)


def _burst(trace):
    """All requests queued at t = 0 (a saturated engine: throughput is the engine's, not the arrival rate's)."""
    from dataclasses import replace

    from sglang_ext.formats.trace import Trace

    return Trace(tuple(replace(r, arrival=0.0) for r in trace.requests), trace.meta)


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        from sglang_ext.core.costs import CostModel, load_profile
        from sglang_ext.formats.trace import read_trace
        from simulator.tune import coerce_params
        from simulator.validate import derive_trace

        self.args = args
        self.fixed = coerce_params(args.policy, _kv(args.fixed, "--fixed"))
        name, _, values = args.grid.partition("=")
        if not values:
            raise SystemExit(f"--grid {args.grid!r}: expected NAME=V1,V2,...")
        self.grid_name = name.strip()
        self.grid_values = [coerce_params(args.policy, {self.grid_name: v})[self.grid_name]
                            for v in values.split(",") if v.strip()]
        self.profile = load_profile(args.profile)
        self.cost = CostModel.fit(args.profile)
        source = read_trace(args.trace)
        if len(source) < 2 * args.requests:
            raise SystemExit(f"--requests {args.requests}: {args.trace} has {len(source)} requests, need {2 * args.requests}")
        scale = {"prompt_scale": args.prompt_scale, "output_scale": args.output_scale,
                 "max_prompt_tokens": args.max_prompt_tokens, "max_output_tokens": args.max_output_tokens}
        self.tune_trace = _burst(derive_trace(source, start=args.requests, count=args.requests, prefix="t", **scale))
        self.test_trace = _burst(derive_trace(source, start=0, count=args.requests, prefix="r", **scale))
        self.context_length = max(1024, max(r.prompt_tokens + r.output_tokens for r in source.requests) + 16)
        self.report: dict[str, Any] = {"kind": "sglang-ext.tuning-pays", "command": shlex.join(sys.argv),
                                       "policy": args.policy, "fixed": self.fixed,
                                       "grid": {self.grid_name: self.grid_values}, "profile": str(args.profile),
                                       "trace": str(args.trace), "requests": args.requests, **scale}

    # -- engine ------------------------------------------------------------------------------------------------
    def load(self) -> None:
        import torch

        from sglang_ext.engine.launch import load_draft_model, load_target
        from sglang_ext.engine.replay import PromptSource, load_texts

        hw = self.profile["meta"].get("hardware") or {}
        threads = self.args.threads or hw.get("torch_threads")
        if threads:
            torch.set_num_threads(int(threads))
        self.model, self.tokenizer, self.name, _ = load_target(self.args.model_path)
        self.draft = load_draft_model(str(self.args.speculative_draft_model_path), self.name, self.model.config)
        texts = load_texts(None)
        self.tune_prompts = PromptSource(texts, self.tokenizer, seed=self.args.seed + 7919)
        self.test_prompts = PromptSource(texts, self.tokenizer, seed=self.args.seed)
        self.report["machine"] = {"platform": platform.platform(), "threads": torch.get_num_threads(),
                                  "torch": torch.__version__}

    def engine(self, arm: Arm, policy=None):
        from sglang_ext.core.policies import make_policy
        from sglang_ext.engine.launch import build_engine_from_parts

        if policy is None and arm.policy is not None:
            policy = make_policy(arm.policy, **arm.params)
        spec = arm.num_steps > 0
        engine, _ = build_engine_from_parts(
            self.model, self.tokenizer, "EAGLE" if spec else "NONE", num_steps=arm.num_steps if spec else None,
            draft_model=self.draft if spec else None, max_running_requests=self.args.batch,
            context_length=self.context_length, prefill_chunk=self.args.chunked_prefill_size, model_name=self.name,
            policy=policy)
        return engine

    def replay(self, arm: Arm, trace, prompts, policy=None):
        from sglang_ext.engine.replay import replay

        engine = self.engine(arm, policy)
        run = replay(engine, trace.requests, prompts, warmup=2)
        del engine
        gc.collect()
        if not run.complete:
            raise RuntimeError(f"{arm.name}: {run.error}")
        return run

    # -- the stages --------------------------------------------------------------------------------------------
    def record_and_tune(self, out: Path, log) -> dict[str, Any]:
        from sglang_ext.formats.steps import kl_positions_from_steps
        from simulator.acceptance import ReplayAcceptance
        from simulator.tune import save_tuned, tune
        from simulator.validate import fit_calibration, sim_config

        a = self.args
        defaults = Arm("defaults", a.policy, dict(self.fixed), a.num_steps)
        t = time.perf_counter()
        run = self.replay(defaults, self.tune_trace, self.tune_prompts)
        calib = fit_calibration(run.steps, self.cost, a.chunked_prefill_size, True)
        log(f"recorded the tuning traffic ({len(run.steps)} steps, {time.perf_counter() - t:.0f} s); overhead "
            f"{1e3 * calib['coefficients']['overhead_s']:.2f} ms/step")
        recorded = run.trace(finished_only=True)
        kl = {rid: kl_positions_from_steps(steps) for rid, steps in run.kl_records().items()} or None
        config = sim_config(calib["coefficients"], max_batch_size=a.batch, chunk=a.chunked_prefill_size,
                            num_steps=a.num_steps)
        t = time.perf_counter()
        res = tune(recorded, self.cost, a.policy, objective="throughput",
                   params=[n.strip() for n in a.params.split(",")] if a.params else None, fixed=self.fixed,
                   config=config, acceptance=ReplayAcceptance(kl=kl), seed=a.seed, maxiter=a.maxiter,
                   popsize=a.popsize, give_costs=False, progress=True)
        path = save_tuned(res, out / "tuned.json")
        (out / "tuned.tune.json").write_text(json.dumps({"best": res.best_params, "score": res.best_score,
                                                          "default_score": res.default_score,
                                                          "evaluations": res.evaluations}, indent=1, default=str))
        log(f"tuned {a.policy} in the simulator ({res.evaluations} simulations, {time.perf_counter() - t:.0f} s): "
            f"{res.best_params}; simulated throughput {res.best_score:.1f} tok/s vs defaults {res.default_score:.1f}")
        self.report["tune"] = {"params": res.best_params, "sim_throughput": res.best_score,
                               "sim_default_throughput": res.default_score, "evaluations": res.evaluations,
                               "calibration": calib["coefficients"], "config_file": str(path),
                               "recorded_steps": len(run.steps)}
        return res.best_params

    def measure(self, arms: list[Arm], log) -> None:
        from sglang_ext.core.policies.config import load_policy_config

        def run(arm: Arm):
            policy = load_policy_config(self.report["tune"]["config_file"]) if arm.name == "tuned" else None
            return self.replay(arm, self.test_trace, self.test_prompts, policy)

        measure_arms(arms, run, self.args.rounds, log)

    def arms(self, tuned: dict[str, Any]) -> list[Arm]:
        a = self.args
        out = [Arm("off", None, {}, 0), Arm("defaults", a.policy, dict(self.fixed), a.num_steps),
               Arm("tuned", a.policy, dict(tuned), a.num_steps)]
        for v in self.grid_values:
            out.append(Arm(f"{self.grid_name}={v}", a.policy, {**self.fixed, self.grid_name: v}, a.num_steps))
        return out


def measure_arms(arms: list[Arm], run: Callable[[Arm], Any], rounds: int, log: Callable[[str], None],
                 progress: Callable[[], None] | None = None) -> None:
    """Every arm once per round, rounds in rotated order (round r starts at arm r), so the machine's drift falls on
    every arm alike; each run's throughput and acceptance are appended to its arm, and ``identical`` records
    whether its outputs equal the speculation-off arm's (the first ``num_steps == 0`` arm that ran).

    ``run(arm)`` serves the held-out requests and returns the engine's ``ReplayRun``.
    """
    reference: dict[str, list[int]] | None = None
    for rnd in range(rounds):
        for arm in arms[rnd % len(arms):] + arms[:rnd % len(arms)]:
            t = time.perf_counter()
            res_run = run(arm)
            res = res_run.result().summary
            outs = {r.id: r.output_ids for r in res_run.requests}
            if arm.num_steps == 0 and reference is None:
                reference = outs
            arm.throughputs.append(res["throughput_tok_s"])
            arm.mean_accept.append(res.get("mean_acceptance_length") or 1.0)
            arm.identical.append(reference is None or outs == reference)
            log(f"round {rnd + 1} {arm.name:>14s}: {res['throughput_tok_s']:6.2f} tok/s, accept "
                f"{arm.mean_accept[-1]:.2f} ({time.perf_counter() - t:.0f} s)")
            if progress is not None:
                progress()
    if reference is None:
        raise RuntimeError("no speculation-off arm ran: nothing to check greedy identity against")


def verdict(arms: list[Arm]) -> dict[str, Any]:
    by = {a.name: a for a in arms}
    grid = [a for a in arms if a.name not in ("off", "defaults", "tuned")]
    best = max(grid, key=lambda a: a.median)
    tuned, defaults = by["tuned"].median, by["defaults"].median
    return {"tuned_tok_s": tuned, "defaults_tok_s": defaults, "best_grid": best.name, "best_grid_tok_s": best.median,
            "tuned_vs_defaults": tuned / defaults, "tuned_vs_best_grid": tuned / best.median,
            "beats_defaults": tuned > defaults, "within_3pct_of_best_grid": tuned >= (1 - WITHIN) * best.median,
            "greedy_identical": all(all(a.identical) for a in arms)}


def markdown(report: dict[str, Any], arms: list[Arm]) -> str:
    v = report["verdict"]
    lines = [f"# Tuning pays? ({report['date']})", "", f"Command: `{report['command']}`", "",
             f"Policy `{report['policy']}` (fixed {report['fixed']}), tuned in the simulator on a recording of "
             f"{report['requests']} requests, measured on {report['requests']} held-out ones (burst, batch "
             f"{report.get('batch')}), {len(arms[0].throughputs)} interleaved rounds, median tok/s.", "",
             f"Tuned parameters: `{json.dumps(report['tune']['params'])}`; simulated {report['tune']['sim_throughput']:.1f}"
             f" tok/s vs defaults {report['tune']['sim_default_throughput']:.1f}.", "",
             "| arm | tok/s (median) | runs | × defaults | × best grid | accept length | identical to off |",
             "|---|---:|---|---:|---:|---:|---|"]
    d, b = v["defaults_tok_s"], v["best_grid_tok_s"]
    for a in arms:
        runs = ", ".join(f"{x:.1f}" for x in a.throughputs)
        lines.append(f"| {a.name} | {a.median:.2f} | {runs} | {a.median / d:.3f}× | {a.median / b:.3f}× | "
                     f"{statistics.median(a.mean_accept):.2f} | {'yes' if all(a.identical) else 'NO'} |")
    lines += ["", f"Verdict: tuned {'beats' if v['beats_defaults'] else 'does not beat'} the defaults "
              f"({v['tuned_vs_defaults']:.3f}×) and is {v['tuned_vs_best_grid']:.3f}× the best grid point "
              f"({v['best_grid']}): {'within' if v['within_3pct_of_best_grid'] else 'not within'} 3 %. Greedy identity: "
              f"{'all arms token-identical to speculation off' if v['greedy_identical'] else 'FAILED'}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    console = Console()
    log = lambda m: console.print(m, highlight=False)  # noqa: E731
    out = args.out or ROOT / "analysis" / "results" / f"tuning-pays-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    study = Study(args)
    study.report.update(date=time.strftime("%Y-%m-%d %H:%M"), batch=args.batch, num_steps=args.num_steps)
    study.load()
    tuned = study.record_and_tune(out, log)
    arms = study.arms(tuned)
    try:
        study.measure(arms, log)
    finally:
        study.report["arms"] = [{"name": a.name, "policy": a.policy, "params": a.params, "num_steps": a.num_steps,
                                 "throughputs": a.throughputs, "median": a.median, "mean_accept": a.mean_accept,
                                 "identical": a.identical} for a in arms]
        (out / "results.json").write_text(json.dumps(study.report, indent=1, default=str))
    study.report["verdict"] = verdict(arms)
    (out / "results.json").write_text(json.dumps(study.report, indent=1, default=str))
    (out / "results.md").write_text(markdown(study.report, arms))
    console.print(markdown(study.report, arms))
    return 0 if study.report["verdict"]["greedy_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
