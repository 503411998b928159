r"""Acceptance models: how many of the ``k`` drafted tokens the target accepts, per request and step.

The simulator has no models, so acceptance is a *model* of the drafter/target pair, of two kinds:

**Parametric** (:class:`ParametricAcceptance`). Each request ``r`` draws its own acceptance rate

.. math::  \alpha_r \sim \mathrm{Beta}(\mu_c \kappa_c,\ (1-\mu_c)\kappa_c)

from its category ``c`` (mean ``μ_c``, concentration ``κ_c``; per-request rather than per-category because the
per-request spread is large in public data, simulators-and-traces.md §3.1). Positions decay geometrically:

.. math::  P(\text{accept position } i \mid \text{positions } 1..i{-}1 \text{ accepted}) = \alpha_r^{\rm eff}\,\delta^{\,i-1}

so a step with draft depth ``k`` accepts ``a`` tokens with probability
:math:`\prod_{i=1}^{a} \alpha\delta^{i-1} \cdot (1 - \alpha\delta^{a})^{[a<k]}`. The effective rate at time ``t``
is :math:`\alpha^{\rm eff} = m(t)\,\alpha_r + f\,(\alpha^{\rm ceil} - m(t)\,\alpha_r)^+`, where ``m(t)`` is a
piecewise-linear *drift* schedule (a workload shift that makes the drafter worse) and ``f ∈ [0, 1)`` is the
fraction of the gap to ``α_ceil`` closed by online training (:meth:`improve`, called by the simulated trainer).

**Synthetic KL** (a model, not a measurement): KL-driven policies (DSDE) need KL(p‖q) per proposed position. For
position ``i`` the model emits :math:`\mathrm{KL}_i = -\log(\alpha^{\rm eff}\delta^{i-1})\cdot e^{\sigma z - \sigma^2/2}`,
``z ~ N(0, 1)``: the KL grows as the position's acceptance probability falls (``−log α ≥ 1 − α``, the rejection
rate), with mean-preserving log-normal noise ``σ`` (``kl_noise``) drawn independently of the accept/reject
outcome, so the signal correlates only loosely with a single step's acceptance, as DSDE measured (algorithms.md §4.4).

**Replay** (:class:`ReplayAcceptance`). A trace's ``acceptance`` field records the accepted count of each verify
step of a real run. It is replayed *by output position*: recorded step ``j`` started at token position
``p_j = Σ_{i<j} (a_i + 1)`` and accepted ``a_j``, so a simulated step starting at position ``p ∈ [p_j, p_j + a_j]``
can accept ``a_j − (p − p_j)`` (the drafter continues the same accepted run; exact for a deterministic drafter).
Positions count output tokens from 0. The reference engine's first decode step emits position 0 (its prefill emits
nothing); so does the simulator's ``schedule="reference"`` (:mod:`simulator.model`), whose steps then start exactly
where the recorded ones did. Under the SGLang/vLLM schedules the simulated prefill emits position 0 itself, so the
first simulated step starts at position 1, inside the first recorded run: indexing by position is what keeps the
two aligned either way.
When the simulated policy drafts a different depth ``k`` than the recording, the count is clipped:
``accepted = min(recorded, k)`` — the recording cannot say what a *longer* draft would have accepted, so a larger
``k`` is optimistic-never, pessimistic-sometimes. Positions past the record, and requests without one, fall back
to a parametric model. Replay ignores training (a recording is a fixed measurement).

A recording may also carry the KL(p‖q) the engine measured at every proposed position (``sglang-ext replay``
writes it beside the trace, ``signals.jsonl``; the trace format has no field for it). Given ``kl`` (request id →
KL per output position, :func:`kl_positions_from_steps`), replay hands a KL-driven policy the measured value of
each position a simulated step proposes, and the synthetic one only where the run never proposed that position.

All randomness comes from one seeded ``numpy.random.Generator`` drawn in blocks, so the same seed and the same
order of calls give the same numbers.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sglang_ext.formats.steps import kl_positions_from_steps, positions_from_steps  # noqa: F401  (re-exported)
from sglang_ext.formats.trace import Request

_BLOCK = 1 << 15
_ALPHA_MAX = 0.9999


@dataclass(frozen=True)
class CategoryAcceptance:
    """Beta distribution of per-request α for one category: mean ``alpha`` and concentration ``concentration``
    (``a = alpha·κ``, ``b = (1 − alpha)·κ``; ``κ = inf`` gives every request exactly ``alpha``)."""

    alpha: float = 0.7
    concentration: float = 20.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1]")
        if not self.concentration > 0:
            raise ValueError(f"concentration={self.concentration} must be > 0")


@dataclass(frozen=True)
class Drift:
    """Piecewise-linear multiplier ``m(t)`` on α: ``points`` are ``(time_s, multiplier)``, held flat outside."""

    points: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        ts = [p[0] for p in self.points]
        if any(b < a for a, b in itertools.pairwise(ts)):
            raise ValueError(f"drift times must be non-decreasing: {ts}")
        if any(not 0 <= m for _, m in self.points):
            raise ValueError("drift multipliers must be >= 0")

    def __call__(self, t: float) -> float:
        if not self.points:
            return 1.0
        return float(np.interp(t, [p[0] for p in self.points], [p[1] for p in self.points]))


#: requests drawn in steps of more than ``small_batch`` requests in one run, after which the draw loads numba (and
#: the simulator's step follows, :mod:`.model`): there the compiled draw and step save ~0.5 µs per request drawn
#: (measured on a saturated replay, 2 M requests drawn: 0.55 s), so numba's ~0.5 s load pays back after about 1 M;
#: a replay below this (the Azure code trace draws ~0.1 M) never loads it, a long one pays the load once and keeps
#: most of the gain; one whose steps hold a few requests (many replicas) never does
COMPILE_AFTER = 250_000


@functools.cache
def compiled_kernels():
    """The simulator's compiled per-step code (:mod:`simulator._kernels`: the draw here, the depth clip and commit in
    :mod:`simulator.model`), imported on first use (by a process that steps with it, not by one that only imports
    this module)."""
    from . import _kernels

    return _kernels


class _Streams:
    """Two seeded streams read in order: uniforms (accept/reject) and log-normal KL multipliers.

    Each is one fixed sequence however it is read: :meth:`uniforms` / :meth:`kl_noise` return the next ``n`` values,
    drawing further blocks as needed and keeping what is left of the current one (a ``Generator`` gives the same
    numbers for ``random(a)`` then ``random(b)`` as for ``random(a + b)``), so a batched draw and one draw per
    request read the same values.
    """

    def __init__(self, u_rng: np.random.Generator, z_rng: np.random.Generator, kl_noise: float) -> None:
        self.rng = u_rng
        self.z_rng = z_rng
        self.kl_noise = kl_noise
        self.u = np.empty(0)
        self.i = 0
        self.z = np.empty(0)
        self.j = 0

    def ensure(self, n: int, noise: bool) -> None:
        """Hold at least ``n`` unread uniforms (and noise values when ``noise``), drawing further blocks."""
        if self.i + n > len(self.u):
            left = self.u[self.i:]
            self.u = np.concatenate([left, self.rng.random(max(_BLOCK, n - len(left)))])
            self.i = 0
        if noise and self.j + n > len(self.z):
            self.ensure_noise(n)

    def ensure_noise(self, n: int) -> None:
        s = self.kl_noise
        left = self.z[self.j:]
        more = np.exp(s * self.z_rng.standard_normal(max(_BLOCK, n - len(left))) - 0.5 * s * s)
        self.z = np.concatenate([left, more])
        self.j = 0

    def uniforms(self, n: int) -> np.ndarray:
        self.ensure(n, False)
        out = self.u[self.i:self.i + n]
        self.i += n
        return out

    def noise(self, n: int) -> np.ndarray:
        if self.j + n > len(self.z):
            self.ensure_noise(n)
        out = self.z[self.j:self.j + n]
        self.j += n
        return out


def kl_matrix(kls: Sequence[Sequence[float]], ks: Sequence[int]) -> np.ndarray | None:
    """Per-request KL lists as one ``[B, max k]`` array (row ``r`` holds its ``k_r`` values, zeros after); None
    when no request proposed anything."""
    K = max(ks, default=0)
    if K <= 0:
        return None
    out = np.zeros((len(ks), K))
    for i, (kl, k) in enumerate(zip(kls, ks)):
        if k > 0:
            out[i, :k] = kl[:k]
    return out


class RequestAcceptance:
    """Per-request state of an acceptance model (its α, and for replay its per-position record)."""

    __slots__ = ("alpha", "kl", "record")

    def __init__(self, alpha: float, record: list[int] | None = None) -> None:
        self.alpha = alpha
        self.record = record
        self.kl: list[float | None] | None = None


class ParametricAcceptance:
    """Per-request Beta α per category, geometric per-position decay, drift over time, trainer gains (module doc)."""

    kind = "parametric"

    def __init__(self, categories: dict[str, CategoryAcceptance] | None = None,
                 default: CategoryAcceptance = CategoryAcceptance(), decay: float = 1.0,
                 drift: Drift = Drift(), kl_noise: float = 0.3, ceiling: float = 0.95) -> None:
        if not 0 < decay <= 1:
            raise ValueError(f"decay={decay} must be in (0, 1]")
        if kl_noise < 0:
            raise ValueError(f"kl_noise={kl_noise} must be >= 0")
        if not 0 <= ceiling <= 1:
            raise ValueError(f"ceiling={ceiling} must be in [0, 1]")
        self.categories = dict(categories or {})
        self.default = default
        self.decay = float(decay)
        self.drift = drift
        self.kl_noise = float(kl_noise)
        self.ceiling = float(ceiling)
        self.trained = 0.0
        self._mult = 1.0
        self._buf: _Streams | None = None
        #: up to this many requests a step is drawn one request at a time (:meth:`_sample_small`, the same numbers)
        self.small_batch = 16
        #: draw with the compiled kernel (True), never (False), or None: a step of more than ``small_batch``
        #: requests once numba is loaded in this process or this run has drawn ``compile_after`` requests on the
        #: array path (:meth:`sample_batch`)
        self.compiled: bool | None = None
        self.compile_after = COMPILE_AFTER
        self._drawn = 0  # requests drawn on the array path in this run (toward compile_after)
        self._last_states: Sequence[RequestAcceptance] | None = None  # the last batch's states and their α
        self._last_alphas = np.empty(0)
        self._last_key: tuple | None = None
        self._last_draw: tuple[np.ndarray, np.ndarray] = (np.empty(0), np.empty(0))
        self._log_decay = -math.log(self.decay)

    # lifecycle -------------------------------------------------------------------------------------------------
    def reset(self, seed: int) -> None:
        """Start a run: seed the streams, forget training, time 0.

        Three independent streams (per-request α, accept/reject uniforms, KL noise), so every policy replayed
        with the same seed sees the same per-request α (common random numbers).
        """
        a_ss, u_ss, z_ss = np.random.SeedSequence(seed).spawn(3)
        self._rng = np.random.default_rng(a_ss)
        self._buf = _Streams(np.random.default_rng(u_ss), np.random.default_rng(z_ss), self.kl_noise)
        self._last_states = None
        self._last_key = None
        self._drawn = 0
        self.trained = 0.0
        self.set_time(0.0)

    def start(self, request: Request) -> RequestAcceptance:
        """A request arrived: draw its α from its category's Beta (in arrival order: deterministic)."""
        c = self.categories.get(request.category or "", self.default)
        if math.isinf(c.concentration) or c.alpha in (0.0, 1.0):
            return RequestAcceptance(c.alpha)
        a = c.alpha * c.concentration
        b = (1.0 - c.alpha) * c.concentration
        return RequestAcceptance(float(self._rng.beta(a, b)))

    def set_time(self, t: float) -> None:
        """Evaluate the drift once per iteration (not per request)."""
        self._mult = self.drift(t)

    def improve(self, gain: float) -> None:
        """A training round finished: close a further ``gain`` fraction of the gap to ``ceiling``."""
        self.trained += float(gain) * (1.0 - self.trained)

    def effective_alpha(self, alpha: float) -> float:
        a = alpha * self._mult
        if self.trained > 0.0 and self.ceiling > a:
            a += self.trained * (self.ceiling - a)
        return min(a, _ALPHA_MAX) if a < 1.0 else 1.0

    # the draw --------------------------------------------------------------------------------------------------
    def effective_alphas(self, alphas: np.ndarray) -> np.ndarray:
        """:meth:`effective_alpha` of every entry (capped at ``_ALPHA_MAX`` unless exactly 1)."""
        if self.trained == 0.0 and self._mult == 1.0:  # no drift, no training (the common case)
            return np.where((alphas < _ALPHA_MAX) | (alphas >= 1.0), alphas, _ALPHA_MAX)
        a = alphas * self._mult
        if self.trained > 0.0:
            a = np.where(self.ceiling > a, a + self.trained * (self.ceiling - a), a)
        return np.where(a < 1.0, np.minimum(a, _ALPHA_MAX), 1.0)

    def sample(self, st: RequestAcceptance, position: int, k: int, want_kl: bool) -> tuple[int, list[float]]:
        """``(accepted, kl per proposed position)`` for a depth-``k`` draft starting at output ``position``."""
        if k <= 0:
            return 0, []
        a, kl = self.sample_batch([st], [position], [k], want_kl)
        return int(a[0]), kl[0].tolist() if kl is not None else []

    def sample_batch(self, states: Sequence[RequestAcceptance], positions: Sequence[int], ks: Sequence[int],
                     want_kl: bool) -> tuple[np.ndarray, np.ndarray | None]:
        r"""Accepted counts and KL of every request of a decode step, in batch order.

        Request ``r`` (depth ``k_r``) reads the next ``k_r`` uniforms ``u_{r,0..k_r-1}`` (requests in batch order)
        and accepts the run of leading positions that pass, position ``i`` with probability
        :math:`p_{r,i} = \alpha_r\delta^i` (a running product, ``p ← p·δ``):

        .. math::  a_r = \min\{\, i : u_{r,i} \ge p_{r,i} \,\} \ (\text{or } k_r \text{ if none})

        which has the module's distribution. Every request reads exactly ``k_r`` uniforms whatever it accepts (so a
        request's numbers do not depend on what the requests before it accepted), and its KL at position ``i`` is
        :math:`(-\ln\alpha_r + i\,(-\ln\delta))\,z_{r,i}` with ``k_r`` log-normal multipliers read the same way.
        Returns the counts (an int array) and a ``[B, max k]`` KL array (row ``r`` valid up to ``k_r``; None without
        ``want_kl`` or when nothing is proposed). The requests' α are read again only when ``states`` is a different
        list from the last call's (a host reuses its list while the batch is unchanged).

        Three ways to the same numbers (tested against a plain per-request loop): for up to ``small_batch`` requests
        a Python loop (numpy's and numba's cost per call dominate there); above, one compiled pass
        (:func:`simulator._kernels.draw_chains`, ~3 µs a step) once numba is loaded in the process (a policy with
        compiled steps loads it) or once the run has drawn :data:`COMPILE_AFTER` requests in such steps (then this
        loads it), else ``[B, max k]`` array comparisons; ``compiled`` forces the compiled pass (True, any batch) or
        the other two (False). Why not always compiled: loading numba costs ~0.5 s once, more than a replay that
        speculates in few steps, or only tens of thousands, saves with it.
        """
        buf = self._buf
        if buf is None:
            raise RuntimeError("acceptance model not reset: call reset(seed) first")
        compiled = self.compiled
        if compiled is None:
            if len(ks) <= self.small_batch:  # a few requests: the Python loop is the fastest way
                return self._sample_small(states, ks.tolist() if isinstance(ks, np.ndarray) else list(ks), want_kl)
            compiled = "numba" in sys.modules or self._drawn >= self.compile_after
        if compiled:
            return self._sample_compiled(states, ks, want_kl)
        self._drawn += len(ks)
        if len(ks) <= self.small_batch:
            return self._sample_small(states, ks.tolist() if isinstance(ks, np.ndarray) else list(ks), want_kl)
        k = np.maximum(np.asarray(ks, dtype=np.int64), 0)
        B = len(k)
        K = int(k.max()) if B else 0
        if K <= 0:
            return np.zeros(B, dtype=np.int64), None
        alpha, base = self._alphas_of(states, want_kl)
        if int(k.min()) == K:  # one depth for the whole batch (a uniform policy, nobody clipped)
            return self._sample_uniform(alpha, base, B, K, want_kl)
        total = int(k.sum())
        start = np.cumsum(k) - k
        J = np.arange(K + 1)  # one column past the deepest draft: always a miss, so every row has one
        idx = np.minimum(start[:, None] + J, total - 1)
        P = np.empty((B, K + 1))
        P[:, 0] = alpha
        P[:, 1:] = self.decay
        np.multiply.accumulate(P, axis=1, out=P)
        P *= J < k[:, None]  # positions past k_r: probability 0, a miss (u >= 0)
        accepted = (buf.uniforms(total)[idx] >= P).argmax(axis=1)  # the first miss
        if not want_kl:
            return accepted, None
        kl = (base[:, None] + J[:K] * self._log_decay) * buf.noise(total)[idx[:, :K]]
        return accepted, kl

    def _sample_uniform(self, alpha: np.ndarray, base: np.ndarray, B: int, K: int,
                        want_kl: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """The array draw when every request drafts ``K``: request ``r`` reads uniforms ``r·K .. r·K + K − 1``, so
        the batch's are one ``[B, K]`` view (no gather) and the first miss is an argmax (``K`` where none); with
        ``δ = 1`` every position's probability is ``α_r`` itself. The same numbers as the general path."""
        buf = self._buf
        assert buf is not None
        U = buf.uniforms(B * K).reshape(B, K)
        if self.decay == 1.0:
            miss = U >= alpha[:, None]
        else:
            P = np.empty((B, K))
            P[:, 0] = alpha
            P[:, 1:] = self.decay
            np.multiply.accumulate(P, axis=1, out=P)
            miss = U >= P
        accepted = np.where(miss.any(axis=1), miss.argmax(axis=1), K)
        if not want_kl:
            return accepted, None
        return accepted, (base[:, None] + np.arange(K) * self._log_decay) * buf.noise(B * K).reshape(B, K)

    def _sample_compiled(self, states: Sequence[RequestAcceptance], ks: Sequence[int],
                         want_kl: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`sample_batch` as one compiled pass (:func:`simulator._kernels.draw_chains`): the same uniforms,
        running products and comparisons, and the KL from the same bases, so the same numbers."""
        buf = self._buf
        assert buf is not None
        k = np.asarray(ks, dtype=np.int64)
        alpha, base = self._alphas_of(states, want_kl)
        draw = compiled_kernels().draw_chains
        accepted, kl, total = draw(k, alpha, base, buf.u, buf.i, buf.z, buf.j, self.decay, self._log_decay, want_kl)
        if total < 0:  # a buffer ran short: draw more of the same streams and ask again
            buf.ensure(-total, want_kl)
            accepted, kl, total = draw(k, alpha, base, buf.u, buf.i, buf.z, buf.j, self.decay, self._log_decay,
                                       want_kl)
        buf.i += total
        if not want_kl or kl.shape[1] == 0:
            return accepted, None
        buf.j += total
        return accepted, kl

    def _sample_small(self, states: Sequence[RequestAcceptance], ks: list[int],
                      want_kl: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`sample_batch` for a few requests, one by one in Python (numpy's per-call cost dominates there):
        the same uniforms, the same running products and comparisons, so the same counts; the KL by the same
        array expression."""
        buf = self._buf
        assert buf is not None
        ks = [k if k > 0 else 0 for k in ks]
        total = sum(ks)
        if total == 0:
            return np.zeros(len(ks), dtype=np.int64), None
        u = buf.uniforms(total).tolist()
        plain = self.trained == 0.0 and self._mult == 1.0
        d = self.decay
        accepted: list[int] = []
        alphas: list[float] = []
        i = 0
        for st, k in zip(states, ks):
            a = st.alpha
            if plain:
                alpha = a if a < _ALPHA_MAX or a >= 1.0 else _ALPHA_MAX
            else:
                alpha = self.effective_alpha(a)
            alphas.append(alpha)
            n, p = 0, alpha
            while n < k and u[i + n] < p:  # the first miss (u >= p) ends the accepted run
                n += 1
                p *= d
            accepted.append(n)
            i += k
        if not want_kl:
            return np.array(accepted, dtype=np.int64), None
        k_arr = np.array(ks, dtype=np.int64)
        K = int(k_arr.max())
        alpha_arr = np.array(alphas)
        idx = np.minimum((np.cumsum(k_arr) - k_arr)[:, None] + np.arange(K), total - 1)
        with np.errstate(divide="ignore"):
            base = np.where(alpha_arr > 0, -np.log(alpha_arr), 50.0)
        return np.array(accepted, dtype=np.int64), (base[:, None] + np.arange(K) * self._log_decay) * buf.noise(total)[idx]

    def _alphas_of(self, states: Sequence[RequestAcceptance], want_kl: bool) -> tuple[np.ndarray, np.ndarray]:
        """The batch's effective α and, with ``want_kl``, the KL bases ``-ln α`` (50 for α = 0), recomputed only for
        a different ``states`` list (a host reuses its list while the batch is unchanged), drift or training."""
        key = (self._mult, self.trained, want_kl)
        if states is not self._last_states or key != self._last_key:
            if states is not self._last_states:
                self._last_states = states
                self._last_alphas = np.array([st.alpha for st in states], dtype=float)
            self._last_key = key
            alpha = self.effective_alphas(self._last_alphas)
            if want_kl:  # (log of 1 where α = 0: no -inf to silence, the same floats elsewhere)
                positive = alpha > 0
                base = np.where(positive, -np.log(np.where(positive, alpha, 1.0)), 50.0)
            else:
                base = alpha
            self._last_draw = (alpha, base)
        return self._last_draw

    def _draw(self, alpha: float, k: int, want_kl: bool) -> tuple[int, list[float]]:
        """One request's draw at an already effective ``alpha`` (the same streams as :meth:`sample_batch`)."""
        st = RequestAcceptance(alpha)
        trained, mult = self.trained, self._mult
        self.trained, self._mult = 0.0, 1.0  # ``alpha`` is effective already
        try:
            a, kl = self.sample_batch([st], [0], [k], want_kl)
        finally:
            self.trained, self._mult = trained, mult
        return int(a[0]), kl[0].tolist() if kl is not None else []

    # (de)serialisation -----------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "default": asdict(self.default),
                "categories": {c: asdict(v) for c, v in self.categories.items()}, "decay": self.decay,
                "drift": [list(p) for p in self.drift.points], "kl_noise": self.kl_noise, "ceiling": self.ceiling}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ParametricAcceptance:
        return cls(categories={c: CategoryAcceptance(**v) for c, v in obj.get("categories", {}).items()},
                   default=CategoryAcceptance(**obj.get("default", {})), decay=obj.get("decay", 1.0),
                   drift=Drift(tuple((float(t), float(m)) for t, m in obj.get("drift", []))),
                   kl_noise=obj.get("kl_noise", 0.3), ceiling=obj.get("ceiling", 0.95))


class ReplayAcceptance:
    """Replays each request's recorded acceptance (and KL, where given) by output position; ``fallback``
    elsewhere (module doc). ``kl``: request id → KL per output position (:func:`kl_positions_from_steps`)."""

    kind = "replay"

    def __init__(self, fallback: ParametricAcceptance | None = None,
                 kl: dict[str, list[float | None]] | None = None) -> None:
        self.fallback = fallback or ParametricAcceptance()
        self.kl = kl
        self.recorded = 0

    def reset(self, seed: int) -> None:
        self.fallback.reset(seed)
        self.recorded = 0  # requests started with a recording (none: every draw is the fallback's)

    def start(self, request: Request) -> RequestAcceptance:
        st = self.fallback.start(request)
        if request.acceptance is not None:
            st.record = positions_from_steps(request.acceptance, request.output_tokens)
            self.recorded += 1
        if self.kl is not None and request.id is not None:
            st.kl = self.kl.get(request.id)
        return st

    def set_time(self, t: float) -> None:
        self.fallback.set_time(t)

    def improve(self, gain: float) -> None:
        self.fallback.improve(gain)

    def sample(self, st: RequestAcceptance, position: int, k: int, want_kl: bool) -> tuple[int, list[float]]:
        if k <= 0:
            return 0, []
        rec = st.record
        if rec is None or position >= len(rec):
            return self.fallback.sample(st, position, k, want_kl)
        a = min(rec[position], k)
        if not want_kl:
            return a, []
        # KL from the fallback's model at the request's α where the recording has none (always drawn, so the
        # random streams do not depend on which positions were recorded)
        kl = self.fallback._draw(self.fallback.effective_alpha(st.alpha), k, True)[1]
        measured = st.kl
        if measured is not None:
            n = len(measured)
            for i in range(k):
                j = position + i
                if j < n and measured[j] is not None:
                    kl[i] = measured[j]
        return a, kl

    def sample_batch(self, states: Sequence[RequestAcceptance], positions: Sequence[int], ks: Sequence[int],
                     want_kl: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`sample` of every request of a decode step, in batch order (the same draws in the same order).

        Why: a trace without recordings (every synthetic one) replays nothing, so the whole batch goes through the
        fallback's batched :meth:`ParametricAcceptance.sample_batch`; requests with a record at their position are
        drawn one by one with :meth:`sample`, between runs of fallback draws, so the stream order is unchanged.
        """
        fb = self.fallback
        recorded = [j for j, (st, pos, k) in enumerate(zip(states, positions, ks))
                    if k > 0 and st.record is not None and pos < len(st.record)] if self.recorded else []
        if not recorded:
            return fb.sample_batch(states, positions, ks, want_kl)
        accepted: list[int] = []
        kls: list[Sequence[float]] = []
        start = 0
        for j in [*recorded, len(ks)]:
            if j > start:
                a, kl = fb.sample_batch(states[start:j], positions[start:j], ks[start:j], want_kl)
                accepted += a.tolist()
                kls += (kl[:, :max(ks[start:j])].tolist() if kl is not None else [()] * (j - start))
            if j < len(ks):
                a1, kl1 = self.sample(states[j], positions[j], ks[j], want_kl)
                accepted.append(a1)
                kls.append(kl1 if want_kl else ())
            start = j + 1
        return np.array(accepted, dtype=np.int64), kl_matrix(kls, ks) if want_kl else None

    def to_json(self) -> dict[str, Any]:
        """The model as JSON, recorded KL included (so sweep and tune workers, which receive it this way, replay
        the same KL as the parent process)."""
        out: dict[str, Any] = {"kind": self.kind, "fallback": self.fallback.to_json()}
        if self.kl is not None:
            out["recorded_kl_requests"] = len(self.kl)
            out["kl"] = {rid: list(v) for rid, v in self.kl.items()}
        return out


AcceptanceModel = ParametricAcceptance | ReplayAcceptance


# ---- fitting ---------------------------------------------------------------------------------------------------
def step_loglik(alpha: float, decay: float, ks: np.ndarray, accs: np.ndarray) -> float:
    r"""Log-likelihood of steps ``(k, a)`` under the decay model:
    :math:`a\log\alpha + \tfrac{a(a-1)}{2}\log\delta + [a<k]\log(1 - \alpha\delta^{a})`."""
    la, ld = math.log(alpha), math.log(decay)
    ll = accs * la + 0.5 * accs * (accs - 1) * ld
    miss = accs < ks
    p_next = np.clip(alpha * np.exp(accs[miss] * ld), 0.0, 1.0 - 1e-12)
    return float(ll.sum() + np.log1p(-p_next).sum())


@dataclass
class AcceptanceFit:
    """Result of :func:`fit_acceptance`: pooled α and δ (MLE), per-request spread κ (moments), step count."""

    alpha: float
    decay: float
    concentration: float
    steps: int
    loglik: float
    per_request_alpha: list[float] = field(default_factory=list, repr=False)

    def model(self, **kw: Any) -> ParametricAcceptance:
        return ParametricAcceptance(default=CategoryAcceptance(self.alpha, self.concentration), decay=self.decay, **kw)


def fit_acceptance(recording: Sequence[Sequence[int]], k: int | Sequence[Sequence[int]],
                   fit_decay: bool = True) -> AcceptanceFit:
    """Maximum-likelihood α and δ from per-step accepted counts (one list per request) drafted at depth ``k``
    (an int for a static-k recording, or per-step depths shaped like ``recording``).

    Steps with ``k = 0`` carry no information and are dropped. κ is the method-of-moments concentration of the
    per-request α estimates after subtracting their sampling variance (inf when the spread is all noise).
    """
    from scipy.optimize import minimize

    ks_list: list[int] = []
    acc_list: list[int] = []
    req_slices: list[tuple[int, int]] = []
    for r, steps in enumerate(recording):
        kr = [k] * len(steps) if isinstance(k, int) else list(k[r])
        if len(kr) != len(steps):
            raise ValueError(f"request {r}: {len(steps)} accepted counts but {len(kr)} depths")
        start = len(ks_list)
        for kk, a in zip(kr, steps):
            if kk <= 0:
                continue
            if not 0 <= a <= kk:
                raise ValueError(f"request {r}: accepted={a} outside 0..k={kk}")
            ks_list.append(kk)
            acc_list.append(a)
        req_slices.append((start, len(ks_list)))
    if not ks_list:
        raise ValueError("no speculative steps to fit")
    ks = np.asarray(ks_list, dtype=float)
    accs = np.asarray(acc_list, dtype=float)
    eps = 1e-6

    if fit_decay:
        def nll(x: np.ndarray) -> float:
            return -step_loglik(x[0], x[1], ks, accs)

        trials = (accs + (accs < ks)).sum()
        a0 = float(np.clip(accs.sum() / max(trials, 1), 0.05, 0.95))
        res = minimize(nll, np.array([a0, 0.9]), method="L-BFGS-B", bounds=[(eps, 1 - eps), (eps, 1.0)])
        alpha, decay, ll = float(res.x[0]), float(res.x[1]), -float(res.fun)
    else:
        trials = (accs + (accs < ks)).sum()
        alpha, decay = float(accs.sum() / trials) if trials else 0.0, 1.0
        alpha = min(max(alpha, eps), 1 - eps)
        ll = step_loglik(alpha, decay, ks, accs)

    # per-request α at the pooled δ (closed form is not available with δ < 1: a 1-D bounded fit each)
    per_req: list[float] = []
    noise: list[float] = []
    for s, e in req_slices:
        if e - s < 3:
            continue
        kr, ar = ks[s:e], accs[s:e]
        t = float((ar + (ar < kr)).sum())
        a_hat = _alpha_given_decay(kr, ar, decay)
        per_req.append(a_hat)
        noise.append(a_hat * (1 - a_hat) / max(t, 1.0))
    conc = math.inf
    if len(per_req) >= 3:
        m, v = float(np.mean(per_req)), float(np.var(per_req, ddof=1)) - float(np.mean(noise))
        if v > 1e-9:
            conc = max(m * (1 - m) / v - 1.0, 1e-3)
    return AcceptanceFit(alpha, decay, conc, len(ks_list), ll, per_req)


def _alpha_given_decay(ks: np.ndarray, accs: np.ndarray, decay: float) -> float:
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda a: -step_loglik(a, decay, ks, accs), bounds=(1e-6, 1 - 1e-6), method="bounded")
    return float(res.x)


def synthetic_recording(alpha: float, decay: float, k: int, requests: int, steps: int, seed: int = 0,
                        concentration: float = math.inf) -> list[list[int]]:
    """Per-step accepted counts drawn from the model (for tests and for checking a fit)."""
    m = ParametricAcceptance(default=CategoryAcceptance(alpha, concentration), decay=decay)
    m.reset(seed)
    out = []
    for _ in range(requests):
        st = m.start(Request(0.0, 1, 1))
        out.append([m.sample(st, 0, k, False)[0] for _ in range(steps)])
    return out


# ---- specs (CLI) -----------------------------------------------------------------------------------------------
def parse_acceptance(spec: str | None) -> AcceptanceModel:
    """An acceptance model from the CLI.

    - ``None`` / ``""``: replay recorded acceptance where the trace has it, parametric defaults elsewhere;
    - a JSON file: ``{"kind": "parametric", ...}`` (:meth:`ParametricAcceptance.to_json`), ``{"kind": "replay",
      "fallback": {...}}``, or a recording ``{"recording": [[...], ...], "k": 4}`` fitted by :func:`fit_acceptance`;
    - a spec ``alpha=0.7,conc=20,decay=0.95,kl_noise=0.3,ceiling=0.95,drift=0:1;600:0.6`` with per-category
      overrides ``code.alpha=0.8,code.conc=30``; prefix ``replay:`` to replay recordings first.
    """
    if not spec:
        return ReplayAcceptance()
    replay = spec.startswith("replay:")
    body = spec[len("replay:"):] if replay else spec
    path = Path(body)
    if body.endswith(".json") or path.is_file():
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read acceptance model ({e})") from None
        model = acceptance_from_json(obj, str(path))
    else:
        model = _parse_spec(body)
    if replay and isinstance(model, ParametricAcceptance):
        return ReplayAcceptance(model)
    return model


def acceptance_from_json(obj: Any, where: str = "<acceptance>") -> AcceptanceModel:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object")
    try:
        if "recording" in obj:
            return fit_acceptance(obj["recording"], obj.get("k", 4)).model()
        if obj.get("kind") == "replay":
            kl = obj.get("kl")
            if kl is not None and not isinstance(kl, dict):
                raise ValueError("'kl' must map request ids to KL per output position")
            return ReplayAcceptance(ParametricAcceptance.from_json(obj.get("fallback", {})),
                                    kl={str(k): [None if x is None else float(x) for x in v] for k, v in kl.items()}
                                    if kl is not None else None)
        return ParametricAcceptance.from_json(obj)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{where}: bad acceptance model: {e}") from None


def _parse_spec(spec: str) -> ParametricAcceptance:
    glob: dict[str, str] = {}
    cats: dict[str, dict[str, str]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" not in item:
            raise ValueError(f"acceptance spec item {item!r} is not key=value")
        key, val = (s.strip() for s in item.split("=", 1))
        if "." in key:
            cat, name = key.split(".", 1)
            cats.setdefault(cat, {})[name] = val
        else:
            glob[key] = val
    known = {"alpha", "conc", "decay", "kl_noise", "ceiling", "drift"}
    bad = sorted(set(glob) - known) + sorted({n for c in cats.values() for n in c} - {"alpha", "conc"})
    if bad:
        raise ValueError(f"acceptance spec: unknown key(s) {bad}; known: {sorted(known)} (and CATEGORY.alpha/conc)")
    try:
        default = CategoryAcceptance(float(glob.get("alpha", 0.7)), float(glob.get("conc", 20.0)))
        categories = {c: CategoryAcceptance(float(v.get("alpha", default.alpha)),
                                            float(v.get("conc", default.concentration))) for c, v in cats.items()}
        drift = Drift(tuple((float(t), float(m)) for t, m in (p.split(":") for p in glob["drift"].split(";"))))\
            if "drift" in glob else Drift()
        return ParametricAcceptance(categories, default, decay=float(glob.get("decay", 1.0)), drift=drift,
                                    kl_noise=float(glob.get("kl_noise", 0.3)),
                                    ceiling=float(glob.get("ceiling", 0.95)))
    except ValueError as e:
        raise ValueError(f"acceptance spec {spec!r}: {e}") from None


def describe(model: AcceptanceModel) -> dict[str, Any]:
    """JSON description for result files."""
    return model.to_json()


def iter_records(requests: Iterable[Request]) -> list[list[int]]:
    """The recorded acceptance lists of a trace (requests without one are skipped)."""
    return [list(r.acceptance) for r in requests if r.acceptance is not None]
