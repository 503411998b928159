r"""DSDE: per-request speculation length from KL(p‖q) stability, with a batch cap (Yang et al., Samsung SDS).

Re-implemented from the authors' vLLM fork (``vllm/spec_decode/dynamic_scheduler.py``: ``KLScheduler``,
``_weighted_intensity_ratio``, ``_dsl_step``, ``coordinate_batch_k``); see algorithms.md §4.

Per request ``r``, after every verify step that proposed ``k_prop > 0`` tokens with KL values
``KL_1..KL_{k_prop}`` (:func:`~sglang_ext.core.signals.kl_divergence` at every proposed position, accepted
or not):

.. code-block:: text

    hist_r.extend(KL_i)                               # deque, maxlen W ("window"; DSDE worker default 30)
    WARM-UP (len(hist_r) < W):  collect accepted a and the KLs;
        k ← min(2k, max_k)   if a ≥ k               # doubling while everything is accepted
        k ← max(k, min_k)    otherwise
    END OF WARM-UP (once, the step len(hist_r) reaches W):
        k_max' = clip(round(max(a_warm) · (1 + f · mean(KL_warm) / max(KL_warm))), min_k, max_k)
        k_min' = clip(ceil(m · k_max'), min_k, k_max')
    STEADY:
        WVIR = wvar(last max(1, n//3) of hist) / wvar(hist)     (20 if wvar(hist) < 1e-6; 0 if n < 2)
              wvar(x, w) = Σ w (x − μ_w)² / Σ w,  μ_w = Σ w x / Σ w,  w_j = δ^{age_j}  (newest weight 1)
        SF   = exp(α_sf · KL_last / T) − 1           (KL_last = this step's mean KL; no /T when T = 0)
        k̂   = max(k_min', ceil((k_max' − k_min')(1 − WVIR·SF) + k_min'))   if WVIR·SF ≤ 1
        k̂   = k_min'                                                        otherwise
    next length = clip(k, min_k, max_k)
    BATCH CAP (cap=True): SL_cap = ceil(mean over the batch's post-warm-up requests of k̂_r);
        k_r = min(k̂_r, SL_cap)  (requests still in warm-up are neither capped nor counted, as in the code)

The intuition: a KL that is large *and* more volatile recently than over the window (WVIR > 1) predicts
rejections soon, so draft short; a calm, low KL allows long drafts.

**Cost cap** (``cost_cap``, our addition, on by default; ``cost_cap=false`` is DSDE as published). DSDE's rule
is cost-blind: it predicts how many tokens *would be accepted*, not whether verifying them pays. Where an extra
verified position is not nearly free (a CPU, or a large batch on a GPU) its lengths overshoot the best static
depth. After the SL cap, the batch's lengths are capped once more at the depth that maximises expected tokens per
second of the step (:func:`~.goodput.best_length_cap`, over ``1..max k̂``; a cap only shortens):

.. code-block:: text

    c* = argmax_c  Σ_r E_{α_r}[ℓ](min(k_r, c)) / (D(b, c') + V(b, c' + 1)),   c' = max_r min(k_r, c)
    k_r ← min(k_r, c*)

with α_r each request's chain MLE of per-token acceptance (discounted ratio of sums) and the step costs learned
online from the measured seconds of every step (:class:`~._estimators.OnlineLinearCost`, V affine in batched
positions) or taken from a profile's cost model (``cost_model=``). No per-workload profiling: until the online fit
is identifiable, every other step is capped at 1 to measure a second depth. Never below 1: turning speculation off
is the on/off policy's job (compose with tide-control).

**Variants** (``variant`` param; any constant can also be set on its own, which wins over the variant):

============== ===== ====== ========================================================================
variant        δ     f      k_min' rule
============== ===== ====== ========================================================================
``code``       0.9   0.5    ``clip(ceil(0.1·k_max'), min_k, k_max')`` (m = ``min_frac`` = 0.1), min_k 1
``paper``      0.85  1.0    fixed SL_min: m = 0, min_k = 2 (speculation never switched off)
============== ===== ====== ========================================================================

The default is ``code``: it is what produced the paper's measurements and the only version we can read
([CODE]); the paper's constants come from a secondary summary ([SEC]). ``max_k`` defaults to 10 (the top of
DSDE's Static-opt grid {2..10}), not the fork's deployment flag (``max_spec_tokens`` 20 for a 70B/1B pair);
``min_k`` to 1 for ``code`` (the code's ``min_spec_tokens`` default 6 is a deployment floor that would
forbid short drafts for a small drafter).

**Model-free drafters (no KL):** a request whose steps carry no ``kl`` uses an acceptance-only proxy in its
place: each *verified* position contributes ``0`` if accepted and ``miss_kl`` if it was the rejected one
(positions after the first rejection were never verified and contribute nothing). Then ``KL_last`` is
``miss_kl`` × the rejected fraction of the step's verified positions, SF = exp(α_sf·KL_last) − 1 (no
temperature division: the proxy is not a temperature-scaled divergence) and WVIR measures how bursty the
rejections are. All accepted → SF = 0 → k_max'; steady rejections → k_min'. The same warm-up and bounds apply.

Steps where the request proposed nothing (plain decode steps) carry no information about the drafter and are
skipped. (The fork fed them to the warm-up as "accepted 0, no KL", which changes neither k, max(a_warm) nor
the KL mean, so skipping is equivalent.)

**Speed.** A simulated run steps 64 requests per step for hours of simulated time, so the per-request state lives
in arrays (:class:`~._estimators.SlotTable`: current and predicted length, bounds, the KL window as a ring) and a
step is a handful of array operations over its requests, warm-up included. The float operations are those of the
scalar formulas, in the same order (the KL sums add position by position; WVIR is :func:`wvir_rows`: one numpy
two-pass over a ``[requests, W]`` matrix when there are :data:`BATCH_WVIR_MIN` or more, the plain :func:`wvir`
otherwise, whose sums round differently in the last bits, which changes no decision). ``tests/test_validate.py`` replays random steps through
this and the per-request reference implementation and compares every decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import repeat
from operator import mul, sub
from typing import Any, Callable

import numpy as np

from ..signals import StepColumns, StepResult
from ._estimators import OnlineLinearCost, RequestAlphas, SlotTable, resolve_costs
from .base import BatchLengths, BatchView, Decision, Param, Policy
from .goodput import best_length_cap

VARIANTS = {
    "code": {"decay": 0.9, "max_factor": 0.5, "min_frac": 0.1, "min_k": 1},
    "paper": {"decay": 0.85, "max_factor": 1.0, "min_frac": 0.0, "min_k": 2},
}

#: WVIR when the long-window variance is ~0 (a flat history), and the threshold for "~0" (DSDE's constants)
WVIR_FLAT = 20.0
VAR_EPS = 1e-6
_EPS_T = 1e-8


#: from this many steady requests in one step on, WVIR is evaluated as one numpy batch (:func:`wvir_rows`)
BATCH_WVIR_MIN = 8

_WEIGHTS: dict[tuple[int, float], tuple[list[float], float]] = {}
_NP_WEIGHTS: dict[tuple[int, float], tuple[np.ndarray, float, np.ndarray, float]] = {}


def _weights(n: int, decay: float) -> tuple[list[float], float]:
    """``([decay**(n-1), ..., decay, 1], their sum)``, cached (the same floats the plain formula computes)."""
    got = _WEIGHTS.get((n, decay))
    if got is None:
        if len(_WEIGHTS) >= 4096:
            _WEIGHTS.clear()
        w = [decay ** (n - 1 - i) for i in range(n)]
        got = _WEIGHTS[(n, decay)] = (w, sum(w))
    return got


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


def _np_weights(n: int, decay: float) -> tuple[np.ndarray, float, np.ndarray, float]:
    got = _NP_WEIGHTS.get((n, decay))
    if got is None:
        if len(_NP_WEIGHTS) >= 4096:
            _NP_WEIGHTS.clear()
        w, sw = _weights(n, decay)
        ws, sws = _weights(max(1, n // 3), decay)
        got = _NP_WEIGHTS[(n, decay)] = (np.array(w), sw, np.array(ws), sws)
    return got


def wvir_rows(X: np.ndarray, decay: float) -> np.ndarray:
    """:func:`wvir` of every row of ``X`` (``[m, n]``, oldest value first; the same value up to float rounding in
    the last bits): the numpy two-pass when ``m >= BATCH_WVIR_MIN`` and ``n >= 2``, the plain formula otherwise."""
    m, n = X.shape
    if n < 2 or m < BATCH_WVIR_MIN:
        return np.array([wvir(row, decay) for row in X.tolist()], dtype=float)
    w, sw, ws, sws = _np_weights(n, decay)
    short = len(ws)
    D = X - ((X @ w) / sw)[:, None]
    long_var = ((D * D) @ w) / sw
    S = X[:, n - short:]
    Ds = S - ((S @ ws) / sws)[:, None]
    short_var = ((Ds * Ds) @ ws) / sws
    flat = long_var < VAR_EPS
    return np.where(flat, WVIR_FLAT, short_var / np.where(flat, 1.0, long_var))


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


#: per-request state of :class:`DSDEPolicy` (:class:`~._estimators.SlotTable` fields; ``kl`` is the window ring)
def _state_fields(window: int, init_k: int, init_pred: int) -> dict[str, tuple[Any, Any, tuple[int, ...]]]:
    return {
        "k": (np.int64, init_k, ()),  # the controller's length
        "pred": (np.int64, init_pred, ()),  # its clipped prediction k̂ (the next length before the batch caps)
        "steady": (bool, False, ()),  # warm-up ended: bounds set
        "lo": (np.int64, 0, ()), "hi": (np.int64, 0, ()),  # (k_min', k_max') once steady
        "warm_n": (np.int64, 0, ()), "warm_acc_max": (np.int64, 0, ()),  # warm-up samples: accepted counts
        "warm_kl_sum": (float, 0.0, ()), "warm_kl_n": (np.int64, 0, ()), "warm_kl_max": (float, 0.0, ()),
        "kl": (float, 0.0, (window,)), "kl_n": (np.int64, 0, ()), "kl_ptr": (np.int64, 0, ()),  # KL window ring
    }


class DSDEPolicy(Policy):
    """DSDE's per-request KL-stability controller plus the batch SL cap (module docstring has the math)."""

    name = "dsde"
    needs_kl = True
    ordered_params = (("min_k", "init_k", "max_k"),)
    extra_args = ("cost_model", "verify_cost", "draft_cost")
    params = (
        Param("variant", "code", kind="choice", choices=("code", "paper"),
              doc="constants of the authors' code (default) or of the paper; see the module docstring"),
        Param("min_k", None, 1, 32, "int", doc="floor of every length (None: 1 for code, 2 = SL_min for paper)",
              depth=True),
        Param("max_k", 10, 1, 32, "int", doc="ceiling of every length and of warm-up doubling", depth=True),
        Param("init_k", 4, 1, 32, "int", doc="first length of a new request (warm-up starts here)", depth=True),
        Param("window", 30, 2, 1024, "int", doc="W: KL history length in tokens; warm-up lasts until it is full"),
        Param("decay", None, 0.5, 0.999, doc="δ, weight decay per token of age in WVIR (None: variant)"),
        Param("max_factor", None, 0.0, 4.0, doc="f in the dynamic k_max' (None: variant)"),
        Param("min_frac", None, 0.0, 1.0, doc="m in k_min' = ceil(m·k_max') (None: variant)"),
        Param("sf_alpha", 2.0, 0.1, 10.0, doc="α_sf in SF = exp(α_sf·KL/T) − 1 (DSDE: 2.0)"),
        Param("miss_kl", 0.5, 0.01, 10.0, doc="proxy KL of a rejected position when the drafter gives no q"),
        Param("cap", True, kind="choice", choices=(True, False), doc="apply the batch SL cap"),
        Param("cost_cap", True, kind="choice", choices=(True, False),
              doc="cap lengths at the goodput-optimal depth (module docstring); false = DSDE as published"),
        Param("alpha_decay", 0.9, 0.5, 0.9999, doc="discount per step of each request's α (cost cap)"),
        Param("forget", 0.99, 0.5, 1.0, doc="forgetting factor of the online linear cost fit (cost cap)"),
    )

    def __init__(self, cost_model: Any = None, verify_cost: Callable[[int, int], float] | None = None,
                 draft_cost: Callable[[int], float] | None = None, **overrides) -> None:
        super().__init__(**overrides)
        c = self.config
        variant = VARIANTS[c["variant"]]
        #: resolved constants (explicit params win over the variant)
        self.k_floor: int = c["min_k"] if c["min_k"] is not None else variant["min_k"]
        self.decay: float = c["decay"] if c["decay"] is not None else variant["decay"]
        self.max_factor: float = c["max_factor"] if c["max_factor"] is not None else variant["max_factor"]
        self.min_frac: float = c["min_frac"] if c["min_frac"] is not None else variant["min_frac"]
        if self.k_floor > c["max_k"]:
            raise ValueError(f"{self.name}: min_k={self.k_floor} > max_k={c['max_k']}")
        self.window: int = c["window"]
        self.table = self._new_table()
        self.given_costs = resolve_costs(cost_model, verify_cost, draft_cost)
        self.learned = OnlineLinearCost(c["forget"])
        self.alphas = RequestAlphas(c["alpha_decay"], prior=0.5)
        self._probe = 0

    def _new_table(self) -> SlotTable:
        init_k = self.config["init_k"]
        return SlotTable(**_state_fields(self.window, init_k, self._clip(init_k)))

    # request lifetime ---------------------------------------------------------------------------------------------
    def admit(self, rid: str) -> None:
        self.table.add(rid)

    def release(self, rid: str) -> None:
        self.table.release(rid)
        self.alphas.release(rid)

    def _clip(self, k: int) -> int:
        return min(max(int(k), self.k_floor), self.config["max_k"])

    # the controller -----------------------------------------------------------------------------------------------
    def _step_values(self, c: StepColumns, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This step's KL values of ``rows`` as ``(V [n, K], count per row, proxy per row)``: the drafter's KL at
        the proposed positions, or the acceptance-only proxy ``[0]·a + [miss_kl]·[a < k]`` where it gave none."""
        prop, acc = c.proposed[rows], c.accepted[rows]
        kl_len = c.kl_len[rows]
        proxy = kl_len <= 0
        counts = np.where(proxy, acc + (acc < prop), np.minimum(kl_len, prop))
        width = int(counts.max())
        V = np.zeros((len(rows), width))
        if c.kl is not None and not proxy.all():
            src = c.kl[rows, :min(width, c.kl.shape[1])]
            V[:, :src.shape[1]] = src
            V[proxy] = 0.0
        cols = np.arange(width)[None, :]
        V[cols >= counts[:, None]] = 0.0  # padding: zeros, so that position-by-position sums add nothing
        if proxy.any():
            miss_rows = np.flatnonzero(proxy & (acc < prop))
            V[miss_rows, acc[miss_rows]] = self.config["miss_kl"]
        return V, counts, proxy

    def _record_window(self, slots: np.ndarray, V: np.ndarray, counts: np.ndarray) -> None:
        """Append each row's values to its request's KL window (a ring of ``W``; only the last ``W`` are kept)."""
        W = self.window
        cols = self.table.cols
        ptr = cols["kl_ptr"][slots]
        width = V.shape[1]
        j = np.arange(width)[None, :]
        keep = (j < counts[:, None]) & (j >= (counts - W)[:, None])
        r, jj = np.nonzero(keep)
        cols["kl"][slots[r], (ptr[r] + jj) % W] = V[r, jj]
        cols["kl_ptr"][slots] = (ptr + counts) % W
        cols["kl_n"][slots] = np.minimum(cols["kl_n"][slots] + counts, W)

    def _warm_rows(self, idx: np.ndarray, slots: np.ndarray, V: np.ndarray, counts: np.ndarray,
                   accepted: np.ndarray) -> None:
        """The warm-up rule (module docstring) for the rows ``idx`` of requests still warming up, after this step's
        values were recorded: rows whose window is still short collect warm-up samples and double/keep ``k``; rows
        whose window just filled end their warm-up (bounds from the samples) and are steady from this step on."""
        cols = self.table.cols
        ss = slots[idx]
        filling = cols["kl_n"][ss] < self.window
        if filling.any():
            w = idx[filling]
            ws = slots[w]
            acc = accepted[w]
            cols["warm_n"][ws] += 1
            cols["warm_acc_max"][ws] = np.maximum(cols["warm_acc_max"][ws], acc)
            vals = V[w]
            # running sum of every warm-up KL in order: old sum, then this step's values one position at a time
            cols["warm_kl_sum"][ws] = np.add.reduce(np.ascontiguousarray(
                np.concatenate([cols["warm_kl_sum"][ws][:, None], vals], axis=1).T), axis=0)
            valid = np.arange(vals.shape[1])[None, :] < counts[w][:, None]
            top = np.where(valid, vals, -np.inf).max(axis=1)
            had = cols["warm_kl_n"][ws] > 0
            cols["warm_kl_max"][ws] = np.where(had, np.maximum(cols["warm_kl_max"][ws], top), top)
            cols["warm_kl_n"][ws] += counts[w]
            k = cols["k"][ws]
            k = np.where(acc >= k, np.minimum(np.where(k > 0, 2 * k, 1), self.config["max_k"]),
                         np.maximum(k, self.k_floor))
            cols["k"][ws] = k
            cols["pred"][ws] = np.minimum(np.maximum(k, self.k_floor), self.config["max_k"])
        if not filling.all():
            es = ss[~filling]
            lo, hi = self._end_warmup(es)
            cols["lo"][es], cols["hi"][es] = lo, hi
            cols["steady"][es] = True

    def _end_warmup(self, ss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r"""Bounds at the end of warm-up, for the requests at slots ``ss``:
        :math:`k_{max}' = \mathrm{clip}(\mathrm{round}(\max a \cdot (1 + f\,\overline{KL}/\max KL)))`,
        :math:`k_{min}' = \mathrm{clip}(\lceil m\,k_{max}' \rceil)` (a max KL of 0 counts as 1; no samples: the floor
        and ``max_k``)."""
        cols = self.table.cols
        lo, hi = self.k_floor, self.config["max_k"]
        n = cols["warm_kl_n"][ss]
        some = n > 0
        mean_kl = np.where(some, cols["warm_kl_sum"][ss] / np.maximum(n, 1), 0.0)
        max_kl = np.where(some, cols["warm_kl_max"][ss], 1.0)
        max_kl = np.where(max_kl == 0, 1.0, max_kl)
        k_max = np.minimum(hi, np.maximum(lo, np.rint(cols["warm_acc_max"][ss] * (1 + self.max_factor * mean_kl / max_kl))))
        k_max = k_max.astype(np.int64)
        k_min = np.minimum(k_max, np.maximum(lo, np.ceil(self.min_frac * k_max))).astype(np.int64)
        none = cols["warm_n"][ss] == 0
        return np.where(none, lo, k_min), np.where(none, hi, k_max)

    def observe(self, result: StepResult) -> None:
        if self.config["cost_cap"]:
            self._observe_costs(result)
        c = result.columns
        rows = np.flatnonzero(c.proposed > 0)
        if len(rows) == 0:
            return
        rids = c.rids
        row_rids = [rids[i] for i in rows.tolist()]
        if len(set(row_rids)) < len(row_rids):  # a request listed twice: its entries in order, one step each
            for i in rows.tolist():
                self._observe_rows(c, np.array([i]), [rids[i]])
            return
        self._observe_rows(c, rows, row_rids)

    def _observe_rows(self, c: StepColumns, rows: np.ndarray, row_rids: list[str]) -> None:
        slots = self.table.slots(row_rids)
        V, counts, proxy = self._step_values(c, rows)
        self._record_window(slots, V, counts)
        cols = self.table.cols
        warm = ~cols["steady"][slots]
        if warm.any():
            self._warm_rows(np.flatnonzero(warm), slots, V, counts, c.accepted[rows])
        steady = cols["steady"][slots]
        if not steady.any():
            return
        idx = np.flatnonzero(steady)
        ss = slots[idx]
        # SF from this step's mean KL (summed position by position, as the scalar sum does)
        kl_last = np.add.reduce(np.ascontiguousarray(V[idx].T), axis=0) / counts[idx]
        temp = c.temperatures[rows[idx]]
        scaled = ~proxy[idx] & (np.abs(temp) >= _EPS_T)
        x = np.where(scaled, kl_last / (temp + _EPS_T), kl_last)
        sf = np.expm1(np.minimum(self.config["sf_alpha"] * x, 700.0))
        # WVIR over each window, oldest first
        W = self.window
        order = (cols["kl_ptr"][ss][:, None] + np.arange(W)[None, :]) % W
        ratio = wvir_rows(cols["kl"][ss[:, None], order], self.decay)
        # DSDE's length rule, then the clip
        lo, hi = cols["lo"][ss], cols["hi"][ss]
        r = ratio * sf
        k = np.where(r <= 1, np.maximum(lo, np.ceil((hi - lo) * (1 - np.minimum(r, 1.0)) + lo)), lo).astype(np.int64)
        cols["k"][ss] = k
        cols["pred"][ss] = np.minimum(np.maximum(k, self.k_floor), self.config["max_k"])

    def warming_up(self, rid: str) -> bool:
        """Whether the request is still in warm-up (its length is neither capped nor counted in the cap)."""
        slot = self.table.index.get(rid)
        return slot is None or not bool(self.table.cols["steady"][slot])

    def bounds(self, rid: str) -> tuple[int, int] | None:
        """The request's ``(k_min', k_max')`` once its warm-up ended (None before, or for an unknown request)."""
        slot = self.table.index.get(rid)
        if slot is None or not self.table.cols["steady"][slot]:
            return None
        return int(self.table.cols["lo"][slot]), int(self.table.cols["hi"][slot])

    def predictions(self, rids: Sequence[str]) -> dict[str, int]:
        """Each request's own next length k̂_r, before the batch cap."""
        slots = self.table.slots(rids)  # first: admitting may grow the table (new arrays)
        preds = self.table.cols["pred"][slots].tolist()
        return dict(zip(rids, preds))

    def decide(self, batch: BatchView) -> Decision:
        rids = batch.rids
        slots = self.table.slots(rids)
        cols = self.table.cols
        lengths = cols["pred"][slots]
        cap = None
        if self.config["cap"]:
            steady = cols["steady"][slots]
            if steady.any():  # apply_batch_cap over the post-warm-up requests
                cap = math.ceil(int(lengths[steady].sum()) / int(steady.sum()) - 1e-12)
                lengths = np.where(steady, np.minimum(lengths, cap), lengths)
        info: dict = {"sl_cap": cap}
        if self.config["cost_cap"]:
            lengths, info["cost_cap"] = self._apply_cost_cap(batch, lengths)
        ks = lengths.tolist()
        return Decision(speculate=any(k > 0 for k in ks), lengths=BatchLengths(rids, ks=ks), info=info)

    # the cost cap -------------------------------------------------------------------------------------------------
    @property
    def costs(self):
        return self.given_costs if self.given_costs is not None else self.learned

    def _observe_costs(self, result: StepResult) -> None:
        if self.given_costs is None:
            self.learned.update(result)
        self.alphas.update(result)

    def alpha(self, rid: str) -> float:
        """The request's running per-token acceptance (batch-wide before its first verify; 0.5 before any)."""
        return self.alphas.value(rid)

    def _apply_cost_cap(self, batch: BatchView, lengths: np.ndarray) -> tuple[np.ndarray, int | None]:
        floor = max(1, self.k_floor)
        if len(lengths) == 0 or int(lengths.max()) <= floor:
            return lengths, None
        known = self.given_costs is not None or (self.learned.knows_verify() and self.learned.knows_draft())
        if not known:  # probe: alternate uncapped and floor-capped steps until the linear fit is identifiable
            self._probe += 1
            cap = floor if self._probe % 2 == 0 else None
        else:
            ctx = round(sum(batch.context_lens) / len(batch.context_lens)) if len(batch.context_lens) else 0
            cap, _ = best_length_cap(self.costs, self.alphas.values(batch.rids), lengths, floor, ctx)
        if cap is None:
            return lengths, None
        return np.minimum(lengths, cap), cap

    # persistence --------------------------------------------------------------------------------------------------
    def _request_state(self, slot: int) -> dict:
        cols = self.table.cols
        n, ptr, W = int(cols["kl_n"][slot]), int(cols["kl_ptr"][slot]), self.window
        ring = cols["kl"][slot].tolist()
        window = [ring[(ptr - n + i) % W] for i in range(n)]
        return {"k": int(cols["k"][slot]), "pred": int(cols["pred"][slot]), "kl": window,
                "bounds": [int(cols["lo"][slot]), int(cols["hi"][slot])] if cols["steady"][slot] else None,
                "warm": [int(cols["warm_n"][slot]), int(cols["warm_acc_max"][slot]), float(cols["warm_kl_sum"][slot]),
                         int(cols["warm_kl_n"][slot]), float(cols["warm_kl_max"][slot])]}

    def _load_request(self, rid: str, s: dict) -> None:
        slot = self.table.add(rid)
        cols = self.table.cols
        cols["k"][slot], cols["pred"][slot] = int(s["k"]), int(s["pred"])
        window = [float(v) for v in s.get("kl", [])][-self.window:]
        cols["kl"][slot, :len(window)] = window
        cols["kl_n"][slot], cols["kl_ptr"][slot] = len(window), len(window) % self.window
        if s.get("bounds"):
            cols["steady"][slot] = True
            cols["lo"][slot], cols["hi"][slot] = (int(v) for v in s["bounds"])
        warm = s.get("warm")
        if warm:
            (cols["warm_n"][slot], cols["warm_acc_max"][slot], cols["warm_kl_sum"][slot], cols["warm_kl_n"][slot],
             cols["warm_kl_max"][slot]) = warm

    def state_dict(self) -> dict:
        return {"requests": {rid: self._request_state(slot) for rid, slot in self.table.items()},
                **self.alphas.state_dict(), "learned": self.learned.state_dict(), "probe": self._probe}

    def load_state_dict(self, state: dict) -> None:
        self.table = self._new_table()
        for rid, s in state.get("requests", {}).items():
            self._load_request(rid, s)
        self.alphas.load_state_dict(state)
        if "learned" in state:
            self.learned.load_state_dict(state["learned"])
        self._probe = int(state.get("probe", 0))
