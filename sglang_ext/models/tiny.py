"""Tiny random-weight Llama models, built in-process, for fast tests (no files, no downloads)."""

from __future__ import annotations

import torch


def tiny_llama(vocab_size: int = 128, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               num_kv_heads: int = 2, intermediate_size: int = 128, max_positions: int = 512, seed: int = 0):
    """A ``LlamaForCausalLM`` with random weights (seeded), float32, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_positions, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model
