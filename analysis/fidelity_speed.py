"""Why the simulator's fidelity on a shared CPU VM hangs on the machine's speed (README, "Simulator fidelity").

Three measurements, all from stored data:

* ``windows``: in each engine run a ``sim validate`` recorded, the median of measured / profiled verify-forward
  time per window of ``--window`` seconds (how fast the machine ran, window by window);
* ``profiles``: two profiles of the same machine taken minutes apart, point by point (how far the machine moved
  between them);
* ``sensitivity``: in the simulator, how much E2E latency and throughput move when every forward is ``--speed``
  slower, at several loads (fractions of the plain-decoding capacity the profile predicts)::

    .venv/bin/python -m analysis.fidelity_speed windows analysis/results/fidelity-20261202-b
    .venv/bin/python -m analysis.fidelity_speed sensitivity --profile analysis/results/fidelity-20261202-b/profile.json \\
        --trace chat160.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def window_speeds(run_dir: Path, cost, window_s: float) -> list[float]:
    """Median measured / profiled verify time per ``window_s`` of one recorded run."""
    from simulator.validate import RecordedRun

    rec = RecordedRun.load(run_dir)
    steps = [s for s in rec.steps if s.batch_size > 0 and s.verify_forward_s > 0]
    ratio = np.array([s.verify_forward_s / cost.verify_seconds(s.batch_size, max(s.depths, default=0) + 1, s.context_max)
                      for s in steps])
    idx = (np.array([s.start for s in steps]) // window_s).astype(int)
    return [float(np.median(ratio[idx == i])) for i in np.unique(idx)]


def cmd_windows(args: argparse.Namespace) -> int:
    from sglang_ext.core.costs import CostModel

    src = Path(args.validation)
    cost = CostModel.fit(args.profile or src / "profile.json")
    rows = json.loads((src / "validate.json").read_text())["rows"]
    for r in rows:
        tag = f"{r['load']}-{r['config']}"
        w = window_speeds(src / tag, cost, args.window)
        print(f"{tag:14s} {len(w):3d} windows of {args.window:g} s: median speed {np.median(w):.3f}, "
              f"range {min(w):.2f}-{max(w):.2f}, 10-90% {np.percentile(w, 10):.2f}-{np.percentile(w, 90):.2f}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from sglang_ext.core.costs import CostModel
    from simulator.acceptance import ParametricAcceptance
    from simulator.model import simulate
    from sglang_ext.formats.trace import read_trace
    from simulator.validate import CalibratedCost, RunConfig, derive_trace, estimate_capacity, sim_config, time_scale_for

    cost = CostModel.fit(args.profile)
    trace = derive_trace(read_trace(args.trace), count=args.head, prefix="r", prompt_scale=0.5, output_scale=0.25,
                         max_prompt_tokens=512, max_output_tokens=48)
    off = RunConfig("off")
    cfg = sim_config(None, max_batch_size=8, chunk=512, num_steps=0)
    cap = estimate_capacity(trace, cost, cfg, off.sim_policy, ParametricAcceptance())
    slow = CalibratedCost(cost, {"prefill": args.speed, "verify": args.speed, "draft": args.speed})
    print(f"capacity {cap:.3f} req/s; every forward x{args.speed:g}:")
    for frac in args.loads:
        t = trace.scaled(time_scale_for(trace, frac * cap))
        a = simulate(t, cost, off.sim_policy(), cfg, seed=0).summary
        b = simulate(t, slow, off.sim_policy(), cfg, seed=0).summary
        print(f"  load {frac:4.2f}x: E2E p50 {100 * (b['e2e_s']['p50'] / a['e2e_s']['p50'] - 1):+5.1f}%, "
              f"p90 {100 * (b['e2e_s']['p90'] / a['e2e_s']['p90'] - 1):+5.1f}%, "
              f"throughput {100 * (b['throughput_tok_s'] / a['throughput_tok_s'] - 1):+5.1f}%")
    return 0


_KEYS = {"target": ("batch_size", "tokens_per_request", "context_len"), "prefill": ("tokens", "context_len"),
         "draft": ("batch_size", "depth", "context_len")}


def cmd_profiles(args: argparse.Namespace) -> int:
    """Two profiles of one machine: the ratio second / first of every point both measured, per part."""
    from sglang_ext.core.costs import load_profile

    a, b = load_profile(args.first), load_profile(args.second)
    print(f"{args.second} ({b['meta'].get('date')}) / {args.first} ({a['meta'].get('date')}):")
    for part, keys in _KEYS.items():
        first = {tuple(e.get(k) for k in keys): e["seconds"] for e in a[part]}
        r = np.array([e["seconds"] / first[k] for e in b[part] if (k := tuple(e.get(x) for x in keys)) in first])
        if len(r):
            print(f"  {part:8s} {len(r):3d} points: median {np.median(r):.3f}, range {r.min():.2f}-{r.max():.2f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.fidelity_speed", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("windows", help="machine speed per time window of recorded runs")
    w.add_argument("validation", help="a `sim validate --out` directory")
    w.add_argument("--profile", default=None, help="default: VALIDATION/profile.json")
    w.add_argument("--window", type=float, default=5.0)
    w.set_defaults(func=cmd_windows)
    q = sub.add_parser("profiles", help="two profiles of one machine, point by point")
    q.add_argument("first")
    q.add_argument("second")
    q.set_defaults(func=cmd_profiles)
    s = sub.add_parser("sensitivity", help="E2E and throughput change per forward-speed change, by load")
    s.add_argument("--profile", required=True)
    s.add_argument("--trace", required=True)
    s.add_argument("--head", type=int, default=80)
    s.add_argument("--speed", type=float, default=1.05)
    s.add_argument("--loads", type=lambda x: [float(v) for v in x.split(",")], default=[0.25, 0.5, 0.75, 1.3, 2.0, 3.0])
    s.set_defaults(func=cmd_sensitivity)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
