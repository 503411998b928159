r"""Searching policy parameters with the simulator: a grid sweep, and an optimiser that writes a policy config.

**Sweep** (:func:`sweep`): the Cartesian product of a grid over policy parameters, engine settings
(:class:`~simulator.model.SimConfig` fields such as ``max_batch_size``), the load (``time_scale``: arrivals
multiplied by it, so 0.5 is twice the rate) and ``seed``; one simulation per point, in parallel over processes.

**Tune** (:func:`tune`): maximise an objective over a policy's tunables — the registry's
:func:`~sglang_ext.core.policies.tunables` with their declared bounds — by
``scipy.optimize.differential_evolution`` (seeded; ``int`` parameters rounded through ``integrality``, ``choice``
parameters searched as an integer index). Every candidate is replayed with the same simulation seed (common
random numbers: the same per-request α and the same uniforms), so differences between candidates are the
policy's, not noise. Objectives (all maximised):

- ``goodput``: requests meeting both SLOs per second (TTFT ≤ ``slo_ttft_s`` and TPOT ≤ ``slo_tpot_s``);
- ``throughput``: output tokens per second;
- ``throughput-p90-tpot``: output tokens/s if the p90 TPOT meets ``slo_tpot_s``, else scaled down by
  ``(slo / p90)²`` (a continuous penalty the optimiser can climb);
- ``latency``: minus the mean end-to-end latency.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from simulator.acceptance import AcceptanceModel, acceptance_from_json
from simulator.model import SimConfig, simulate
from sglang_ext.formats.trace import Trace

OBJECTIVES: dict[str, Callable[[dict], float]] = {}


def _objective(name: str):
    def deco(fn):
        OBJECTIVES[name] = fn
        return fn
    return deco


@_objective("goodput")
def _goodput(s: dict) -> float:
    return float(s["goodput_req_s"])


@_objective("throughput")
def _throughput(s: dict) -> float:
    return float(s["throughput_tok_s"])


@_objective("throughput-p90-tpot")
def _throughput_p90(s: dict) -> float:
    p90, slo = s["tpot_s"]["p90"], s["slo_tpot_s"]
    thr = float(s["throughput_tok_s"])
    if p90 is None or not math.isfinite(p90):
        return 0.0
    return thr if p90 <= slo else thr * (slo / p90) ** 2


@_objective("latency")
def _latency(s: dict) -> float:
    m = s["e2e_s"]["mean"]
    return -float(m) if m is not None and math.isfinite(m) else -math.inf


def score(summary: dict, objective: str) -> float:
    try:
        fn = OBJECTIVES[objective]
    except KeyError:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}") from None
    return fn(summary)


# ---- building a policy for a run -------------------------------------------------------------------------------
def build_policy(name: str, params: dict[str, Any] | None = None, cost_model: Any = None,
                 config_path: str | Path | None = None, give_costs: bool = True) -> Any:
    """A core policy by registry name (or from a config file), with the cost model passed to the policies that
    take one (``extra_args``; tide-control, goodput) when ``give_costs`` — the profile a host would load.

    ``params`` override the file's parameters. A policy without ``decide`` (a drafter-update policy) is refused.
    """
    from sglang_ext.core.policies import make_policy, policy_class
    from sglang_ext.core.policies.config import (
        load_policy_config,
        policy_from_dict,
        policy_to_dict,
    )

    extra = {"cost_model": cost_model} if give_costs and cost_model is not None else {}
    if config_path is not None:
        policy = load_policy_config(config_path, **extra)
        if params:
            d = policy_to_dict(policy, include_state=True)
            if d["policy"] == "composed":
                raise ValueError("--policy-param cannot override a composed policy's nested parameters")
            d["params"] = {**d["params"], **params}
            policy = policy_from_dict(d, str(config_path), **extra)
    else:
        cls = policy_class(name)
        kw = {k: v for k, v in extra.items() if k in getattr(cls, "extra_args", ())}
        policy = make_policy(name, **(params or {}), **kw)
    if getattr(policy, "role", "length") != "length" or not callable(getattr(policy, "decide", None)):
        raise ValueError(f"policy {getattr(policy, 'name', name)!r} does not decide draft lengths "
                         "(role != 'length'); the simulator drives length policies")
    return policy


def coerce_params(name: str, raw: dict[str, str]) -> dict[str, Any]:
    """``k=v`` strings from the command line → typed values by the policy's declared :class:`Param`."""
    import json

    from sglang_ext.core.policies import policy_class

    declared = {p.name: p for p in policy_class(name).params}
    out: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in declared:
            raise ValueError(f"policy {name!r} has no parameter {key!r}; known: {sorted(declared)}")
        p = declared[key]
        value: Any = text
        if p.kind == "json" or p.kind == "choice":
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
            if p.kind == "choice" and value not in p.choices and text in [str(c) for c in p.choices]:
                value = next(c for c in p.choices if str(c) == text)
        elif text.lower() in ("none", "null"):
            value = None
        out[key] = p.check(value, name)
    return out


# ---- one point (also the worker function of the process pool) -------------------------------------------------
_SHARED: dict[str, Any] = {}


def _init_worker(trace: Trace, cost_model: Any, acceptance: dict | None) -> None:
    _SHARED.update(trace=trace, cost_model=cost_model, acceptance=acceptance)


def _acceptance(obj: dict | None) -> AcceptanceModel | None:
    return acceptance_from_json(obj) if obj is not None else None


def run_point(point: dict[str, Any], trace: Trace | None = None, cost_model: Any = None,
              acceptance: dict | None = None) -> dict[str, Any]:
    """Simulate one point ``{"policy", "params", "config", "time_scale", "seed", "give_costs"}``; returns
    ``{"summary", "perf"}``. Trace, cost model and acceptance come from the arguments or the worker globals."""
    trace = trace if trace is not None else _SHARED["trace"]
    cost_model = cost_model if cost_model is not None else _SHARED["cost_model"]
    acc = acceptance if acceptance is not None else _SHARED.get("acceptance")
    scale = float(point.get("time_scale", 1.0))
    tr = trace if scale == 1.0 else trace.scaled(scale)
    policy = build_policy(point["policy"], point.get("params"), cost_model,
                          give_costs=point.get("give_costs", True))
    cfg = SimConfig(**point.get("config", {}))
    res = simulate(tr, cost_model, policy, cfg, seed=int(point.get("seed", 0)), acceptance=_acceptance(acc))
    return {"summary": res.summary, "perf": res.perf}


def _pool(jobs: int, trace: Trace, cost_model: Any, acceptance: dict | None):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("fork") if sys.platform.startswith("linux") else None  # fork: no re-import of torch
    return ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                               initargs=(trace, cost_model, acceptance))


def default_jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


# ---- sweep ------------------------------------------------------------------------------------------------------
_CONFIG_KEYS = {f.name for f in fields(SimConfig)}


def grid_points(policy: str, grid: dict[str, Sequence[Any]], base_params: dict[str, Any] | None = None,
                base_config: SimConfig | None = None, seed: int = 0, give_costs: bool = True) -> list[dict[str, Any]]:
    """The sweep's points: every combination of the grid's values, each split into policy params, engine config,
    ``time_scale`` and ``seed`` (a key that is none of those is a policy parameter)."""
    base_config = base_config or SimConfig()
    keys = list(grid)
    points = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        params = dict(base_params or {})
        cfg = base_config.to_json()
        point = {"policy": policy, "time_scale": 1.0, "seed": seed, "give_costs": give_costs, "grid": values}
        for k, v in values.items():
            if k in _CONFIG_KEYS:
                cfg[k] = v
            elif k in ("time_scale", "seed"):
                point[k] = v
            else:
                params[k] = v
        SimConfig(**cfg)  # validate early, in this process
        point.update(params=params, config=cfg)
        points.append(point)
    return points


@dataclass
class SweepRow:
    grid: dict[str, Any]
    summary: dict[str, Any]
    perf: dict[str, Any]

    def flat(self) -> dict[str, Any]:
        s = self.summary
        row = dict(self.grid)
        for k in ("throughput_tok_s", "goodput_req_s", "slo_attainment", "mean_acceptance_length", "requests",
                  "unfinished", "preemptions", "iterations", "makespan_s"):
            row[k] = s[k]
        for m in ("ttft_s", "tpot_s", "e2e_s"):
            for p in ("p50", "p90", "p99", "mean"):
                row[f"{m[:-2]}_{p}_s"] = s[m][p]
        row["sim_wall_s"] = self.perf.get("wall_s")
        return row


def sweep(trace: Trace, cost_model: Any, policy: str, grid: dict[str, Sequence[Any]], *,
          base_params: dict[str, Any] | None = None, config: SimConfig | None = None,
          acceptance: AcceptanceModel | None = None, seed: int = 0, jobs: int = 1, give_costs: bool = True,
          progress: bool = False, ray_address: str | None = None) -> list[SweepRow]:
    """Simulate every grid point (``jobs`` > 1: a process pool; ``ray_address``: a Ray cluster,
    :mod:`simulator.distributed`); rows come back in grid order, identical whichever runs them."""
    points = grid_points(policy, grid, base_params, config or SimConfig(), seed, give_costs)
    acc = acceptance.to_json() if acceptance is not None else None
    results: list[dict | None] = [None] * len(points)
    with _progress(progress, len(points), f"sweep {policy}") as advance:
        if ray_address:
            from simulator.distributed import RayPool

            for i, r in RayPool(ray_address, trace, cost_model, acc).as_completed(points):
                results[i] = r
                advance()
        elif jobs <= 1 or len(points) == 1:
            for i, p in enumerate(points):
                results[i] = run_point(p, trace, cost_model, acc)
                advance()
        else:
            from concurrent.futures import as_completed

            with _pool(min(jobs, len(points)), trace, cost_model, acc) as ex:
                futs = {ex.submit(run_point, p): i for i, p in enumerate(points)}
                for f in as_completed(futs):
                    results[futs[f]] = f.result()
                    advance()
    return [SweepRow(p["grid"], r["summary"], r["perf"]) for p, r in zip(points, results)]  # type: ignore[index]


def write_sweep(rows: list[SweepRow], out_dir: str | Path) -> tuple[Path, Path]:
    """``sweep.csv`` (one flat row per point) and ``sweep.json`` (full summaries)."""
    import csv
    import json

    from sglang_ext.formats.results import _finite

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = [r.flat() for r in rows]
    names = list(dict.fromkeys(k for row in flat for k in row))
    csv_path = out / "sweep.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        w.writerows(flat)
    json_path = out / "sweep.json"
    json_path.write_text(json.dumps(_finite({"kind": "sglang-ext.sim-sweep", "rows": [
        {"grid": r.grid, "summary": r.summary, "perf": r.perf} for r in rows]}), indent=1) + "\n", encoding="utf-8")
    return csv_path, json_path


class _progress:
    """A rich progress bar (or nothing), used as ``with _progress(on, total, label) as advance: advance()``."""

    def __init__(self, on: bool, total: int, label: str) -> None:
        self.on, self.total, self.label = on, total, label
        self.bar = None

    def __enter__(self) -> Callable[[], None]:
        if not self.on:
            return lambda: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), transient=False)
        self.bar.__enter__()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda: self.bar.advance(task)  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


# ---- tune ---------------------------------------------------------------------------------------------------------
@dataclass
class Dim:
    """One searched parameter: bounds in search space and how to map a search value back to the parameter."""

    name: str
    low: float
    high: float
    kind: str  # "int", "float", "choice"
    choices: tuple = ()

    def value(self, x: float) -> Any:
        if self.kind == "int":
            return round(min(max(x, self.low), self.high))
        if self.kind == "choice":
            return self.choices[round(min(max(x, self.low), self.high))]
        return float(min(max(x, self.low), self.high))


def search_space(policy: str, names: Sequence[str] | None = None, fixed: dict[str, Any] | None = None,
                 max_depth: int | None = None) -> list[Dim]:
    """The dimensions to search: the registry's tunables of ``policy`` (or just ``names``), minus ``fixed`` ones and
    RNG seeds; numeric parameters need both bounds. ``max_depth`` (the deployment's ``--speculative-num-steps``)
    caps every depth parameter: a length the server can never draft is not worth searching."""
    from sglang_ext.core.policies import tunables

    params = {p.name: p for p in tunables(policy)}
    if names:
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ValueError(f"policy {policy!r}: {unknown} are not tunable; tunable: {sorted(params)}")
        chosen = [params[n] for n in names]
    else:
        chosen = [p for p in params.values() if p.name != "seed" and p.name not in (fixed or {})]
    dims = []
    for p in chosen:
        if p.kind == "choice":
            if len(p.choices) > 1:
                dims.append(Dim(p.name, 0, len(p.choices) - 1, "choice", tuple(p.choices)))
        elif p.low is not None and p.high is not None and p.high > p.low:
            high = min(p.high, max_depth) if (p.depth and max_depth is not None) else p.high
            if high > p.low:
                dims.append(Dim(p.name, float(p.low), float(high), p.kind))
        elif names:
            raise ValueError(f"policy {policy!r}: parameter {p.name!r} has no bounds to search")
    if not dims:
        raise ValueError(f"policy {policy!r}: nothing to tune")
    return dims


def ordered(params: dict[str, Any], policy: str) -> dict[str, Any]:
    """``params`` with the policy's ordered depth groups made consistent (DSDE: ``init_k`` clamped to ``max_k``, then
    ``min_k`` to ``init_k``): the values the policy would use anyway, so a tuned config never holds a contradiction."""
    from sglang_ext.core.policies import policy_class

    out = dict(params)
    for group in policy_class(policy).ordered_params:
        ceiling = None
        for name in reversed(group):
            v = out.get(name)
            if v is None:
                continue
            if ceiling is not None and v > ceiling:
                out[name] = v = ceiling
            ceiling = v
    return out


def check_depths(policy: str, params: dict[str, Any], max_depth: int, source: str) -> None:
    """A depth parameter beyond the deployment's ``--speculative-num-steps`` is a contradiction, named."""
    from sglang_ext.core.policies import policy_class

    for p in policy_class(policy).params:
        v = params.get(p.name)
        if p.depth and v is not None and v > max_depth:
            raise ValueError(f"{source}: {p.name}={v} exceeds --speculative-num-steps {max_depth}")


@dataclass
class TuneResult:
    policy: str
    objective: str
    best_params: dict[str, Any]
    best_score: float
    best_summary: dict[str, Any]
    evaluations: int
    history: list[dict[str, Any]] = field(default_factory=list)
    default_score: float | None = None
    deploy: dict[str, int] = field(default_factory=dict)  # the serving flags it was tuned for

    def meta(self) -> dict[str, Any]:
        from sglang_ext.formats.results import _finite

        return _finite({"tuner": "simulator.tune (scipy differential_evolution)", "objective": self.objective,
                "score": self.best_score, "default_score": self.default_score, "evaluations": self.evaluations,
                "throughput_tok_s": self.best_summary.get("throughput_tok_s"),
                "goodput_req_s": self.best_summary.get("goodput_req_s"),
                "tpot_p90_s": self.best_summary.get("tpot_s", {}).get("p90"), "deploy": self.deploy})


class _Evaluator:
    """The objective as a function of the search vector, memoised on the rounded parameters (DE revisits
    integer points often)."""

    def __init__(self, policy: str, dims: list[Dim], fixed: dict[str, Any], point: dict[str, Any], objective: str,
                 trace: Trace, cost_model: Any, acceptance: dict | None, pool: Any = None) -> None:
        self.policy, self.dims, self.fixed, self.point, self.objective = policy, dims, fixed, point, objective
        self.trace, self.cost_model, self.acceptance, self.pool = trace, cost_model, acceptance, pool
        self.cache: dict[tuple, tuple[float, dict]] = {}
        self.history: list[dict[str, Any]] = []

    def params(self, x: Sequence[float]) -> dict[str, Any]:
        return ordered({**self.fixed, **{d.name: d.value(v) for d, v in zip(self.dims, x)}}, self.policy)

    def _key(self, params: dict[str, Any]) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in params.items()))

    def evaluate_many(self, xs: Sequence[Sequence[float]]) -> list[float]:
        todo: dict[tuple, dict[str, Any]] = {}
        keys = []
        for x in xs:
            p = self.params(x)
            k = self._key(p)
            keys.append(k)
            if k not in self.cache and k not in todo:
                todo[k] = p
        points = [{**self.point, "params": p} for p in todo.values()]
        if self.pool is not None and len(points) > 1:
            outs = list(self.pool.map(run_point, points))
        else:
            outs = [run_point(pt, self.trace, self.cost_model, self.acceptance) for pt in points]
        for (k, p), out in zip(todo.items(), outs):
            s = score(out["summary"], self.objective)
            self.cache[k] = (s, out["summary"])
            self.history.append({"params": p, "score": s})
        return [-self.cache[k][0] for k in keys]  # scipy minimises

    def __call__(self, x: np.ndarray) -> float:
        return self.evaluate_many([x])[0]


def tune(trace: Trace, cost_model: Any, policy: str, *, objective: str = "goodput",
         params: Sequence[str] | None = None, fixed: dict[str, Any] | None = None, config: SimConfig | None = None,
         acceptance: AcceptanceModel | None = None, seed: int = 0, maxiter: int = 10, popsize: int = 8,
         jobs: int = 1, give_costs: bool = True, progress: bool = False,
         deploy: dict[str, int] | None = None, ray_address: str | None = None) -> TuneResult:
    """Maximise ``objective`` over the policy's tunables by differential evolution (module docstring).

    ``deploy``: the serving flags the result will run under (``speculative_num_steps``, ``speculative_eagle_topk``,
    ``max_running_requests``): depth parameters are searched only up to the number of steps, fixed depths beyond it
    are refused, and the written config records them so a launch with other flags is refused.
    """
    from scipy.optimize import differential_evolution

    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    fixed = dict(fixed or {})
    config = config or SimConfig()
    deploy = {k: v for k, v in (deploy or {}).items() if v is not None}
    max_depth = deploy.get("speculative_num_steps")
    if max_depth is not None:
        check_depths(policy, fixed, max_depth, "--policy-param")
    dims = search_space(policy, params, fixed, max_depth)
    acc = acceptance.to_json() if acceptance is not None else None
    point = {"policy": policy, "config": config.to_json(), "time_scale": 1.0, "seed": seed, "give_costs": give_costs}
    if ray_address:
        from simulator.distributed import RayPool

        pool = RayPool(ray_address, trace, cost_model, acc)
    else:
        pool = _pool(jobs, trace, cost_model, acc) if jobs > 1 else None
    try:
        ev = _Evaluator(policy, dims, fixed, point, objective, trace, cost_model, acc, pool)
        default = ev.evaluate_many([[_default_x(policy, d) for d in dims]])[0]
        bounds = [(d.low, d.high) for d in dims]
        integrality = [d.kind in ("int", "choice") for d in dims]
        with _progress(progress, maxiter + 1, f"tune {policy} (generations)") as advance:
            def vectorised(xs: np.ndarray) -> np.ndarray:  # (D, S) -> (S,): one call per generation
                out = ev.evaluate_many(list(xs.T))
                advance()
                return np.asarray(out)

            differential_evolution(vectorised, bounds, integrality=integrality, seed=seed, maxiter=maxiter,
                                         popsize=popsize, polish=False, vectorized=True, updating="deferred",
                                         init="sobol" if len(dims) > 1 else "latinhypercube", tol=1e-6)
        best_key = min(ev.cache, key=lambda k: -ev.cache[k][0])
        best_s, best_summary = ev.cache[best_key]
        best = next(h["params"] for h in ev.history if ev._key(h["params"]) == best_key)
    finally:
        if pool is not None:
            pool.shutdown()
    return TuneResult(policy, objective, best, best_s, best_summary, len(ev.cache), ev.history, -default, deploy)


def _default_x(policy: str, d: Dim) -> float:
    from sglang_ext.core.policies import policy_class

    p = next(p for p in policy_class(policy).params if p.name == d.name)
    if p.default is None:
        return (d.low + d.high) / 2
    if d.kind == "choice":
        return float(d.choices.index(p.default))
    return float(p.default)


def save_tuned(result: TuneResult, path: str | Path, cost_model: Any = None) -> Path:
    """Write the best parameters as a policy config (:func:`save_policy_config`; no learned state), which
    ``--speculative-policy-config`` and ``sim replay --policy-config`` load."""
    from sglang_ext.core.policies.config import save_policy_config

    policy = build_policy(result.policy, result.best_params, cost_model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_policy_config(path, policy, include_state=False, meta=result.meta())
    return path


def with_config(config: SimConfig, **changes: Any) -> SimConfig:
    return replace(config, **changes)
