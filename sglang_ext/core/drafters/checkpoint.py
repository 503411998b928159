"""Feature-drafter checkpoints of either architecture, and the serving drafter for one.

A checkpoint directory holds ``model.safetensors`` and ``config.json`` whose ``architecture`` says which model it
is: ``sglang-ext-eagle`` (:mod:`.eagle_model`, one layer per draft depth) or ``sglang-ext-specblock``
(:mod:`.specblock_model`, one forward per block). Hosts load either through :func:`load_draft_model` and build
the matching serving drafter with :func:`make_feature_drafter`, so adding an architecture touches only here.
"""

from __future__ import annotations

from pathlib import Path

from .eagle_model import EagleDraftModel, read_checkpoint_meta
from .specblock_model import ARCHITECTURE as SPECBLOCK
from .specblock_model import SpecBlockDraftModel

EAGLE = "sglang-ext-eagle"
ARCHITECTURES = (EAGLE, SPECBLOCK)
FeatureDraftModel = EagleDraftModel | SpecBlockDraftModel


def load_draft_model(directory: str | Path, expect_target: dict | None = None) -> FeatureDraftModel:
    """Load a drafter checkpoint of any architecture; errors name the file (and the target key that differs)."""
    meta, cfg_path = read_checkpoint_meta(directory)
    arch = meta.get("architecture")
    if arch == EAGLE:
        return EagleDraftModel.load(directory, expect_target=expect_target)
    if arch == SPECBLOCK:
        return SpecBlockDraftModel.load(directory, expect_target=expect_target)
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
