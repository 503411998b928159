r"""Multi-armed bandits over speculation configurations (BanditSpec, arXiv 2505.15141; algorithms.md §6.2).

Arms are configurations ``{"k": depth, "tree_budget": nodes or None, "drafter": name or None}`` (an int is
shorthand for ``{"k": int}``); the reward of a step is its measured throughput,
``StepResult.tokens_per_second`` = committed tokens / step seconds. Every request of a step uses the arm.

Rewards are **min–max normalised** per context before scoring, :math:`\tilde r = (r - r_{min}) / (r_{max} -
r_{min})` over the rewards seen so far (0.5 while the range is 0), because both rules assume rewards in [0, 1]
and tokens/s is in the hundreds; the per-arm means are kept in raw units and normalised at decision time, so a
new extreme rescales every arm consistently. A **context** is the batch size's power-of-two bucket (``context
= "pow2"``), since tokens/s grows with the batch and one table would mix scales; ``"none"`` keeps one table.

Rules, after ``warmup`` round-robin plays of every arm (textbook UCB1 plays each arm once):

* ``ucb1`` (Auer et al. 2002), per-arm counts (not BanditSpec code's total count, see algorithms.md §6.2):

  .. math::  a_t = \arg\max_a\ \bar{\tilde r}_a + \sqrt{c \ln t / n_a}, \qquad c = 2 \text{ (textbook)}

* ``thompson``: **Gaussian** Thompson sampling on the normalised reward (Agrawal & Goyal 2013):

  .. math::  \theta_a \sim \mathcal N\bigl(\bar{\tilde r}_a,\ \sigma^2 / (n_a + 1)\bigr), \qquad
             a_t = \arg\max_a \theta_a, \qquad \sigma = 1 \text{ (the paper's choice for rewards in [0, 1])}

  Gaussian rather than Beta because the reward is continuous (a Beta needs Bernoulli trials or a
  binarisation trick that adds noise).

All randomness comes from ``random.Random(seed)`` (UCB1 draws only to break exact ties).
"""

from __future__ import annotations

import math
import random

from ..signals import StepResult
from ._estimators import rng_state, set_rng_state
from .base import BatchLengths, BatchView, Decision, Param, Policy

DEFAULT_ARMS = [1, 2, 3, 4]  # BanditSpec's code: γ ∈ {1..4}


def normalise_arms(arms) -> list[dict]:
    """Validate and expand the arm list; errors name the arm index and the bad field."""
    if not isinstance(arms, (list, tuple)) or not arms:
        raise ValueError(f"arms={arms!r} is not a non-empty list")
    out = []
    for i, arm in enumerate(arms):
        if isinstance(arm, bool) or not isinstance(arm, (int, dict)):
            raise ValueError(f"arms[{i}]={arm!r} is neither an int depth nor an object")
        a = {"k": arm} if isinstance(arm, int) else dict(arm)
        unknown = sorted(set(a) - {"k", "tree_budget", "drafter"})
        if unknown:
            raise ValueError(f"arms[{i}] has unknown field(s) {unknown}; known: k, tree_budget, drafter")
        k = a.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 64:
            raise ValueError(f"arms[{i}].k={k!r} is not an int in [0, 64]")
        tb = a.get("tree_budget")
        if tb is not None and (isinstance(tb, bool) or not isinstance(tb, int) or tb < 1):
            raise ValueError(f"arms[{i}].tree_budget={tb!r} is not a positive int or null")
        dr = a.get("drafter")
        if dr is not None and not isinstance(dr, str):
            raise ValueError(f"arms[{i}].drafter={dr!r} is not a string or null")
        out.append({"k": k, "tree_budget": tb, "drafter": dr})
    return out


class _ArmTable:
    """Counts, raw reward sums and the observed reward range of one context."""

    def __init__(self, n_arms: int) -> None:
        self.n = [0] * n_arms
        self.sum = [0.0] * n_arms
        self.lo = math.inf
        self.hi = -math.inf

    @property
    def t(self) -> int:
        return sum(self.n)

    def add(self, arm: int, reward: float) -> None:
        self.n[arm] += 1
        self.sum[arm] += reward
        self.lo, self.hi = min(self.lo, reward), max(self.hi, reward)

    def norm_mean(self, arm: int) -> float:
        mean = self.sum[arm] / self.n[arm]
        span = self.hi - self.lo
        return (mean - self.lo) / span if span > 0 else 0.5

    def state_dict(self) -> dict:
        return {"n": self.n, "sum": self.sum, "lo": self.lo if self.t else None,
                "hi": self.hi if self.t else None}

    def load(self, s: dict) -> _ArmTable:
        self.n, self.sum = [int(v) for v in s["n"]], [float(v) for v in s["sum"]]
        self.lo = math.inf if s["lo"] is None else float(s["lo"])
        self.hi = -math.inf if s["hi"] is None else float(s["hi"])
        return self


class BanditPolicy(Policy):
    """UCB1 or Gaussian Thompson sampling over speculation configurations (module docstring)."""

    name = "bandit"
    params = (
        Param("algorithm", "ucb1", kind="choice", choices=("ucb1", "thompson")),
        Param("arms", DEFAULT_ARMS, kind="json", doc="list of k or {k, tree_budget, drafter}"),
        Param("ucb_c", 2.0, 0.01, 10.0, doc="UCB1 exploration constant c in sqrt(c ln t / n_a) (textbook 2)"),
        Param("ts_sigma", 1.0, 0.01, 10.0, doc="Thompson posterior scale σ on normalised rewards"),
        Param("warmup", 1, 1, 100, "int", doc="round-robin plays of every arm before the rule"),
        Param("context", "pow2", kind="choice", choices=("pow2", "none"), doc="separate tables per batch bucket"),
        Param("seed", 0, 0, 2**31 - 1, "int", doc="seed of the RNG"),
    )

    def __init__(self, **overrides) -> None:
        super().__init__(**overrides)
        self.arms = normalise_arms(self.config["arms"])
        self.config["arms"] = [dict(a) for a in self.arms]
        self.tables: dict[str, _ArmTable] = {}
        self.rng = random.Random(self.config["seed"])
        self._last: tuple[str, int] | None = None

    def context_key(self, batch_size: int) -> str:
        if self.config["context"] == "none":
            return "all"
        return str(1 << (max(int(batch_size), 1).bit_length() - 1))  # 1, 2, 4, 8, ...

    def _table(self, key: str) -> _ArmTable:
        if key not in self.tables:
            self.tables[key] = _ArmTable(len(self.arms))
        return self.tables[key]

    def choose(self, key: str) -> int:
        """The arm index for this context (warm-up round robin, then the rule)."""
        tab = self._table(key)
        for arm in range(len(self.arms)):
            if tab.n[arm] < self.config["warmup"]:
                return arm
        if self.config["algorithm"] == "ucb1":
            log_t = math.log(tab.t)
            scores = [tab.norm_mean(a) + math.sqrt(self.config["ucb_c"] * log_t / tab.n[a])
                      for a in range(len(self.arms))]
        else:
            sigma = self.config["ts_sigma"]
            scores = [self.rng.gauss(tab.norm_mean(a), sigma / math.sqrt(tab.n[a] + 1))
                      for a in range(len(self.arms))]
        best = max(scores)
        ties = [a for a, s in enumerate(scores) if s == best]
        return ties[0] if len(ties) == 1 else self.rng.choice(ties)

    def decide(self, batch: BatchView) -> Decision:
        key = self.context_key(batch.batch_size)
        arm = self.choose(key)
        self._last = (key, arm)
        a = self.arms[arm]
        return Decision(speculate=a["k"] > 0, lengths=BatchLengths(batch.rids, uniform=a["k"]),
                        tree_budget=a["tree_budget"], drafter=a["drafter"], info={"arm": arm, "context": key})

    def observe(self, result: StepResult) -> None:
        """Credit ``result.config["arm"]`` (what the host echoed back) or, failing that, the last decided arm."""
        if result.seconds <= 0 or result.batch_size == 0:
            return
        arm = result.config.get("arm", self._last[1] if self._last else None)
        if arm is None or not 0 <= int(arm) < len(self.arms):
            return
        key = result.config.get("context") or self.context_key(result.batch_size)
        self._table(key).add(int(arm), result.tokens_per_second)

    def state_dict(self) -> dict:
        return {"tables": {k: t.state_dict() for k, t in self.tables.items()}, "rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        self.tables = {k: _ArmTable(len(self.arms)).load(s) for k, s in state.get("tables", {}).items()}
        for k, t in self.tables.items():
            if len(t.n) != len(self.arms):
                raise ValueError(f"{self.name}: state table {k!r} has {len(t.n)} arms, config has {len(self.arms)}")
        if "rng" in state:
            set_rng_state(self.rng, state["rng"])
