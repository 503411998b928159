"""Step results: what a host's verify step tells the policies and the capture buffer (one dataclass, every host).

The reference engine, the SGLang plugin and the simulator all produce a :class:`StepResult` after each
speculative step and hand it to ``policy.observe``. Fields a host cannot measure stay empty (the simulator
has no KL, a model-free drafter has no q); policies that need them must say so and cope with their absence.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence, overload

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class RequestStep:
    """One request's outcome of one verify step.

    ``proposed`` draft tokens were verified (the depth of the accepted-path candidates for a tree, ``k`` for a
    chain) and ``accepted`` of them were kept (``0 <= accepted <= proposed``); the step always also commits
    one target token (the bonus / correction), so the request advanced by ``accepted + 1`` tokens.
    ``kl[i]`` is KL(p_target || q_draft) at proposed position ``i`` over the full vocabulary (DSDE's signal),
    ``target_entropy[i]`` / ``draft_entropy[i]`` the entropies there; all three may be empty.
    """

    rid: str
    proposed: int
    accepted: int
    kl: Sequence[float] = ()
    target_entropy: Sequence[float] = ()
    draft_entropy: Sequence[float] = ()
    context_len: int = 0
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.accepted <= max(self.proposed, 0):
            raise ValueError(f"request {self.rid}: accepted={self.accepted} outside 0..proposed={self.proposed}")


def _int64(v: Sequence[int] | np.ndarray) -> np.ndarray:
    """``v`` as an int64 array (itself when it already is one)."""
    return v if isinstance(v, np.ndarray) and v.dtype == np.int64 else np.asarray(v, dtype=np.int64)


class StepColumns:
    """A step's per-request outcomes as arrays in batch order: the same facts as a list of :class:`RequestStep`.

    Why two forms: a host with a handful of requests (the engine, the SGLang plugin) builds ``RequestStep`` objects;
    a host that steps 64 requests millions of times (the simulator) builds these arrays instead, and the policies
    read whichever is cheaper for them (:attr:`StepResult.columns`), each form derived lazily from the other.

    ``kl`` is ``[B, K]`` (``K`` ≥ every row's ``kl_len``) or None when no request has KL; row ``r`` holds
    ``kl_len[r]`` values (0: that request's drafter gave no q), the rest is padding and must not be read.
    Any column may be given as a list (made an array on first read); ``temperatures`` may be one number for the
    whole batch. Lengths and ``0 <= accepted <= max(proposed, 0)`` are checked unless ``check=False`` (a host
    whose counts are valid by construction, in its hot loop).
    """

    __slots__ = ("_accepted", "_context_lens", "_kl_len", "_proposed", "_temperatures", "kl", "rids")

    def __init__(self, rids: Sequence[str], proposed: Sequence[int], accepted: Sequence[int],
                 kl: np.ndarray | None = None, kl_len: Sequence[int] | None = None,
                 context_lens: Sequence[int] | None = None, temperatures: Sequence[float] | float | None = None,
                 check: bool = True) -> None:
        # stored as given and made arrays on first read: a policy that reads nothing (static k) costs nothing
        self.rids = rids
        self._proposed, self._accepted, self.kl = proposed, accepted, kl
        self._kl_len, self._context_lens, self._temperatures = kl_len, context_lens, temperatures
        if not check:  # the host built them valid (the simulator: accepted counts drawn within 0..k)
            return
        n = len(rids)
        if len(self.proposed) != n or len(self.accepted) != n:
            raise ValueError(f"step columns: {n} rids but {len(self.proposed)} proposed / {len(self.accepted)} accepted")
        bad = (self.accepted < 0) | (self.accepted > np.maximum(self.proposed, 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"request {rids[i]}: accepted={int(self.accepted[i])} outside 0..proposed="
                             f"{int(self.proposed[i])}")

    @property
    def proposed(self) -> np.ndarray:
        self._proposed = v = _int64(self._proposed)
        return v

    @property
    def accepted(self) -> np.ndarray:
        self._accepted = v = _int64(self._accepted)
        return v

    @property
    def kl_len(self) -> np.ndarray:
        v = self._kl_len
        if v is None:
            v = (np.zeros(len(self.rids), dtype=np.int64) if self.kl is None
                 else np.minimum(self.proposed, self.kl.shape[1]))
        self._kl_len = v = _int64(v)
        return v

    @property
    def context_lens(self) -> np.ndarray:
        v = self._context_lens
        if v is None:
            v = np.zeros(len(self.rids), dtype=np.int64)
        elif not isinstance(v, np.ndarray):
            v = np.asarray(v)
        self._context_lens = v
        return v

    @property
    def temperatures(self) -> np.ndarray:
        v = self._temperatures
        if v is None:
            v = np.zeros(len(self.rids))
        elif isinstance(v, (int, float)):
            v = np.full(len(self.rids), float(v))
        elif not isinstance(v, np.ndarray) or v.dtype != float:
            v = np.asarray(v, dtype=float)
        self._temperatures = v
        return v

    @classmethod
    def from_requests(cls, requests: Sequence[RequestStep]) -> StepColumns:
        n = len(requests)
        proposed = np.fromiter((r.proposed for r in requests), dtype=np.int64, count=n)
        kls = [r.kl[: max(r.proposed, 0)] if len(r.kl) else () for r in requests]
        kl_len = np.fromiter((len(v) for v in kls), dtype=np.int64, count=n)
        kl = None
        if n and kl_len.max() > 0:
            kl = np.zeros((n, int(kl_len.max())))
            for i, v in enumerate(kls):
                if len(v):
                    kl[i, : len(v)] = [float(x) for x in v]
        return cls([r.rid for r in requests], proposed,
                   np.fromiter((r.accepted for r in requests), dtype=np.int64, count=n), kl, kl_len,
                   np.fromiter((r.context_len for r in requests), dtype=np.int64, count=n),
                   np.fromiter((r.temperature for r in requests), dtype=float, count=n))

    def to_requests(self) -> list[RequestStep]:
        kl, kl_len = self.kl, self.kl_len.tolist()
        rows = kl.tolist() if kl is not None else None
        return [RequestStep(rid, k, a, rows[i][: kl_len[i]] if rows is not None and kl_len[i] else (), (), (), c, t)
                for i, (rid, k, a, c, t) in enumerate(zip(self.rids, self.proposed.tolist(), self.accepted.tolist(),
                                                          self.context_lens.tolist(), self.temperatures.tolist()))]


class ColumnarRequests(Sequence[RequestStep]):
    """``StepResult.requests`` backed by :class:`StepColumns`: the ``RequestStep`` list is built on first use only."""

    __slots__ = ("columns", "_list")

    def __init__(self, columns: StepColumns) -> None:
        self.columns = columns
        self._list: list[RequestStep] | None = None

    def _items(self) -> list[RequestStep]:
        if self._list is None:
            self._list = self.columns.to_requests()
        return self._list

    def __len__(self) -> int:
        return len(self.columns.rids)

    @overload
    def __getitem__(self, i: int) -> RequestStep: ...
    @overload
    def __getitem__(self, i: slice) -> list[RequestStep]: ...
    def __getitem__(self, i):
        return self._items()[i]

    def __iter__(self) -> Iterator[RequestStep]:
        return iter(self._items())


@dataclass
class StepResult:
    """One speculative (or plain) step of a whole batch, with its measured costs in seconds.

    ``speculated`` is False for a plain decode step (every request has ``proposed == 0``).
    ``requests`` is a list of :class:`RequestStep` or, from a host that works in arrays, a
    :class:`ColumnarRequests` over :class:`StepColumns`; :attr:`columns` gives the arrays either way.
    ``verify_tokens`` is the number of token positions the target forward processed (batch × tree nodes of the
    widest tree: the batch is padded to it). ``catch_up_seconds`` is the drafter's one-off catch-up on backlogs
    (a fresh prompt, or the tokens decoded while speculation was off): part of the step's time, but kept out of
    ``draft_seconds`` so that policies learn the steady per-step drafting cost from it.
    """

    requests: Sequence[RequestStep]
    speculated: bool = True
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    overhead_seconds: float = 0.0
    train_seconds: float = 0.0
    catch_up_seconds: float = 0.0
    verify_tokens: int = 0
    drafter: str = ""
    config: dict = field(default_factory=dict)  # what the policy chose for this step (e.g. bandit arm)

    @property
    def batch_size(self) -> int:
        return len(self.requests)

    @property
    def seconds(self) -> float:
        return (self.draft_seconds + self.verify_seconds + self.overhead_seconds + self.train_seconds
                + self.catch_up_seconds)

    @property
    def columns(self) -> StepColumns:
        """The requests as arrays (:class:`StepColumns`): the host's own when it built them, else built once."""
        reqs = self.requests
        if isinstance(reqs, ColumnarRequests):
            return reqs.columns
        built = self.__dict__.get("_columns")
        if built is None or built[0] is not reqs:
            built = self.__dict__["_columns"] = (reqs, StepColumns.from_requests(reqs))
        return built[1]

    @property
    def committed_tokens(self) -> int:
        return int(self.columns.accepted.sum()) + self.batch_size

    @property
    def tokens_per_second(self) -> float:
        return self.committed_tokens / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Per-position signals (batched torch) and the chain acceptance helpers
# ---------------------------------------------------------------------------------------------------------------
#
# Only the two tensor functions use torch (imported inside them); everything a policy touches is plain Python or numpy.

#: DSDE clamps both distributions at this floor before taking logs (``compute_kl_divergence``, eps=1e-8).
PROB_FLOOR = 1e-8


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = PROB_FLOOR) -> torch.Tensor:
    r"""KL(p ‖ q) over the last (vocabulary) axis, DSDE's definition: both clamped at ``eps`` first.

    .. math::  \mathrm{KL}(p \,\|\, q) = \sum_x \tilde p(x)\,(\log \tilde p(x) - \log \tilde q(x)),
               \qquad \tilde p = \max(p, \epsilon),\ \tilde q = \max(q, \epsilon)

    ``p`` is the target distribution, ``q`` the draft's; shapes ``[..., V]`` broadcast, result ``[...]`` in
    float32 (float64 stays float64). The clamp makes the value finite when q misses p's support (the sum is then
    large, not inf) and is what DSDE's thresholds were tuned on; it is not renormalised, exactly as DSDE.
    """
    import torch

    dtype = torch.promote_types(torch.promote_types(p.dtype, q.dtype), torch.float32)
    p = p.to(dtype).clamp_min(eps)
    q = q.to(dtype).clamp_min(eps)
    return (p * (p.log() - q.log())).sum(dim=-1)


def entropy(p: torch.Tensor, eps: float = PROB_FLOOR) -> torch.Tensor:
    r"""Shannon entropy :math:`H(p) = -\sum_x p(x)\log \max(p(x), \epsilon)` in nats over the last axis.

    Zero-probability entries contribute 0 (``0·log eps = 0``), so a one-hot row has entropy exactly 0.
    """
    import torch

    p = p.to(torch.promote_types(p.dtype, torch.float32))
    return -(p * p.clamp_min(eps).log()).sum(dim=-1)


def chain_trials(proposed: int, accepted: int) -> tuple[int, int]:
    r"""(successes, trials) of one chain step for the per-token acceptance rate α.

    Under the i.i.d. model each verified position is a Bernoulli(α) trial and verification stops at the first
    rejection, so a step that proposed ``k`` and accepted ``a`` ran ``a + 1[a < k]`` trials with ``a`` successes.
    Summing over steps gives the maximum-likelihood estimate :math:`\hat\alpha = \sum a / \sum (a + 1[a<k])`
    (the naive ``Σa / Σk`` is biased low: positions after a rejection were never tried).
    """
    if proposed <= 0:
        return 0, 0
    return accepted, accepted + (1 if accepted < proposed else 0)


def expected_tokens(alpha: float, k: int) -> float:
    r"""Expected tokens committed by a chain step of depth ``k``, bonus token included (TIDE Eq. 2).

    .. math::  E[\ell] = \frac{1 - \alpha^{k+1}}{1 - \alpha} = \sum_{i=0}^{k} \alpha^i

    Summed as the geometric series, so there is no division by zero at α → 1 (where it tends to ``k + 1``).
    """
    alpha = min(max(float(alpha), 0.0), 1.0)
    total, term = 0.0, 1.0
    for _ in range(max(int(k), 0) + 1):
        total += term
        term *= alpha
    return total
