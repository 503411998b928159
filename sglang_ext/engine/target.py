"""The target model's forward, gpt-fast style, over a Hugging Face Llama's own modules.

Why not call ``model(...)``: the engine needs per-request write positions in a slot KV cache, tree attention
masks, and the hidden states of chosen layers (for the drafter and the online learner) from the *same*
forward. HF's generic cache and mask machinery supports none of that directly. This module reuses every HF
submodule (norms, projections, MLP, rotary embedding), so the arithmetic per token is HF's (a prefill matches
``model(ids).logits`` exactly); only the attention core (SDPA with an explicit boolean mask over the cache)
and the cache bookkeeping are ours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sglang_ext.core.kv_cache import SlotKVCache, StepLayout, apply_rope

F = torch.nn.functional


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None  # [B, T, V] float32 (zeros where not requested; None with ``hidden_only``)
    features: torch.Tensor | None  # [B, T, F]: concatenated outputs of the feature layers
    hidden: torch.Tensor | None = None  # [B, T, d] final-norm hidden state (the LM head's input)


def _plain_llama_layers(model) -> list[tuple] | None:
    """Per-layer weights for the fast forward, or ``None`` when a layer is not the plain Llama structure it assumes.

    The fast forward does exactly the arithmetic of the HF modules (same ops, same order, so the results are
    bit-identical) without their per-call overhead; it needs HF's ``LlamaRMSNorm`` (x * rsqrt(mean(x^2) + eps),
    then times the weight), bias-free projections, a SiLU-gated MLP and rotate-half RoPE.
    """
    inner = model.model
    cfg = model.config
    if getattr(cfg, "hidden_act", None) != "silu" or type(inner.norm).__name__ != "LlamaRMSNorm":
        return None
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim % 2:
        return None
    out = []
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
        if type(attn).__name__ != "LlamaAttention" or type(mlp).__name__ != "LlamaMLP":
            return None
        if any(type(n).__name__ != "LlamaRMSNorm" for n in norms) or type(mlp.act_fn).__name__ != "SiLUActivation":
            return None
        projs = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(m) is not torch.nn.Linear or m.bias is not None for m in projs):
            return None
        modules = (layer, attn, mlp, *norms, *projs)
        if any(m._forward_hooks or m._forward_pre_hooks for m in modules):
            return None
        out.append((norms[0].weight, norms[0].variance_epsilon, *(m.weight for m in projs[:4]),
                    norms[1].weight, norms[1].variance_epsilon, *(m.weight for m in projs[4:]), attn.scaling))
    return out


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``LlamaRMSNorm`` op for op (float32 compute, cast back, weight times normalised)."""
    dtype = x.dtype
    xf = x.to(torch.float32)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(dtype)


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
        # fast path: same arithmetic as the HF modules without their call overhead (SGLANG_EXT_FAST_FORWARD=0: off).
        # The layer weights are captured here: a model whose modules are replaced later needs a new TargetModel.
        self._fast_layers = _plain_llama_layers(model)
        self.use_fast_forward = self._fast_layers is not None and os.environ.get("SGLANG_EXT_FAST_FORWARD", "1") != "0"

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
        if self.use_fast_forward:
            x, feats = self._layers_fast(layout, x, cos, sin)
        else:
            x, feats = self._layers_modules(layout, x, cos, sin)
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

    def _layers_modules(self, layout: StepLayout, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The decoder layers through the HF modules (any Llama-style layer)."""
        B, T = x.shape[:2]
        feats: dict[int, torch.Tensor] = {}
        for li, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = apply_rope(attn.q_proj(h).view(B, T, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
            k = apply_rope(attn.k_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            v = attn.v_proj(h).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
            x = x + attn.o_proj(layout.attend(li, q, k, v, attn.scaling))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if li in self.feature_layers:
                feats[li] = x
        return x, feats

    def _layers_fast(self, layout: StepLayout, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The same layers with the modules' arithmetic inlined (bit-identical to :meth:`_layers_modules`).

        RoPE: ``rotate_half(x) * sin == roll(x, D/2) * sin'`` with ``sin'`` = sin with its first half negated
        (``(-a) * b == a * (-b)`` exactly), so each of q and k costs a roll instead of slice/neg/cat.
        """
        B, T = x.shape[:2]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        half = D // 2
        sin_signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        gqa = H != Hkv
        keep = self.feature_layers
        feats: dict[int, torch.Tensor] = {}
        for li, (w_in, eps_in, wq, wk, wv, wo, w_post, eps_post, wg, wu, wd, scale) in enumerate(self._fast_layers):
            h = _rms_norm(x, w_in, eps_in)
            q = F.linear(h, wq).view(B, T, H, D).transpose(1, 2)
            k = F.linear(h, wk).view(B, T, Hkv, D).transpose(1, 2)
            v = F.linear(h, wv).view(B, T, Hkv, D).transpose(1, 2)
            q = q * cos + q.roll(half, -1) * sin_signed
            k = k * cos + k.roll(half, -1) * sin_signed
            layout.write(li, k, v)
            c = layout.cache
            s0 = layout.first_slot
            o = F.scaled_dot_product_attention(
                q, c.keys[li][s0:s0 + B, :, :layout.kv_len], c.values[li][s0:s0 + B, :, :layout.kv_len],
                attn_mask=layout.attn_bias(q.dtype), scale=scale, enable_gqa=gqa)
            x = x + F.linear(o.transpose(1, 2).reshape(B, T, H * D), wo)
            h = _rms_norm(x, w_post, eps_post)
            x = x + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)
            if li in keep:
                feats[li] = x
        return x, feats
