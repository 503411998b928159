r"""Greedy verification (temperature 0).

With ``t(u) = argmax p(.|u)`` the target's greedy choice after node ``u`` (first index on ties, as
``torch.argmax`` and plain greedy decoding pick), the accepted path is the longest root-to-node path
``u_0 → u_1 → … → u_n`` with ``token(u_{i+1}) = t(u_i)``; the step emits its tokens followed by ``t(u_n)``.
The output is therefore identical, token for token, to plain greedy decoding of the target, whatever the
drafter proposed. Among duplicate siblings the first matching one is followed.
"""

from __future__ import annotations

import torch

from .tree import DraftTree, VerifyResult


def verify_greedy_chain(draft_tokens: torch.Tensor, target_argmax: torch.Tensor,
                        num_draft: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``draft_tokens [B, K]`` against ``target_argmax [B, K + 1]`` → ``(num_accepted [B], next_token [B])``."""
    B, K = draft_tokens.shape
    if num_draft is None:
        num_draft = torch.full((B,), K, dtype=torch.long)
    live = torch.arange(K).expand(B, K) < num_draft.reshape(-1, 1)
    match = (draft_tokens == target_argmax[:, :K]) & live
    num_accepted = torch.cumprod(match.long(), dim=1).sum(dim=1)
    next_token = target_argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
    return num_accepted, next_token


def verify_greedy_tree(tree: DraftTree, target_argmax: torch.Tensor) -> VerifyResult:
    """Walk every tree along the target's argmax (``target_argmax [B, N]``: greedy token after each node)."""
    B, N = tree.tokens.shape
    rows = torch.arange(B)
    children = tree.children
    cur = torch.zeros(B, dtype=torch.long)
    for _ in range(tree.max_depth):
        want = target_argmax[rows, cur]  # [B]
        kids = children[rows, cur]  # [B, C]
        kid_tokens = torch.where(kids >= 0, tree.tokens.gather(1, kids.clamp(min=0)), torch.full_like(kids, -1))
        hit = kid_tokens == want[:, None]
        has = hit.any(dim=1)
        if not bool(has.any()):
            break
        first = hit.long().argmax(dim=1)
        cur = torch.where(has, kids[rows, first], cur)
    return VerifyResult.from_paths(tree, cur, target_argmax[rows, cur])


def greedy_verify_fn(tree: DraftTree, target_probs: torch.Tensor, rng: object = None) -> VerifyResult:
    """:func:`verify_greedy_tree` with the checker's ``verify_fn`` signature (argmax of the processed target)."""
    return verify_greedy_tree(tree, target_probs.argmax(dim=-1))
