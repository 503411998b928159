"""How fast the simulator replays a trace: the whole `sglang-ext sim replay` command (process start, imports, trace
import, simulation, writing results) against the trace's own duration, and the simulation loop alone, for every
shipped length policy.

    .venv/bin/python -m analysis.sim_speed --trace ../shared/data/traces/azure2023_code.csv --format azure \
        --profile traces/profiles/cpu-2core-smollm2-135m.json --out analysis/results/sim-speed-code

Each policy's command runs ``--repeats`` times in rotated order (the machine's speed drifts); the table gives the
median. Outputs ``results.json`` and ``results.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = ("static", "dsde", "tide-control", "sglang-adaptive", "goodput", "bandit")


def run_once(trace: str, fmt: str, profile: str, policy: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "sglang_ext", "sim", "replay", "--trace", trace, "--format", fmt, "--profile",
               profile, "--policy", policy, "--out", out, *extra]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"})
        wall = time.perf_counter() - t0
        res = json.loads((Path(out) / "result.json").read_text())
    return {"command_s": wall, "loop_s": res["perf"]["wall_s"], "loop_cpu_s": res["perf"]["cpu_s"],
            "requests": res["summary"]["requests"], "rejected": res["summary"].get("rejected", 0),
            "events": res["perf"]["events"], "sim_s": res["perf"]["sim_s"]}


def trace_duration(trace: str, fmt: str) -> tuple[float, int]:
    from simulator.importers import import_trace

    t = import_trace(fmt, trace)
    return t.requests[-1].arrival - t.requests[0].arrival, len(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True)
    p.add_argument("--format", default="jsonl")
    p.add_argument("--profile", required=True)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--extra", default="", help="more sim replay flags, quoted")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    policies = [x.strip() for x in a.policies.split(",") if x.strip()]
    extra = shlex.split(a.extra)
    duration, n = trace_duration(a.trace, a.format)
    runs: dict[str, list[dict]] = {pol: [] for pol in policies}
    for r in range(a.repeats):
        for pol in policies[r % len(policies):] + policies[: r % len(policies)]:
            runs[pol].append(run_once(a.trace, a.format, a.profile, pol, extra))
            print(f"round {r + 1} {pol}: {runs[pol][-1]['command_s']:.2f} s", flush=True)
    rows = []
    for pol in policies:
        cmd = statistics.median(x["command_s"] for x in runs[pol])
        loop = statistics.median(x["loop_s"] for x in runs[pol])
        cpu = statistics.median(x["loop_cpu_s"] for x in runs[pol])
        rows.append({"policy": pol, "command_s": cmd, "loop_s": loop, "loop_cpu_s": cpu,
                     "command_x_real_time": duration / cmd, "loop_x_real_time": duration / loop,
                     "ms_per_request_cpu": 1e3 * cpu / n, "runs": runs[pol]})
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m analysis.sim_speed " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "trace": a.trace, "requests": n, "trace_duration_s": duration, "date": time.strftime("%Y-%m-%d %H:%M"),
            "cpus": os.cpu_count()}
    (a.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = [f"`{meta['command']}`", "", f"{Path(a.trace).name}: {n} requests over {duration:,.0f} s; medians of "
          f"{a.repeats} runs in rotated order.", "",
          "| policy | whole command (s) | × real time | loop (s) | loop × real time | loop CPU ms / request |",
          "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['policy']} | {r['command_s']:.2f} | {r['command_x_real_time']:,.0f}× | {r['loop_s']:.2f} | "
           f"{r['loop_x_real_time']:,.0f}× | {r['ms_per_request_cpu']:.3f} |" for r in rows]
    (a.out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
