r"""SmartSpec / TurboSpec-style goodput maximisation (arXiv 2406.14066; algorithms.md §6.7).

Goodput is the expected number of committed tokens per second of batch time. With per-request acceptance
α_r (estimated online), a depth ``k`` for the whole batch of ``b`` requests, and a linear cost model:

.. math::

    G(k) = \frac{\sum_r E_r[\ell](k)}{D(b, k) + V(b, k + 1)}, \qquad
    E_r[\ell](k) = \sum_{i=0}^{k} \alpha_r^i = \frac{1 - \alpha_r^{k+1}}{1 - \alpha_r}, \qquad D(b, 0) = 0

    k^\* = \arg\max_{k \in [\text{min\_k}, \text{max\_k}]} G(k)   \quad(\text{ties: the smaller } k)

``k = 0`` is a plain decode step (one token per request, ``V(b, 1)``), so the policy turns speculation off by
itself when no depth pays for its verification.

**Costs**: a duck-typed ``cost_model`` (``verify_seconds(b, tokens_per_request, context_len)``,
``draft_seconds(b, depth)``), two callables as for tide-control, or — with neither — an online linear fit
:math:`V = v_0 + v_1 \cdot b t`, :math:`D = d\,(d_0 + d_1 b)` by discounted least squares
(:class:`~._estimators.OnlineLinearCost`). Until that fit is identifiable (two distinct batched-token counts
and one draft measured) the policy cycles through the probe depths ``max_k, 0, max_k // 2``.

**α_r**: the chain MLE per request (discounted ratio of sums); a request with no speculative step yet uses the
batch-wide estimate, or ``alpha_prior`` before any. Exploration: with probability ``explore`` a uniformly random
depth (seeded), so that α and the costs of depths the argmax avoids stay measured.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from ..signals import StepResult, expected_tokens
from ._estimators import (
    OnlineLinearCost,
    RequestAlphas,
    depth_seconds,
    kernels,
    resolve_costs,
    rng_state,
    set_rng_state,
)
from .base import BatchLengths, BatchView, Decision, Param, Policy


def batch_goodput(costs: Any, alphas: Sequence[float], lengths: Sequence[int], context_len: int = 0) -> float | None:
    r"""Expected committed tokens per second of one step with per-request chain depths ``lengths``.

    .. math::  G = \frac{\sum_r E_{\alpha_r}[\ell](k_r)}{D(b, \max_r k_r) + V(b, \max_r k_r + 1)}

    The batch is padded to its longest chain (the reference engine's one target forward, and SGLang's), and the
    drafter runs ``max_r k_r`` depth steps for all ``b`` rows, so both costs follow the deepest request. None while
    a cost is unknown (a learned model before it is identifiable).
    """
    b = len(alphas)
    if b == 0:
        return None
    depth = max(lengths)
    v = costs.verify_seconds(b, depth + 1, context_len)
    d = costs.draft_seconds(b, depth) if depth > 0 else 0.0
    if v is None or d is None or v + d <= 0:
        return None
    return sum(expected_tokens(a, k) for a, k in zip(alphas, lengths)) / (v + d)


_NO_LENGTHS = np.zeros(0, dtype=np.int64)


def capped_expected_totals(alphas: Sequence[float] | np.ndarray, lengths: Sequence[int] | np.ndarray | None,
                           top: int) -> list[float]:
    r"""``E_total(c)`` for every cap ``c = 0..top`` at once, as array operations over the batch.

    .. math::  E_{\rm total}(c) = \sum_r E_{\alpha_r}[\ell](\min(k_r, c)) = \sum_r \sum_{i=0}^{\min(k_r, c)} \alpha_r^i

    ``lengths`` None means no per-request limit (every ``k_r = top``: the uncapped ``Σ_r E_{α_r}[ℓ](c)``).
    Why: ``O(b · top)`` work in one compiled pass (:func:`._kernels.capped_totals`) instead of ``b`` geometric sums
    per candidate ``c``, and the *same floats* as :func:`~sglang_ext.core.signals.expected_tokens` summed over the
    batch in order: the powers are a running product (``1, α, α·α, …``), the partial sums a running sum, a capped
    request stops adding past ``k_r``, and the totals add the requests in batch order (``tests/test_policies.py``
    checks the bits against the scalar loop).
    """
    a = np.asarray(alphas, dtype=np.float64)
    if len(a) == 0:
        return [0.0] * (top + 1)
    k = _NO_LENGTHS if lengths is None else np.asarray(lengths, dtype=np.int64)
    return kernels().capped_totals(a, k, int(top)).tolist()


def best_length_cap(costs: Any, alphas: Sequence[float], lengths: Sequence[int], floor: int = 1,
                    context_len: int = 0) -> tuple[int | None, float | None]:
    r"""The cap ``c`` maximising :func:`batch_goodput` of ``min(k_r, c)``, searched over ``floor..max(lengths)``.

    .. math::  c^\* = \arg\max_{c} G\bigl(\{\min(k_r, c)\}_r\bigr) \qquad(\text{ties: the smaller } c)

    A cap only ever shortens a request's own length, so whatever chose the lengths (DSDE's KL rule) keeps the
    last word on *how short*, and the cost model only on *how long is still worth paying for*. ``(None, None)``
    while the costs cannot answer.
    """
    top = (int(lengths.max()) if len(lengths) else 0) if isinstance(lengths, np.ndarray) else max(lengths, default=0)
    if top <= floor:
        return None, None
    b = len(alphas)
    totals = capped_expected_totals(alphas, lengths, top)
    lo = max(floor, 0)
    best: tuple[float, int] | None = None
    for c, s in enumerate(depth_seconds(costs, b, lo, top, context_len), start=lo):
        if s is None or s <= 0:
            return None, None
        g = totals[c] / s
        if best is None or g > best[0]:
            best = (g, c)
    return best[1], best[0]


class GoodputPolicy(Policy):
    """Per step, the depth maximising expected tokens per second under a linear cost model."""

    name = "goodput"
    extra_args = ("cost_model", "verify_cost", "draft_cost")
    ordered_params = (("min_k", "max_k"),)
    params = (
        Param("min_k", 0, 0, 32, "int", doc="smallest depth considered (0 allows plain steps)", depth=True),
        Param("max_k", 8, 1, 32, "int", doc="largest depth considered", depth=True),
        Param("alpha_decay", 0.9, 0.5, 0.9999, doc="discount per step of each request's α ratio-of-sums"),
        Param("alpha_prior", 0.5, 0.0, 1.0, doc="α assumed before any acceptance was observed"),
        Param("forget", 0.99, 0.5, 1.0, doc="forgetting factor of the online linear cost fit"),
        Param("explore", 0.02, 0.0, 0.5, doc="probability of a uniformly random depth"),
        Param("seed", 0, 0, 2**31 - 1, "int", doc="seed of the exploration RNG"),
    )

    def __init__(self, cost_model: Any = None, verify_cost: Callable[[int, int], float] | None = None,
                 draft_cost: Callable[[int], float] | None = None, **overrides) -> None:
        super().__init__(**overrides)
        if self.config["min_k"] > self.config["max_k"]:
            raise ValueError(f"{self.name}: min_k={self.config['min_k']} > max_k={self.config['max_k']}")
        self.given_costs = resolve_costs(cost_model, verify_cost, draft_cost)
        self.learned = OnlineLinearCost(self.config["forget"])
        self.alphas = RequestAlphas(self.config["alpha_decay"], self.config["alpha_prior"])
        self.rng = random.Random(self.config["seed"])
        self._probe = 0

    @property
    def costs(self):
        return self.given_costs if self.given_costs is not None else self.learned

    def _costs_known(self) -> bool:
        return self.given_costs is not None or (self.learned.knows_verify() and self.learned.knows_draft())

    def alpha(self, rid: str) -> float:
        return self.alphas.value(rid)

    def goodput(self, alphas: list[float], k: int, context_len: int = 0) -> float | None:
        """G(k) for a batch with these per-request α (None while a cost is unknown)."""
        return batch_goodput(self.costs, alphas, [k] * len(alphas), context_len)

    def _scores(self, alphas: Sequence[float] | np.ndarray, lo: int, hi: int,
                context_len: int) -> dict[int, float | None]:
        """:meth:`goodput` of every depth ``lo..hi`` (None where a cost is unknown), the same floats, in one pass.

        Why: the per-depth form summed ``b`` geometric series per depth (a few million calls on a long replay);
        :func:`capped_expected_totals` gives every depth's numerator at once, and the denominator is
        :func:`batch_goodput`'s, ``D(b, k) + V(b, k + 1)``, priced for every depth at once
        (:func:`~._estimators.depth_seconds`).
        """
        b = len(alphas)
        if b == 0:
            return {k: None for k in range(lo, hi + 1)}
        totals = capped_expected_totals(alphas, None, hi)
        seconds = depth_seconds(self.costs, b, lo, hi, context_len)
        return {k: None if s is None or s <= 0 else totals[k] / s for k, s in enumerate(seconds, start=lo)}

    def _argmax(self, rids: Sequence[str], lo: int, hi: int, ctx: int) -> tuple[int, float | None]:
        """The depth of largest goodput (ties: the smaller) and its goodput; ``(hi, None)`` when no depth is priced.
        With a profile's price arrays (:meth:`~sglang_ext.core.costs.CostModel.depth_parts`) one compiled pass
        (:func:`._kernels.goodput_best`), else :meth:`_scores` (the same floats)."""
        parts = getattr(self.costs, "depth_parts", None)
        if parts is not None:
            a = self.alphas
            k, g = kernels().goodput_best(a.table.lookup(rids), a.table.records, a.fallback(), lo, hi,
                                          *parts(len(rids), lo, hi), lo, float(ctx))
            return (k, g) if k >= 0 else (hi, None)
        scores = self._scores(self.alphas.values(rids), lo, hi, ctx)
        known = {k: g for k, g in scores.items() if g is not None}
        k = max(known, key=lambda j: (known[j], -j)) if known else hi
        return k, known.get(k)

    def release(self, rid: str) -> None:
        self.alphas.release(rid)

    def decide(self, batch: BatchView) -> Decision:
        lo, hi = self.config["min_k"], self.config["max_k"]
        if batch.batch_size == 0:
            return Decision(speculate=False, lengths={})
        ctx = round(sum(batch.context_lens) / len(batch.context_lens)) if batch.context_lens else 0
        info: dict = {}
        if not self._costs_known():
            probes = [hi, lo, max(lo, hi // 2)]
            k = probes[self._probe % len(probes)]
            self._probe += 1
            info["reason"] = "probe: costs unknown"
        else:
            k, g = self._argmax(batch.rids, lo, hi, ctx)
            info.update(reason="argmax", goodput=g)
            if self.config["explore"] > 0 and self.rng.random() < self.config["explore"]:
                k = self.rng.randint(lo, hi)
                info["reason"] = "explore: epsilon"
        return Decision(speculate=k > 0, lengths=BatchLengths(batch.rids, uniform=k), info=info)

    def observe(self, result: StepResult) -> None:
        if result.batch_size == 0:
            return
        if self.given_costs is None:
            self.learned.update(result)
        self.alphas.update(result)

    def state_dict(self) -> dict:
        return {**self.alphas.state_dict(), "learned": self.learned.state_dict(),
                "probe": self._probe, "rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        self.alphas.load_state_dict(state)
        if "learned" in state:
            self.learned.load_state_dict(state["learned"])
        self._probe = int(state.get("probe", 0))
        if "rng" in state:
            set_rng_state(self.rng, state["rng"])
