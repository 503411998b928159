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
step is one compiled pass over its requests (:func:`._kernels.dsde_observe`, numba), warm-up included, with the
float operations of the scalar formulas above in their order (the sums add position by position). The decision
(SL cap, cost cap) stays numpy. ``tests/test_validate.py`` replays random steps through this and the per-request
reference implementation and compares every decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from ..signals import StepResult
from ._estimators import OnlineLinearCost, RequestAlphas, SlotTable, kernels, resolve_costs
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
_NO_KL = np.zeros((0, 0))  # a step without KL: an empty [B, 0] stand-in (the kernel reads no column of it)


_WEIGHTS: dict[tuple[int, float], tuple[list[float], float]] = {}


def _weights(n: int, decay: float) -> tuple[list[float], float]:
    """``([decay**(n-1), ..., decay, 1], their sum)``, cached (the same floats the plain formula computes)."""
    got = _WEIGHTS.get((n, decay))
    if got is None:
        if len(_WEIGHTS) >= 4096:
            _WEIGHTS.clear()
        w = [decay ** (n - 1 - i) for i in range(n)]
        got = _WEIGHTS[(n, decay)] = (w, sum(w))
    return got


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
        **RequestAlphas.FIELDS,  # the cost cap's α_r (:class:`~._estimators.RequestAlphas` keeps them in this table)
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
        self.alphas = RequestAlphas(c["alpha_decay"], prior=0.5, table=self.table)
        self._probe = 0
        self._kernel_consts: tuple | None = None
        self._parts: dict[int, tuple] = {}  # the given profile's prices per batch size (_priced_parts)

    def _new_table(self) -> SlotTable:
        init_k = self.config["init_k"]
        return SlotTable(**_state_fields(self.window, init_k, self._clip(init_k)))

    # request lifetime ---------------------------------------------------------------------------------------------
    def admit(self, rid: str) -> None:
        self.table.add(rid)

    def release(self, rid: str) -> None:
        self.table.release(rid)  # (α_r's row too: the estimator keeps it in this table)

    def _clip(self, k: int) -> int:
        return min(max(int(k), self.k_floor), self.config["max_k"])

    # the controller -----------------------------------------------------------------------------------------------
    def _kernel_args(self) -> tuple:
        """The constants the compiled controller step reads: WVIR weights (whole window, last third) and the rule's
        constants."""
        got = self._kernel_consts
        if got is None:
            W = self.window
            w, sw = _weights(W, self.decay)
            ws, sws = _weights(max(1, W // 3), self.decay)
            c = self.config
            got = self._kernel_consts = (np.array(w), np.array(ws), np.array([sw, sws, self.max_factor, self.min_frac,
                                                                               c["sf_alpha"], c["miss_kl"]], dtype=float),
                                         self.k_floor, c["max_k"])
        return got

    def observe(self, result: StepResult) -> None:
        cost_cap = self.config["cost_cap"]
        if cost_cap and self.given_costs is None:
            self.learned.update(result)
        c = result.columns
        # every request's row (the decision made them); the pass below skips the requests that proposed nothing:
        # a plain step carries no information about the drafter
        slots = self.table.slots(c.rids)
        kl = _NO_KL if c.kl is None else np.ascontiguousarray(c.kl, dtype=np.float64)
        # the cost cap's α_r records step in the same pass (RequestAlphas' update, its formula and its batch ratio)
        alphas = self.alphas
        b = alphas.batch
        b.num, b.den = kernels().dsde_observe(slots, c.proposed, c.accepted, c.kl_len, kl,
                                              c.temperatures.astype(np.float64, copy=False), self.table.records,
                                              self.table.cols["kl"], *self._kernel_args(),
                                              alphas.decay if cost_cap else 0.0, b.num, b.den)

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
        parts = self._priced_parts(len(rids)) if self.config["cost_cap"] else None
        if parts is not None:  # lengths, SL cap and the cost cap priced by the profile: one compiled pass
            ctxs = batch.context_lens
            ctx = round(sum(ctxs) / len(ctxs)) if len(ctxs) else 0
            lengths, cap, cost_cap, top = kernels().dsde_decide(slots, self.table.records, self.config["cap"],
                                                                max(1, self.k_floor), self.alphas.fallback(), *parts,
                                                                float(ctx))
            info: dict = {"sl_cap": cap if cap >= 0 else None, "cost_cap": cost_cap if cost_cap >= 0 else None}
            # (the lengths stay an array: a host that works on arrays takes them as they are)
            return Decision(speculate=top > 0, lengths=BatchLengths(rids, ks=lengths), info=info)
        # each request's prediction, and the SL cap (apply_batch_cap over the post-warm-up requests)
        lengths, cap = kernels().dsde_lengths(slots, self.table.records, self.config["cap"])
        info = {"sl_cap": cap if cap >= 0 else None}
        if self.config["cost_cap"]:
            lengths, info["cost_cap"] = self._apply_cost_cap(batch, lengths)
        ks = lengths.tolist()
        return Decision(speculate=bool(ks) and max(ks) > 0, lengths=BatchLengths(rids, ks=ks), info=info)

    # the cost cap -------------------------------------------------------------------------------------------------
    @property
    def costs(self):
        return self.given_costs if self.given_costs is not None else self.learned

    def alpha(self, rid: str) -> float:
        """The request's running per-token acceptance (batch-wide before its first verify; 0.5 before any)."""
        return self.alphas.value(rid)

    def _priced_parts(self, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
        """The given profile's step prices at depths ``floor..max_k`` as arrays, with the first depth
        (:meth:`~sglang_ext.core.costs.CostModel.depth_parts`); None for costs without them (learned online)."""
        got = self._parts.get(batch_size)
        if got is None:
            parts = getattr(self.given_costs, "depth_parts", None)
            if parts is None:
                return None
            floor = max(1, self.k_floor)
            got = self._parts[batch_size] = (*parts(batch_size, floor, max(floor, self.config["max_k"])), floor)
        return got

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
        self.table = self.alphas.table = self._new_table()
        for rid, s in state.get("requests", {}).items():
            self._load_request(rid, s)
        self.alphas.load_state_dict(state)
        if "learned" in state:
            self.learned.load_state_dict(state["learned"])
        self._probe = int(state.get("probe", 0))
