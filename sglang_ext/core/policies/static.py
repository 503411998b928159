"""The baseline every adaptive policy must beat: a fixed draft depth, and the offline oracle that picks it.

``oracle_static`` is DSDE's "Static-opt" baseline (best of {2, 4, 6, 8, 10} per dataset): evaluate every
candidate k on the workload (e.g. with the simulator) and keep the best. It is an upper bound for static
policies, not a deployable one (it needs the workload in advance).
"""

from __future__ import annotations

from typing import Callable, Iterable

from .base import BatchLengths, BatchView, Decision, Param, Policy


class StaticPolicy(Policy):
    """Draft ``k`` tokens for every request at every step (``k = 0``: never speculate)."""

    name = "static"
    params = (Param("k", 4, 0, 64, "int", doc="draft depth for every request (0: plain decoding)", depth=True),)

    def decide(self, batch: BatchView) -> Decision:
        k = self.config["k"]
        return Decision(speculate=k > 0, lengths=BatchLengths(batch.rids, uniform=k))


def oracle_static(evaluate: Callable[[int], float], ks: Iterable[int]) -> tuple[int, dict[int, float]]:
    """The fixed k with the highest throughput on a workload, and every candidate's score.

    ``evaluate(k)`` returns a throughput (higher is better, e.g. tokens/s of a simulated replay with
    ``StaticPolicy(k=k)``); it is called once per distinct k, in ascending order. Ties go to the smaller k
    (cheaper verification at equal speed). Returns ``(best_k, {k: throughput})``.
    """
    candidates = sorted({int(k) for k in ks})
    if not candidates:
        raise ValueError("oracle_static: no candidate k")
    table = {k: float(evaluate(k)) for k in candidates}
    best = max(candidates, key=lambda k: (table[k], -k))
    return best, table
