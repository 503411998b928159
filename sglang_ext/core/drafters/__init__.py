"""Drafters: propose draft tokens. Model-free ones live here; model-based ones arrive with the engine."""

from .ngram import NgramDrafter

__all__ = ["NgramDrafter"]
