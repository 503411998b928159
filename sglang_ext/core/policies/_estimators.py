"""Small online estimators shared by the cost-aware policies (tide-control, goodput).

Each learned cost model answers the same duck-typed questions as a profile's fitted ``CostModel``
(``verify_seconds(batch_size, tokens_per_request, context_len=0)`` and ``draft_seconds(batch_size, depth)``),
so a policy reads costs the same way whether they were given or learned; the learned ones also say whether they
*can* answer yet (``knows_verify`` / ``knows_draft``), which is what drives exploration.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from ..signals import StepResult


@functools.cache
def kernels():
    """The compiled per-step functions (:mod:`._kernels`), imported on first use: numba's import and load (~0.5 s)
    are paid only by a process whose policy steps through them."""
    from . import _kernels

    return _kernels


class RatioEMA:
    r"""Exponentially weighted ratio of sums, for a rate such as α = successes / trials.

    .. math::  S \leftarrow \lambda S + s, \quad N \leftarrow \lambda N + n, \quad \hat r = S / N

    Discounting the numerator and denominator separately (rather than averaging per-step ratios) weights each
    step by its number of trials, so a step with one trial does not move α as much as a batch of 64.
    """

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = float(decay)
        self.num = 0.0
        self.den = 0.0

    def update(self, num: float, den: float) -> None:
        if den <= 0:
            return
        self.num = self.decay * self.num + num
        self.den = self.decay * self.den + den

    @property
    def value(self) -> float | None:
        return self.num / self.den if self.den > 0 else None

    def state_dict(self) -> list[float]:
        return [self.num, self.den]

    def load(self, state: list[float]) -> RatioEMA:
        self.num, self.den = float(state[0]), float(state[1])
        return self


class SlotTable:
    """Request ids mapped to rows of per-request state, rows reused after :meth:`release`.

    Why: a policy's per-request state held as one array per field (indexed by slot) is updated for a whole batch
    with a few array operations (or one compiled pass), where a dict of small objects costs a Python call per
    request per step — the simulator's dominant cost at 64 running requests. ``fields`` maps a name to
    ``(dtype, fill, row shape)``; a new slot's row is reset to ``fill``. The scalar fields are one numpy structured
    array (:attr:`records`, one record per slot: what a compiled step takes as a single argument, its type the same
    whatever the sizes); a field with a row shape (a window) is its own ``[slots, *shape]`` array. :attr:`cols`
    holds every field: a view of the records or the field's own array.
    """

    def __init__(self, **fields: tuple[Any, Any, tuple[int, ...]]) -> None:
        self.index: dict[str, int] = {}
        self.free: list[int] = []
        self.fields = fields
        self._scalar = [name for name, (_, _, shape) in fields.items() if shape == ()]
        self._shaped = [name for name, (_, _, shape) in fields.items() if shape != ()]
        self.dtype = np.dtype([(name, fields[name][0]) for name in self._scalar], align=True)
        self._fill = np.zeros((), self.dtype)
        for name in self._scalar:
            self._fill[name] = fields[name][1]
        self.size = 0
        self.records = np.zeros(0, self.dtype)
        self._arrays = {name: np.full((0, *fields[name][2]), fields[name][1], dtype=fields[name][0])
                        for name in self._shaped}
        self.cols: dict[str, np.ndarray] = {}
        self._views()
        self._last: tuple[list[str], np.ndarray] | None = None  # the last lookup, while no request came or went

    def _views(self) -> None:
        self.cols = {name: self.records[name] if name in self.dtype.names else self._arrays[name]
                     for name in self.fields}

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, rid: str) -> bool:
        return rid in self.index

    def _grow(self) -> None:
        old = self.size
        self.size = max(64, 2 * old)
        grown = np.full(self.size, self._fill, self.dtype)
        grown[:old] = self.records
        self.records = grown
        for name in self._shaped:
            dt, fill, shape = self.fields[name]
            arr = np.full((self.size, *shape), fill, dtype=dt)
            arr[:old] = self._arrays[name]
            self._arrays[name] = arr
        self._views()
        self.free.extend(range(self.size - 1, old - 1, -1))

    def add(self, rid: str) -> int:
        """The request's slot, a fresh one (reset to the fills) when it has none."""
        got = self.index.get(rid)
        if got is not None:
            return got
        if not self.free:
            self._grow()
        slot = self.free.pop()
        self.records[slot] = self._fill
        for name in self._shaped:
            self._arrays[name][slot] = self.fields[name][1]
        self.index[rid] = slot
        self._last = None
        return slot

    def slots(self, rids: Sequence[str]) -> np.ndarray:
        """Slots of ``rids`` in order, new requests added."""
        got = self._cached(rids)
        if got is not None:
            return got
        try:  # every request known (the common case: a batch that changed by a few requests)
            out = np.fromiter(map(self.index.__getitem__, rids), dtype=np.intp, count=len(rids))
        except KeyError:
            get, add = self.index.get, self.add
            out = np.array([s if (s := get(r)) is not None else add(r) for r in rids], dtype=np.intp)
        self._last = (list(rids), out)
        return out

    def lookup(self, rids: Sequence[str]) -> np.ndarray:
        """Slots of ``rids`` in order, -1 for a request without one."""
        got = self._cached(rids)
        if got is not None:
            return got
        get = self.index.get
        out = np.array([get(r, -1) for r in rids], dtype=np.intp)
        if (out >= 0).all():
            self._last = (list(rids), out)
        return out

    def _cached(self, rids: Sequence[str]) -> np.ndarray | None:
        """The last answer when asked about the same requests again (a batch is asked about at its decide and its
        observe, and it changes only when a request joins or leaves). A copy: callers may write to it."""
        last = self._last
        if last is not None and last[0] == rids:
            return last[1].copy()
        return None

    def release(self, rid: str) -> None:
        slot = self.index.pop(rid, None)
        if slot is not None:
            self.free.append(slot)
            self._last = None

    def items(self) -> list[tuple[str, int]]:
        return list(self.index.items())


class RequestAlphas:
    r"""Per-request per-token acceptance α (the chain MLE as a :class:`RatioEMA`), with the batch-wide estimate for
    a request not yet verified and ``prior`` before any step. Shared by the cost-aware length policies.

    The per-request ratios live in a :class:`SlotTable` (``num``, ``den``) and are updated per step in one compiled
    pass (:func:`._kernels.ratio_update`), the same float operations as one :class:`RatioEMA` per request:
    :math:`S_r \leftarrow \lambda S_r + s_r,\ N_r \leftarrow \lambda N_r + n_r` for every request with trials,
    and the batch-wide ratio updated the same way by every such request in batch order.
    """

    #: the per-request fields, for a policy that keeps them in its own :class:`SlotTable` (``table=``)
    FIELDS: dict[str, tuple[Any, Any, tuple[int, ...]]] = {"num": (float, 0.0, ()), "den": (float, 0.0, ())}

    def __init__(self, decay: float, prior: float = 0.5, table: SlotTable | None = None) -> None:
        self.decay = float(decay)
        self.prior = float(prior)
        #: a request's row; ``den == 0`` (a new row) means no estimate of its own yet. A policy may pass its own
        #: table holding :attr:`FIELDS` (its slots then serve both, one lookup per step); it then owns the rows.
        self.table = table if table is not None else SlotTable(**self.FIELDS)
        self._own_table = table is None
        self.batch = RatioEMA(decay)

    def update(self, result: StepResult) -> None:
        c = result.columns
        prop = c.proposed
        if prop.any():  # some request has chain trials (a proposed chain verifies >= 1 position)
            b = self.batch
            b.num, b.den = kernels().ratio_update(self.table.slots(c.rids), prop, c.accepted, self.table.records,
                                                  self.decay, b.num, b.den)

    def fallback(self) -> float:
        """α of a request without its own estimate: the batch-wide one, or the prior before any step."""
        a = self.batch.value
        return self.prior if a is None else a

    def value(self, rid: str) -> float:
        slot = self.table.index.get(rid)
        if slot is not None and self.table.cols["den"][slot] > 0:
            return float(self.table.cols["num"][slot] / self.table.cols["den"][slot])
        return self.fallback()

    def values(self, rids: Sequence[str]) -> np.ndarray:
        """:meth:`value` of every request in ``rids``, as one array."""
        return kernels().ratio_values(self.table.lookup(rids), self.table.records, self.fallback())

    def release(self, rid: str) -> None:
        self.table.release(rid)

    def state_dict(self) -> dict:
        num, den = self.table.cols["num"], self.table.cols["den"]
        return {"alpha_req": {rid: [float(num[s]), float(den[s])] for rid, s in self.table.items() if den[s] > 0},
                "alpha_all": self.batch.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the estimates (into a fresh table when it is this object's own; a policy's shared table is reset
        by the policy)."""
        if self._own_table:
            self.table = SlotTable(**self.FIELDS)
        for rid, (n, d) in state.get("alpha_req", {}).items():
            slot = self.table.add(rid)
            self.table.cols["num"][slot] = float(n)
            self.table.cols["den"][slot] = float(d)
        if "alpha_all" in state:
            self.batch = RatioEMA(self.decay).load(state["alpha_all"])


def step_trials(result: StepResult) -> tuple[int, int]:
    """(successes, trials) of a whole step, summing :func:`chain_trials` over its requests."""
    c = result.columns
    return kernels().chain_trial_sums(c.proposed, c.accepted)


def tokens_per_request(result: StepResult) -> int:
    """Token positions the target processed per request: 1 for a plain step, ``k + 1`` for a depth-k chain."""
    b = max(result.batch_size, 1)
    if not result.speculated:
        return 1
    if result.verify_tokens > 0:
        return max(1, round(result.verify_tokens / b))
    return step_depth(result) + 1


def step_depth(result: StepResult) -> int:
    """Draft depth of the step (the deepest request's proposal)."""
    p = result.columns.proposed
    return max(int(p.max()), 0) if len(p) else 0


class CallableCosts:
    """Adapts two callables ``verify_cost(batch_size, tokens_per_request)`` and ``draft_cost(batch_size)`` (seconds
    per draft step, TIDE's D0) to the CostModel interface."""

    def __init__(self, verify_cost: Callable[[int, int], float], draft_cost: Callable[[int], float] | None) -> None:
        self._verify = verify_cost
        self._draft = draft_cost

    def verify_seconds(self, batch_size: int, tokens_per_request: int, context_len: int = 0) -> float:
        return float(self._verify(batch_size, tokens_per_request))

    def draft_seconds(self, batch_size: int, depth: int) -> float:
        return depth * float(self._draft(batch_size)) if self._draft is not None else 0.0


def depth_seconds(costs: Any, batch_size: int, lo: int, hi: int, context_len: int = 0) -> list[float | None]:
    """One step's seconds at every depth ``c = lo..hi``, ``V(b, c + 1) + D(b, c)`` (``D(b, 0) = 0``; None where a
    cost is unknown): the cost model's own :meth:`~sglang_ext.core.costs.CostModel.depth_seconds` when it has one
    (priced at once), else one depth at a time."""
    many = getattr(costs, "depth_seconds", None)
    if many is not None:
        return many(batch_size, lo, hi, context_len)
    out: list[float | None] = []
    for c in range(lo, hi + 1):
        v = costs.verify_seconds(batch_size, c + 1, context_len)
        d = costs.draft_seconds(batch_size, c) if c > 0 else 0.0
        out.append(None if v is None or d is None else v + d)
    return out


def resolve_costs(cost_model: Any = None, verify_cost: Callable | None = None,
                  draft_cost: Callable | None = None) -> Any | None:
    """The given costs as one CostModel-like object, or None when nothing was given (learn online)."""
    if cost_model is not None:
        for m in ("verify_seconds", "draft_seconds"):
            if not callable(getattr(cost_model, m, None)):
                raise TypeError(f"cost model {type(cost_model).__name__} has no method {m}()")
        return cost_model
    if verify_cost is not None:
        return CallableCosts(verify_cost, draft_cost)
    if draft_cost is not None:
        raise ValueError("draft_cost without verify_cost: give both, or a cost_model")
    return None


class OnlineCostTable:
    """Non-parametric learned costs: an EMA of measured seconds per (batch size, tokens per request).

    A plain step measures ``T(b)`` (key ``(b, 1)``), a speculative step ``T(b(γ+1))`` (key ``(b, γ+1)``) and the
    draft time per depth step ``D(b)``. A batch size never measured for a given ``t`` is read by linear
    interpolation between the nearest measured batch sizes (clamped at the ends), so one measurement at b = 8
    already answers for b = 7. Step time includes ``overhead_seconds`` (it is paid in either mode).
    """

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = float(weight)  # weight of a new sample
        self.verify: dict[int, dict[int, float]] = {}  # t -> {b: seconds}
        self.draft: dict[int, float] = {}  # b -> seconds per depth step

    def _ema(self, table: dict[int, float], key: int, value: float) -> None:
        old = table.get(key)
        table[key] = value if old is None else (1 - self.weight) * old + self.weight * value

    def update(self, result: StepResult) -> None:
        b = result.batch_size
        if b <= 0 or result.verify_seconds <= 0:
            return
        t = tokens_per_request(result)
        self._ema(self.verify.setdefault(t, {}), b, result.verify_seconds + result.overhead_seconds)
        depth = step_depth(result)
        if result.speculated and depth > 0 and result.draft_seconds > 0:
            self._ema(self.draft, b, result.draft_seconds / depth)

    @staticmethod
    def _interp(table: dict[int, float], b: int) -> float | None:
        if not table:
            return None
        if b in table:
            return table[b]
        keys = sorted(table)
        i = bisect.bisect_left(keys, b)
        if i == 0:
            return table[keys[0]]
        if i == len(keys):
            return table[keys[-1]]
        lo, hi = keys[i - 1], keys[i]
        w = (b - lo) / (hi - lo)
        return (1 - w) * table[lo] + w * table[hi]

    def knows_verify(self, t: int) -> bool:
        """Whether ``T(b·t)`` can be read: ``t`` itself was measured, or two other ``t`` to draw a line through."""
        return bool(self.verify.get(t)) or len(self.verify) >= 2

    def knows_draft(self) -> bool:
        return bool(self.draft)

    def verify_seconds(self, batch_size: int, tokens_per_request: int, context_len: int = 0) -> float | None:
        """Measured ``t`` first; otherwise linear in ``t`` through the two nearest measured ``t`` (bracketing ones
        when they exist), which is what lets ragged steps (``verify_tokens / b`` between depths) price any γ."""
        t = tokens_per_request
        if self.verify.get(t):
            return self._interp(self.verify[t], batch_size)
        ts = sorted(self.verify)
        if len(ts) < 2:
            return None
        i = bisect.bisect_left(ts, t)
        lo, hi = (ts[i - 1], ts[i]) if 0 < i < len(ts) else ((ts[0], ts[1]) if i == 0 else (ts[-2], ts[-1]))
        v_lo, v_hi = self._interp(self.verify[lo], batch_size), self._interp(self.verify[hi], batch_size)
        return max(v_lo + (v_hi - v_lo) * (t - lo) / (hi - lo), 0.0)

    def draft_seconds(self, batch_size: int, depth: int) -> float | None:
        d = self._interp(self.draft, batch_size)
        return None if d is None else depth * d

    def state_dict(self) -> dict:
        return {"verify": {str(t): {str(b): v for b, v in row.items()} for t, row in self.verify.items()},
                "draft": {str(b): v for b, v in self.draft.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.verify = {int(t): {int(b): float(v) for b, v in row.items()} for t, row in state.get("verify", {}).items()}
        self.draft = {int(b): float(v) for b, v in state.get("draft", {}).items()}


class _DiscountedLine:
    r"""Weighted least squares of ``y = a + b·x`` with exponential forgetting (ρ per sample).

    .. math::  \hat b = \frac{S\,S_{xy} - S_x S_y}{S\,S_{xx} - S_x^2}, \qquad \hat a = (S_y - \hat b S_x) / S

    over discounted sums :math:`S = \sum \rho^{age}`, :math:`S_x = \sum \rho^{age} x`, …. A negative slope (noise)
    is clamped to 0; with a single distinct x the slope is unidentified (``slope_known`` False) and 0 is used.
    """

    def __init__(self, forget: float = 0.99) -> None:
        self.forget = float(forget)
        self.s = [0.0] * 5  # S, Sx, Sy, Sxx, Sxy

    def update(self, x: float, y: float) -> None:
        r = self.forget
        S, Sx, Sy, Sxx, Sxy = (v * r for v in self.s)
        self.s = [S + 1, Sx + x, Sy + y, Sxx + x * x, Sxy + x * y]

    @property
    def n(self) -> float:
        return self.s[0]

    def _denominator(self) -> float:
        S, Sx, _, Sxx, _ = self.s
        return S * Sxx - Sx * Sx

    @property
    def slope_known(self) -> bool:
        S, _, _, Sxx, _ = self.s
        return S > 0 and self._denominator() > 1e-9 * max(S * Sxx, 1e-300)

    def coefficients(self) -> tuple[float, float] | None:
        S, Sx, Sy, _, Sxy = self.s
        if S <= 0:
            return None
        slope = max((S * Sxy - Sx * Sy) / self._denominator(), 0.0) if self.slope_known else 0.0
        return max((Sy - slope * Sx) / S, 0.0), slope

    def predict(self, x: float) -> float | None:
        c = self.coefficients()
        return None if c is None else c[0] + c[1] * x


class OnlineLinearCost:
    r"""Learned linear cost model (SmartSpec's form): batch time is affine in the batched tokens.

    .. math::  V(b, t) = v_0 + v_1 \cdot b t, \qquad D(b, d) = d\,(d_0 + d_1 b)

    fitted by discounted least squares on every step (verify on ``verify_tokens``, draft per depth step on ``b``).
    """

    def __init__(self, forget: float = 0.99) -> None:
        self.verify_fit = _DiscountedLine(forget)
        self.draft_fit = _DiscountedLine(forget)

    def update(self, result: StepResult) -> None:
        b = result.batch_size
        if b <= 0 or result.verify_seconds <= 0:
            return
        n = b * tokens_per_request(result)
        self.verify_fit.update(n, result.verify_seconds + result.overhead_seconds)
        depth = step_depth(result)
        if result.speculated and depth > 0 and result.draft_seconds > 0:
            self.draft_fit.update(b, result.draft_seconds / depth)

    def knows_verify(self, t: int | None = None) -> bool:
        return self.verify_fit.slope_known

    def knows_draft(self) -> bool:
        return self.draft_fit.n > 0

    def verify_seconds(self, batch_size: int, tokens_per_request: int, context_len: int = 0) -> float | None:
        return self.verify_fit.predict(batch_size * tokens_per_request)

    def draft_seconds(self, batch_size: int, depth: int) -> float | None:
        d = self.draft_fit.predict(batch_size)
        return None if d is None else depth * d

    def state_dict(self) -> dict:
        return {"verify": list(self.verify_fit.s), "draft": list(self.draft_fit.s)}

    def load_state_dict(self, state: dict) -> None:
        self.verify_fit.s = [float(v) for v in state["verify"]]
        self.draft_fit.s = [float(v) for v in state["draft"]]


def rng_state(rng) -> list:
    """``random.Random.getstate()`` as JSON (version, 625 ints, gauss_next)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))
