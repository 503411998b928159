"""Turn target logits into the distribution that speculative sampling must reproduce.

Lossless means: the emitted tokens are distributed exactly as if sampled from the *processed* target
distribution ``p = top_p(top_k(softmax(logits / T)))``. So the processing is applied to the target
logits before verification, in float64, and verification never looks at raw logits again.

Order (as in vLLM and HF): temperature, then top-k, then top-p, then renormalise.

* temperature ``T > 0``: ``p ∝ exp(logits / T)``; ``T == 0`` means greedy and is handled by
  :mod:`sglang_ext.core.greedy` (``process_logits`` returns the one-hot argmax for it, first index on ties,
  which is what ``torch.argmax`` and plain greedy decoding pick).
* top-k ``k > 0``: keep the ``k`` most likely tokens (ties at the boundary broken by token id, lowest first).
* top-p ``0 < P <= 1``: keep the smallest prefix of tokens, in order of decreasing probability, whose mass
  reaches ``P`` (the token that crosses ``P`` is kept, so at least one token always survives).

Non-finite input is an error, never silently "fixed": NaN or ``+inf`` anywhere, or a row that is ``-inf``
everywhere, raises :class:`NonFiniteLogitsError` naming the request. ``-inf`` entries are allowed (masked tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


class NonFiniteLogitsError(ValueError):
    """Logits that cannot define a distribution (NaN, +inf, or everything masked)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters (SGLang/vLLM names and meanings; ``top_k <= 0`` disables top-k)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def check_finite(logits: torch.Tensor, request_ids: Sequence[object] | None = None, what: str = "target logits") -> None:
    """Raise :class:`NonFiniteLogitsError` naming the first bad request (batch index or id)."""
    bad_value = torch.isnan(logits) | (logits == float("inf"))
    all_masked = (logits == float("-inf")).all(dim=-1)
    flat_bad = bad_value.reshape(logits.shape[0], -1).any(dim=-1) | all_masked.reshape(logits.shape[0], -1).any(dim=-1)
    if bool(flat_bad.any()):
        b = int(torch.nonzero(flat_bad)[0, 0])
        name = request_ids[b] if request_ids is not None else b
        kind = "NaN" if bool(torch.isnan(logits[b]).any()) else "+inf" if bool((logits[b] == float("inf")).any()) else "-inf everywhere"
        raise NonFiniteLogitsError(f"request {name!r}: {what} contain {kind}; refusing to sample from them")


def _apply_top_k(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= probs.shape[-1]:
        return probs
    # Stable sort on (-p) keeps the lowest token id first among equal probabilities.
    order = torch.sort(-probs, dim=-1, stable=True).indices
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep.scatter_(-1, order[..., :top_k], True)
    return torch.where(keep, probs, torch.zeros_like(probs))


def _apply_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    total = sorted_p.sum(dim=-1, keepdim=True)
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    keep_sorted = mass_before < top_p * total  # the token crossing top_p is kept
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return torch.where(keep, probs, torch.zeros_like(probs))


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    request_ids: Sequence[object] | None = None,
) -> torch.Tensor:
    """Processed target probabilities, float64, same shape as ``logits`` (``[B, ..., V]``).

    ``params`` is one :class:`SamplingParams` for the whole batch or one per request (dimension 0).
    """
    check_finite(logits, request_ids)
    x = logits.to(torch.float64)
    per_request = [params] * x.shape[0] if isinstance(params, SamplingParams) else list(params)
    if len(per_request) != x.shape[0]:
        raise ValueError(f"got {len(per_request)} SamplingParams for a batch of {x.shape[0]}")
    out = torch.empty_like(x)
    for b, sp in enumerate(per_request):
        row = x[b]
        if sp.greedy:
            out[b] = torch.nn.functional.one_hot(row.argmax(dim=-1), row.shape[-1]).to(torch.float64)
            continue
        probs = torch.softmax(row / sp.temperature, dim=-1)
        probs = _apply_top_p(_apply_top_k(probs, sp.top_k), sp.top_p)
        out[b] = probs / probs.sum(dim=-1, keepdim=True)
    return out


def check_distribution(probs: torch.Tensor, what: str, request_ids: Sequence[object] | None = None, atol: float = 1e-6) -> None:
    """Validate that the last dim of ``probs`` holds distributions (finite, >= 0, sums to 1)."""
    finite = torch.isfinite(probs).reshape(probs.shape[0], -1).all(dim=-1)
    nonneg = (probs >= 0).reshape(probs.shape[0], -1).all(dim=-1)
    sums_ok = ((probs.sum(dim=-1) - 1.0).abs() <= atol).reshape(probs.shape[0], -1).all(dim=-1)
    ok = finite & nonneg & sums_ok
    if not bool(ok.all()):
        b = int(torch.nonzero(~ok)[0, 0])
        name = request_ids[b] if request_ids is not None else b
        reason = "non-finite values" if not bool(finite[b]) else "negative values" if not bool(nonneg[b]) else "rows that do not sum to 1"
        raise ValueError(f"request {name!r}: {what} has {reason}")
