"""Feature-drafter checkpoints of either architecture, and the serving drafter for one.

A checkpoint directory holds ``model.safetensors`` and ``config.json`` whose ``architecture`` says which model it
is: ``sglang-ext-eagle`` (:mod:`.eagle_model`, one layer per draft depth) or ``sglang-ext-specblock``
(:mod:`.specblock_model`, one forward per block). Hosts load either through :func:`load_draft_model` and build
the matching serving drafter with :func:`make_feature_drafter`, so adding an architecture touches only here.
"""

from __future__ import annotations

import json
from pathlib import Path

from .eagle_model import EagleDraftModel
from .specblock_model import ARCHITECTURE as SPECBLOCK
from .specblock_model import SpecBlockDraftModel

EAGLE = "sglang-ext-eagle"
ARCHITECTURES = (EAGLE, SPECBLOCK)
FeatureDraftModel = EagleDraftModel | SpecBlockDraftModel


def load_draft_model(directory: str | Path, expect_target: dict | None = None) -> FeatureDraftModel:
    """Load a drafter checkpoint of any architecture; errors name the file (and the target key that differs)."""
    d = Path(directory)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{d}: not a drafter checkpoint (no config.json)")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: invalid JSON ({e})") from e
    arch = meta.get("architecture") if isinstance(meta, dict) else None
    if arch == EAGLE:
        return EagleDraftModel.load(d, expect_target=expect_target)
    if arch == SPECBLOCK:
        from safetensors.torch import load_file

        return SpecBlockDraftModel.from_meta(meta, load_file(str(d / "model.safetensors")), cfg_path, expect_target)
    raise ValueError(f"{cfg_path}: architecture {arch!r} is not an sglang-ext drafter (expected one of "
                     f"{', '.join(ARCHITECTURES)})")


def architecture_of(model: FeatureDraftModel) -> str:
    return SPECBLOCK if isinstance(model, SpecBlockDraftModel) else EAGLE


def drafter_cache_layers(model: FeatureDraftModel) -> int:
    """Layers of the drafter's own KV cache (for memory sizing)."""
    return model.config.num_layers if isinstance(model, SpecBlockDraftModel) else 1


def drafter_scratch(model: FeatureDraftModel, num_steps: int, topk: int, max_blocks: int = 2) -> int:
    """Cache entries one draft step may write beyond the committed context."""
    if isinstance(model, SpecBlockDraftModel):
        from .specblock import SpecBlockDrafter

        return SpecBlockDrafter.scratch_len(model.config.block_size, topk, max_blocks)
    return topk * num_steps + 2


def make_feature_drafter(model: FeatureDraftModel, num_slots: int, max_len: int, topk: int = 1,
                         num_draft_tokens: int | None = None, max_blocks: int = 2):
    """The serving drafter for a bound model of either architecture."""
    if isinstance(model, SpecBlockDraftModel):
        from .specblock import SpecBlockDrafter

        return SpecBlockDrafter(model, num_slots, max_len, topk=topk, num_draft_tokens=num_draft_tokens,
                                max_blocks=max_blocks)
    from .eagle import EagleDrafter

    return EagleDrafter(model, num_slots, max_len, topk=topk, num_draft_tokens=num_draft_tokens)
