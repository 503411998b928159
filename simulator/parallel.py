"""One replay on several cores: the replicas split into groups, one process per group (``sim replay --workers N``).

With round-robin routing and no shared trainer, replicas never interact: request ``i`` goes to replica
``i mod R`` whatever the others do. So worker ``g`` of ``W`` simulates the replicas ``r ≡ g (mod W)`` on exactly the
requests routed to them (local round-robin over its ``R / W`` replicas reproduces the global routing), and the
per-request rows merge back into one result with their global request and replica numbers.

What differs from one process is only the random streams: each worker seeds its acceptance model with
``seed + g``, so a run with ``W`` workers is deterministic for its ``(seed, W)`` and statistically the same model,
but not draw-for-draw the one-process run. Routers that look at replica state (``least-loaded``, ``least-tokens``)
and a trainer shared by the replicas couple them, and are refused.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from sglang_ext.formats.results import REQUEST_COLUMNS, SimResult, summarize
from sglang_ext.formats.trace import Trace
from simulator.model import SimConfig, Simulation
from simulator.ranges import merge

_SHARED: dict[str, Any] = {}


def check_partitionable(config: SimConfig, workers: int) -> None:
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be >= 1")
    if workers == 1:
        return
    if config.router != "round-robin":
        raise ValueError(f"--workers {workers}: needs --router round-robin (router {config.router!r} couples the "
                         "replicas through their load)")
    if config.trainer != "none":
        raise ValueError(f"--workers {workers}: the trainer ({config.trainer!r}) is shared by the replicas")
    if config.replicas % workers:
        raise ValueError(f"--workers {workers}: --replicas {config.replicas} must be a multiple of it")


def _worker(g: int) -> tuple[SimResult, list[int]]:
    trace, cost, policy_factory, config, seed, acceptance_factory, workers = (
        _SHARED[k] for k in ("trace", "cost", "policy", "config", "seed", "acceptance", "workers"))
    R = config.replicas
    mine = [i for i in range(len(trace.requests)) if (i % R) % workers == g]
    local = SimConfig(**{**config.to_json(), "replicas": R // workers})
    sim = Simulation(Trace(tuple(trace.requests[i] for i in mine), trace.meta), cost,
                     lambda r: policy_factory(r * workers + g), local, seed + g, acceptance_factory())
    return sim.run(), mine


def simulate_partitioned(trace: Trace, cost_model: Any, policy_factory: Any, config: SimConfig, seed: int,
                         acceptance_factory: Any, workers: int) -> SimResult:
    """The replay of :func:`simulator.model.simulate` on ``workers`` processes (module docstring).

    ``policy_factory(replica)`` builds each replica's policy; ``acceptance_factory()`` a fresh acceptance model.
    """
    import multiprocessing as mp

    check_partitionable(config, workers)
    _SHARED.update(trace=trace, cost=cost_model, policy=policy_factory, config=config, seed=int(seed),
                   acceptance=acceptance_factory, workers=workers)
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(workers) as pool:  # fork: the trace and models are shared, not pickled
        parts = pool.map(_worker, range(workers))
    wall = time.perf_counter() - t0
    cols: dict[str, list] = {name: [] for name in REQUEST_COLUMNS}
    busy: dict[str, float] = {}
    rejected: list[dict] = []
    errors = [p.error for p, _ in parts if p.error]
    for g, (res, mine) in enumerate(parts):
        for name in REQUEST_COLUMNS:
            vals = res.requests[name].tolist()
            if name == "index":
                vals = [mine[i] for i in vals]
            elif name == "replica":
                vals = [r * workers + g for r in vals]
            cols[name].extend(vals)
        for k, v in res.summary["busy_s"].items():
            busy[k] = busy.get(k, 0.0) + v
        rejected += [{**r, "index": mine[r["index"]]} for r in res.rejected]
    order = np.argsort(np.asarray(cols["index"]), kind="stable")
    arrays = {name: np.asarray(v, dtype=float if name in ("arrival", "first_token", "finish") else np.int64)[order]
              for name, v in cols.items()}
    s0 = parts[0][0].summary
    summary = summarize(arrays, busy, iterations=sum(p.summary["iterations"] for p, _ in parts),
                        slo_ttft_s=s0["slo_ttft_s"], slo_tpot_s=s0["slo_tpot_s"],
                        unfinished=sum(p.summary["unfinished"] for p, _ in parts), rejected=len(rejected),
                        beyond_profile=merge([p.summary["beyond_profile"] for p, _ in parts]))
    events = sum(p.perf.get("events", 0) for p, _ in parts)
    sim_s = max(p.perf.get("sim_s", 0.0) for p, _ in parts)
    perf = {"wall_s": wall, "cpu_s": sum(p.perf.get("cpu_s", 0.0) for p, _ in parts), "events": events,
            "sim_s": sim_s, "workers": workers, "events_per_s": events / wall if wall > 0 else 0.0,
            "realtime_factor": sim_s / wall if wall > 0 else 0.0}
    config_json = {**parts[0][0].config, "workers": workers, "engine": config.to_json()}
    return SimResult(summary, arrays, perf, config_json, complete=not errors, error="; ".join(errors) or None,
                     rejected=sorted(rejected, key=lambda r: r["index"]))
