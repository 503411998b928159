"""Prompt sets and their importers."""

from .prompts import Prompt, PromptFileError, load_prompts

__all__ = ["Prompt", "PromptFileError", "load_prompts"]
