r"""Composition: per-request lengths from one policy, DSDE's batch cap, and an on/off switch from another.

DSDE's batch cap (its "SL_cap", code ``coordinate_batch_k``): the mean is the MSE-optimal consensus
:math:`\arg\min_c \frac1N \sum_r (c - \hat k_r)^2`, rounded up, and no request drafts more than it predicted:

.. math::  \mathrm{cap} = \Bigl\lceil \frac1N \sum_r \hat k_r \Bigr\rceil, \qquad k_r = \min(\hat k_r, \mathrm{cap})

Why cap at all: one request predicting a long draft makes the whole batch verify that many positions (ragged
kernels pad, chains keep drafting); the cap trims the outliers above the batch consensus (DSDE: batch-64 speedup
11.21× → 12.16× at T = 0 with the cap).

The on/off switch (TIDE's rule, :class:`~.tide.TideControlPolicy`) is asked about the depth the batch will
actually verify, ``γ = ⌈mean of the positive lengths⌉``, and turns the step into a plain decode when the
predicted speedup is ≤ 1.
"""

from __future__ import annotations

import math
from typing import Mapping

from ..signals import StepResult
from .base import BatchView, Decision, Policy


def apply_batch_cap(predictions: Mapping[str, int]) -> tuple[dict[str, int], int | None]:
    """``(capped lengths, cap)``: cap = ceil(mean of the predictions), each length min(own prediction, cap).

    An empty mapping gives ``({}, None)``. The cap is an int (DSDE rounds the mean up with ``math.ceil``).
    """
    if not predictions:
        return {}, None
    cap = math.ceil(sum(predictions.values()) / len(predictions) - 1e-12)  # tolerate float noise in an integer mean
    return {rid: min(int(k), cap) for rid, k in predictions.items()}, cap


def batch_length(decision: Decision, max_length: int) -> int:
    r"""One draft length for the whole batch, for hosts whose worker takes a single length per step (SGLang).

    A plain step gives 0. Otherwise the per-request lengths are reduced the way DSDE's batch cap does: the batch
    verifies :math:`\max_r \min(\hat k_r, \mathrm{cap})`, which equals the cap,
    :math:`\lceil \frac1N \sum_r \hat k_r \rceil` (the mean is the MSE-optimal consensus, rounded up). Lengths
    a policy has already capped (``info["sl_cap"]``) are not capped again, since a second cap could only lower the
    consensus below what the policy decided. The result is clipped to ``0..max_length``.
    """
    if not decision.speculate:
        return 0
    lengths = [max(int(k), 0) for k in decision.lengths.values()]
    if not lengths or max(lengths) == 0:
        return 0
    if "sl_cap" not in decision.info:
        capped, _ = apply_batch_cap(dict(enumerate(lengths)))
        lengths = list(capped.values())
    return min(max(lengths), int(max_length))


class ComposedPolicy(Policy):
    """``length_policy`` decides per-request lengths; ``cap`` applies the DSDE batch cap to them; ``onoff``
    (optional, usually tide-control) may veto speculation for the step.

    Give DSDE with ``cap=False`` here if ``cap=True`` (capping twice can lower the cap again). Persisted by
    :mod:`.config` as ``{"policy": "composed", "params": {"cap": ..., "length": {...}, "onoff": {...}}}``.
    """

    name = "composed"

    def __init__(self, length_policy: Policy, cap: bool = True, onoff: Policy | None = None) -> None:
        super().__init__()
        self.length_policy = length_policy
        self.cap = bool(cap)
        self.onoff = onoff

    @property
    def needs_kl(self) -> bool:  # type: ignore[override]
        return bool(self.length_policy.needs_kl or (self.onoff is not None and self.onoff.needs_kl))

    def admit(self, rid: str) -> None:
        self.length_policy.admit(rid)
        if self.onoff is not None:
            self.onoff.admit(rid)

    def release(self, rid: str) -> None:
        self.length_policy.release(rid)
        if self.onoff is not None:
            self.onoff.release(rid)

    def decide(self, batch: BatchView) -> Decision:
        d = self.length_policy.decide(batch)
        lengths = {rid: max(int(d.lengths.get(rid, 0)), 0) for rid in batch.rids}
        info = dict(d.info)
        if self.cap:
            lengths, info["sl_cap"] = apply_batch_cap(lengths)
        positive = [k for k in lengths.values() if k > 0]
        speculate = bool(positive) and d.speculate
        if speculate and self.onoff is not None:
            gamma = math.ceil(sum(positive) / len(positive))
            if hasattr(self.onoff, "should_speculate"):
                on = self.onoff.should_speculate(batch.batch_size, gamma)
            else:
                on = self.onoff.decide(batch).speculate
            info["onoff"] = on
            speculate = on
        if not speculate:
            lengths = {rid: 0 for rid in batch.rids}
        return Decision(speculate=speculate, lengths=lengths, tree_budget=d.tree_budget, drafter=d.drafter, info=info)

    def observe(self, result: StepResult) -> None:
        self.length_policy.observe(result)
        if self.onoff is not None:
            self.onoff.observe(result)

    def state_dict(self) -> dict:
        return {"length": self.length_policy.state_dict(),
                "onoff": self.onoff.state_dict() if self.onoff is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.length_policy.load_state_dict(state.get("length") or {})
        if self.onoff is not None and state.get("onoff") is not None:
            self.onoff.load_state_dict(state["onoff"])
