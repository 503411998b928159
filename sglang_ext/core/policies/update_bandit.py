r"""Cost-aware drafter-update bandit (SpecBlock's idea, our own design; algorithms.md §5.3).

SpecBlock "uses free verifier feedback to update the drafter selectively, only when the expected throughput gain
exceeds the update cost", choosing per round among {skip, head-only update, full update}. Its reward, cost
model and priors are unpublished (the paper's Appendix D), so this is a design of ours with the same contract.

**Value of an action** (in tokens, over the horizon an update keeps paying off):

.. math::

    V(a) = H \cdot \hat g_a \cdot h \;-\; w \cdot \hat c_a \cdot \mathrm{tps}, \qquad V(\text{skip}) = 0

* :math:`h = 1 - \alpha` is the *headroom* now (α: per-token acceptance this round): an update cannot help a
  drafter that is already always accepted, and helps most when it is far off (e.g. after a traffic shift);
* :math:`\hat g_a` is the throughput gain per unit of headroom learned from past updates of kind ``a``: each
  :meth:`observe_update` reports ``gain`` = Δ tokens/s measured after vs before the update (verifier feedback,
  see :func:`throughput_gain`) and we record ``gain / h_at_choice``;
* :math:`\hat c_a` is the EMA of the measured update seconds, priced at the current throughput ``tps``
  (tokens not served while updating) times ``w`` (``blocking``: 1 for an update that stalls serving, less when
  it overlaps);
* ``H`` (``horizon_seconds``) is how long an update's gain lasts before drift erodes it.

The round's choice is :math:`\arg\max_a V(a)` with an optimistic :math:`\hat g_a`, **discounted UCB**
(Garivier & Moulines 2011):

.. math::

    \hat g_a = \frac{S_a}{N_a} + s \sqrt{\frac{c \ln N}{N_a}}, \qquad
    N_a \leftarrow \delta N_a + 1[\text{observed}], \quad S_a \leftarrow \delta S_a + x, \quad N = \sum_{a'} N_{a'}

with δ = ``discount`` applied once per round (skip rounds count in N), ``s`` the largest |x| seen (puts the bonus
in gain units) and ties going to the cheaper action (skip < head < full). Discounting is the point: as online
training converges, recent gains shrink and the bandit skips; as old evidence fades the bonus grows and it
tries again, which is what catches a later drift. An action never observed is tried once (head before full)
whenever the headroom is at least ``min_headroom``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..signals import expected_tokens
from .base import BatchView, Decision, Param, Policy

ACTIONS = ("skip", "head", "full")


@dataclass
class UpdateRoundStats:
    """What the serving loop knows at the end of a round (what :meth:`UpdateBandit.choose_update` reads)."""

    acceptance: float  # per-token acceptance α of the current drafter this round
    tokens_per_second: float  # current serving throughput
    horizon_seconds: float | None = None  # overrides the policy's horizon for this round


def throughput_gain(alpha_before: float, alpha_after: float, k: int, step_seconds: float, batch_size: int = 1) -> float:
    r"""Δ tokens/s from an acceptance change at depth ``k``: :math:`b\,(E_{after}[\ell] - E_{before}[\ell]) / t_{step}`."""
    if step_seconds <= 0:
        return 0.0
    return batch_size * (expected_tokens(alpha_after, k) - expected_tokens(alpha_before, k)) / step_seconds


class UpdateBandit(Policy):
    """Chooses skip / head-only / full drafter updates per round (module docstring). Not a length policy:
    hosts call :meth:`choose_update` and :meth:`observe_update`; :meth:`decide` is not available."""

    name = "update-bandit"
    role = "drafter-update"
    params = (
        Param("horizon_seconds", 60.0, 1.0, 86400.0, doc="H: seconds an update's gain is assumed to last"),
        Param("blocking", 1.0, 0.0, 1.0, doc="w: fraction of update time that stalls serving"),
        Param("discount", 0.9, 0.5, 1.0, doc="δ: per-round discount of the evidence (1: stationary UCB)"),
        Param("ucb_c", 2.0, 0.0, 10.0, doc="c in the exploration bonus"),
        Param("cost_weight", 0.3, 0.01, 1.0, doc="EMA weight of a new measured update cost"),
        Param("min_headroom", 0.05, 0.0, 1.0, doc="no update is tried while 1 − α is below this"),
    )

    def __init__(self, **overrides) -> None:
        super().__init__(**overrides)
        self.n = {a: 0.0 for a in ACTIONS}
        self.s = {a: 0.0 for a in ACTIONS}
        self.cost: dict[str, float | None] = {"skip": 0.0, "head": None, "full": None}
        self.tried = {a: a == "skip" for a in ACTIONS}
        self.scale = 0.0  # largest |gain per headroom| seen
        self.rounds = 0
        self._headroom_at_choice: dict[str, float] = {}
        self.last_values: dict[str, float] = {}

    # the bandit ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _read(stats: Any) -> tuple[float, float, float | None]:
        get = stats.get if isinstance(stats, Mapping) else (lambda k, d=None: getattr(stats, k, d))
        acc, tps = get("acceptance"), get("tokens_per_second")
        if acc is None or tps is None:
            raise ValueError("round_stats needs 'acceptance' and 'tokens_per_second'")
        return min(max(float(acc), 0.0), 1.0), max(float(tps), 0.0), get("horizon_seconds")

    def _gain_estimate(self, a: str) -> float:
        total = sum(self.n.values())
        mean = self.s[a] / self.n[a]
        bonus = self.scale * math.sqrt(self.config["ucb_c"] * math.log(max(total, math.e)) / self.n[a])
        return mean + bonus

    def values(self, stats: Any) -> dict[str, float]:
        """V(a) for every action this round (optimistic gains; +inf for an action to try once)."""
        acc, tps, horizon = self._read(stats)
        h = 1.0 - acc
        H = self.config["horizon_seconds"] if horizon is None else float(horizon)
        out = {"skip": 0.0}
        for a in ("head", "full"):
            if not self.tried[a]:
                out[a] = math.inf if h >= self.config["min_headroom"] else -math.inf
            else:
                out[a] = H * self._gain_estimate(a) * h - self.config["blocking"] * (self.cost[a] or 0.0) * tps
        return out

    def choose_update(self, round_stats: Any) -> str:
        """``"skip"``, ``"head"`` or ``"full"`` for this round (``round_stats``: :class:`UpdateRoundStats` or a
        mapping with ``acceptance``, ``tokens_per_second`` and optionally ``horizon_seconds``)."""
        acc, _, _ = self._read(round_stats)
        values = self.values(round_stats)
        self.last_values = values
        d = self.config["discount"]
        for a in ACTIONS:
            self.n[a] *= d
            self.s[a] *= d
            if a != "skip" and self.tried[a] and self.n[a] < 1e-9:  # evidence forgotten: an untried action again
                self.n[a] = self.s[a] = 0.0
                self.tried[a] = False
        best = max(ACTIONS, key=lambda a: (values[a], -ACTIONS.index(a)))
        if values[best] <= 0:
            best = "skip"
        if best == "skip":
            self.n["skip"] += 1.0
        else:
            self._headroom_at_choice[best] = 1.0 - acc
        self.rounds += 1
        return best

    def observe_update(self, action: str, gain: float, cost: float) -> None:
        """An update of kind ``action`` finished: ``gain`` = Δ tokens/s after vs before (may be negative),
        ``cost`` = its measured seconds."""
        if action not in ACTIONS:
            raise ValueError(f"{self.name}: action {action!r} is not one of {list(ACTIONS)}")
        if action == "skip":
            return
        h = max(self._headroom_at_choice.pop(action, 0.0), 1e-3)
        x = float(gain) / h
        self.n[action] += 1.0
        self.s[action] += x
        self.tried[action] = True
        self.scale = max(self.scale, abs(x))
        old, w = self.cost[action], self.config["cost_weight"]
        self.cost[action] = float(cost) if old is None else (1 - w) * old + w * float(cost)

    # not a length policy ------------------------------------------------------------------------------------------
    def decide(self, batch: BatchView) -> Decision:
        raise TypeError(f"{self.name} chooses drafter updates (choose_update), not draft lengths")

    # persistence --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"n": self.n, "s": self.s, "cost": self.cost, "tried": self.tried, "scale": self.scale,
                "rounds": self.rounds, "pending": self._headroom_at_choice}

    def load_state_dict(self, state: dict) -> None:
        self.n = {a: float(state["n"][a]) for a in ACTIONS}
        self.s = {a: float(state["s"][a]) for a in ACTIONS}
        self.cost = {a: (None if state["cost"][a] is None else float(state["cost"][a])) for a in ACTIONS}
        self.tried = {a: bool(state["tried"][a]) for a in ACTIONS}
        self.scale = float(state["scale"])
        self.rounds = int(state["rounds"])
        self._headroom_at_choice = {a: float(v) for a, v in state.get("pending", {}).items()}
