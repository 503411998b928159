r"""Chain speculative sampling, vectorised over the batch and the draft positions.

Leviathan et al. (2211.17192, Alg. 1) and Chen et al. (2302.01318, Alg. 2). Request ``b`` drafted
``x_1..x_k`` (``k = num_draft[b]``), ``x_i ~ q_i``; one target pass gave ``p_1..p_{k+1}``:

.. math::

    a_i &= \mathbb{1}\bigl[U_i < \min(1,\ p_i(x_i) / q_i(x_i))\bigr], \qquad U_i \sim \mathcal U[0, 1)

    n &= \max\{\, m \le k : a_1 = \dots = a_m = 1 \,\}   \quad\text{(accepted prefix)}

    y &\sim \begin{cases}
        \operatorname{norm}(\max(0,\ p_{n+1} - q_{n+1})) & n < k \text{ (residual after the first rejection)}\\
        p_{k+1} & n = k \text{ (bonus token)}
    \end{cases}

and the step emits ``x_1..x_n, y``. ``P(accept) = Σ_x min(p(x), q(x)) = 1 - TV(p, q)`` and the expected
number of tokens per step is ``(1 - α^{k+1}) / (1 - α)``.

Differences from vLLM's v0 sampler, on purpose: no ``+1e-8`` in the ratio and no clamp of the residual to
the smallest positive float (both bias the output slightly); a token with ``q(x) = 0`` raises; a residual
of zero mass (reached only through a rejection of probability 0) falls back to ``p``.
"""

from __future__ import annotations

import torch

from .processing import check_distribution
from .random_source import RandomSource
from .tree import DraftTree, VerifyResult
from .tree_verify import _TINY, InvalidDraftError, _renormalised_residual


def verify_chain(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    rng: RandomSource,
    num_draft: torch.Tensor | None = None,
    request_ids: list[object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify ``B`` chains at once.

    Args:
        draft_tokens: ``[B, K]`` drafted tokens (positions ``>= num_draft[b]`` are ignored).
        draft_probs: ``[B, K, V]``; ``draft_probs[b, i]`` is the q ``draft_tokens[b, i]`` was sampled from.
        target_probs: ``[B, K + 1, V]`` processed target distributions after the root and each draft token.
        rng: randomness source.
        num_draft: ``[B]`` per-request draft length (ragged chains); default ``K`` for all.

    Returns:
        ``(num_accepted [B], next_token [B])``: request ``b`` commits
        ``draft_tokens[b, :num_accepted[b]]`` followed by ``next_token[b]``.
    """
    B, K = draft_tokens.shape
    if target_probs.shape[:2] != (B, K + 1) or draft_probs.shape[:2] != (B, K):
        raise ValueError(
            f"shapes disagree: draft_tokens {tuple(draft_tokens.shape)}, draft_probs {tuple(draft_probs.shape)}, "
            f"target_probs {tuple(target_probs.shape)} (expected [B, K], [B, K, V], [B, K+1, V])"
        )
    check_distribution(target_probs[:, 0], "target distribution at the root", request_ids)
    if num_draft is None:
        num_draft = torch.full((B,), K, dtype=torch.long)
    p = target_probs.to(torch.float64)
    q = draft_probs.to(torch.float64)
    rows = torch.arange(B)
    live = torch.arange(K).expand(B, K) < num_draft.reshape(-1, 1)
    x = draft_tokens.clamp(min=0).unsqueeze(-1)
    p_x = p[:, :K].gather(-1, x).squeeze(-1)
    q_x = q.gather(-1, x).squeeze(-1)
    impossible = live & (q_x <= 0)
    if bool(impossible.any()):
        b, i = (int(v) for v in torch.nonzero(impossible)[0])
        name = request_ids[b] if request_ids is not None else b
        raise InvalidDraftError(f"request {name!r}: draft token {int(draft_tokens[b, i])} at position {i} has q(x) = 0")
    ratio = torch.where(live, (p_x / q_x.clamp(min=_TINY)).clamp(max=1.0), torch.zeros_like(p_x))
    accepted = rng.bernoulli(ratio) & live
    num_accepted = torch.cumprod(accepted.long(), dim=1).sum(dim=1)

    p_stop = p[rows, num_accepted]  # [B, V]
    rejected = num_accepted < num_draft
    q_stop = q[rows, num_accepted.clamp(max=K - 1)] if K > 0 else torch.zeros_like(p_stop)
    final = torch.where(rejected[:, None], _renormalised_residual(p_stop, q_stop), p_stop)
    next_token = rng.categorical(final)
    return num_accepted, next_token


def verify_chain_tree(tree: DraftTree, target_probs: torch.Tensor, rng: RandomSource) -> VerifyResult:
    """:func:`verify_chain` on a chain-shaped :class:`DraftTree` (node ``i``'s parent is ``i - 1``)."""
    B, N = tree.tokens.shape
    expected_parents = torch.arange(-1, N - 1).expand(B, N)
    if bool((tree.valid & (tree.parents != expected_parents)).any()):
        raise ValueError("verify_chain_tree needs a chain laid out in order (parents[i] == i - 1)")
    if tree.draft_probs is None:
        raise ValueError("chain verification needs the draft distributions q")
    num_draft = tree.num_nodes - 1
    num_accepted, next_token = verify_chain(
        tree.tokens[:, 1:], tree.draft_probs[:, : N - 1], target_probs, rng, num_draft, tree.request_ids
    )
    return VerifyResult.from_paths(tree, num_accepted, next_token)
