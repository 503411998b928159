"""Left-padded batches for HF ``generate`` (baselines and data generation, not the engine's own batching)."""

from __future__ import annotations

from typing import Sequence

import torch


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[B, W]`` with every prompt right-aligned: generation appends at column ``W``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):
        if p:
            ids[r, width - len(p):] = torch.tensor(list(p))
            mask[r, width - len(p):] = 1
    return ids, mask
