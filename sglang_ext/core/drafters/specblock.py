"""Serving the SpecBlock drafter: one forward per block of ``K`` draft positions, chains and rank-driven trees.

Per request the drafter keeps an ``L``-layer KV cache of committed pairs (as :mod:`.eagle` does, one entry per
pair ``(h_t, x_{t+1})``; the slot-0 stream of :mod:`.specblock_model`). One step:

1. **Block 1 in the same forward as the absorb**: the pending pairs (the tokens committed since the last step)
   followed by the ``K-1`` slot inputs of the root, in one causal forward. The pairs are committed; the slot
   entries stay in the scratch region (columns ``0..K-2``) for later blocks to attend to. Long backlogs (a fresh
   prompt) are absorbed alone first, as in :mod:`.eagle` (``catch_up_split``).
2. **Chain** (``topk == 1``): slot ``k`` proposes the argmax of its distribution (greedy requests) or a sample
   from it (stochastic ones; scheme ``chain`` with ``q`` recorded, so the chain rule applies unchanged). With a
   rank head, the first slot ``k >= 1`` predicted "give up" ends the block there; if the request wants more depth
   and blocks remain (``max_blocks``), the next block starts at that depth from the token just drafted and the
   state of the slot that drafted it (cross-block inheritance).
3. **Tree** (``topk > 1``): slot 0 branches ``topk`` ways, slot ``k`` by its predicted rank bucket
   (:data:`~.specblock_model.RANK_SLOT_TOPK`, capped at ``topk``; fixed at 2 without a rank head), give-up stops
   the block; the best ``topk`` nodes by cumulative log-probability form each depth's frontier (beam). The
   frontier leaves seed one second block each (all in one forward), expanded the same way, and the whole tree is
   pruned to the draft-token budget by cumulative log-probability, ancestors kept
   (:func:`~.base.prune_to_budget`). Nodes are chosen, not sampled: scheme ``topk`` (point masses), lossless for
   greedy and stochastic requests alike.

A slot's distribution inside a block does not depend on the tokens chosen at earlier slots of that block (they
are drafted in parallel), so every branch at depth ``k`` of one block shares slot ``k``'s state and its cache
entry: the tree costs one forward per block, not one per depth.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from ..kv_cache import SlotKVCache, StepLayout
from .base import Draft, DraftRequest, FeatureDrafterSlots, prune_to_budget
from .specblock_model import RANK_SLOT_TOPK, SpecBlockDraftModel

GIVE_UP = 3
FIXED_BRANCHING = 2  # children per slot k >= 1 without a rank head (the "no rank head" ablation)


class SpecBlockDrafter(FeatureDrafterSlots):
    name = "specblock"

    def __init__(self, model: SpecBlockDraftModel, num_slots: int, max_len: int, topk: int = 1,
                 num_draft_tokens: int | None = None, max_blocks: int = 2) -> None:
        if model.embed_weight is None:
            raise ValueError("bind the drafter to its target first (SpecBlockDraftModel.bind_target)")
        if topk < 1 or max_blocks < 1:
            raise ValueError(f"topk and max_blocks must be >= 1, got {topk}, {max_blocks}")
        self.model = model.eval()
        c = model.config
        dev = model.fc.weight.device
        self.cache = SlotKVCache(c.num_layers, num_slots, c.num_kv_heads, c.head_dim, max_len,
                                 dtype=model.fc.weight.dtype, device=dev)
        self.topk, self.num_draft_tokens, self.max_blocks = topk, num_draft_tokens, max_blocks
        self.pending: dict[int, tuple[list[torch.Tensor], list[int]]] = {}
        self.version = 0
        self.last_catch_up_seconds = 0.0
        self.blocks_run = 0  # block forwards since construction (drafting cost accounting in benchmarks)

    @staticmethod
    def scratch_len(block_size: int, topk: int, max_blocks: int) -> int:
        """Scratch cache entries one step may write beyond the committed length (block 1's slots, then later blocks)."""
        later = (max_blocks - 1) * block_size if topk == 1 else (min(max_blocks, 2) - 1) * block_size * topk
        return block_size - 1 + later

    # ---- forwards ------------------------------------------------------------------------------------------------
    def _attend(self, layout: StepLayout):
        scale = self.model.scale
        return lambda layer, q, k, v: layout.attend(layer, q, k, v, scale)

    def _absorb_alone(self, slot: int, tokens: torch.Tensor, features: torch.Tensor) -> None:
        m = self.model
        n = tokens.shape[1]
        dev = tokens.device
        layout = StepLayout(self.cache, 1, torch.ones(n, n, dtype=torch.bool, device=dev).tril().unsqueeze(0),
                            first_slot=slot)
        positions = layout.lengths.view(1, 1) + 1 + torch.arange(n, device=dev).view(1, n)
        m.forward_stack(m.token_inputs(tokens, m.project_features(features)), positions, torch.arange(n, device=dev),
                        self._attend(layout))

    @torch.inference_mode()
    def _first_block(self, s0: int, B: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Absorb every request's pending pairs and run block 1 in one forward → slot states ``[B, K, d]``, the
        root conditions ``[B, d]`` and the pending counts (0: nothing to draft from yet)."""
        m = self.model
        c = m.config
        K = c.block_size
        t0 = time.perf_counter()
        self._catch_up(s0, B)
        self.last_catch_up_seconds = time.perf_counter() - t0
        pend = [self.pending.get(s0 + b, ([], [])) for b in range(B)]
        counts = [len(t) for _, t in pend]
        lengths = self.cache.lengths[s0:s0 + B].tolist()
        empty = [s0 + b for b in range(B) if counts[b] == 0 and lengths[b] > 0]
        if empty:
            raise RuntimeError(f"slots {empty}: no committed pair to draft from (observe() was not called after the "
                               "last target forward)")
        P = max(max(counts), 1)
        T = P + K - 1
        dev = m.fc.weight.device
        tokens = torch.zeros(B, P, dtype=torch.long, device=dev)
        feats = torch.zeros(B, P, c.feature_dim, dtype=m.fc.weight.dtype, device=dev)
        for b, (f, t) in enumerate(pend):
            if t:
                tokens[b, :counts[b]] = torch.tensor(t, device=dev)
                feats[b, :counts[b]] = f[0] if len(f) == 1 else torch.cat(f, dim=0)
        cond = m.project_features(feats)
        root = torch.tensor([max(n - 1, 0) for n in counts], device=dev)
        rows = torch.arange(B, device=dev)
        cond_root = cond[rows, root]
        u_pairs = m.token_inputs(tokens, cond)
        slots = m.slot_inputs(cond_root, K - 1) if K > 1 else None
        shift_src = torch.arange(T, device=dev).repeat(B, 1)
        if min(counts) == P and K > 1:
            u = torch.cat([u_pairs, slots], dim=1)
            shift_src[:, P:] -= 1
        else:
            u = torch.zeros(B, T, c.hidden_size, dtype=u_pairs.dtype, device=dev)
            u[:, :P] = u_pairs
            for b in range(B):
                n = max(counts[b], 1)
                if K > 1:
                    u[b, n:n + K - 1] = slots[b]
                    shift_src[b, n:n + K - 1] -= 1
        vis = torch.ones(T, T, dtype=torch.bool, device=dev).tril().expand(B, T, T)
        layout = StepLayout(self.cache, B, vis, first_slot=s0)
        positions = layout.lengths.view(B, 1) + 1 + torch.arange(T, device=dev).view(1, T)
        a = m.forward_stack(u, positions, shift_src, self._attend(layout))
        for b in range(B):
            self.cache.commit(s0 + b, list(range(counts[b])))
            self.pending[s0 + b] = ([], [])
        idx = root.view(B, 1) + torch.arange(K, device=dev).view(1, K)
        self.blocks_run += 1
        return a.gather(1, idx.unsqueeze(-1).expand(B, K, a.shape[-1])), cond_root, counts

    @torch.inference_mode()
    def _later_block(self, s0: int, tokens: torch.Tensor, cond: torch.Tensor, start: torch.Tensor, write_offset: int,
                     ancestors: list[list[list[int]]]) -> torch.Tensor:
        """One block per (request, leaf): ``tokens [B, R]`` at positions ``start [B]`` (relative to the committed
        length), conditions ``cond [B, R, d]``; ``ancestors[b][r]``: scratch columns leaf ``r`` of request ``b`` sees.
        Writes ``R*K`` scratch entries at ``write_offset`` → slot states ``[B, R, K, d]``."""
        m = self.model
        K = m.config.block_size
        B, R = tokens.shape
        T = R * K
        dev = tokens.device
        u0 = m.token_inputs(tokens, cond)  # [B, R, d]
        u = u0.unsqueeze(2) if K == 1 else torch.cat([u0.unsqueeze(2), m.slot_inputs(cond, K - 1)], dim=2)
        k_idx = torch.arange(K, device=dev)
        shift_src = (torch.arange(R, device=dev).view(R, 1) * K + (k_idx - (k_idx > 0).long()).view(1, K)).view(1, T)
        vis = torch.zeros(B, T, write_offset + T, dtype=torch.bool, device=dev)
        own = torch.ones(K, K, dtype=torch.bool, device=dev).tril()
        for r in range(R):
            lo = write_offset + r * K
            vis[:, r * K:(r + 1) * K, lo:lo + K] = own
            for b in range(B):
                if ancestors[b][r]:
                    vis[b, r * K:(r + 1) * K, ancestors[b][r]] = True
        layout = StepLayout(self.cache, B, vis, write_offset=write_offset, first_slot=s0)
        positions = (layout.lengths + start.to(layout.lengths.device)).view(B, 1) + k_idx.repeat(R).view(1, T)
        a = m.forward_stack(u.reshape(B, T, -1), positions, shift_src, self._attend(layout))
        self.blocks_run += 1
        return a.view(B, R, K, -1)

    def _rank_classes(self, states: torch.Tensor, logits: torch.Tensor) -> list | None:
        r = self.model.rank_logits(states, logits)
        return None if r is None else r.argmax(-1).tolist()

    # ---- drafting -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def draft(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        if not requests:
            return []
        s0 = self.first_slot(requests)
        states, cond_root, counts = self._first_block(s0, len(requests))
        depths = [r.num_steps if counts[b] > 0 else 0 for b, r in enumerate(requests)]
        if self.topk == 1:
            return self._draft_chain(requests, states, cond_root, depths)
        return self._draft_tree(requests, states, cond_root, depths)

    def _cut(self, classes: list[int] | None, K: int) -> int:
        """Slots a block keeps: up to (not including) the first slot ``k >= 1`` predicted to give up."""
        if classes is None:
            return K
        return next((k for k in range(1, K) if classes[k] == GIVE_UP), K)

    def _draft_chain(self, requests: Sequence[DraftRequest], states: torch.Tensor, cond_root: torch.Tensor,
                     depths: list[int]) -> list[Draft]:
        m = self.model
        K, V = m.config.block_size, m.config.vocab_size
        B = len(requests)
        dev = states.device
        vocab = m.draft_vocab
        drafted: list[list[int]] = [[] for _ in range(B)]
        qs: list[list[torch.Tensor]] = [[] for _ in range(B)]
        offset = [0] * B  # depth before this block's slot 0 prediction
        ancestors: list[list[int]] = [[] for _ in range(B)]
        cols = list(range(-1, K - 1))  # scratch column of each slot of the current block (-1: committed)
        write_offset = K - 1
        for blk in range(self.max_blocks):
            logits = m.logits(states).float()  # [B, K, Vd]
            classes = self._rank_classes(states, logits)
            choice = logits.argmax(-1)
            stochastic = [b for b, r in enumerate(requests) if not r.greedy]
            probs = torch.softmax(logits.double(), dim=-1) if stochastic or any(r.want_q for r in requests) else None
            for b in stochastic:
                choice[b] = torch.multinomial(probs[b].float(), 1, generator=requests[b].generator).squeeze(-1)
            chosen = vocab[choice].tolist()
            cuts = []
            for b, r in enumerate(requests):
                cut = self._cut(classes[b] if classes else None, K)
                take = max(0, min(cut, depths[b] - len(drafted[b])))
                for k in range(take):
                    drafted[b].append(chosen[b][k])
                    if not r.greedy or r.want_q:
                        full = torch.zeros(V, dtype=torch.float64, device=dev)
                        full[vocab] = probs[b, k]
                        qs[b].append(full)
                cuts.append(cut)
            more = [len(drafted[b]) < depths[b] and len(drafted[b]) == offset[b] + cuts[b] for b in range(B)]
            if blk == self.max_blocks - 1 or not any(more):
                break
            # next block: from the token slot M-1 drafted, conditioned on slot M-1's state
            M = torch.tensor(cuts, device=dev)
            last = torch.tensor([drafted[b][-1] if drafted[b] else 0 for b in range(B)], device=dev)
            prev = states[torch.arange(B, device=dev), M - 1]
            cond = prev if m.config.inherit else cond_root
            for b in range(B):
                ancestors[b] = ancestors[b] + [c for c in cols[:cuts[b]] if c >= 0]
                offset[b] += cuts[b]
            start = torch.tensor(offset, device=dev)
            states = self._later_block(requests[0].slot, last.view(B, 1), cond.view(B, 1, -1), start, write_offset,
                                       [[a] for a in ancestors]).squeeze(1)
            cols = list(range(write_offset, write_offset + K))
            write_offset += K
        out = []
        for b, r in enumerate(requests):
            root = r.tokens[-1]
            if r.greedy or not drafted[b]:
                draft = Draft.chain(root, drafted[b], scheme="topk")
                if qs[b]:
                    draft.proposal_probs = torch.stack(qs[b]).float().cpu()
            else:
                probs_b = torch.stack(qs[b] + [torch.zeros(V, dtype=torch.float64, device=dev)]).cpu()
                draft = Draft.chain(root, drafted[b], scheme="chain", draft_probs=probs_b)
                draft.proposal_probs = probs_b[:-1]
            out.append(draft)
        return out

    def _branching(self, classes: list[int] | None, k: int, nmax: int) -> int:
        if k == 0:
            return nmax
        if classes is None:
            return min(FIXED_BRANCHING, nmax)
        return min(RANK_SLOT_TOPK[classes[k]], nmax)

    def _draft_tree(self, requests: Sequence[DraftRequest], states: torch.Tensor, cond_root: torch.Tensor,
                    depths: list[int]) -> list[Draft]:
        m = self.model
        K = m.config.block_size
        B, beam = len(requests), self.topk
        dev = states.device
        vocab = m.draft_vocab
        nmax = min(beam, m.config.draft_vocab_size or m.config.vocab_size)  # the widest any slot branches
        logp = torch.log_softmax(m.logits(states).float(), dim=-1)  # [B, K, Vd]
        classes = self._rank_classes(states, logp)
        top_lp, top_id = logp.topk(nmax, dim=-1)
        top_lp, top_tok = top_lp.tolist(), vocab[top_id].tolist()
        # node: (token, parent (-1 = root), cumulative log-prob, depth)
        nodes: list[list[tuple[int, int, float, int]]] = [[] for _ in range(B)]
        leaves: list[list[int]] = []
        cuts: list[int] = []
        for b in range(B):
            cls = classes[b] if classes else None
            cut = min(self._cut(cls, K), depths[b])
            frontier = [(-1, 0.0)]
            for k in range(cut):
                n = self._branching(cls, k, nmax)
                cands = []
                for parent, score in frontier:
                    for j in range(n):
                        nodes[b].append((top_tok[b][k][j], parent, score + top_lp[b][k][j], k + 1))
                        cands.append((len(nodes[b]) - 1, score + top_lp[b][k][j]))
                frontier = sorted(cands, key=lambda x: -x[1])[:beam]
            leaves.append([nid for nid, _ in frontier] if cut > 0 else [])
            cuts.append(cut)
        grow = [self.max_blocks > 1 and leaves[b] and cuts[b] < depths[b] for b in range(B)]
        if any(grow):
            R = beam
            tok = torch.zeros(B, R, dtype=torch.long)
            anc: list[list[list[int]]] = []
            for b in range(B):
                ids = leaves[b]  # padded to R with its first leaf (outputs of padding rows are never read)
                tok[b] = torch.tensor([nodes[b][ids[min(r, len(ids) - 1)]][0] if ids else 0 for r in range(R)])
                anc.append([list(range(0, max(cuts[b] - 1, 0)))] * R)
            M = torch.tensor([max(c, 1) for c in cuts], device=dev)
            prev = states[torch.arange(B, device=dev), M - 1]
            cond = (prev if m.config.inherit else cond_root).unsqueeze(1).expand(B, R, -1)
            s2 = self._later_block(requests[0].slot, tok.to(dev), cond, M, K - 1, anc)  # [B, R, K, d]
            lp2 = torch.log_softmax(m.logits(s2).float(), dim=-1)
            cls2 = self._rank_classes(s2, lp2)
            lp2_top, id2 = lp2.topk(nmax, dim=-1)
            lp2_top, tok2 = lp2_top.tolist(), vocab[id2].tolist()
            for b in range(B):
                if not grow[b]:
                    continue
                # level-synchronous expansion of every leaf's block, one beam across leaves
                frontier = [(nid, nodes[b][nid][2], r) for r, nid in enumerate(leaves[b])]
                leaf_cut = [self._cut(cls2[b][r] if cls2 else None, K) for r in range(len(leaves[b]))]
                for k in range(K):
                    depth = cuts[b] + k + 1
                    if depth > depths[b]:
                        break
                    cands = []
                    for parent, score, r in frontier:
                        if k >= leaf_cut[r]:
                            continue
                        for j in range(self._branching(cls2[b][r] if cls2 else None, k, nmax)):
                            s = score + lp2_top[b][r][k][j]
                            nodes[b].append((tok2[b][r][k][j], parent, s, depth))
                            cands.append((len(nodes[b]) - 1, s, r))
                    if not cands:
                        break
                    frontier = sorted(cands, key=lambda x: -x[1])[:beam]
        out = []
        for b, r in enumerate(requests):
            budget = (self.num_draft_tokens or (beam * depths[b] + 1)) - 1
            tokens, parents = prune_to_budget(r.tokens[-1], nodes[b], budget)
            out.append(Draft(tokens=tokens, parents=parents, scheme="topk"))
        return out


__all__ = ["SpecBlockDrafter"]
