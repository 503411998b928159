"""Prompt sets and their importers."""

from .prompts import Prompt, PromptFileError, load_prompts

__all__ = ["Prompt", "PromptFileError", "load_prompts"]

from .packaged_prompts import PROMPT_SETS, fetch_prompt_set, prompt_set_path  # noqa: E402

__all__ += ["PROMPT_SETS", "fetch_prompt_set", "prompt_set_path"]
