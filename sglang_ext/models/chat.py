"""Apply a tokenizer's chat template and get plain token ids (transformers returns several shapes across versions)."""

from __future__ import annotations


def encode_chat(tokenizer, user_text: str) -> list[int]:
    """Token ids of a one-turn chat ``user_text`` with the generation prompt appended."""
    enc = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True,
                                        return_dict=True)
    ids = enc["input_ids"]
    if ids and not isinstance(ids[0], int):
        ids = ids[0]
    return [int(t) for t in ids]
