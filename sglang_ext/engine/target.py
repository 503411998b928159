"""The target model's forward, gpt-fast style, over a Hugging Face Llama's own modules.

Why not call ``model(...)``: the engine needs per-request write positions in a slot KV cache, tree attention
masks, and the hidden states of chosen layers (for the drafter and the online learner) from the *same*
forward. HF's generic cache and mask machinery supports none of that directly. This module reuses every HF
submodule (norms, projections, MLP, rotary embedding), so the arithmetic per token is HF's (a prefill matches
``model(ids).logits`` exactly); only the attention core (SDPA with an explicit boolean mask over the cache)
and the cache bookkeeping are ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_ext.core.kv_cache import SlotKVCache, StepLayout, apply_rope


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None  # [B, T, V] float32 (zeros where not requested; None with ``hidden_only``)
    features: torch.Tensor | None  # [B, T, F]: concatenated outputs of the feature layers
    hidden: torch.Tensor | None = None  # [B, T, d] final-norm hidden state (the LM head's input)


def supports(model) -> bool:
    """Llama-family decoder (Llama, SmolLM2 and the like share these module names)."""
    inner = getattr(model, "model", None)
    return inner is not None and hasattr(inner, "layers") and hasattr(inner, "rotary_emb") and hasattr(model, "lm_head")


class TargetModel:
    """Runs a HF ``LlamaForCausalLM`` over a :class:`SlotKVCache`.

    ``feature_layers``: indices of the decoder layers whose *outputs* form the drafter's feature
    (EAGLE-3 concatenates a low, a middle and a high layer; EAGLE-1 uses the last one, before the final norm).
    """

    def __init__(self, model, feature_layers: tuple[int, ...] = (), name: str = "target") -> None:
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a Llama-style decoder; the reference engine supports those")
        self.model = model.eval()
        self.name = name
        cfg = model.config
        self.config = cfg
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self.max_positions = cfg.max_position_embeddings
        self.set_feature_layers(feature_layers)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def set_feature_layers(self, feature_layers: tuple[int, ...]) -> None:
        for i in feature_layers:
            if not -self.num_layers <= i < self.num_layers:
                raise ValueError(f"feature layer {i} out of range for a {self.num_layers}-layer model")
        self.feature_layers = tuple(i % self.num_layers for i in feature_layers)

    @property
    def feature_dim(self) -> int:
        return self.hidden_size * len(self.feature_layers)

    @property
    def embed_tokens(self) -> torch.nn.Embedding:
        return self.model.model.embed_tokens

    @property
    def lm_head(self) -> torch.nn.Linear:
        return self.model.lm_head

    def new_cache(self, num_slots: int, max_len: int) -> SlotKVCache:
        return SlotKVCache(self.num_layers, num_slots, self.num_kv_heads, self.head_dim, max_len,
                           dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, cache: SlotKVCache, input_ids: torch.Tensor, visible: torch.Tensor, depths: torch.Tensor,
                logits_for: torch.Tensor | None = None, first_slot: int = 0, hidden_only: bool = False) -> ForwardOutput:
        """One forward over slots ``first_slot .. first_slot + B - 1``; node ``j`` is written at ``lengths[b] + j``.

        ``visible [B, T, T]`` is ancestor-or-self among the ``T`` new nodes; ``depths [B, T]`` their depth (the
        node's position is ``lengths[b] + depth``). Padding nodes may hold any token id >= 0. Nothing is
        committed: call ``cache.commit`` with the surviving nodes afterwards. ``logits_for [B, T]`` (bool)
        restricts the LM head to the rows that need logits (a prefill needs only its last one); ``hidden_only``
        skips the LM head and returns the final hidden state instead (drafter training applies its own head).
        """
        B, T = input_ids.shape
        layout = StepLayout(cache, B, visible, first_slot=first_slot)
        positions = layout.lengths.view(B, 1) + depths.to(self.device)
        inner = self.model.model
        x = inner.embed_tokens(input_ids.to(self.device))
        cos, sin = inner.rotary_emb(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        feats: dict[int, torch.Tensor] = {}
        for li, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = apply_rope(attn.q_proj(h).view(B, T, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
            k = apply_rope(attn.k_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            v = attn.v_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
            x = x + attn.o_proj(layout.attend(li, q, k, v, attn.scaling))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if li in self.feature_layers:
                feats[li] = x
        features = torch.cat([feats[i] for i in self.feature_layers], dim=-1) if feats else None
        hidden = inner.norm(x)
        if hidden_only:
            return ForwardOutput(logits=None, features=features, hidden=hidden)
        if logits_for is not None:
            logits = torch.zeros(B, T, self.vocab_size, dtype=torch.float32, device=self.device)
            sel = logits_for.to(self.device)
            logits[sel] = self.lm_head(hidden[sel]).float()
        else:
            logits = self.lm_head(hidden).float()
        return ForwardOutput(logits=logits, features=features)
