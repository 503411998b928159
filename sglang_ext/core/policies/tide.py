r"""TIDE's adaptive speculation control: speculate iff the predicted speedup at this batch size exceeds 1.

TIDE (arXiv 2602.05145 v2, Sec. IV-A; algorithms.md §2.2). With γ draft tokens, per-token acceptance α, target
latency ``T(n)`` for ``n`` batched token positions and draft latency ``D0`` per draft step:

.. math::

    E[\ell] &= \frac{1 - \alpha^{\gamma+1}}{1 - \alpha} = \sum_{i=0}^{\gamma} \alpha^i
        \qquad\text{(Eq. 2, tokens per step; summed as a series, so α → 1 gives γ + 1, no 0/0)}

    \mathrm{Speedup}(b) &= \frac{E[\ell]}{c(b)\,\gamma + \beta(b)}, \qquad
        c(b) = \frac{D_0}{T(b)}, \quad \beta(b) = \frac{T(b(\gamma+1))}{T(b)}   \qquad\text{(Eq. 3–5)}

and the rule is ``speculate ⇔ Speedup(b) > threshold`` (TIDE: 1). Equivalently ``E[ℓ] > c(b)γ + β(b)``.

**Costs.** From, in order: a ``cost_model`` object with ``verify_seconds(batch_size, tokens_per_request,
context_len=0)`` and ``draft_seconds(batch_size, depth)`` (a profile's fitted model; ``c(b)γ`` is read as
``draft_seconds(b, γ) / T(b)``, which is TIDE's ``D0·γ`` when drafting is linear in depth); or two callables
``verify_cost(batch_size, tokens_per_request)`` and ``draft_cost(batch_size)`` (= D0); or, with neither, learned
online from the measured seconds of each :class:`StepResult` (:class:`~._estimators.OnlineCostTable`: EMA per
(batch size, tokens per request), interpolated over both; a plain step measures ``T(b)``, a speculative one
``T(b(γ+1))`` and ``D0``).

**α** is the chain MLE (successes / verified positions, :func:`~sglang_ext.core.signals.chain_trials`) as a
discounted ratio of sums per batch size; a batch size with fewer than ``min_trials`` (discounted) trials uses
the all-batch-sizes estimate.

**Exploration** (no measurements yet, and staleness later), in this order:

1. α unknown, or speculative costs unknown → speculate (the only way to measure α, ``T(b(γ+1))`` and ``D0``);
2. plain cost ``T(b)`` unknown → a plain step;
3. otherwise the rule, flipped with probability ``explore`` (seeded ``random.Random``) so that the mode the rule
   rejects keeps being measured: α drifts with the traffic, and the costs of the unused mode go stale.

**Depth choice** (``depth``; our addition, after Nightjar's batch-level γ ∈ {0..Γ_max}, algorithms.md §6.5).
``depth="fixed"`` is TIDE as published: the rule is asked about γ = ``gamma`` only. ``depth="best"`` (default) asks
the same model about every depth up to ``gamma`` and speculates at the best one,

.. math::

    γ^* = \arg\max_{1 \le g \le γ} R_{\text{on}}(b, g), \qquad
    \text{speculate at } γ^* \iff \mathrm{Speedup}(b, γ^*) = R_{\text{on}}(b, γ^*) / R_{\text{off}}(b) > \text{threshold}

with the rates below. Why: when the fixed γ sits near break-even (on this 2-core CPU, γ = 3 is 0.92–1.00× of
speculation off while γ = 1 is 1.16–1.18×), the fixed rule flips between modes on noise, and every switch-on
makes a feature drafter catch up on the tokens decoded while it was off, so the mix loses to both pure modes
(measured 0.954× speculation off at batch 1 and 8, ``analysis/results/bench-interleaved-20261123``). The best
depth is usually far from break-even, so the decision is stable. Unmeasured depths are priced by the cost
model's interpolation over tokens per request, so no extra exploration is needed to price them; ε-flips (below)
take any other option in {off, 1..γ} uniformly, which keeps every depth's cost measured.

**Exploration budget** (our addition; TIDE profiles offline and never explores). A flip costs real time when the
rule was right: a speculative step where speculation does not pay, plus the drafter's catch-up on every token
decoded while it was off. Each flip's *loss* is measured against the rule's own prediction for the mode it
replaced,

.. math::

    \text{loss} = t_{\text{step}} - \frac{\text{tokens}_{\text{step}}}{R_{\text{rule}}(b)}, \qquad
    R_{\text{off}}(b) = \frac{b}{T(b)}, \quad
    R_{\text{on}}(b) = \frac{b\,E[\ell]}{D(b, γ) + T(b(γ+1))},

(negative when the flip did better than the rule expected), and a flip is taken only while the summed loss is
at most ``explore_budget`` × the summed time of every step observed. So exploration never costs more than that
share of serving time, whatever ``explore`` is: with the default 1 % the policy stays within TIDE's target
"never more than 2 % slower than speculation off" when the rule is right, and still re-measures the other mode.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from ..signals import StepResult, expected_tokens
from ._estimators import (
    OnlineCostTable,
    RatioEMA,
    depth_seconds,
    resolve_costs,
    rng_state,
    set_rng_state,
    step_trials,
)
from .base import BatchLengths, BatchView, Decision, Param, Policy


_UNSET: Any = object()  # "not computed by the caller" (None is a value: unknown)


class TideControlPolicy(Policy):
    """Per-batch on/off speculation at a fixed depth γ by TIDE's speedup model (module docstring)."""

    name = "tide-control"
    extra_args = ("cost_model", "verify_cost", "draft_cost")
    params = (
        Param("gamma", 3, 1, 16, "int", doc="draft depth when speculating (TIDE: 3); the deepest with depth=best",
              depth=True),
        Param("depth", "best", kind="choice", choices=("best", "fixed"),
              doc="best: speculate at the depth <= gamma with the highest predicted rate; fixed: TIDE, always gamma"),
        Param("threshold", 1.0, 0.5, 2.0, doc="speculate iff predicted speedup > threshold (TIDE: 1)"),
        Param("alpha_decay", 0.95, 0.5, 0.9999, doc="discount per step of the α ratio-of-sums"),
        Param("min_trials", 16, 1, 10000, "int", doc="trials before a batch size's own α is trusted"),
        Param("cost_weight", 0.2, 0.01, 1.0, doc="EMA weight of a new measured cost (online costs only)"),
        Param("explore", 0.02, 0.0, 0.5, doc="probability of taking the mode the rule rejects"),
        Param("explore_budget", 0.01, 0.0, 0.5, doc="most of all step time that exploring flips may lose (measured)"),
        Param("seed", 0, 0, 2**31 - 1, "int", doc="seed of the exploration RNG"),
    )

    def __init__(self, cost_model: Any = None, verify_cost: Callable[[int, int], float] | None = None,
                 draft_cost: Callable[[int], float] | None = None, **overrides) -> None:
        super().__init__(**overrides)
        self.given_costs = resolve_costs(cost_model, verify_cost, draft_cost)
        self.learned = OnlineCostTable(self.config["cost_weight"])
        self.alpha_by_bs: dict[int, RatioEMA] = {}
        self.alpha_all = RatioEMA(self.config["alpha_decay"])
        self.rng = random.Random(self.config["seed"])
        self.seconds_seen = 0.0  # every observed step's time
        self.explore_loss = 0.0  # summed loss of exploring flips (module docstring)
        self._flip_rate: float | None = None  # this step is a flip: the rule's predicted tok/s for its own mode

    # the model ----------------------------------------------------------------------------------------------------
    @property
    def costs(self):
        return self.given_costs if self.given_costs is not None else self.learned

    def alpha(self, batch_size: int) -> float | None:
        """Running per-token acceptance rate at this batch size (all batch sizes while it has few trials)."""
        own = self.alpha_by_bs.get(batch_size)
        if own is not None and own.den >= self.config["min_trials"]:
            return own.value
        return self.alpha_all.value

    def _spec_costs_known(self, gamma: int) -> bool:
        return self.given_costs is not None or (self.learned.knows_verify(gamma + 1) and self.learned.knows_draft())

    def _plain_cost_known(self) -> bool:
        return self.given_costs is not None or self.learned.knows_verify(1)

    def predicted_speedup(self, batch_size: int, gamma: int | None = None, context_len: int = 0) -> float | None:
        """TIDE Eq. 4/5 at this batch size, or None while α or a cost is unknown: ``R_on / R_off`` (module
        docstring), since ``E[ℓ] / (c(b)γ + β(b)) = (b E[ℓ] / (D(b, γ) + T(b(γ+1)))) / (b / T(b))``."""
        gamma = self.config["gamma"] if gamma is None else int(gamma)
        return self._speedup(batch_size, gamma, context_len, self.alpha(batch_size))

    def _speedup(self, batch_size: int, gamma: int, context_len: int, alpha: float | None,
                 on: Any = _UNSET) -> float | None:
        """:meth:`predicted_speedup` with α given and, when the caller priced it already, ``on`` = R_on(γ)."""
        if alpha is None or not (self._spec_costs_known(gamma) and self._plain_cost_known()):
            return None
        if on is _UNSET:
            on = self._spec_rates(batch_size, gamma, gamma, context_len, alpha)[gamma]
        off = self.predicted_rate(batch_size, False, gamma, context_len)
        return None if on is None or not off else on / off

    def should_speculate(self, batch_size: int, gamma: int | None = None, context_len: int = 0) -> bool:
        """The decision, exploration included (draws from the policy's RNG)."""
        return self._choose(batch_size, gamma, context_len)[0]

    def best_depth(self, batch_size: int, context_len: int = 0) -> int:
        """``γ*``: the depth in ``1..gamma`` with the highest predicted speculative rate (``gamma`` while unpriced)."""
        return self._best(self._spec_rates(batch_size, 1, self.config["gamma"], context_len))

    def _best(self, rates: dict[int, float | None]) -> int:
        """The depth of the highest priced rate (ties: the shallower, cheaper one), ``gamma`` when none is priced."""
        priced = {g: r for g, r in rates.items() if r is not None}
        return max(priced, key=lambda g: (priced[g], -g)) if priced else self.config["gamma"]

    def _choose(self, batch_size: int, gamma: int | None, context_len: int) -> tuple[bool, dict]:
        """``(speculate, info)`` at the fixed ``gamma`` when one is given (the composed policy asks about the depth
        the batch will verify); otherwise at the depth the ``depth`` setting picks. ``info["gamma"]`` is the depth."""
        choose_depth = gamma is None and self.config["depth"] == "best"
        gamma = self.config["gamma"] if gamma is None else int(gamma)
        self._flip_rate = None
        alpha = self.alpha(batch_size)
        if alpha is None or not self._spec_costs_known(gamma):
            return True, {"reason": "explore: speculative step unmeasured", "gamma": gamma}
        if not self._plain_cost_known():
            return False, {"reason": "explore: plain step unmeasured", "gamma": gamma}
        if choose_depth:  # every depth priced once; the chosen one's rate is the speedup's numerator
            rates = self._spec_rates(batch_size, 1, gamma, context_len, alpha)
            gamma = self._best(rates)
            s = self._speedup(batch_size, gamma, context_len, alpha, rates[gamma])
        else:
            s = self._speedup(batch_size, gamma, context_len, alpha)
        on = s is not None and s > self.config["threshold"]
        info = {"speedup": s, "alpha": alpha, "reason": "rule", "gamma": gamma}
        if self.config["explore"] > 0 and self.rng.random() < self.config["explore"]:
            if self.explore_loss <= self.config["explore_budget"] * self.seconds_seen:
                rate = self.predicted_rate(batch_size, on, gamma, context_len)
                if rate:
                    self._flip_rate = rate
                    info["reason"] = "explore: epsilon"
                    if choose_depth:  # any other option in {off, 1..gamma}, uniformly
                        chosen = gamma if on else 0
                        options = [g for g in range(self.config["gamma"] + 1) if g != chosen]
                        g = options[self.rng.randrange(len(options))]
                        on, info["gamma"] = g > 0, (g if g > 0 else gamma)
                    else:
                        on = not on
            else:
                info["reason"] = "rule (exploration budget spent)"
        return on, info

    def predicted_rate(self, batch_size: int, speculate: bool, gamma: int | None = None,
                       context_len: int = 0) -> float | None:
        """Predicted tokens/s of a step in the given mode (R_on / R_off of the module docstring)."""
        gamma = self.config["gamma"] if gamma is None else int(gamma)
        if not speculate:
            t1 = self.costs.verify_seconds(batch_size, 1, context_len)
            return batch_size / t1 if t1 is not None and t1 > 0 else None
        return self._spec_rates(batch_size, gamma, gamma, context_len)[gamma]

    def _spec_rates(self, batch_size: int, lo: int, hi: int, context_len: int,
                    alpha: Any = _UNSET) -> dict[int, float | None]:
        """R_on at every depth ``lo..hi``, ``b E[ℓ] / (D(b, γ) + T(b(γ+1)))``, priced at once
        (:func:`~._estimators.depth_seconds`); None where α or a cost is unknown. ``alpha``: α(b) when the caller
        read it already."""
        a = self.alpha(batch_size) if alpha is _UNSET else alpha
        seconds = depth_seconds(self.costs, batch_size, lo, hi, context_len)
        return {g: None if a is None or t is None or t <= 0 else batch_size * expected_tokens(a, g) / t
                for g, t in enumerate(seconds, start=lo)}

    # the loop -----------------------------------------------------------------------------------------------------
    def decide(self, batch: BatchView) -> Decision:
        if batch.batch_size == 0:
            return Decision(speculate=False, lengths={})
        ctx = round(sum(batch.context_lens) / len(batch.context_lens)) if batch.context_lens else 0
        on, info = self._choose(batch.batch_size, None, ctx)
        k = info["gamma"] if on else 0
        return Decision(speculate=on, lengths=BatchLengths(batch.rids, uniform=k), info=info)

    def observe(self, result: StepResult) -> None:
        if result.batch_size == 0:
            return
        self.seconds_seen += result.seconds
        if self._flip_rate is not None:  # priced before this step updates the model that priced the rule's mode
            self.explore_loss += result.seconds - result.committed_tokens / self._flip_rate
            self._flip_rate = None
        if self.given_costs is None:
            self.learned.update(result)
        if result.speculated:
            s, t = step_trials(result)
            self.alpha_by_bs.setdefault(result.batch_size, RatioEMA(self.config["alpha_decay"])).update(s, t)
            self.alpha_all.update(s, t)

    # persistence --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"alpha_by_bs": {str(b): e.state_dict() for b, e in self.alpha_by_bs.items()},
                "alpha_all": self.alpha_all.state_dict(), "learned": self.learned.state_dict(),
                "rng": rng_state(self.rng), "seconds_seen": self.seconds_seen, "explore_loss": self.explore_loss}

    def load_state_dict(self, state: dict) -> None:
        d = self.config["alpha_decay"]
        self.alpha_by_bs = {int(b): RatioEMA(d).load(v) for b, v in state.get("alpha_by_bs", {}).items()}
        if "alpha_all" in state:
            self.alpha_all = RatioEMA(d).load(state["alpha_all"])
        self.learned.load_state_dict(state.get("learned", {}))
        if "rng" in state:
            set_rng_state(self.rng, state["rng"])
        self.seconds_seen = float(state.get("seconds_seen", 0.0))
        self.explore_loss = float(state.get("explore_loss", 0.0))
