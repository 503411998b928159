"""The quickstart's six steps. Each takes the :class:`Context`, writes its files into the run directory and returns
the JSON record the later steps (and the report) read; nothing here is a second copy of an algorithm: the
engine, the online learner, the simulator, the tuner and the policies are the project's own.

1. ``provision``: the model, the drafter and the prompt pools (cached);
2. ``profile``: this machine's target, prefill and drafter costs (cached per hardware, versions, model and grid);
3. ``serve``: a chat -> code -> maths stream on the reference engine, static drafter vs online adaptation,
   stepped alternately (:mod:`sglang_ext.studies.workload_shift`); greedy identity checked;
4. ``simulate``: a bundled trace replayed with the measured costs and the acceptance recorded in step 3, every
   policy at several loads; the best adaptive policy tuned for throughput under a p90 TPOT SLO;
5. ``check``: the tuned configuration against the policy's defaults and speculation off on the real engine,
   interleaved rounds, greedy identity on the same runs;
6. ``report``: ``report.md`` / ``report.html`` with the plots, and the commands to deploy.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from .rundir import RunDir, write_json
from .settings import DEPTH_PARAM, REPO, SIM_POLICIES, TUNE_PARAMS, Settings


class QuickstartError(RuntimeError):
    pass


class Context:
    """The run's settings, directory and console, plus the target model loaded once for every step that needs it."""

    def __init__(self, settings: Settings, rundir: RunDir, console: Console) -> None:
        self.settings, self.rundir, self.console = settings, rundir, console
        self.out = rundir.path
        self._target = None

    def log(self, msg: str) -> None:
        self.console.print(msg, highlight=False)

    def target(self):
        """``(model, tokenizer, name)``; torch threads set to the serving threads first."""
        if self._target is None:
            import torch

            from sglang_ext.engine.launch import LaunchError, load_target

            torch.set_num_threads(self.settings.threads)
            try:
                model, tok, name, seconds = load_target(self.settings.model)
            except LaunchError as e:
                raise QuickstartError(str(e)) from e
            self.log(f"  loaded {name} in {seconds:.1f} s")
            self._target = (model, tok, name)
        return self._target

    def drafter_path(self) -> str:
        return self.rundir.result("provision")["drafter"]["path"]

    def load_drafter(self):
        from sglang_ext.engine.launch import load_draft_model

        model, _, name = self.target()
        return load_draft_model(self.drafter_path(), name, model.config)


# ---- 1. provision ----------------------------------------------------------------------------------------------
def provision(ctx: Context) -> dict[str, Any]:
    from sglang_ext.models import MODELS
    from sglang_ext.models.provision import fetch_model

    from .prompts import prompt_pools

    s = ctx.settings
    if s.model in MODELS:
        fetch_model(s.model)
    model, _, name = ctx.target()
    if s.drafter:
        path, source = Path(s.drafter).expanduser(), f"given ({s.drafter})"
        if not (path / "config.json").is_file():
            raise QuickstartError(f"--speculative-draft-model-path {s.drafter}: no config.json there")
    elif (REPO / "drafters" / f"{name}-eagle" / "config.json").is_file():
        path, source = REPO / "drafters" / f"{name}-eagle", f"shipped (drafters/{name}-eagle)"
    else:  # no trained drafter for this model: a random one, so the loop still runs (acceptance will be low)
        from sglang_ext.engine.profile import random_drafter
        from sglang_ext.engine.target import TargetModel

        path, source = ctx.out / "drafter", "random weights (no trained drafter ships for this model)"
        random_drafter(TargetModel(model, name=name), seed=s.seed).save(path)
        ctx.log(f"  [yellow]no trained drafter for {name}: using a random-weights drafter ({path})[/yellow]")
    pools = prompt_pools(s.prompts)
    short = {c: len(p) for c, p in pools.items() if len(p) < s.per_segment}
    if short:
        raise QuickstartError(f"prompt pools too small for {s.per_segment} requests per segment: {short}")
    ctx.log(f"  model {name}; drafter {source}; prompts: " + ", ".join(f"{c} {len(p)}" for c, p in pools.items()))
    return {"model": name, "drafter": {"path": str(path), "source": source},
            "prompts": {"source": s.prompts, "pools": {c: len(p) for c, p in pools.items()}}}


# ---- 2. profile -------------------------------------------------------------------------------------------------
def _profile_cache_key(ctx: Context) -> tuple[str, dict[str, Any]]:
    import torch
    import transformers

    import sglang_ext
    from sglang_ext.engine.profile import hardware_meta

    model, _, name = ctx.target()
    drafter_cfg = Path(ctx.drafter_path()) / "config.json"
    ident = {"hardware": hardware_meta("cpu").get("summary"), "threads": ctx.settings.threads,
             "versions": [torch.__version__, transformers.__version__, sglang_ext.__version__],
             "model": name, "config": hashlib.sha256(model.config.to_json_string().encode()).hexdigest()[:16],
             "drafter": hashlib.sha256(drafter_cfg.read_bytes()).hexdigest()[:16] if drafter_cfg.is_file() else None,
             "grid": asdict(ctx.settings.profile)}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return key, ident


def profile(ctx: Context) -> dict[str, Any]:
    from sglang_ext.core.costs import CostModel
    from sglang_ext.engine.profile import ProfileGrid, run_profile, summary_line
    from sglang_ext.models.provision import cache_root

    key, ident = _profile_cache_key(ctx)
    cached = cache_root() / "profiles" / f"{name_safe(ident['model'])}-{key}.json"
    out = ctx.out / "profile.json"
    if cached.is_file():
        shutil.copyfile(cached, out)
        reused = True
        ctx.log(f"  reusing the cached profile {cached} (same hardware, versions, model and grid)")
    else:
        p = ctx.settings.profile
        model, _, name = ctx.target()
        grid = ProfileGrid(batch_sizes=p.batch_sizes, tokens=p.tokens, context_lens=p.context_lens,
                           prefill_tokens=p.prefill_tokens, prefill_context_lens=p.prefill_context_lens,
                           draft_depths=p.draft_depths, repeats=p.repeats, warmup=p.warmup,
                           parts=("target", "prefill", "draft"))
        prof = run_profile(model, name=name, grid=grid, draft_model=ctx.load_drafter(),
                           drafter_source=ctx.drafter_path(), command="sglang-ext quickstart (step profile)",
                           seed=ctx.settings.seed)
        write_json(out, prof)
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, cached)
        reused = False
    prof = json.loads(out.read_text())
    cost = CostModel.fit(out)
    ctx.log("  " + summary_line(prof))
    return {"file": "profile.json", "reused_cache": reused, "cache_file": str(cached), "identity": ident,
            "summary": summary_line(prof), "fit": cost.fit_report(),
            "profile_seconds": prof["meta"]["timing"]["profile_seconds"]}


def name_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# ---- 3. serve: the shifting stream, static vs online --------------------------------------------------------------
def serve(ctx: Context) -> dict[str, Any]:
    import tempfile

    from sglang_ext.engine.engine import GenerationRequest
    from sglang_ext.engine.launch import build_engine_from_parts
    from sglang_ext.studies import workload_shift as ws

    from .prompts import prompt_pools

    s = ctx.settings
    model, tok, name = ctx.target()
    segments = [ws.Segment(c, c, s.per_segment) for c in ("chat", "code", "math")]
    stream = ws.encode_stream(tok, ws.select_stream(prompt_pools(s.prompts), segments, s.seed), s.max_prompt_tokens)
    context = 2 * (max(len(it.ids) for it in stream) + s.max_new_tokens) + 16

    def make_engine(drafter: str | None = None):  # every configuration here starts from the shipped drafter
        if drafter is not None:
            raise ValueError("the quickstart's workload step serves its own drafter only")
        engine, _ = build_engine_from_parts(model, tok, "EAGLE", num_steps=s.num_steps, topk=1,
                                            draft_model=ctx.load_drafter(), max_running_requests=s.batch,
                                            context_length=context, model_name=name)
        return engine

    def warmup(engine) -> None:
        engine.run([GenerationRequest(list(stream[0].ids), max_new_tokens=4)])
        engine.totals.update(tokens=0, draft_s=0.0, verify_s=0.0, prefill_s=0.0, steps=0)

    online = dict(s.online)
    specs = ws.parse_configs(f"static,{online.pop('learner')}")
    handoff = Path(tempfile.mkdtemp(prefix="sglang-ext-quickstart-"))
    runs: list = []
    try:
        runs = ws.build_runs(specs, make_engine, online, handoff, warmup, log=ctx.log, trainer_nice=19)
        for r in runs:
            r.submit(stream, s.max_new_tokens)
        with _bar(ctx, "serving the stream", len(stream) * len(runs)) as advance:
            done = [0]

            def progress(_msg: str) -> None:
                n = sum(len(r.finish_order) for r in runs)
                advance(n - done[0])
                done[0] = n

            ws.run_interleaved(runs, gate_trainers=True, log=progress, progress_every=1)
        summary = ws.summarize(runs, stream, window=max(2, s.per_segment // 2))
        recording: dict[str, list[list[int]]] = {}
        for it, st in zip(stream, runs[0].states):
            recording.setdefault(it.segment, []).append(list(st.accept_record))
    finally:
        ws.stop_runs(runs)
        shutil.rmtree(handoff, ignore_errors=True)
    if not summary["greedy_identity"]:
        bad = {n: c["not_identical"] for n, c in summary["configs"].items() if c["not_identical"]}
        raise QuickstartError(f"greedy identity failed in the serving step: {bad}")
    ws.plot_acceptance(summary, ctx.out / "acceptance.png",
                       title=f"{name} + EAGLE chain k={s.num_steps}, batch {s.batch}, greedy; chat -> code -> math")
    acceptance = fit_stream_acceptance(recording, s.num_steps)
    return {"summary": summary, "recording": recording, "acceptance": acceptance,
            "stream": [{"index": it.index, "segment": it.segment, "prompt_id": it.prompt_id,
                        "prompt_tokens": len(it.ids)} for it in stream]}


def fit_stream_acceptance(recording: dict[str, list[list[int]]], k: int) -> dict[str, Any]:
    """Per-category α and κ and a pooled δ (:func:`simulator.acceptance.fit_acceptance`) from the static run."""
    from simulator.acceptance import fit_acceptance

    out: dict[str, Any] = {"k": k, "categories": {}}
    pooled = [r for reqs in recording.values() for r in reqs if r]
    if not pooled:
        return out
    fit = fit_acceptance(pooled, k)
    out["decay"] = fit.decay
    out["pooled"] = {"alpha": fit.alpha, "concentration": fit.concentration, "steps": fit.steps}
    for cat, reqs in recording.items():
        reqs = [r for r in reqs if r]
        if reqs:
            f = fit_acceptance(reqs, k)
            out["categories"][cat] = {"alpha": f.alpha, "concentration": f.concentration, "steps": f.steps}
    return out


def acceptance_model(fit: dict[str, Any]):
    from simulator.acceptance import CategoryAcceptance, ParametricAcceptance

    def cat(d: dict) -> CategoryAcceptance:
        kappa = d["concentration"]
        return CategoryAcceptance(min(max(d["alpha"], 0.0), 1.0), kappa if math.isfinite(kappa) and kappa > 0 else 1e6)

    if "pooled" not in fit:
        return ParametricAcceptance()
    return ParametricAcceptance({c: cat(d) for c, d in fit["categories"].items()}, default=cat(fit["pooled"]),
                                decay=min(max(fit["decay"], 1e-3), 1.0))


class _bar:
    """A rich progress bar for a step's long loop (``advance(n)``)."""

    def __init__(self, ctx: Context, what: str, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn(f"  {what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=ctx.console, transient=False)
        self.task = self.progress.add_task(what, total=total)

    def __enter__(self):
        self.progress.__enter__()
        return lambda n=1: self.progress.update(self.task, advance=n)

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)


# ---- 4. simulate -----------------------------------------------------------------------------------------------------
def sim_inputs(ctx: Context):
    """``(trace, cost model, acceptance model, SimConfig, scales)`` for the simulation step."""
    from sglang_ext.core.costs import CostModel
    from simulator.model import SimConfig
    from sglang_ext.formats.trace import read_trace
    from simulator.validate import derive_trace

    s = ctx.settings
    source = read_trace(s.trace)
    trace = derive_trace(source, count=s.trace_head, max_prompt_tokens=s.max_trace_prompt,
                         max_output_tokens=s.max_trace_output, prefix="q")
    cost = CostModel.fit(ctx.out / "profile.json")
    acc = acceptance_model(ctx.rundir.result("serve")["acceptance"])
    decode_step = cost.verify_seconds(s.batch, 1, s.max_trace_prompt // 2)
    slo_tpot = s.slo_tpot_ms / 1e3 if s.slo_tpot_ms else 10.0  # the default is set after the sweep (simulate)
    config = SimConfig(max_batch_size=s.batch, max_prefill_tokens=512, max_draft_tokens=s.num_steps,
                       slo_ttft_s=s.slo_ttft_s, slo_tpot_s=slo_tpot)
    # plain decoding's capacity (output tokens/s at full batch, prefill included) against the trace's offered rate
    reqs = trace.requests
    duration = max(reqs[-1].arrival - reqs[0].arrival, 1e-9)
    mean_out = statistics.mean(r.output_tokens for r in reqs)
    mean_prompt = statistics.mean(r.prompt_tokens for r in reqs)
    per_request = mean_out * decode_step / s.batch + cost.prefill_seconds(int(mean_prompt), 0)
    capacity_req_s = 1.0 / per_request
    offered_req_s = len(reqs) / duration
    scales = {load: offered_req_s / (capacity_req_s * load) for load in s.loads}
    return trace, cost, acc, config, scales, {"decode_step_s": decode_step, "capacity_req_s": capacity_req_s,
                                              "offered_req_s": offered_req_s}


def policy_point(name: str, num_steps: int) -> tuple[str, dict[str, Any]]:
    """The simulator's policy and parameters for one compared row."""
    if name == "off":
        return "static", {"k": 0}
    if name == "static":
        return "static", {"k": num_steps}
    depth = DEPTH_PARAM.get(name)
    return name, ({depth: num_steps} if depth else {})


def simulate(ctx: Context) -> dict[str, Any]:
    from dataclasses import replace as dc_replace

    from simulator.tune import save_tuned, score, sweep, tune

    s = ctx.settings
    trace, cost, acc, config, scales, derived = sim_inputs(ctx)
    objective = "throughput-p90-tpot"
    rows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    with _bar(ctx, f"simulating {len(SIM_POLICIES)} policies x {len(scales)} loads", len(SIM_POLICIES)) as advance:
        for name in SIM_POLICIES:
            policy, params = policy_point(name, s.num_steps)
            grid = {"time_scale": list(scales.values())}
            for load, row in zip(scales, sweep(trace, cost, policy, grid, base_params=params, config=config,
                                               acceptance=acc, seed=s.seed, jobs=2, give_costs=False)):
                sm = row.summary
                summaries.append(sm)
                rows.append({"policy": name, "load": load, "time_scale": scales[load],
                             "throughput_tok_s": sm["throughput_tok_s"],
                             "tpot_p50_s": sm["tpot_s"]["p50"], "tpot_p90_s": sm["tpot_s"]["p90"],
                             "e2e_p50_s": sm["e2e_s"]["p50"], "e2e_p90_s": sm["e2e_s"]["p90"],
                             "accept_length": sm["mean_acceptance_length"]})
            advance()
    # the SLO: given, or "no worse than speculation off": off's simulated p90 TPOT at the tuning load
    off_p90 = next(r["tpot_p90_s"] for r in rows if r["policy"] == "off" and r["load"] == s.tune_load)
    slo_tpot = s.slo_tpot_ms / 1e3 if s.slo_tpot_ms else off_p90
    config = dc_replace(config, slo_tpot_s=slo_tpot)
    derived.update(slo_tpot_s=slo_tpot, slo_source="given" if s.slo_tpot_ms else "speculation off's p90 TPOT")
    for r, sm in zip(rows, summaries):
        r["score"] = score({**sm, "slo_tpot_s": slo_tpot}, objective)
    at = [r for r in rows if r["load"] == s.tune_load]
    adaptive = [r for r in at if r["policy"] in TUNE_PARAMS]
    best = max(adaptive, key=lambda r: r["score"])["policy"]
    policy, fixed = policy_point(best, s.num_steps)
    tuning_trace = trace.scaled(scales[s.tune_load])
    ctx.log(f"  best adaptive policy at load {s.tune_load}: {best}; tuning {', '.join(TUNE_PARAMS[best])} for "
            f"tokens/s under a p90 TPOT SLO of {1e3 * derived['slo_tpot_s']:.0f} ms")
    res = tune(tuning_trace, cost, policy, objective=objective, params=list(TUNE_PARAMS[best]), fixed=fixed,
               config=config, acceptance=acc, seed=s.seed, maxiter=s.tune_maxiter, popsize=s.tune_popsize,
               jobs=2, give_costs=False, progress=True,
               deploy={"speculative_num_steps": s.num_steps, "speculative_eagle_topk": 1,
                       "max_running_requests": s.batch})
    save_tuned(res, ctx.out / "tuned-policy.json")
    _plot_simulation(ctx, rows, res, best)
    return {"objective": objective, "rows": rows, "scales": scales, **derived, "best_policy": best,
            "tune": {"policy": best, "fixed": fixed, "params": res.best_params, "score": res.best_score,
                     "default_score": res.default_score, "evaluations": res.evaluations,
                     "throughput_tok_s": res.best_summary["throughput_tok_s"],
                     "tpot_p90_s": res.best_summary["tpot_s"]["p90"],
                     "history": [h["score"] for h in res.history]},
            "trace": {"file": s.trace, "requests": len(trace), "head": s.trace_head,
                      "max_prompt_tokens": s.max_trace_prompt, "max_output_tokens": s.max_trace_output},
            "config": config.to_json(), "tuned_config": "tuned-policy.json"}


def _plot_simulation(ctx: Context, rows: list[dict], res, best: str) -> None:
    from sglang_ext.studies.workload_shift import _mpl

    plt = _mpl()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in SIM_POLICIES:
        pts = sorted((r["load"], r["e2e_p90_s"], r["throughput_tok_s"]) for r in rows if r["policy"] == name)
        a1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        a2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
    a1.set_xlabel("offered load (x plain decoding's capacity)")
    a1.set_ylabel("simulated p90 end-to-end latency (s)")
    a1.set_yscale("log")
    a2.set_xlabel("offered load (x plain decoding's capacity)")
    a2.set_ylabel("simulated output tokens/s")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.out / "latency_vs_load.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    hist = [h["score"] for h in res.history]
    ax.plot(range(1, len(hist) + 1), hist, ".", alpha=0.6, label="candidates")
    ax.plot(range(1, len(hist) + 1), [max(hist[: i + 1]) for i in range(len(hist))], label="best so far")
    if res.default_score is not None:
        ax.axhline(res.default_score, color="k", ls="--", lw=1, label="defaults")
    ax.set_xlabel("simulation")
    ax.set_ylabel("tokens/s under the p90 TPOT SLO")
    ax.set_title(f"tuning {best} in the simulator", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.out / "tuning.png", dpi=110)
    plt.close(fig)


# ---- 5. check on the real engine -------------------------------------------------------------------------------------
def check(ctx: Context) -> dict[str, Any]:
    import gc
    from dataclasses import replace as dc_replace

    from sglang_ext.core.policies import make_policy
    from sglang_ext.core.policies.config import load_policy_config
    from sglang_ext.engine.launch import build_engine_from_parts
    from sglang_ext.engine.replay import PromptSource, replay
    from sglang_ext.studies.tuning_pays import Arm, measure_arms
    from sglang_ext.formats.trace import Trace, read_trace
    from simulator.validate import derive_trace

    from .prompts import prompt_pools

    s = ctx.settings
    sim = ctx.rundir.result("simulate")
    best = sim["best_policy"]
    policy, fixed = policy_point(best, s.num_steps)
    model, tok, name = ctx.target()
    draft = ctx.load_drafter()
    source = read_trace(s.trace)
    # held-out requests: the trace's last ones (the simulation used its head), lengths clipped, all queued at t = 0
    start = max(0, len(source) - s.check_requests)
    held = derive_trace(source, start=start, count=s.check_requests, max_prompt_tokens=s.max_prompt_tokens,
                        max_output_tokens=s.check_output_tokens, prefix="c")
    held = Trace(tuple(dc_replace(r, arrival=0.0) for r in held.requests), held.meta)
    texts = [t for pool in prompt_pools(s.prompts).values() for _, t in pool]
    context = max(1024, max(r.prompt_tokens + r.output_tokens for r in held.requests) * 2 + 16)
    arms = [Arm("off", None, {}, 0), Arm("defaults", policy, dict(fixed), s.num_steps),
            Arm("tuned", policy, dict(sim["tune"]["params"]), s.num_steps)]

    def run(arm: Arm):
        if arm.name == "tuned":
            pol = load_policy_config(ctx.out / "tuned-policy.json")
        else:
            pol = make_policy(arm.policy, **arm.params) if arm.policy else None
        spec = arm.num_steps > 0
        engine, _ = build_engine_from_parts(model, tok, "EAGLE" if spec else "NONE",
                                            num_steps=arm.num_steps if spec else None,
                                            draft_model=draft if spec else None, max_running_requests=s.batch,
                                            context_length=context, prefill_chunk=512, model_name=name, policy=pol)
        result = replay(engine, held.requests, PromptSource(texts, tok, seed=s.seed), warmup=1)
        del engine
        gc.collect()
        if not result.complete:
            raise QuickstartError(f"check, arm {arm.name}: {result.error}")
        return result

    with _bar(ctx, f"{s.check_rounds} interleaved round(s) of {len(arms)} arms", s.check_rounds * len(arms)) as advance:
        measure_arms(arms, run, s.check_rounds, log=lambda m: None, progress=advance)
    table = [{"arm": a.name, "policy": a.policy, "params": a.params, "num_steps": a.num_steps,
              "throughputs": a.throughputs, "median_tok_s": a.median,
              "accept_length": statistics.median(a.mean_accept), "identical": all(a.identical)} for a in arms]
    by = {a.name: a.median for a in arms}
    verdict = {"tuned_vs_defaults": by["tuned"] / by["defaults"], "tuned_vs_off": by["tuned"] / by["off"],
               "defaults_vs_off": by["defaults"] / by["off"], "beats_defaults": by["tuned"] > by["defaults"],
               "greedy_identical": all(r["identical"] for r in table)}
    ctx.log(f"  tuned {verdict['tuned_vs_defaults']:.3f}x the defaults, {verdict['tuned_vs_off']:.3f}x speculation "
            f"off; greedy identity {'held' if verdict['greedy_identical'] else 'FAILED'}")
    if not verdict["greedy_identical"]:
        raise QuickstartError(f"greedy identity failed in the check step: {table}")
    return {"policy": best, "arms": table, "verdict": verdict, "requests": len(held),
            "rounds": s.check_rounds, "max_output_tokens": s.check_output_tokens}


# ---- 6. report ---------------------------------------------------------------------------------------------------------
def report(ctx: Context) -> dict[str, Any]:
    from .report import write_report

    files = write_report(ctx)
    return {"files": files}


def machine() -> dict[str, Any]:
    import os

    import torch
    import transformers

    import sglang_ext
    from sglang_ext.engine.profile import hardware_meta

    return {"hardware": hardware_meta("cpu").get("summary"), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "sglang_ext": sglang_ext.__version__}


STEP_FUNCTIONS = {"provision": provision, "profile": profile, "serve": serve, "simulate": simulate, "check": check,
                  "report": report}
