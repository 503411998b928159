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

**Speed.** WVIR is the hot spot of a simulated DSDE run (two weighted variances over a ``W``-value history per
request per step). The decay-weight vectors are cached per ``(length, δ)``; :func:`weighted_variance` runs its two
passes as C-level ``map`` pipelines, bit-identical to the plain formula (same operations, same order); and
:meth:`DSDEPolicy.observe` evaluates the steady requests of a step together (:func:`wvir_many`: one numpy
two-pass over a ``[requests, W]`` matrix when there are :data:`BATCH_WVIR_MIN` or more; the sums round
differently in the last bits, which changes no decision — ``tests/test_policies.py`` compares both paths with
the plain formula on random histories).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain, repeat
from operator import mul, sub
from typing import Any, Callable

import numpy as np

from ..signals import RequestStep, SignalHistory, StepResult
from ._estimators import OnlineLinearCost, RequestAlphas, resolve_costs
from .base import BatchView, Decision, Param, Policy
from .compose import apply_batch_cap
from .goodput import best_length_cap

VARIANTS = {
    "code": {"decay": 0.9, "max_factor": 0.5, "min_frac": 0.1, "min_k": 1},
    "paper": {"decay": 0.85, "max_factor": 1.0, "min_frac": 0.0, "min_k": 2},
}

#: WVIR when the long-window variance is ~0 (a flat history), and the threshold for "~0" (DSDE's constants)
WVIR_FLAT = 20.0
VAR_EPS = 1e-6
_EPS_T = 1e-8


#: from this many steady requests in one step on, WVIR is evaluated as one numpy batch (:func:`wvir_many`)
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


def wvir_many(histories: Sequence[Sequence[float]], decay: float) -> list[float]:
    """:func:`wvir` of every history (the same value up to float rounding in the last bits).

    Histories of one length ``n >= 2`` (a steady DSDE request always holds a full window) with at least
    :data:`BATCH_WVIR_MIN` members go through one numpy two-pass over a ``[m, n]`` matrix; the rest one by one.
    """
    out: list[float] = [0.0] * len(histories)
    groups: dict[int, list[int]] = {}
    for i, h in enumerate(histories):
        groups.setdefault(len(h), []).append(i)
    for n, idx in groups.items():
        if n < 2 or len(idx) < BATCH_WVIR_MIN:
            for i in idx:
                out[i] = wvir(histories[i], decay)
            continue
        w, sw, ws, sws = _np_weights(n, decay)
        short = len(ws)
        X = np.fromiter(chain.from_iterable(histories[i] for i in idx), dtype=float, count=n * len(idx))
        X = X.reshape(len(idx), n)
        D = X - ((X @ w) / sw)[:, None]
        long_var = ((D * D) @ w) / sw
        S = X[:, n - short:]
        Ds = S - ((S @ ws) / sws)[:, None]
        short_var = ((Ds * Ds) @ ws) / sws
        flat = long_var < VAR_EPS
        ratio = np.where(flat, WVIR_FLAT, short_var / np.where(flat, 1.0, long_var))
        for i, v in zip(idx, ratio.tolist()):
            out[i] = v
    return out


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
        self._req: dict[str, _RequestState] = {}
        self.given_costs = resolve_costs(cost_model, verify_cost, draft_cost)
        self.learned = OnlineLinearCost(c["forget"])
        self.alphas = RequestAlphas(c["alpha_decay"], prior=0.5)
        self._probe = 0

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

    def _update(self, st: _RequestState, r: RequestStep) -> None:
        sf = self._record(st, r)
        if sf is not None:
            st.k = dsl_step(wvir(st.hist.kl, self.decay), sf, *st.bounds)
            st.pred = self._clip(st.k)

    def observe(self, result: StepResult) -> None:
        # every request's state is its own, so recording all of them first and then computing the steady ones'
        # WVIR together (in order; a repeated rid's last entry wins, as sequentially) gives the same lengths
        if self.config["cost_cap"]:
            self._observe_costs(result)
        steady: list[tuple[_RequestState, float]] = []
        for r in result.requests:
            if r.proposed <= 0:
                continue
            self.admit(r.rid)
            st = self._req[r.rid]
            sf = self._record(st, r)
            if sf is not None:
                steady.append((st, sf))
        if not steady:
            return
        ratios = wvir_many([st.hist.kl for st, _ in steady], self.decay)
        for (st, sf), ratio in zip(steady, ratios):
            st.k = dsl_step(ratio, sf, *st.bounds)
            st.pred = self._clip(st.k)

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
