r"""Lossless verification of draft trees with stochastic or deterministic siblings.

All three tree rules are one walk. Start at the root ``u`` with the target residual ``p_res = p(.|u)``
and visit the children ``x_1, x_2, ...`` of ``u`` in order, each proposed from a distribution ``q_j``:

.. math::

    \text{accept } x_j \text{ with probability } \min\Bigl(1, \frac{p_{res}(x_j)}{q_j(x_j)}\Bigr)

    \text{on rejection: } p_{res} \leftarrow \frac{\max(0,\ p_{res} - q_j)}{\sum \max(0,\ p_{res} - q_j)}

On acceptance descend into ``x_j`` and start again with ``p_res = p(.|x_j)``; when every child of ``u`` is
rejected (or ``u`` is a leaf), emit one token from ``p_res``. The schemes differ only in ``q_j``:

* ``iid`` (SpecInfer, Alg. 2 ``VerifyStochastic``): every sibling was drawn i.i.d. from ``q``, so
  ``q_j = q`` for all ``j``. Duplicate siblings are legitimate here and are *not* removed (removing them
  would change the proposal distribution).
* ``without_replacement`` (recursive rejection sampling): sibling ``j`` was drawn from ``q`` with the
  earlier siblings removed, so ``q_1 = q`` and ``q_{j+1}(x) = q_j(x)·1[x != x_j] / (1 - q_j(x_j))``.
  A duplicate sibling is impossible under this scheme and raises.
* ``topk`` (EAGLE ``evaluate_posterior``): siblings were *chosen*, not sampled, so each proposal is a
  point mass ``q_j = δ_{x_j}``: ``max(0, p_res - δ_{x_j})`` is ``p_res`` with ``x_j`` zeroed. Written in
  the cumulative form GPU kernels use (one coin ``u`` per node, accept the first ``j`` with
  ``u < Σ_{i≤j} p(x_i)``), the conditional acceptance of sibling ``j`` is

  .. math:: \Pr[\text{accept } x_j \mid x_{<j} \text{ rejected}] = \frac{p(x_j)}{1 - \sum_{i<j} p(x_i)}

  and the residual is ``p`` with every tried sibling zeroed, renormalised. That form is exact only for
  *distinct* siblings: a duplicate would count ``p(x)`` twice and emit ``x`` with probability ``2 p(x)``.
  So duplicate siblings are skipped explicitly (only the first copy is tried).
* ``chain`` is ``iid`` with one child per node (see also the vectorised :func:`sglang_ext.core.chain.verify_chain`).

Why this is lossless (SpecInfer Thm. 4.2, RRS): at each node the emitted token has marginal ``p(.|u)``:
``P(x_j accepted) + P(all of x_1..x_j rejected) · p_res^{(j)}(x)`` telescopes to ``p(x)`` for every ``x``.
The guarantee needs ``q_j`` to be the distribution that *actually* produced ``x_j``: using the drafter's
softmax on top-k-chosen nodes, or a drafter updated after proposing, is biased (tests show both).

Degenerate cases, handled explicitly:

* a drafted token with ``q_j(x_j) = 0`` cannot have been sampled: :class:`InvalidDraftError` names the request;
* a drafted token with ``p_res(x_j) = 0`` (e.g. cut by top-p) is rejected with probability 1;
* a residual whose mass is 0 belongs to a rejection of probability 0; ``p_res`` is then kept unchanged
  rather than dividing by zero.

Arithmetic is float64. The batch walks in lockstep: one iteration per depth, one inner iteration per
sibling slot, every request at its own node.
"""

from __future__ import annotations

import torch

from .processing import check_distribution
from .random_source import RandomSource
from .tree import DraftTree, VerifyResult


_TINY = torch.finfo(torch.float64).tiny  # guards divisions whose result is masked out anyway


class InvalidDraftError(ValueError):
    """A draft that contradicts its own proposal distribution (e.g. a token with q(x) = 0)."""


def _renormalised_residual(p_res: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, p_res - q))`` per row; rows whose residual mass is 0 keep ``p_res``."""
    res = (p_res - q).clamp(min=0.0)
    mass = res.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, res / mass.clamp(min=_TINY), p_res)


def _name(tree: DraftTree, b: int) -> object:
    return tree.request_ids[b] if tree.request_ids is not None else b


def verify_tree(
    tree: DraftTree,
    target_probs: torch.Tensor,
    rng: RandomSource,
    *,
    dedup_topk: bool = True,
) -> VerifyResult:
    """Verify a batch of draft trees against the processed target distributions.

    Args:
        tree: the draft trees; ``tree.scheme`` selects the rule (see module docstring).
        target_probs: ``[B, N, V]`` processed target distribution ``p(.|node)`` at every tree node
            (from :func:`sglang_ext.core.processing.process_logits`).
        rng: the randomness (``TorchRandomSource`` when serving, scripted when checking).
        dedup_topk: skip duplicate siblings in ``topk`` trees. Leave on; ``False`` exists to demonstrate the pitfall.
    """
    B, N = tree.tokens.shape
    if target_probs.shape[:2] != (B, N):
        raise ValueError(f"target_probs must be [B, N, V] = [{B}, {N}, V], got {tuple(target_probs.shape)}")
    check_distribution(target_probs[:, 0], "target distribution at the root", tree.request_ids)
    p_all = target_probs.to(torch.float64)
    V = p_all.shape[-1]
    q_all = tree.draft_probs.to(torch.float64) if tree.draft_probs is not None else None
    rows = torch.arange(B)
    children = tree.children
    C = children.shape[-1]
    scheme = tree.scheme

    cur = torch.zeros(B, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    next_token = torch.full((B,), -1, dtype=torch.long)

    for _depth in range(tree.max_depth + 1):
        p_res = p_all[rows, cur].clone()
        q_res = q_all[rows, cur].clone() if q_all is not None else None
        kids = children[rows, cur]  # [B, C]
        moved = torch.zeros(B, dtype=torch.bool)
        if scheme == "topk":
            p_node = p_res.clone()  # p(.|u); topk uses the cumulative form below
            tried = torch.zeros(B, V, dtype=torch.bool)  # siblings already tried at this node
            tried_mass = torch.zeros(B, dtype=torch.float64)  # Σ p(x_i) over tried siblings
        for j in range(C):
            kid = kids[:, j]
            live = ~done & ~moved & (kid >= 0)
            if not bool(live.any()):
                break
            x = tree.tokens[rows, kid.clamp(min=0)].clamp(min=0)
            if scheme == "topk":
                if dedup_topk:
                    live = live & ~tried[rows, x]
                p_x = p_node[rows, x]
                ratio = (p_x / (1.0 - tried_mass).clamp(min=_TINY)).clamp(max=1.0)
                accept = rng.bernoulli(torch.where(live, ratio, torch.zeros_like(ratio))) & live
                rejected = live & ~accept
                tried[rows, x] |= rejected
                tried_mass = tried_mass + torch.where(rejected, p_x, torch.zeros_like(p_x))
                left = torch.where(tried, torch.zeros_like(p_node), p_node)
                mass = left.sum(dim=-1, keepdim=True)
                p_res = torch.where(mass > 0, left / mass.clamp(min=_TINY), p_node)
                cur = torch.where(accept, kid, cur)
                moved |= accept
                continue
            # iid / chain / without_replacement: sibling j was drawn from the current proposal residual q_res
            p_x = p_res[rows, x]
            q_x = q_res[rows, x]
            impossible = live & (q_x <= 0)
            if bool(impossible.any()):
                b = int(torch.nonzero(impossible)[0, 0])
                why = "a duplicate sibling in a without-replacement tree" if scheme == "without_replacement" else "q(x) = 0"
                raise InvalidDraftError(
                    f"request {_name(tree, b)!r}: draft token {int(x[b])} at node {int(kid[b])} has proposal "
                    f"probability 0 ({why}); it cannot have been drawn from the recorded draft distribution"
                )
            ratio = torch.where(live, (p_x / q_x.clamp(min=_TINY)).clamp(max=1.0), torch.zeros_like(p_x))
            accept = rng.bernoulli(ratio) & live
            rejected = live & ~accept
            if bool(rejected.any()):
                p_res = torch.where(rejected[:, None], _renormalised_residual(p_res, q_res), p_res)
                if scheme == "without_replacement":
                    q_drop = q_res.clone()
                    q_drop[rows, x] = 0.0
                    q_drop = q_drop / q_drop.sum(dim=-1, keepdim=True).clamp(min=_TINY)
                    q_res = torch.where(rejected[:, None], q_drop, q_res)
            cur = torch.where(accept, kid, cur)
            moved |= accept
        stop = ~done & ~moved
        if bool(stop.any()):
            next_token[stop] = rng.categorical(p_res[stop])
            done |= stop
        if bool(done.all()):
            break
    return VerifyResult.from_paths(tree, cur, next_token)

