r"""Judging the simulator on repeated engine runs: medians, spreads and rankings (``sim validate --repeats N``).

One engine run on a shared VM is a noisy sample: the same forward runs 0.8–1.6× its profiled time from one
5-second window to the next, so a single run can miss a ±5 % target through the machine alone. With ``N`` repeats
of every (load, configuration) row, run in rotated order so no configuration always runs first or last, the
simulator is judged against the **median** of the engine's repeats, and the spread those repeats show is reported
next to the error it is judged by:

.. math::

    \text{error} = \frac{\operatorname{median}_r \hat y_r - \operatorname{median}_r y_r}{\operatorname{median}_r y_r},
    \qquad
    \text{spread} = \frac{\max_r y_r - \min_r y_r}{\operatorname{median}_r y_r}

where :math:`y_r` is the engine's measurement of repeat ``r`` and :math:`\hat y_r` the simulator's prediction of
that same run (replaying its recorded acceptance).

**Ranking** is what tuning needs: the simulator must order configurations as the engine does. Per load and per
metric (throughput, higher is better; p90 E2E, lower is better) we report Kendall's :math:`\tau_b` between the
engine's and the simulator's medians over the configurations,

.. math::

    \tau_b = \frac{n_c - n_d}{\sqrt{(n_0 - n_1)(n_0 - n_2)}},

(:func:`scipy.stats.kendalltau`; :math:`n_c, n_d` concordant and discordant pairs, :math:`n_1, n_2` tied pairs in
each ranking). Two configurations whose engine repeats overlap are not ordered by the engine itself — at light load
every configuration's throughput is the arrival rate — so the **resolved pairs** are reported too: pairs whose
engine repeats do not overlap (every repeat of one beats every repeat of the other), and the share of them the
simulator orders the same way. A τ over unresolved pairs measures the machine's noise, not the simulator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np

#: metrics ranked, and whether higher is better
RANKED: tuple[tuple[str, bool], ...] = (("throughput", True), ("e2e_p90", False))
#: the ranking target: Kendall τ_b at least this per load and metric
TAU_TARGET = 0.8


def _finite(values: Sequence[float]) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    return a[np.isfinite(a)]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and relative spread ``(max − min) / median`` of one metric's repeats."""
    a = _finite(values)
    if a.size == 0:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "rel_spread": math.nan, "n": 0}
    med = float(np.median(a))
    return {"median": med, "min": float(a.min()), "max": float(a.max()),
            "rel_spread": float((a.max() - a.min()) / med) if med else math.nan, "n": int(a.size)}


def aggregate(rows: Sequence[dict], metrics: Sequence[tuple[str, Any, bool]],
              tolerances: dict[str, float]) -> list[dict]:
    """One entry per (load, configuration), in first-seen order: per metric the engine's and the simulator's
    repeats, their medians and spreads, the error of the medians and (judged metrics) whether it is within its
    tolerance. A row that did not complete fails its entry."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["load"], row["config"]), []).append(row)
    out = []
    for (load, config), reps in groups.items():
        entry: dict[str, Any] = {"load": load, "config": config, "repeats": len(reps),
                                 "complete": all(r.get("complete", True) for r in reps), "metrics": {}}
        for name, _path, judged in metrics:
            real = [r["errors"][name]["real"] for r in reps]
            sim = [r["errors"][name]["sim"] for r in reps]
            rs, ss = spread(real), spread(sim)
            err = (ss["median"] - rs["median"]) / rs["median"] \
                if math.isfinite(rs["median"]) and math.isfinite(ss["median"]) and rs["median"] else math.nan
            tol = tolerances.get(name) if judged else None
            entry["metrics"][name] = {
                "real": real, "sim": sim, "real_spread": rs, "sim_spread": ss, "rel_error": err, "tolerance": tol,
                "pass": (bool(abs(err) <= tol) if math.isfinite(err) else False) if tol is not None else None}
        entry["pass"] = entry["complete"] and all(m["pass"] for m in entry["metrics"].values() if m["pass"] is not None)
        out.append(entry)
    return out


def _beats(a: Sequence[float], b: Sequence[float], higher_better: bool) -> bool:
    """Every repeat of ``a`` is better than every repeat of ``b``."""
    a, b = _finite(a), _finite(b)
    if a.size == 0 or b.size == 0:
        return False
    return bool(a.min() > b.max()) if higher_better else bool(a.max() < b.min())


def rank_agreement(entries: Sequence[dict], metric: str, higher_better: bool) -> dict[str, Any]:
    """Kendall τ_b between the engine's and the simulator's medians of ``metric`` over ``entries`` (one load), and
    the resolved pairs (engine repeats that do not overlap) the simulator orders the same way."""
    from scipy.stats import kendalltau

    names = [e["config"] for e in entries]
    real = np.array([e["metrics"][metric]["real_spread"]["median"] for e in entries])
    sim = np.array([e["metrics"][metric]["sim_spread"]["median"] for e in entries])
    ok = np.isfinite(real) & np.isfinite(sim)
    tau = math.nan
    if ok.sum() >= 2:
        t = kendalltau(real[ok], sim[ok]).statistic
        tau = float(t) if t is not None and math.isfinite(t) else math.nan
    sign = 1.0 if higher_better else -1.0
    resolved, agreed, disagreements = 0, 0, []
    for i, j in combinations(range(len(entries)), 2):
        mi, mj = entries[i]["metrics"][metric], entries[j]["metrics"][metric]
        if _beats(mi["real"], mj["real"], higher_better):
            better, worse = i, j
        elif _beats(mj["real"], mi["real"], higher_better):
            better, worse = j, i
        else:
            continue
        resolved += 1
        if sign * (sim[better] - sim[worse]) > 0:
            agreed += 1
        else:
            disagreements.append(f"{names[better]} > {names[worse]}")

    def order(values: np.ndarray) -> list[str]:
        idx = sorted(range(len(names)), key=lambda k: (-sign * values[k]) if math.isfinite(values[k]) else math.inf)
        return [names[k] for k in idx]

    return {"metric": metric, "higher_is_better": higher_better, "configs": len(names), "tau": tau,
            "pass": bool(math.isfinite(tau) and tau >= TAU_TARGET), "engine_order": order(real),
            "sim_order": order(sim), "resolved_pairs": resolved, "pairs": len(names) * (len(names) - 1) // 2,
            "resolved_agreed": agreed, "resolved_disagreements": disagreements}


def rankings(entries: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """:func:`rank_agreement` per load (in first-seen order) and per :data:`RANKED` metric; loads with fewer than
    three configurations are not ranked (two points always correlate ±1)."""
    by_load: dict[str, list[dict]] = {}
    for e in entries:
        by_load.setdefault(e["load"], []).append(e)
    return {load: {m: rank_agreement(es, m, hb) for m, hb in RANKED}
            for load, es in by_load.items() if len(es) >= 3}


def rotated(plan: Sequence[Any], repeat: int, repeats: int) -> list[Any]:
    """The ``repeat``-th of ``repeats`` rotations of ``plan``: each starts ``len(plan) / repeats`` rows further on,
    so over the repeats every row runs early, in the middle and late."""
    n = len(plan)
    if n == 0 or repeats <= 1:
        return list(plan)
    offset = (repeat * n) // repeats
    return list(plan[offset:]) + list(plan[:offset])


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%" if math.isfinite(x) else "-"


def print_medians(entries: Sequence[dict], console: Any, title: str) -> None:
    """The judged metrics on the medians, each with the engine's spread over its repeats."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("load", "config", "n", "tok/s real (median)", "throughput", "E2E p50", "E2E p90",
                "engine spread thr/p50/p90", "verdict"):
        t.add_column(col, justify="left" if col in ("load", "config", "verdict") else "right")
    for e in entries:
        m = e["metrics"]

        def cell(name: str) -> str:
            txt = _pct(m[name]["rel_error"])
            return f"[green]{txt}[/green]" if m[name]["pass"] else f"[red]{txt}[/red]"

        spreads = "/".join(f"{100 * m[k]['real_spread']['rel_spread']:.0f}" if
                           math.isfinite(m[k]["real_spread"]["rel_spread"]) else "-"
                           for k in ("throughput", "e2e_p50", "e2e_p90")) + "%"
        t.add_row(e["load"], e["config"], str(e["repeats"]), f"{m['throughput']['real_spread']['median']:.1f}",
                  cell("throughput"), cell("e2e_p50"), cell("e2e_p90"), spreads,
                  "[green]pass[/green]" if e["pass"] else "[red]FAIL[/red]")
    console.print(t)


def print_rankings(ranks: dict[str, dict[str, dict]], console: Any, title: str) -> None:
    """Per load and metric: τ_b, both orders, and the resolved pairs the simulator gets right."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("load", "metric", "Kendall τ", "engine order (best first)", "simulator order", "resolved pairs agreed"):
        t.add_column(col, justify="right" if col in ("Kendall τ", "resolved pairs agreed") else "left")
    for load, per in ranks.items():
        for metric, r in per.items():
            tau = f"{r['tau']:+.2f}" if math.isfinite(r["tau"]) else "-"
            t.add_row(load, metric, f"[green]{tau}[/green]" if r["pass"] else f"[red]{tau}[/red]",
                      " > ".join(r["engine_order"]), " > ".join(r["sim_order"]),
                      f"{r['resolved_agreed']}/{r['resolved_pairs']} (of {r['pairs']})")
    console.print(t)
