"""DSDE as it was before its state moved into arrays: one ``_RequestState`` per request, the plain per-request rule.

A test-only copy, kept verbatim as the oracle for ``tests/test_validate.py`` (the compiled policy must decide exactly
as this one on random steps), with the scalar formulas it used (``weighted_variance``, ``wvir``, ``scale_factor``,
``dsl_step``), the per-request history (``SignalHistory``) and the grouped WVIR of lists of histories
(``wvir_many``). Not imported by the package.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import repeat
from operator import mul, sub
from typing import Any, Callable

import numpy as np

from sglang_ext.core.policies.base import BatchView, Decision
from sglang_ext.core.policies.compose import apply_batch_cap
from sglang_ext.core.policies.dsde import _EPS_T, VAR_EPS, WVIR_FLAT, DSDEPolicy, _weights
from sglang_ext.core.policies.goodput import best_length_cap
from sglang_ext.core.signals import RequestStep, StepResult, chain_trials


class SignalHistory:
    """One request's recent signals with bounded memory: KL per proposed position, and per step its proposed
    and accepted lengths (from which acceptance per position and the chain α estimate are derived).

    ``kl_window`` bounds the token-level KL deque (DSDE's W); ``step_window`` the per-step deques.
    """

    def __init__(self, kl_window: int = 30, step_window: int = 64) -> None:
        self.kl: deque[float] = deque(maxlen=max(int(kl_window), 1))
        self.proposed: deque[int] = deque(maxlen=max(int(step_window), 1))
        self.accepted: deque[int] = deque(maxlen=max(int(step_window), 1))
        self.last_kl: list[float] = []
        self.steps = 0  # lifetime count of recorded steps (an int, not a buffer)

    def record(self, step: RequestStep, kl: Iterable[float] | None = None) -> None:
        """Append one step. ``kl`` overrides ``step.kl`` (e.g. a proxy for a model-free drafter)."""
        values = [float(x) for x in (step.kl[: step.proposed] if kl is None else kl)]
        self.kl.extend(values)
        self.last_kl = values
        self.proposed.append(int(step.proposed))
        self.accepted.append(int(step.accepted))
        self.steps += 1

    @property
    def mean_last_kl(self) -> float:
        """Mean KL over the positions of the latest step (0.0 when it had none)."""
        return sum(self.last_kl) / len(self.last_kl) if self.last_kl else 0.0

    def acceptance_rate(self) -> float | None:
        """Chain MLE of the per-token α over the step window (None before any proposed token)."""
        s = t = 0
        for k, a in zip(self.proposed, self.accepted):
            ds, dt = chain_trials(k, a)
            s, t = s + ds, t + dt
        return s / t if t else None

    def acceptance_by_position(self) -> list[float]:
        """P(position i accepted | position i was proposed and reached), i = 0.. max proposed − 1."""
        depth = max(self.proposed, default=0)
        hits, tries = [0] * depth, [0] * depth
        for k, a in zip(self.proposed, self.accepted):
            for i in range(min(k, a + 1)):  # positions 0..a were verified (a < k: the a-th one was rejected)
                tries[i] += 1
                hits[i] += i < a
        return [h / n if n else 0.0 for h, n in zip(hits, tries)]

    def mean_accepted(self) -> float:
        return sum(self.accepted) / len(self.accepted) if self.accepted else 0.0

    def state_dict(self) -> dict:
        return {"kl": list(self.kl), "proposed": list(self.proposed), "accepted": list(self.accepted),
                "last_kl": list(self.last_kl), "steps": self.steps,
                "kl_window": self.kl.maxlen, "step_window": self.proposed.maxlen}

    @classmethod
    def from_state(cls, state: dict) -> SignalHistory:
        h = cls(state.get("kl_window", 30), state.get("step_window", 64))
        h.kl.extend(state.get("kl", []))
        h.proposed.extend(state.get("proposed", []))
        h.accepted.extend(state.get("accepted", []))
        h.last_kl = list(state.get("last_kl", []))
        h.steps = int(state.get("steps", 0))
        return h


def weighted_variance(x: Sequence[float], decay: float) -> float:
    r"""wvar(x) with weights ``decay**age`` (the newest value, last in ``x``, has weight 1).

    Computes ``mu = Σ w x / Σ w`` and ``Σ w (x - mu)**2 / Σ w`` with the same float operations in the same order
    as the two generator passes it replaces (so the same bits), with cached weights and C-level iteration.
    """
    w, sw = _weights(len(x), decay)
    mu = sum(map(mul, w, x)) / sw
    return sum(map(mul, w, map(pow, map(sub, x, repeat(mu)), repeat(2)))) / sw


def wvir(history: Sequence[float], decay: float) -> float:
    """Weighted variance intensity ratio: short window (last n//3, at least 1) over the whole history."""
    x = list(history)
    n = len(x)
    if n < 2:
        return 0.0
    short = max(1, n // 3)
    long_var = weighted_variance(x, decay)
    if long_var < VAR_EPS:
        return WVIR_FLAT
    return weighted_variance(x[-short:], decay) / long_var


def scale_factor(kl_last: float, temperature: float, sf_alpha: float, divide_by_t: bool = True) -> float:
    """SF = exp(α_sf · KL_last / T) − 1 (T ignored when 0 or ``divide_by_t`` is False); overflow-safe."""
    x = kl_last / (temperature + _EPS_T) if divide_by_t and abs(temperature) >= _EPS_T else kl_last
    return math.expm1(min(sf_alpha * x, 700.0))


def dsl_step(wvir_value: float, sf: float, k_min: int, k_max: int) -> int:
    """DSDE's length rule ``_dsl_step`` (see the module docstring)."""
    r = wvir_value * sf
    if r <= 1:
        return max(k_min, math.ceil((k_max - k_min) * (1 - r) + k_min))
    return k_min


def wvir_rows(X: np.ndarray, decay: float) -> np.ndarray:
    """:func:`wvir` of every row of ``X`` (``[m, n]``, oldest value first) as one numpy two-pass (the same value up
    to float rounding in the last bits); the package's numpy DSDE used it before its controller step was compiled."""
    m, n = X.shape
    if n < 2 or m == 0:
        return np.array([wvir(row, decay) for row in X.tolist()], dtype=float)
    w, sw = _weights(n, decay)
    ws, sws = _weights(max(1, n // 3), decay)
    w, ws = np.array(w), np.array(ws)
    short = len(ws)
    D = X - ((X @ w) / sw)[:, None]
    long_var = ((D * D) @ w) / sw
    S = X[:, n - short:]
    Ds = S - ((S @ ws) / sws)[:, None]
    short_var = ((Ds * Ds) @ ws) / sws
    flat = long_var < VAR_EPS
    return np.where(flat, WVIR_FLAT, short_var / np.where(flat, 1.0, long_var))


def wvir_many(histories: Sequence[Sequence[float]], decay: float) -> list[float]:
    """:func:`wvir` of every history: those of one length go through :func:`wvir_rows` together."""
    out: list[float] = [0.0] * len(histories)
    groups: dict[int, list[int]] = {}
    for i, h in enumerate(histories):
        groups.setdefault(len(h), []).append(i)
    for n, idx in groups.items():
        X = np.array([list(histories[i]) for i in idx], dtype=float).reshape(len(idx), n)
        for i, v in zip(idx, wvir_rows(X, decay).tolist()):
            out[i] = v
    return out


class _RequestState:
    """One request's controller: the KL history, the warm-up samples and the one-shot bounds."""

    def __init__(self, k: int, window: int) -> None:
        self.k = k
        self.hist = SignalHistory(kl_window=window, step_window=window)
        self.warm_acc: list[int] = []
        self.warm_kl: list[float] = []
        self.bounds: tuple[int, int] | None = None  # (k_min', k_max') once warm-up ended
        self.pred = k

    def state_dict(self) -> dict:
        return {"k": self.k, "hist": self.hist.state_dict(), "warm_acc": self.warm_acc, "warm_kl": self.warm_kl,
                "bounds": list(self.bounds) if self.bounds else None, "pred": self.pred}

    @classmethod
    def from_state(cls, s: dict) -> _RequestState:
        st = cls(int(s["k"]), 1)
        st.hist = SignalHistory.from_state(s["hist"])
        st.warm_acc = [int(a) for a in s["warm_acc"]]
        st.warm_kl = [float(v) for v in s["warm_kl"]]
        st.bounds = tuple(s["bounds"]) if s["bounds"] else None
        st.pred = int(s["pred"])
        return st


class ReferenceDSDE(DSDEPolicy):
    """DSDE one request at a time (the pre-array implementation): the oracle the array policy is compared with."""

    def __init__(self, cost_model: Any = None, verify_cost: Callable[[int, int], float] | None = None,
                 draft_cost: Callable[[int], float] | None = None, **overrides) -> None:
        # the constants, the cost estimators and α come from the package's constructor; the per-request state is
        # this reference's own (one _RequestState per request)
        super().__init__(cost_model, verify_cost, draft_cost, **overrides)
        self._req: dict[str, _RequestState] = {}

    # request lifetime ---------------------------------------------------------------------------------------------
    def admit(self, rid: str) -> None:
        if rid not in self._req:
            st = _RequestState(self.config["init_k"], self.config["window"])
            st.pred = self._clip(st.k)
            self._req[rid] = st

    def release(self, rid: str) -> None:
        self._req.pop(rid, None)
        self.alphas.release(rid)

    def _clip(self, k: int) -> int:
        return min(max(int(k), self.k_floor), self.config["max_k"])

    # the controller -----------------------------------------------------------------------------------------------
    def _step_values(self, r: RequestStep) -> tuple[list[float], bool]:
        """This step's KL values, or the acceptance-only proxy (second item True) when the drafter gave none."""
        if len(r.kl) > 0:
            return [float(v) for v in r.kl[: r.proposed]], False
        miss = [self.config["miss_kl"]] if r.accepted < r.proposed else []
        return [0.0] * r.accepted + miss, True

    def _end_warmup(self, st: _RequestState) -> tuple[int, int]:
        lo, hi = self.k_floor, self.config["max_k"]
        if not st.warm_acc:
            return lo, hi
        mean_kl = sum(st.warm_kl) / len(st.warm_kl) if st.warm_kl else 0.0
        max_kl = max(st.warm_kl) if st.warm_kl else 1.0
        if max_kl == 0:
            max_kl = 1.0
        k_max = min(hi, max(lo, round(max(st.warm_acc) * (1 + self.max_factor * mean_kl / max_kl))))
        k_min = min(k_max, max(lo, math.ceil(self.min_frac * k_max)))
        st.warm_acc, st.warm_kl = [], []
        return k_min, k_max

    def _record(self, st: _RequestState, r: RequestStep) -> float | None:
        """Record one step; warm-up logic. Returns the step's SF when the request is steady (its length then
        follows from WVIR, :meth:`_update` / :meth:`observe`), None when its length is already set."""
        values, proxy = self._step_values(r)
        st.hist.record(r, kl=values)
        W = self.config["window"]
        if st.bounds is None:
            if len(st.hist.kl) < W:
                st.warm_acc.append(r.accepted)
                st.warm_kl.extend(values)
                if r.accepted >= st.k:
                    st.k = min(2 * st.k if st.k > 0 else 1, self.config["max_k"])
                else:
                    st.k = max(st.k, self.k_floor)
            else:
                st.bounds = self._end_warmup(st)
        if st.bounds is None:
            st.pred = self._clip(st.k)
            return None
        return scale_factor(st.hist.mean_last_kl, r.temperature, self.config["sf_alpha"], divide_by_t=not proxy)

    #: the WVIR of one history (a test may swap in another formulation of the same formula)
    wvir_fn = staticmethod(wvir)

    def _update(self, st: _RequestState, r: RequestStep) -> None:
        sf = self._record(st, r)
        if sf is not None:
            st.k = dsl_step(self.wvir_fn(st.hist.kl, self.decay), sf, *st.bounds)
            st.pred = self._clip(st.k)

    def observe(self, result: StepResult) -> None:
        """One request at a time, in batch order (a repeated rid's last entry wins)."""
        if self.config["cost_cap"]:
            self._observe_costs(result)
        for r in result.requests:
            if r.proposed <= 0:
                continue
            self.admit(r.rid)
            self._update(self._req[r.rid], r)

    def warming_up(self, rid: str) -> bool:
        """Whether the request is still in warm-up (its length is neither capped nor counted in the cap)."""
        st = self._req.get(rid)
        return st is None or st.bounds is None

    def predictions(self, rids: Sequence[str]) -> dict[str, int]:
        """Each request's own next length k̂_r, before the batch cap."""
        for rid in rids:
            self.admit(rid)
        return {rid: self._req[rid].pred for rid in rids}

    def decide(self, batch: BatchView) -> Decision:
        preds = self.predictions(batch.rids)
        lengths = dict(preds)
        cap = None
        if self.config["cap"]:
            steady = {rid: k for rid, k in preds.items() if not self.warming_up(rid)}
            capped, cap = apply_batch_cap(steady)
            lengths.update(capped)
        info: dict = {"sl_cap": cap}
        if self.config["cost_cap"]:
            lengths, info["cost_cap"] = self._apply_cost_cap(batch, lengths)
        return Decision(speculate=any(k > 0 for k in lengths.values()), lengths=lengths, info=info)

    # the cost cap (``costs`` and ``alpha`` are the package's) -----------------------------------------------------
    def _observe_costs(self, result: StepResult) -> None:
        if self.given_costs is None:
            self.learned.update(result)
        self.alphas.update(result)

    def _apply_cost_cap(self, batch: BatchView, lengths: dict[str, int]) -> tuple[dict[str, int], int | None]:
        floor = max(1, self.k_floor)
        if max(lengths.values(), default=0) <= floor:
            return lengths, None
        known = self.given_costs is not None or (self.learned.knows_verify() and self.learned.knows_draft())
        if not known:  # probe: alternate uncapped and floor-capped steps until the linear fit is identifiable
            self._probe += 1
            cap = floor if self._probe % 2 == 0 else None
        else:
            ctx = round(sum(batch.context_lens) / len(batch.context_lens)) if batch.context_lens else 0
            cap, _ = best_length_cap(self.costs, [self.alpha(rid) for rid in batch.rids],
                                     [lengths[rid] for rid in batch.rids], floor, ctx)
        if cap is None:
            return lengths, None
        return {rid: min(k, cap) for rid, k in lengths.items()}, cap

    # persistence --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"requests": {rid: st.state_dict() for rid, st in self._req.items()},
                **self.alphas.state_dict(), "learned": self.learned.state_dict(), "probe": self._probe}

    def load_state_dict(self, state: dict) -> None:
        self._req = {rid: _RequestState.from_state(s) for rid, s in state.get("requests", {}).items()}
        self.alphas.load_state_dict(state)
        if "learned" in state:
            self.learned.load_state_dict(state["learned"])
        self._probe = int(state.get("probe", 0))
