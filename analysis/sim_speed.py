"""How fast the simulator replays a trace: the whole `sglang-ext sim replay` command (process start, imports, trace
import, simulation, writing results) against the trace's own duration, and the simulation loop alone, for every
shipped length policy.

    .venv/bin/python -m analysis.sim_speed --trace ../shared/data/traces/azure2023_code.csv --format azure \
        --profile traces/profiles/cpu-2core-smollm2-135m.json --out analysis/results/sim-speed-code

Each policy's command runs ``--repeats`` times in rotated order (the machine's speed drifts); the table gives the
median. ``--vs-checkout DIR`` runs the same commands from another checkout of the project too (e.g. a worktree of an
older commit), each right after this one's, and adds the per-pair ratio of whole-command times (median over the
pairs), with a check that both gave the same number of finished requests. Outputs ``results.json`` and
``results.md`` in ``--out``.
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


def run_once(trace: str, fmt: str, profile: str, policy: str, extra: list[str], checkout: Path | None = None) -> dict:
    """One ``sim replay`` as its own process; ``checkout``: run that checkout's code instead of this one's."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "sglang_ext", "sim", "replay", "--trace", str(Path(trace).resolve()), "--format",
               fmt, "--profile", str(Path(profile).resolve()), "--policy", policy, "--out", out, *extra]
        env = {**os.environ, "COLUMNS": "200"}
        if checkout is not None:
            env["PYTHONPATH"] = str(checkout.resolve())
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, cwd=checkout)
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
    p.add_argument("--vs-checkout", type=Path, default=None,
                   help="another checkout of the project (e.g. a git worktree of an older commit) to pair against")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.vs_checkout is not None and not (a.vs_checkout / "sglang_ext").is_dir():
        p.error(f"--vs-checkout {a.vs_checkout}: not a checkout of this project (no sglang_ext/ in it)")
    policies = [x.strip() for x in a.policies.split(",") if x.strip()]
    extra = shlex.split(a.extra)
    duration, n = trace_duration(a.trace, a.format)
    runs: dict[str, list[dict]] = {pol: [] for pol in policies}
    base: dict[str, list[dict]] = {pol: [] for pol in policies}
    for r in range(a.repeats):
        for pol in policies[r % len(policies):] + policies[: r % len(policies)]:
            order = (False, True) if r % 2 == 0 else (True, False)  # alternate which of a pair runs first
            for other in order if a.vs_checkout is not None else (False,):
                got = run_once(a.trace, a.format, a.profile, pol, extra, a.vs_checkout if other else None)
                (base if other else runs)[pol].append(got)
                print(f"round {r + 1} {pol}{' (vs)' if other else ''}: {got['command_s']:.2f} s", flush=True)
    rows = []
    for pol in policies:
        cmd = statistics.median(x["command_s"] for x in runs[pol])
        loop = statistics.median(x["loop_s"] for x in runs[pol])
        cpu = statistics.median(x["loop_cpu_s"] for x in runs[pol])
        row = {"policy": pol, "command_s": cmd, "loop_s": loop, "loop_cpu_s": cpu,
               "command_x_real_time": duration / cmd, "loop_x_real_time": duration / loop,
               "ms_per_request_cpu": 1e3 * cpu / n, "runs": runs[pol]}
        if a.vs_checkout is not None:
            row["vs_runs"] = base[pol]
            row["vs_command_s"] = statistics.median(x["command_s"] for x in base[pol])
            row["speedup_vs"] = statistics.median(b["command_s"] / x["command_s"] for x, b in zip(runs[pol], base[pol]))
            row["same_requests_vs"] = all(x["requests"] == b["requests"] for x, b in zip(runs[pol], base[pol]))
        rows.append(row)
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m analysis.sim_speed " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "trace": a.trace, "requests": n, "trace_duration_s": duration, "date": time.strftime("%Y-%m-%d %H:%M"),
            "cpus": os.cpu_count(), "vs_checkout": str(a.vs_checkout) if a.vs_checkout else None}
    (a.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = [f"`{meta['command']}`", "", f"{Path(a.trace).name}: {n} requests over {duration:,.0f} s; medians of "
          f"{a.repeats} runs in rotated order.", "",
          "| policy | whole command (s) | × real time | loop (s) | loop × real time | loop CPU ms / request |",
          "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['policy']} | {r['command_s']:.2f} | {r['command_x_real_time']:,.0f}× | {r['loop_s']:.2f} | "
           f"{r['loop_x_real_time']:,.0f}× | {r['ms_per_request_cpu']:.3f} |" for r in rows]
    if a.vs_checkout is not None:
        md += ["", f"Paired against `{a.vs_checkout}` (each pair back to back, alternating which runs first):", "",
               "| policy | that checkout (s) | this one (s) | speed-up (median of pairs) | same requests finished |",
               "|---|---:|---:|---:|---|"]
        md += [f"| {r['policy']} | {r['vs_command_s']:.2f} | {r['command_s']:.2f} | {r['speedup_vs']:.2f}× | "
               f"{'yes' if r['same_requests_vs'] else 'no'} |" for r in rows]
    (a.out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
