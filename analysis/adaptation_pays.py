"""When does online adaptation pay on a trace? The simulator's answer from a measured learning curve.

    .venv/bin/python -m analysis.adaptation_pays --shift-results analysis/results/workload-shift-.../results.json \\
        --curve analysis/results/learner-curve-.../results.json --variant online-adam \\
        --segment code --rate 0.1 --requests 600 --out analysis/results/adaptation-pays-DATE

1. A trace of the segment's real request shapes: the prompt and output lengths the workload-shift run served in
   that segment (cycled in order), Poisson arrivals at ``--rate`` (seeded).
2. ``sim fit-learning`` on the learner curve (held-out acceptance per round, the round's trainer CPU seconds).
3. ``sim replay --compare-static`` with those flags: the trainer on its own device (TIDE's heterogeneous mapping:
   here the measured single core; ``--round-seconds-scale`` shrinks it for a faster trainer device), per arrival
   window the static and trained acceptance length and TPOT, and when adaptation starts to pay.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np


def segment_shapes(results: Path, segment: str) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) of every request of ``segment`` in a workload-shift ``results.json``."""
    data = json.loads(results.read_text(encoding="utf-8"))
    segs = data["segments"]
    if segment not in segs:
        raise ValueError(f"{results}: no segment {segment!r} (has: {', '.join(segs)})")
    a, b = segs[segment]["start"], segs[segment]["stop"]
    prompts = [it["prompt_tokens"] for it in data["meta"]["stream"]]
    static = next(iter(data["configs"].values()))
    outs = static["per_request"]["tokens"]
    return [(prompts[i], outs[i]) for i in range(a, b)]


def write_trace(shapes: list[tuple[int, int]], n: int, rate: float, seed: int, category: str, path: Path) -> Path:
    rng = np.random.default_rng(seed)
    t = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0 / rate, n - 1))])
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"trace": {"name": f"{category}-shapes", "licence": "synthetic",
                                      "source": f"request shapes of a workload-shift run, Poisson {rate}/s, seed {seed}",
                                      "time_unit": "s"}}) + "\n")
        for i in range(n):
            p, o = shapes[i % len(shapes)]
            f.write(json.dumps({"arrival": round(float(t[i]), 6), "prompt_tokens": p, "output_tokens": o,
                                "category": category}) + "\n")
    return path


def live_vs_sim(results: Path, config: str, segment: str, fit, profile: str, batch: int, window: int = 16,
                seed: int = 0) -> dict:
    """The simulator's prediction of a live run's segment against what that run measured.

    The segment's requests, in stream order, all queued at t = 0 with ``batch`` slots (as the workload-shift run
    serves them), replayed with a trainer on its own device taking the fit's round time, from the static drafter's
    rate on this domain. Compared per request (a trailing mean over ``window`` requests of acceptance length, both
    sides) and over the segment's last half (pooled)."""
    from sglang_ext.core.costs import CostModel
    from sglang_ext.core.policies.registry import make_policy
    from sglang_ext.formats.trace import Request, Trace
    from simulator.acceptance import parse_acceptance
    from sglang_ext.studies.workload_shift import moving_average
    from simulator.model import SimConfig, simulate

    data = json.loads(results.read_text(encoding="utf-8"))
    if config not in data["configs"]:
        raise ValueError(f"{results}: no configuration {config!r} (has: {', '.join(data['configs'])})")
    shapes = segment_shapes(results, segment)
    trace = Trace(tuple(Request(0.0, p, o, segment) for p, o in shapes))
    cfg = SimConfig(max_batch_size=batch, trainer="separate", train_round_tokens=fit.round_tokens,
                    train_gain=fit.gain, train_round_seconds=fit.round_seconds)
    acc = parse_acceptance(f"alpha={fit.alpha_start},decay={fit.decay},ceiling={fit.ceiling}")
    res = simulate(trace, CostModel.fit(profile), make_policy("static", k=fit.k), cfg, seed=seed, acceptance=acc)
    order = np.argsort(res.requests["index"])
    steps, accepted = res.requests["spec_steps"][order], res.requests["accepted"][order]
    sim_acc = [(a + s) / s if s else 1.0 for a, s in zip(accepted.tolist(), steps.tolist())]
    seg = data["segments"][segment]
    live = data["configs"][config]["per_request"]
    live_acc = live["accept_length"][seg["start"]:seg["stop"]]
    ms, ml = moving_average(sim_acc, window), moving_average(live_acc, window)
    err = np.abs(np.array(ms) - np.array(ml))
    half = len(shapes) // 2
    tok, ver = live["tokens"][seg["start"]:seg["stop"]], live["verify_steps"][seg["start"]:seg["stop"]]
    live_half = sum(tok[half:]) / max(sum(ver[half:]), 1)
    sim_half = float((accepted[half:].sum() + steps[half:].sum()) / max(steps[half:].sum(), 1))
    return {"config": config, "segment": segment, "window": window, "requests": len(shapes),
            "train_rounds_sim": res.summary["train_rounds"],
            "moving_accept_length": {"sim": ms, "live": ml},
            "mean_abs_error": float(err.mean()), "max_abs_error": float(err.max()),
            "last_half_accept_length": {"sim": sim_half, "live": live_half}}


def main(argv: list[str] | None = None) -> int:
    from sglang_ext.cli import main as cli
    from simulator.learning_fit import as_dict, fit_from_results

    p = argparse.ArgumentParser(prog="python -m analysis.adaptation_pays", description=__doc__.split("\n\n")[0])
    p.add_argument("--shift-results", type=Path, required=True, help="results.json of analysis.workload_shift")
    p.add_argument("--curve", type=Path, required=True, help="results.json of analysis.learner_curve")
    p.add_argument("--variant", required=True)
    p.add_argument("--segment", default="code", help="the segment whose shapes make the trace, and the curve's domain")
    p.add_argument("--first-round", type=int, default=0, help="sim fit-learning --first-round")
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-seconds-scale", type=float, default=1.0,
                   help="multiply the measured round time (a trainer device N times faster: 1/N)")
    p.add_argument("--profile", default="traces/profiles/cpu-2core-1thread-smollm2-135m.json")
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--window", type=float, default=None)
    p.add_argument("--validate-config", default=None, metavar="NAME",
                   help="also compare the simulator's per-request acceptance on the segment against this online "
                        "configuration of the workload-shift run (validation.json)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    fit = fit_from_results(args.curve, args.variant, args.segment, first_round=args.first_round)
    if fit.round_seconds is not None:
        fit.round_seconds *= args.round_seconds_scale
    (args.out / "fit.json").write_text(json.dumps(as_dict(fit), indent=1) + "\n")
    trace = write_trace(segment_shapes(args.shift_results, args.segment), args.requests, args.rate, args.seed,
                        args.segment, args.out / "trace.jsonl")
    replay = ["sim", "replay", "--trace", str(trace), "--profile", args.profile, "--policy", "static",
              "--policy-param", "k=3", "--max-batch-size", str(args.max_batch_size), "--seed", str(args.seed),
              "--compare-static", "--out", str(args.out), *shlex.split(fit.flags())]
    if args.window:
        replay += ["--window", str(args.window)]
    if args.validate_config:
        v = live_vs_sim(args.shift_results, args.validate_config, args.segment, fit, args.profile, args.max_batch_size,
                        seed=args.seed)
        (args.out / "validation.json").write_text(json.dumps(v, indent=1) + "\n")
        print(f"simulated vs live {args.validate_config} on {args.segment}: acceptance length (trailing mean of "
              f"{v['window']} requests) mean abs error {v['mean_abs_error']:.3f}, max {v['max_abs_error']:.3f}; "
              f"last half {v['last_half_accept_length']['sim']:.3f} simulated vs "
              f"{v['last_half_accept_length']['live']:.3f} live ({v['train_rounds_sim']} simulated rounds)", flush=True)
    print("sglang-ext " + " ".join(shlex.quote(x) for x in replay), flush=True)
    (args.out / "command.txt").write_text("python -m analysis.adaptation_pays " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])) + "\n\nsglang-ext "
        + " ".join(shlex.quote(x) for x in replay) + "\n")
    return cli(replay)


if __name__ == "__main__":
    raise SystemExit(main())
