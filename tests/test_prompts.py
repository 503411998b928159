"""Prompt files: Spec-Bench format, clear errors naming file:line, nothing lost on a bad line."""

from __future__ import annotations

import json

import pytest

from sglang_ext.data import PromptFileError, load_prompts


def write(tmp_path, lines):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_spec_bench_and_plain_prompt_lines(tmp_path):
    path = write(tmp_path, [
        json.dumps({"question_id": 1, "category": "writing", "turns": ["Hello", "Again"]}),
        json.dumps({"prompt": "Plain", "category": "qa"}),
    ])
    prompts = load_prompts(path)
    assert [(p.id, p.category, p.text) for p in prompts] == [("1", "writing", "Hello"), (f"{path}:2", "qa", "Plain")]


def test_bad_line_names_file_and_line(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": "ok"}), "{not json", json.dumps({"prompt": "after"})])
    with pytest.raises(PromptFileError, match=rf"{path}:2: invalid JSON"):
        load_prompts(path)
    warnings: list[str] = []
    prompts = load_prompts(path, skip_bad=True, warnings=warnings)
    assert [p.text for p in prompts] == ["ok", "after"] and "prompts.jsonl:2" in warnings[0]


def test_missing_fields_and_missing_file(tmp_path):
    path = write(tmp_path, [json.dumps({"question": "x"})])
    with pytest.raises(PromptFileError, match=r":1: needs 'turns'"):
        load_prompts(path)
    with pytest.raises(PromptFileError, match="no such prompt file"):
        load_prompts(tmp_path / "nope.jsonl")


def test_shared_spec_bench_subset_per_category(shared_data):
    prompts = load_prompts(shared_data / "prompts" / "spec_bench_subset.jsonl", per_category=2)
    categories = {p.category for p in prompts}
    assert {"summarization", "qa", "math_reasoning", "writing"} <= categories
    assert all(sum(p.category == c for p in prompts) == 2 for c in categories)
