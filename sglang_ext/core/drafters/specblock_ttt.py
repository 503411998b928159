r"""SpecBlock's multi-block *training-time test*: blocks unrolled over whole sequences at once, and its loss.

One home for the offline trainer (:mod:`sglang_ext.training.specblock`) and the online learners. Notation as in
:mod:`.specblock_model`; ``i`` indexes the committed pair ``(h_i, x_{i+1})`` at position ``i+1`` (``L = S-1`` of them).

Streams. Block 1 has ``K`` streams over all ``i`` at once: stream 0 is the committed pair itself (so stream 0 *is*
the context every block attends to), stream ``k`` is slot ``k`` at position ``i+1+k``. Block ``b > 1`` starts
``M_b`` positions after block ``b-1`` (``M_b ~ U(1, K)``, one draw per batch): its slot 0 pairs the target's greedy
token at that position (what an accepted draft path holds) with slot ``M_b - 1``'s final state of block ``b-1``
(inheritance), and its ``K`` streams sit at positions ``i + 1 + off_b + k`` with ``off_b = M_2 + ... + M_b``.

Attention of a stream at index ``i`` (what the serving cache shows the same node): context stream keys ``<= i``
(causal), the ancestor streams of earlier blocks at the same ``i`` (block-1 slots ``1..M_2-1``, block-2 slots
``0..M_3-1``, ...) and its own block's streams up to itself. Computed as one ``[L, L]`` causal score block per stream
plus a few "diagonal" scores, never a ``[KL, KL]`` mask.

Loss (SpecBlock §5.1), with ``p`` the target's distribution and ``q`` the slot's, at global depth ``j`` (0-based):

.. math:: \mathcal L = \sum_j 0.8^j\ \frac{\sum_i \mathrm{chain}_{j,i}\,\mathrm{CE}(p_i, q_{j,i})}{\#\{i \text{ valid}\}}
          + \lambda\,\mathcal L_{rank}

where ``chain_j`` (the *valid-prefix mask*) keeps a row only while every earlier depth on its path had
``argmax q = argmax p``: a position after the first greedy miss is never reached when serving. Each depth is
normalised by its valid rows (not by the rows its mask keeps), so it weighs in proportion to how often a chain
reaches it. The rank loss is
an ordinal cross-entropy with soft labels ``y_c ∝ 1/(1 + |c-t| + max(t-c, 0))^2`` (under-predicting the bucket, i.e.
under-branching, costs more), a distance weight ``1 + |t-\hat t| + max(t-\hat t, 0)`` and a class weight
``min(1, 10 / count_t)``, on rows whose earlier rank predictions were all right (its own chain).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .specblock_model import NUM_RANK_CLASSES, SpecBlockDraftModel, rank_labels


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


@dataclass
class BlockOutput:
    offset: int  # depth of slot 0 minus one (block 1: 0)
    states: torch.Tensor  # [B, K, L, d] final states
    head: Callable[[torch.Tensor], torch.Tensor]  # states -> draft logits (the model's LM head)

    @property
    def logits(self) -> torch.Tensor:
        """``[B, K, L, V_d]`` for every slot and row (the loss computes only the rows it needs)."""
        return self.head(self.states)


def block_ttt_forward(model: SpecBlockDraftModel, features: torch.Tensor, tokens: torch.Tensor,
                      greedy_next: torch.Tensor, offsets: list[int]) -> list[BlockOutput]:
    """Unroll ``1 + len(offsets)`` blocks; ``greedy_next [B, S]`` is the target's argmax token *after* each position
    (full vocabulary ids), fed to later blocks' slot 0. ``offsets[b]`` is ``M`` of block ``b + 2``."""
    c = model.config
    K = c.block_size
    B, S = tokens.shape
    L = S - 1
    dev = tokens.device
    rep = c.num_heads // c.num_kv_heads
    idx = torch.arange(L, device=dev)
    causal = idx.view(1, L) <= idx.view(L, 1)  # [L(query), L(key)]
    cond1 = model.project_features(features[:, :L])
    ctx: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> context keys/values [B, H, L, D]
    ancestors: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # layer -> ancestor streams' keys/values
    outs: list[BlockOutput] = []
    offset = 0
    state_prev: torch.Tensor | None = None
    for b in range(1 + len(offsets)):
        if b == 0:
            u0 = model.token_inputs(tokens[:, 1:], cond1)
            cond = cond1
        else:
            M = offsets[b - 1]
            if not 1 <= M <= K:
                raise ValueError(f"block offset {M} outside 1..{K}")
            offset += M
            cond = state_prev[:, M - 1] if c.inherit else cond1
            # the greedy token at position i + 1 + offset, i.e. greedy_next at index i + offset (padding past the end)
            tok = torch.zeros(B, L, dtype=torch.long, device=dev)
            n = max(0, L - offset)
            tok[:, :n] = greedy_next[:, offset:offset + n]
            u0 = model.token_inputs(tok, cond)
        u = torch.cat([u0.unsqueeze(1), model.slot_inputs(cond, K - 1).transpose(1, 2)], dim=1) if K > 1 \
            else u0.unsqueeze(1)  # [B, K, L, d]
        positions = (idx.view(1, L) + 1 + offset + torch.arange(K, device=dev).view(K, 1)).reshape(1, K * L).expand(B, K * L)
        # shift partner: slot k -> slot k-1 at the same i; slot 0 -> itself
        shift_src = idx if K == 1 else torch.cat(
            [idx, (idx.view(1, L) + L * torch.arange(K - 1, device=dev).view(K - 1, 1)).reshape(-1)])
        first_block = b == 0
        own: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_block=first_block, own=own):
            H, D = q.shape[1], q.shape[-1]
            kr, vr = _repeat_kv(k, rep).view(B, H, K, L, D), _repeat_kv(v, rep).view(B, H, K, L, D)
            own[layer] = (kr, vr)
            if first_block:
                ctx[layer] = (kr[:, :, 0], vr[:, :, 0])
            qs = q.view(B, H, K, L, D)
            k0, v0 = ctx[layer]
            s_ctx = torch.einsum("bhkld,bhmd->bhklm", qs, k0) * model.scale  # [B, H, K, L, L]
            s_ctx = s_ctx.masked_fill(~causal, float("-inf"))
            anc = ancestors.get(layer, [])
            diag_k = [a for a, _ in anc] + [kr[:, :, s] for s in range(1 if first_block else 0, K)]
            diag_v = [a for _, a in anc] + [vr[:, :, s] for s in range(1 if first_block else 0, K)]
            if diag_k:
                dk, dv = torch.stack(diag_k, dim=2), torch.stack(diag_v, dim=2)  # [B, H, N, L, D]
                s_diag = torch.einsum("bhkld,bhnld->bhkln", qs, dk) * model.scale  # [B, H, K, L, N]
                n_anc, own_start = len(anc), (1 if first_block else 0)
                # stream s sees every ancestor and its own block's streams own_start..s
                col = torch.arange(len(diag_k), device=dev)
                allowed = (col.view(1, -1) < n_anc) | (col.view(1, -1) - n_anc + own_start
                                                       <= torch.arange(K, device=dev).view(K, 1))
                s_diag = s_diag.masked_fill(~allowed.view(1, 1, K, 1, -1), float("-inf"))
                w = torch.softmax(torch.cat([s_ctx, s_diag], dim=-1), dim=-1)
                o = w[..., :L] @ v0.unsqueeze(2) + torch.einsum("bhkln,bhnld->bhkld", w[..., L:], dv)
            else:
                o = torch.softmax(s_ctx, dim=-1) @ v0.unsqueeze(2)
            return o.reshape(B, H, K * L, D).transpose(1, 2).reshape(B, K * L, H * D)

        a = model.forward_stack(u.reshape(B, K * L, -1), positions, shift_src, attend).view(B, K, L, -1)
        outs.append(BlockOutput(offset, a, model.logits))
        if b < len(offsets):  # the next block's ancestors: this block's streams before its start
            M = offsets[b]
            lo = 1 if first_block else 0
            for layer, (kr, vr) in own.items():
                ancestors.setdefault(layer, []).extend((kr[:, :, s], vr[:, :, s]) for s in range(lo, M))
        state_prev = a
    return outs


@dataclass
class BlockMetrics:
    loss: float
    top1: list[float]  # per global depth (1..D), over valid rows (not chained)
    accept_len: float  # mean greedy accepted length of the chain path (leading correct depths), per valid start
    rank_acc: float | None
    tokens: int
    kl: list[float] = field(default_factory=list)


def block_loss(model: SpecBlockDraftModel, features: torch.Tensor, tokens: torch.Tensor, logp: torch.Tensor,
               valid: torch.Tensor, offsets: list[int], step_weight: float = 0.8, prefix_mask: bool = True,
               rank_weight: float = 1.0, label_weight: torch.Tensor | None = None,
               max_depth: int | None = None, only_needed_rows: bool = True) -> tuple[torch.Tensor, BlockMetrics]:
    """The loss of the module docstring over a padded batch (``valid [B, S]``; ``logp [B, S, V_d]`` is the target's
    draft-vocabulary distribution of the token *after* each position; ``label_weight [B, S]`` weighs target rows).
    ``max_depth`` caps the reported chain (metrics only), to compare with another drafter at the same depth.

    Logits cost most (a ``d × V_d`` product per slot and row), and under the valid-prefix mask a slot's rows past
    a miss weigh nothing: only rows still on a correct prefix (or on the rank head's chain) get logits
    (``only_needed_rows``; the loss and its gradient are the same either way, ``top1`` is then per depth given a
    correct prefix). Without the mask every valid row is needed."""
    c = model.config
    K = c.block_size
    B, S = tokens.shape
    L = S - 1
    dev = tokens.device
    greedy_idx = logp.argmax(-1)  # [B, S] draft-vocabulary index of the target's greedy next token
    greedy_next = model.draft_vocab[greedy_idx]
    outs = block_ttt_forward(model, features, tokens, greedy_next, offsets)
    # row j is a usable target when tokens j and j+1 are real (as in the EAGLE loss)
    row_ok = torch.zeros(B, S + 1 + K * (1 + len(offsets)), dtype=torch.bool, device=dev)
    row_ok[:, :S - 1] = valid[:, :-1] & valid[:, 1:]
    weight = torch.zeros(row_ok.shape, dtype=torch.float32, device=dev)
    weight[:, :S] = (label_weight if label_weight is not None else valid.float()).float()
    p = logp.exp()
    total = torch.zeros((), device=dev)
    depth_top1: dict[int, tuple[float, float]] = {}
    depth_kl: dict[int, tuple[float, float]] = {}
    base = torch.ones(B, L, dtype=torch.float32, device=dev)  # chain mask at the block's slot 0
    rank_base = torch.ones(B, L, dtype=torch.float32, device=dev)
    accept = torch.zeros(B, L, device=dev)
    alive = torch.ones(B, L, device=dev)
    rank_terms, rank_hits, rank_rows = [], 0.0, 0.0
    start_ok = row_ok[:, 1:L + 1].float()
    for bi, out in enumerate(outs):
        M_next = offsets[bi] if bi < len(offsets) else K
        chain, rchain = base.clone(), rank_base.clone()
        for k in range(K):
            e = out.offset + k  # depth - 1
            j0 = 1 + e  # target row of index i is i + 1 + e
            ok = row_ok[:, j0:j0 + L].float()
            n = max(0, min(L, S - j0))
            if n == 0:
                break
            rank_on = rank_weight > 0 and model.rank_head is not None
            need = ok > 0
            if prefix_mask and only_needed_rows:
                need = need & ((chain > 0) | (rchain > 0)) if rank_on else need & (chain > 0)
            rows, cols = need.nonzero(as_tuple=True)  # the rows that get logits; ok rows have j0 + col < S
            logits = model.logits(out.states[:, k][rows, cols]).float()  # [N, V_d]
            q_logp = torch.log_softmax(logits, dim=-1)
            ce = torch.zeros(B, L, device=dev).index_put((rows, cols), -(p[rows, cols + j0] * q_logp).sum(-1))
            w = weight[:, j0:j0 + L] * ok
            m = w * (chain if prefix_mask else 1.0)
            # normalised by the slot's valid rows, not by the rows the mask keeps: a slot weighs as often as a chain
            # reaches it (a mean over the few rows that reach a late slot early in training is mostly noise)
            total = total + (step_weight ** e) * (ce * m).sum() / w.sum().clamp(min=1e-8)
            g = greedy_idx[rows, cols + j0]
            hit_rows = logits.argmax(-1) == g
            hit = torch.zeros(B, L, device=dev).index_put((rows, cols), hit_rows.float())
            with torch.no_grad():
                ent = torch.zeros(B, L, device=dev).index_put(
                    (rows, cols), -(p[rows, cols + j0] * logp[rows, cols + j0]).sum(-1))
                if k < M_next and (max_depth is None or e < max_depth):  # on the path (capped for reporting)
                    counted = need.float()
                    depth_top1[e + 1] = (float((hit * counted).sum()), float(counted.sum()))
                    depth_kl[e + 1] = (float(((ce.detach() - ent) * counted).sum()), float(counted.sum()))
                    alive = alive * hit * ok
                    accept = accept + alive
            if rank_on:
                r_logits = model.rank_logits(out.states[:, k][rows, cols], logits).float()
                t = rank_labels(logits.detach(), g)
                pred = r_logits.argmax(-1)
                cls = torch.arange(NUM_RANK_CLASSES, device=dev).view(1, -1)
                tt = t.unsqueeze(-1)
                soft = 1.0 / (1 + (cls - tt).abs() + (tt - cls).clamp(min=0)).float() ** 2
                soft = soft / soft.sum(-1, keepdim=True)
                rce = -(soft * torch.log_softmax(r_logits, dim=-1)).sum(-1)
                dist_w = 1 + (t - pred).abs() + (t - pred).clamp(min=0)
                rm = (ok * rchain)[rows, cols]
                rank_terms.append((rce, dist_w.float(), t, rm))
                with torch.no_grad():
                    rank_hits += float(((pred == t).float() * rm).sum())
                    rank_rows += float(rm.sum())
                rchain = torch.zeros(B, L, device=dev).index_put((rows, cols), rchain[rows, cols] * (pred == t).float())
            chain = chain * hit
            if k == M_next - 1:
                base, rank_base = chain.clone(), rchain.clone()
    if rank_terms:
        counts = torch.zeros(NUM_RANK_CLASSES, device=dev)
        for _, _, t, rm in rank_terms:
            counts += torch.bincount(t.reshape(-1), weights=rm.reshape(-1), minlength=NUM_RANK_CLASSES)
        cls_w = torch.clamp(10.0 / counts.clamp(min=1e-8), max=1.0)
        num = den = torch.zeros((), device=dev)
        for rce, dist_w, t, rm in rank_terms:
            wr = rm * cls_w[t]
            num = num + (rce * dist_w * wr).sum()
            den = den + wr.sum()
        total = total + rank_weight * num / den.clamp(min=1e-8)
    depths = sorted(depth_top1)
    metrics = BlockMetrics(
        loss=float(total.detach()), top1=[depth_top1[d][0] / max(depth_top1[d][1], 1.0) for d in depths],
        accept_len=float((accept * start_ok).sum() / start_ok.sum().clamp(min=1.0)),
        rank_acc=rank_hits / rank_rows if rank_rows else None, tokens=int(start_ok.sum()),
        kl=[depth_kl[d][0] / max(depth_kl[d][1], 1.0) for d in depths])
    return total, metrics


__all__ = ["BlockMetrics", "BlockOutput", "block_loss", "block_ttt_forward"]
