"""Read prompt files: Spec-Bench / MT-Bench ``question.jsonl`` (``question_id, category, turns``) or ``{"prompt": ...}`` lines.

Errors name the file and line, and a bad line never loses the lines already read (``skip_bad=True``
collects them as warnings instead of raising).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class PromptFileError(ValueError):
    """A prompt file line that cannot be used; the message names ``file:line``."""


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str


def _parse(obj: object, where: str) -> Prompt:
    if not isinstance(obj, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "turns" in obj:
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise PromptFileError(f"{where}: 'turns' must be a non-empty list of strings")
        text = turns[0]
    elif isinstance(obj.get("prompt"), str):
        text = obj["prompt"]
    else:
        raise PromptFileError(f"{where}: needs 'turns' (Spec-Bench/MT-Bench) or 'prompt'")
    pid = obj.get("question_id", obj.get("id", where))
    return Prompt(id=str(pid), category=str(obj.get("category", "unknown")), text=text)


def load_prompts(path: str | Path, limit: int | None = None, per_category: int | None = None,
                 skip_bad: bool = False, warnings: list[str] | None = None) -> list[Prompt]:
    """Prompts from a JSONL file, optionally at most ``per_category`` from each category, in file order."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: no such prompt file")
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PromptFileError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                prompt = _parse(obj, where)
            except PromptFileError as e:
                if not skip_bad:
                    raise
                if warnings is not None:
                    warnings.append(str(e))
                continue
            if per_category is not None:
                if seen.get(prompt.category, 0) >= per_category:
                    continue
                seen[prompt.category] = seen.get(prompt.category, 0) + 1
            prompts.append(prompt)
            if limit is not None and len(prompts) >= limit:
                break
    return prompts
