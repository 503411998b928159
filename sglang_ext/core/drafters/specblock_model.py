r"""The SpecBlock drafter (Shi et al.): ``K`` dependent draft positions per forward, a rank head that decides branching.

An autoregressive feature drafter (EAGLE) runs once per draft depth. SpecBlock drafts a *block* of ``K`` slots in
one forward of a small ``L``-layer decoder. At a root whose committed pair is ``(h_t, x_{t+1})`` (target feature at
``t``, token at ``t+1``), block 1 is

.. math::

    c = W_{fc} h_t \qquad
    u_0 = W_{in}[\,\mathrm{norm}_e(E x_{t+1})\,;\ \mathrm{norm}_c(c)\,] \qquad
    u_k = W_{in}[\,\mathrm{norm}_e(s_k)\,;\ \mathrm{norm}_c(c)\,] \quad (1 \le k < K)

at positions ``t+1+k``: slot 0 is the root pair, slots ``k >= 1`` carry a learned slot embedding ``s_k`` (the token
there is not known yet) and the broadcast condition ``c``. Slot ``k``'s output predicts the token at ``t+2+k``.

*Layer-wise shift* (path dependence inside the block): before every layer ``l > 0``

.. math:: u_k \leftarrow W_l\,[\,u_k\,;\ u_{k-1}\,] \qquad (u_{-1} := u_0 \text{: slot 0 keeps its own})

so slot ``k`` sees what slot ``k-1`` computed one layer below, besides attending (causally) to the committed
context and to slots ``0..k`` of its block.

*Cross-block inheritance*: block 2 starts ``M`` positions later (``1 <= M <= K``) at the token drafted by slot
``M-1`` and is conditioned on slot ``M-1``'s final hidden state instead of a target feature:
``c = a_{M-1}``, ``u_0 = W_{in}[\mathrm{norm}_e(E \hat x);\ \mathrm{norm}_c(a_{M-1})]``. With
``inherit=False`` (the ablation) later blocks reuse the root's ``W_{fc} h_t``.

*Rank head*: ``(d + 15) → 256 → SiLU → 4`` over the detached slot state and 15 features of the slot's draft
distribution (:func:`rank_features`); its 4 buckets say where the target's token probably ranks in the draft's
list (1 / 2–4 / 5–10 / give up) and set how wide that slot branches in a tree (:data:`RANK_SLOT_TOPK`).

The committed context is the slot-0 stream: every committed pair goes through the layers exactly as a block's
slot 0 does (its shift partner is itself), so its keys are what later blocks attend to. ``E`` and ``W_lm`` are the
target's, frozen, never saved (as in :mod:`.eagle_model`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .eagle_model import RMSNorm, TargetBoundDrafter, config_fields, read_checkpoint_meta

ARCHITECTURE = "sglang-ext-specblock"
#: branching per predicted rank bucket (SpecBlock's ``RANK_SLOT_TOPK``): rank 1 → 2 children, 2–4 → 4, 5–10 → 10,
#: give up → stop the chain at this slot
RANK_SLOT_TOPK = (2, 4, 10, 0)
NUM_RANK_FEATURES = 15
NUM_RANK_CLASSES = 4

#: ``attend(layer, q, k, v) -> [B, T, H*D]``: attention is the caller's (a KV cache when serving, block masks when
#: training), as for the EAGLE drafter
LayerAttend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SpecBlockConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    feature_dim: int
    vocab_size: int
    num_layers: int = 2
    block_size: int = 4  # K slots per forward
    rank_hidden: int = 256
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    feature_layers: list[int] = field(default_factory=list)
    draft_vocab_size: int | None = None
    target: dict = field(default_factory=dict)
    # ablations (SpecBlock §5.4): each is a different trained model, so it is part of the checkpoint
    shift: bool = True  # layer-wise shift
    inherit: bool = True  # later blocks conditioned on the draft hidden state (False: on the root's target feature)
    rank_head: bool = True  # False: fixed branching, no give-up

    @staticmethod
    def for_target(target_config, feature_layers: list[int], draft_vocab_size: int | None = None,
                   target_identity: dict | None = None, **overrides) -> "SpecBlockConfig":
        cfg = target_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        return SpecBlockConfig(
            hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim, intermediate_size=cfg.intermediate_size, feature_dim=cfg.hidden_size * len(feature_layers),
            vocab_size=cfg.vocab_size, rms_norm_eps=cfg.rms_norm_eps, rope_theta=float(theta),
            feature_layers=list(feature_layers), draft_vocab_size=draft_vocab_size, target=dict(target_identity or {}),
            **overrides)


class DecoderLayer(nn.Module):
    """A pre-norm Llama decoder layer; attention comes from the caller."""

    def __init__(self, c: SpecBlockConfig) -> None:
        super().__init__()
        d, hd = c.hidden_size, c.head_dim
        self.input_norm = RMSNorm(d, c.rms_norm_eps)
        self.q_proj = nn.Linear(d, c.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, c.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, c.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(c.num_heads * hd, d, bias=False)
        self.post_norm = RMSNorm(d, c.rms_norm_eps)
        self.gate_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, d, bias=False)


def rank_features(logits: torch.Tensor) -> torch.Tensor:
    """The rank head's 15 distribution features of draft logits ``[..., V]`` (SpecBlock §5.1):

    top-10 log-probs normalised over the top 20; the gaps top1−top2, top1−top3, top1−top5 (of those log-probs);
    the top-1 probability under the full softmax; the entropy of the top-20 distribution.
    """
    lg = logits.float()
    top = lg.topk(min(20, lg.shape[-1]), dim=-1).values
    if top.shape[-1] < 20:  # a vocabulary under 20 tokens (tests): the missing entries have no mass
        top = torch.cat([top, top.new_full((*top.shape[:-1], 20 - top.shape[-1]), -1e4)], dim=-1)
    lp20 = torch.log_softmax(top, dim=-1)
    gaps = torch.stack([lp20[..., 0] - lp20[..., 1], lp20[..., 0] - lp20[..., 2], lp20[..., 0] - lp20[..., 4]], dim=-1)
    p1 = (top[..., 0] - torch.logsumexp(lg, dim=-1)).exp().unsqueeze(-1)
    ent = -(lp20.exp() * lp20).sum(-1, keepdim=True)
    return torch.cat([lp20[..., :10], gaps, p1, ent], dim=-1)


def rank_labels(draft_logits: torch.Tensor, target_token: torch.Tensor) -> torch.Tensor:
    """Bucket of the target token's rank in the draft's top 10: 1 → 0, 2–4 → 1, 5–10 → 2, otherwise 3."""
    top10 = draft_logits.topk(min(10, draft_logits.shape[-1]), dim=-1).indices
    hit = top10 == target_token.unsqueeze(-1)
    rank = torch.where(hit.any(-1), hit.float().argmax(-1) + 1, torch.full_like(target_token, 11))
    return torch.bucketize(rank, torch.tensor([1, 4, 10], device=rank.device), right=False)


class SpecBlockDraftModel(TargetBoundDrafter):
    ARCHITECTURE = ARCHITECTURE

    def __init__(self, config: SpecBlockConfig) -> None:
        super().__init__()
        c = self.config = config
        d = c.hidden_size
        if c.block_size < 1 or c.num_layers < 1:
            raise ValueError(f"block_size and num_layers must be >= 1, got {c.block_size}, {c.num_layers}")
        self.fc = nn.Linear(c.feature_dim, d, bias=False)
        self.slot_embed = nn.Parameter(torch.randn(max(c.block_size - 1, 1), d) * 0.02)
        self.embed_norm = RMSNorm(d, c.rms_norm_eps)
        self.cond_norm = RMSNorm(d, c.rms_norm_eps)
        self.in_proj = nn.Linear(2 * d, d, bias=False)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.shift_proj = nn.ModuleList(nn.Linear(2 * d, d, bias=False) for _ in range(c.num_layers - 1)) if c.shift \
            else nn.ModuleList()
        for lin in self.shift_proj:  # start as "keep my own state": W = [I, 0]
            with torch.no_grad():
                lin.weight.zero_()
                lin.weight[:, :d] += torch.eye(d)
        self.final_norm = RMSNorm(d, c.rms_norm_eps)
        self.rank_head = nn.Sequential(nn.Linear(d + NUM_RANK_FEATURES, c.rank_hidden), nn.SiLU(),
                                       nn.Linear(c.rank_hidden, NUM_RANK_CLASSES)) if c.rank_head else None
        self._init_buffers()  # RoPE, the draft vocabulary; the frozen target parts come with `bind_target`

    # ---- inputs ---------------------------------------------------------------------------------------------------
    def token_inputs(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Slot-0 / context inputs ``u = W_in[norm_e(E x); norm_c(c)]`` for ``tokens [...]`` and ``cond [..., d]``."""
        emb = torch.nn.functional.embedding(tokens, self.embed_weight)
        return self.in_proj(torch.cat([self.embed_norm(emb), self.cond_norm(cond)], dim=-1))

    def slot_inputs(self, cond: torch.Tensor, num_slots: int) -> torch.Tensor:
        """Inputs of slots ``1..num_slots`` for conditions ``cond [..., d]`` → ``[..., num_slots, d]``."""
        s = self.slot_embed[:num_slots].to(cond.dtype)
        c = cond.unsqueeze(-2).expand(*cond.shape[:-1], num_slots, cond.shape[-1])
        return self.in_proj(torch.cat([self.embed_norm(s).expand_as(c), self.cond_norm(c)], dim=-1))

    # ---- the stack --------------------------------------------------------------------------------------------
    def forward_stack(self, u: torch.Tensor, positions: torch.Tensor, shift_src: torch.Tensor | None,
                      attend: LayerAttend) -> torch.Tensor:
        """``u [B, T, d]`` through every layer → final states ``a [B, T, d]`` (before the final norm).

        ``shift_src [B, T]`` (or ``[T]``): index, within the same ``T``, of each entry's shift partner (slot ``k-1``
        of its block; itself for slot 0 and context). ``attend(layer, q, k, v)`` supplies attention.
        """
        from sglang_ext.core.kv_cache import apply_rope

        c = self.config
        B, T, _ = u.shape
        cos, sin = self.rope(positions, u.dtype)
        x = u
        if shift_src is not None and shift_src.dim() == 1:
            shift_src = shift_src.view(1, T).expand(B, T)
        for li, layer in enumerate(self.layers):
            if li > 0 and self.shift_proj:
                prev = x.gather(1, shift_src.unsqueeze(-1).expand(B, T, x.shape[-1]))
                x = self.shift_proj[li - 1](torch.cat([x, prev], dim=-1))
            h = layer.input_norm(x)
            q = apply_rope(layer.q_proj(h).view(B, T, c.num_heads, c.head_dim).transpose(1, 2), cos, sin)
            k = apply_rope(layer.k_proj(h).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2), cos, sin)
            v = layer.v_proj(h).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
            x = x + layer.o_proj(attend(li, q, k, v))
            h = layer.post_norm(x)
            x = x + layer.down_proj(torch.nn.functional.silu(layer.gate_proj(h)) * layer.up_proj(h))
        return x

    def rank_logits(self, a: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """Rank-bucket logits ``[..., 4]`` from the detached state and the slot's distribution features."""
        if self.rank_head is None:
            return None
        x = torch.cat([a.detach().float(), rank_features(logits.detach())], dim=-1).to(a.dtype)
        return self.rank_head(x)

    # ---- checkpoints ----------------------------------------------------------------------------------------------
    @staticmethod
    def load(directory: str | Path, expect_target: dict | None = None) -> "SpecBlockDraftModel":
        """Load a checkpoint; refuse one trained for another target (``expect_target`` keys must match)."""
        meta, cfg_path = read_checkpoint_meta(directory)
        if meta.get("architecture") != ARCHITECTURE:
            raise ValueError(f"{cfg_path}: architecture {meta.get('architecture')!r} is not an sglang-ext SpecBlock drafter")
        config = SpecBlockConfig(**config_fields(SpecBlockConfig, meta, cfg_path, expect_target))
        return SpecBlockDraftModel(config).load_weights(Path(directory))


__all__ = ["ARCHITECTURE", "RANK_SLOT_TOPK", "SpecBlockConfig", "SpecBlockDraftModel", "rank_features", "rank_labels"]
