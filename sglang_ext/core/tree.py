"""Draft trees: the data every verifier, drafter and engine agrees on.

A batch of ``B`` draft trees is stored padded to ``N`` nodes per request:

* node 0 is the **root**: the last committed token, whose next-token distribution the target computes
  in the same forward as the drafts (it is where the bonus/residual token comes from if nothing is accepted);
* nodes are in topological order (``parents[b, i] < i``), the root's parent is ``-1``;
* padding nodes have ``tokens == -1`` and ``parents == -1``;
* ``draft_probs[b, i]`` is the draft distribution ``q`` *at* node ``i``: the distribution the children of
  ``i`` were drawn from, recorded when they were proposed (never recomputed later, see the pitfalls in
  ``sglang_ext.core.tree_verify``);
* ``scheme`` says *how* children were drawn from ``q``, which decides the acceptance rule:

  ===================== ============================================================
  ``chain``             one child per node, ``x ~ q`` (Leviathan/Chen)
  ``iid``               siblings i.i.d. from ``q`` (SpecInfer multi-step sampling)
  ``without_replacement`` siblings drawn from ``q`` without replacement (recursive rejection sampling)
  ``topk``              siblings chosen deterministically (top-k of ``q``; EAGLE): the proposal is a point mass
  ===================== ============================================================

Tree attention: node ``i`` attends to the committed context and to its ancestors and itself, and sits at
position ``start + depth(i)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch

Scheme = Literal["chain", "iid", "without_replacement", "topk"]
SCHEMES: tuple[str, ...] = ("chain", "iid", "without_replacement", "topk")


@dataclass(eq=False)
class DraftTree:
    """A padded batch of draft trees (see the module docstring for the layout)."""

    tokens: torch.Tensor  # [B, N] long, -1 = padding
    parents: torch.Tensor  # [B, N] long, -1 for root and padding
    scheme: Scheme
    draft_probs: torch.Tensor | None = None  # [B, N, V] float, q at each node
    request_ids: list[object] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown draft scheme {self.scheme!r}; expected one of {SCHEMES}")
        if self.tokens.shape != self.parents.shape or self.tokens.dim() != 2:
            raise ValueError(f"tokens {tuple(self.tokens.shape)} and parents {tuple(self.parents.shape)} must both be [B, N]")
        B, N = self.tokens.shape
        idx = torch.arange(N, device=self.parents.device).expand(B, N)
        valid = self.tokens >= 0
        if not bool(valid[:, 0].all()):
            raise ValueError("every request needs a root token at node 0")
        if bool((self.parents[:, 0] != -1).any()):
            raise ValueError("the root (node 0) must have parent -1")
        body = valid[:, 1:]
        par = self.parents[:, 1:]
        if bool((body & ((par < 0) | (par >= idx[:, 1:]))).any()):
            raise ValueError("nodes must be in topological order: 0 <= parents[i] < i for every real node")
        if bool((body & ~valid.gather(1, par.clamp(min=0))).any()):
            raise ValueError("a real node has a padding node as parent")
        if self.scheme == "chain" and bool((self.num_children > 1).any()):
            raise ValueError("a 'chain' tree has a node with more than one child")
        if self.draft_probs is not None and self.draft_probs.shape[:2] != (B, N):
            raise ValueError(f"draft_probs must be [B, N, V] = [{B}, {N}, V], got {tuple(self.draft_probs.shape)}")
        if self.draft_probs is None and self.scheme != "topk":
            raise ValueError(f"scheme {self.scheme!r} needs draft_probs (the q the children were drawn from)")

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_slots(self) -> int:
        return self.tokens.shape[1]

    @cached_property
    def valid(self) -> torch.Tensor:
        """``[B, N]`` bool: real (non-padding) nodes."""
        return self.tokens >= 0

    @cached_property
    def num_nodes(self) -> torch.Tensor:
        """``[B]`` real nodes per request, root included."""
        return self.valid.sum(dim=1)

    @cached_property
    def depths(self) -> torch.Tensor:
        """``[B, N]`` depth of each node (root 0, padding -1)."""
        B, N = self.tokens.shape
        depth = torch.zeros(B, N, dtype=torch.long, device=self.tokens.device)
        for i in range(1, N):
            depth[:, i] = depth.gather(1, self.parents[:, i : i + 1].clamp(min=0)).squeeze(1) + 1
        return torch.where(self.valid, depth, torch.full_like(depth, -1))

    @cached_property
    def max_depth(self) -> int:
        return int(self.depths.max())

    @cached_property
    def children(self) -> torch.Tensor:
        """``[B, N, C]`` children of each node in index order, padded with -1 (``C`` = max fan-out)."""
        B, N = self.tokens.shape
        lists = [[[] for _ in range(N)] for _ in range(B)]
        for b, row in enumerate(self.parents.tolist()):
            for i, p in enumerate(row):
                if i > 0 and p >= 0 and bool(self.valid[b, i]):
                    lists[b][p].append(i)
        width = max(1, max(len(c) for per_req in lists for c in per_req))
        out = torch.full((B, N, width), -1, dtype=torch.long, device=self.tokens.device)
        for b in range(B):
            for i in range(N):
                if lists[b][i]:
                    out[b, i, : len(lists[b][i])] = torch.tensor(lists[b][i])
        return out

    @cached_property
    def num_children(self) -> torch.Tensor:
        """``[B, N]`` fan-out of each node."""
        B, N = self.tokens.shape
        counts = torch.zeros(B, N, dtype=torch.long, device=self.tokens.device)
        body = self.valid[:, 1:]
        counts.scatter_add_(1, self.parents[:, 1:].clamp(min=0), body.long())
        return counts

    @cached_property
    def attention_mask(self) -> torch.Tensor:
        """``[B, N, N]`` bool: ``mask[b, i, j]`` iff ``j`` is ``i`` or an ancestor of ``i`` (padding rows see only themselves)."""
        B, N = self.tokens.shape
        mask = torch.eye(N, dtype=torch.bool, device=self.tokens.device).expand(B, N, N).clone()
        for i in range(1, N):
            p = self.parents[:, i].clamp(min=0)
            inherited = mask[torch.arange(B), p] & self.valid[:, i : i + 1]
            mask[:, i] |= inherited
        return mask

    def position_ids(self, start: torch.Tensor | int) -> torch.Tensor:
        """``[B, N]`` positions: ``start[b] + depth`` (``start`` = position of the root token)."""
        start_t = torch.as_tensor(start, device=self.tokens.device).reshape(-1, 1)
        return start_t + self.depths.clamp(min=0)

    def path_to(self, b: int, node: int) -> list[int]:
        """Node indices from the root's first child down to ``node`` (empty for the root)."""
        path = []
        while node > 0:
            path.append(node)
            node = int(self.parents[b, node])
        return path[::-1]

    # ---- constructors -------------------------------------------------------------------------
    @staticmethod
    def chain(root_tokens: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None = None,
              num_draft: torch.Tensor | None = None, scheme: Scheme = "chain") -> "DraftTree":
        """A batch of chains: root then ``draft_tokens[b, :num_draft[b]]``.

        ``draft_probs`` is ``[B, K, V]`` with ``draft_probs[b, i]`` the q that ``draft_tokens[b, i]`` was drawn
        from; it is stored at the *parent* node as the layout requires.
        """
        B, K = draft_tokens.shape
        if num_draft is None:
            num_draft = torch.full((B,), K, dtype=torch.long)
        keep = torch.arange(K).expand(B, K) < num_draft.reshape(-1, 1)
        tokens = torch.cat([root_tokens.reshape(B, 1), torch.where(keep, draft_tokens, torch.full_like(draft_tokens, -1))], dim=1)
        parents = torch.cat([torch.full((B, 1), -1), torch.arange(K).expand(B, K)], dim=1)
        parents = torch.where(tokens >= 0, parents, torch.full_like(parents, -1))
        parents[:, 0] = -1
        probs = None
        if draft_probs is not None:
            V = draft_probs.shape[-1]
            probs = torch.cat([draft_probs, torch.zeros(B, 1, V, dtype=draft_probs.dtype)], dim=1)
        return DraftTree(tokens=tokens.long(), parents=parents.long(), scheme=scheme, draft_probs=probs)

    @staticmethod
    def from_lists(tokens: list[list[int]], parents: list[list[int]], scheme: Scheme,
                   draft_probs: list[torch.Tensor] | None = None, vocab_size: int | None = None) -> "DraftTree":
        """Pad ragged per-request trees (lists) into one batch."""
        B = len(tokens)
        N = max(len(t) for t in tokens)
        tok = torch.full((B, N), -1, dtype=torch.long)
        par = torch.full((B, N), -1, dtype=torch.long)
        probs = None
        if draft_probs is not None:
            V = vocab_size or draft_probs[0].shape[-1]
            probs = torch.zeros(B, N, V, dtype=torch.float64)
        for b in range(B):
            n = len(tokens[b])
            tok[b, :n] = torch.tensor(tokens[b])
            par[b, :n] = torch.tensor(parents[b])
            if probs is not None:
                probs[b, :n] = draft_probs[b].to(torch.float64)
        return DraftTree(tokens=tok, parents=par, scheme=scheme, draft_probs=probs)


@dataclass
class VerifyResult:
    """What one verification step commits, per request.

    ``accepted_nodes[b]`` are the tree nodes accepted (root excluded, in order); ``next_token[b]`` is the one
    extra token sampled at the end (residual on rejection, bonus when the path reached a leaf).
    The tokens to commit are ``accepted_tokens[b] + [next_token[b]]``.
    """

    accepted_nodes: list[list[int]]
    accepted_tokens: list[list[int]]
    next_token: torch.Tensor  # [B] long

    @property
    def num_accepted(self) -> torch.Tensor:
        return torch.tensor([len(a) for a in self.accepted_nodes], dtype=torch.long)

    @property
    def emitted(self) -> list[list[int]]:
        return [acc + [int(t)] for acc, t in zip(self.accepted_tokens, self.next_token.tolist())]

    @staticmethod
    def from_paths(tree: DraftTree, last_node: torch.Tensor, next_token: torch.Tensor) -> "VerifyResult":
        nodes = [tree.path_to(b, int(n)) for b, n in enumerate(last_node.tolist())]
        toks = [[int(tree.tokens[b, i]) for i in path] for b, path in enumerate(nodes)]
        return VerifyResult(accepted_nodes=nodes, accepted_tokens=toks, next_token=next_token.long())
