"""Serving the EAGLE-style drafter: its own KV cache, chain drafting and EAGLE-2 dynamic trees.

Per request the drafter keeps a one-layer KV cache of *committed* pairs ``(h_t, x_{t+1})`` (cache index ``j``
holds the pair whose token sits at position ``j + 1``). The host hands over new pairs with :meth:`observe`
after every target forward; :meth:`draft` first runs them through the layer in one batched forward (that
extends the cache and yields the state ``a`` at the root), then drafts from ``a``:

* **catch-up** (a fresh prompt, or the tokens decoded while speculation was off): a request holding more than
  ``catch_up_split`` pending pairs absorbs all but its last pair alone, in a forward of its own, before the
  batched one. Padding every row to the longest backlog would cost ``B · max_r n_r`` layer positions instead
  of ``Σ_r n_r`` (8 fresh prompts of 40–1023 tokens: 8184 positions for 2423 real ones, 1.69 s instead of
  0.29 s on one CPU thread). The time goes to :attr:`last_catch_up_seconds`, apart from the steady per-step
  drafting cost that speculation-control policies price;

* ``topk == 1`` (chain, SGLang's default for EAGLE): ``num_steps`` tokens, each the argmax of ``q`` for greedy
  requests, or a sample from ``q`` (scheme ``chain``, ``q`` recorded) for stochastic ones;
* ``topk > 1`` (EAGLE-2 dynamic tree): expand the ``topk`` best frontier nodes by cumulative log-probability
  for ``num_steps`` levels, then keep the ``num_draft_tokens - 1`` best nodes overall (their ancestors score at
  least as high, so the kept set is a tree). Siblings are *chosen*, so the scheme is ``topk`` (point masses).

Draft nodes are written to the cache's scratch region beyond the committed length and are never committed:
the next :meth:`draft` overwrites them.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from ..kv_cache import SlotKVCache, StepLayout
from .base import Draft, DraftRequest, FeatureDrafterSlots, prune_to_budget
from .eagle_model import EagleDraftModel


class EagleDrafter(FeatureDrafterSlots):
    name = "eagle"

    def __init__(self, model: EagleDraftModel, num_slots: int, max_len: int, topk: int = 1,
                 num_draft_tokens: int | None = None) -> None:
        if model.embed_weight is None:
            raise ValueError("bind the drafter to its target first (EagleDraftModel.bind_target)")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.model = model.eval()
        c = model.config
        dev = model.fc.weight.device
        self.cache = SlotKVCache(1, num_slots, c.num_kv_heads, c.head_dim, max_len, dtype=model.fc.weight.dtype, device=dev)
        self.topk = topk
        self.num_draft_tokens = num_draft_tokens
        self.pending: dict[int, tuple[list[torch.Tensor], list[int]]] = {}
        self.version = 0  # bumped by `swap_model`; a step is verified against the version that proposed it
        self.last_catch_up_seconds = 0.0  # time the last `draft` spent on split catch-ups (module docstring)
        self._masks: dict[tuple, torch.Tensor] = {}

    # ---- drafting ------------------------------------------------------------------------------------
    def _attend(self, layout: StepLayout):
        return lambda q, k, v: layout.attend(0, q, k, v, self.model.scale)

    def _causal(self, B: int, P: int, dev) -> torch.Tensor:
        """``[B, P, P]`` lower-triangular visibility (cached per shape: the same few shapes recur every step)."""
        key = (B, P, str(dev))
        vis = self._masks.get(key)
        if vis is None:
            if len(self._masks) >= 256:
                self._masks.clear()
            vis = self._masks[key] = torch.ones(P, P, dtype=torch.bool, device=dev).tril().expand(B, P, P)
        return vis

    def _all_visible(self, B: int, S: int, dev) -> torch.Tensor:
        """``[B, 1, S]`` all-True visibility of a chain node at depth ``S`` (cached per shape)."""
        key = ("chain", B, S, str(dev))
        vis = self._masks.get(key)
        if vis is None:
            vis = self._masks[key] = torch.ones(B, 1, S, dtype=torch.bool, device=dev)
        return vis

    def _absorb_alone(self, slot: int, tokens: torch.Tensor, features: torch.Tensor) -> None:
        m = self.model
        n = tokens.shape[1]
        layout = StepLayout(self.cache, 1, self._causal(1, n, tokens.device), first_slot=slot)
        positions = layout.lengths.view(1, 1) + 1 + torch.arange(n, device=tokens.device).view(1, n)
        m.layer(tokens, m.project_features(features), positions, self._attend(layout))

    @torch.inference_mode()
    def _absorb_pending(self, first_slot: int, B: int) -> torch.Tensor:
        """Run every request's pending pairs through the layer, commit them, return the root states ``[B, d]``."""
        m = self.model
        t0 = time.perf_counter()
        self._catch_up(first_slot, B)
        self.last_catch_up_seconds = time.perf_counter() - t0
        pend = [self.pending.get(first_slot + b, ([], [])) for b in range(B)]
        counts = [len(t) for _, t in pend]
        if min(counts) == 0:
            # a request whose whole prompt is one token has no pair yet (nothing was prefilled): the host drafts 0
            # tokens for it this step; any other empty slot means observe() was skipped, a host bug
            lengths = self.cache.lengths[first_slot:first_slot + B].tolist()
            empty = [first_slot + b for b in range(B) if counts[b] == 0 and lengths[b] > 0]
            if empty:
                raise RuntimeError(f"slots {empty}: no committed pair to draft from (observe() was not called after the "
                                   "last target forward)")
        P = max(counts)
        dev = m.fc.weight.device
        if min(counts) == P:  # no padding: the rows as they are (same values as the padded build below)
            tokens = torch.tensor([t for _, t in pend], dtype=torch.long, device=dev)
            rows = [f[0] if len(f) == 1 else torch.cat(f, dim=0) for f, _ in pend]
            feats = rows[0].unsqueeze(0) if B == 1 else torch.stack(rows)
        else:
            tokens = torch.zeros(B, P, dtype=torch.long, device=dev)
            feats = torch.zeros(B, P, m.config.feature_dim, dtype=m.fc.weight.dtype, device=dev)
            for b in range(B):
                f, t = pend[b]
                if not t:  # a one-token prompt's first step: nothing to absorb (its draft depth is 0)
                    continue
                tokens[b, :counts[b]] = torch.tensor(t, device=dev)
                feats[b, :counts[b]] = torch.cat(f, dim=0)
        layout = StepLayout(self.cache, B, self._causal(B, P, dev), first_slot=first_slot)
        positions = layout.lengths.view(B, 1) + 1 + torch.arange(P, device=dev).view(1, P)
        a = m.layer(tokens, m.project_features(feats), positions, self._attend(layout))
        for b in range(B):
            self.cache.commit(first_slot + b, list(range(counts[b])))
            self.pending[first_slot + b] = ([], [])
        if min(counts) == P:
            return a[:, P - 1]
        idx = torch.tensor(counts, device=dev) - 1
        return a[torch.arange(B, device=dev), idx]

    @torch.inference_mode()
    def draft(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        if not requests:
            return []
        s0 = self.first_slot(requests)
        root_state = self._absorb_pending(s0, len(requests))
        if self.topk == 1:
            return self._draft_chain(requests, root_state)
        return self._draft_tree(requests, root_state)

    def _step(self, s0: int, tokens: torch.Tensor, g: torch.Tensor, visible: torch.Tensor, write_offset: int,
              depth: int) -> torch.Tensor:
        """One drafter forward over draft nodes at ``depth`` (position ``root + depth``) → their states."""
        B = tokens.shape[0]
        layout = StepLayout(self.cache, B, visible, write_offset=write_offset, first_slot=s0)
        positions = (layout.lengths + depth).view(B, 1).expand_as(tokens)
        return self.model.layer(tokens, g, positions, self._attend(layout))

    def _draft_chain(self, requests: Sequence[DraftRequest], a: torch.Tensor) -> list[Draft]:
        m = self.model
        B, K = len(requests), max(r.num_steps for r in requests)
        V = m.config.vocab_size
        dev = a.device
        vocab = m.draft_vocab
        drafted: list[list[int]] = [[] for _ in range(B)]
        qs: list[list[torch.Tensor]] = [[] for _ in range(B)]
        for d in range(1, K + 1):
            logits = m.logits(a).float()  # [B, Vd]
            choice = logits.argmax(dim=-1)
            for b, r in enumerate(requests):
                if d > r.num_steps:
                    continue
                if r.greedy:
                    if r.want_q:  # signals only: the argmax proposal's distribution, scattered to the full vocab
                        full = torch.zeros(V, dtype=torch.float32, device=dev)
                        full[vocab] = torch.softmax(logits[b], dim=-1)
                        qs[b].append(full)
                    continue
                q = torch.softmax(logits[b].double(), dim=-1)
                choice[b] = torch.multinomial(q.float(), 1, generator=r.generator).squeeze()
                full = torch.zeros(V, dtype=torch.float64, device=dev)
                full[vocab] = q
                qs[b].append(full)
            tokens = vocab[choice]
            chosen = tokens.tolist()  # one sync for the batch
            for b, r in enumerate(requests):
                if d <= r.num_steps:
                    drafted[b].append(chosen[b])
            if d == K:
                break
            visible = self._all_visible(B, d, dev)
            a = self._step(requests[0].slot, tokens.view(B, 1), a.view(B, 1, -1), visible, d - 1, d).squeeze(1)
        out = []
        for b, r in enumerate(requests):
            root = r.tokens[-1]
            if r.greedy or not drafted[b]:
                draft = Draft.chain(root, drafted[b], scheme="topk")
                if qs[b]:
                    draft.proposal_probs = torch.stack(qs[b]).cpu()
                out.append(draft)
            else:
                probs = torch.stack(qs[b] + [torch.zeros(V, dtype=torch.float64, device=dev)]).cpu()
                draft = Draft.chain(root, drafted[b], scheme="chain", draft_probs=probs)
                draft.proposal_probs = probs[:-1]
                out.append(draft)
        return out

    def _draft_tree(self, requests: Sequence[DraftRequest], a_root: torch.Tensor) -> list[Draft]:
        m = self.model
        B, k = len(requests), self.topk
        depth = max(r.num_steps for r in requests)
        budget = (self.num_draft_tokens or (k * depth + 1)) - 1
        dev = a_root.device
        vocab = m.draft_vocab
        # node records per request: (token, parent node id (-1 = root), score, depth)
        nodes: list[list[tuple[int, int, float, int]]] = [[] for _ in range(B)]
        logp = torch.log_softmax(m.logits(a_root).float(), dim=-1)
        scores, idx = logp.topk(k, dim=-1)  # [B, k]
        frontier_ids = [[len(nodes[b]) + j for j in range(k)] for b in range(B)]
        frontier_tokens = vocab[idx]  # [B, k]
        tok_l, score_l = frontier_tokens.tolist(), scores.tolist()  # one sync each, not one per node
        for b in range(B):
            for j in range(k):
                nodes[b].append((tok_l[b][j], -1, score_l[b][j], 1))
        frontier_g = a_root.unsqueeze(1).expand(B, k, -1)
        # scratch bookkeeping: scratch column of each written frontier node, and each node's ancestor columns
        scratch_of: list[dict[int, int]] = [{} for _ in range(B)]
        for d in range(1, depth):
            offset = (d - 1) * k
            vis_rows = [[[False] * (offset + k) for _ in range(k)] for _ in range(B)]
            for b in range(B):
                for j, nid in enumerate(frontier_ids[b]):
                    scratch_of[b][nid] = offset + j
                    anc = nid
                    while anc >= 0:
                        if anc in scratch_of[b]:
                            vis_rows[b][j][scratch_of[b][anc]] = True
                        anc = nodes[b][anc][1]
            visible = torch.tensor(vis_rows, dtype=torch.bool, device=dev)
            a = self._step(requests[0].slot, frontier_tokens, frontier_g, visible, offset, d)  # [B, k, dm]
            logp = torch.log_softmax(m.logits(a).float(), dim=-1)  # [B, k, Vd]
            child_lp, child_idx = logp.topk(k, dim=-1)  # [B, k, k]
            parent_scores = torch.tensor([[nodes[b][n][2] for n in frontier_ids[b]] for b in range(B)], device=dev)
            cu = (parent_scores.unsqueeze(-1) + child_lp).view(B, k * k)
            best = cu.topk(k, dim=-1).indices  # [B, k] next frontier among the k*k candidates
            new_frontier = []
            flat_tokens = vocab[child_idx.view(B, k * k)]
            tok_l, cu_l, best_l = flat_tokens.tolist(), cu.tolist(), best.tolist()
            for b in range(B):
                base = len(nodes[b])
                for c in range(k * k):
                    nodes[b].append((tok_l[b][c], frontier_ids[b][c // k], cu_l[b][c], d + 1))
                new_frontier.append([base + c for c in best_l[b]])
            frontier_ids = new_frontier
            frontier_tokens = flat_tokens.gather(1, best)
            frontier_g = a.gather(1, (best // k).unsqueeze(-1).expand(B, k, a.shape[-1]))
        out = []
        for b, r in enumerate(requests):
            tokens, parents = prune_to_budget(r.tokens[-1], nodes[b], budget)
            out.append(Draft(tokens=tokens, parents=parents, scheme="topk"))
        return out


__all__ = ["EagleDrafter"]
