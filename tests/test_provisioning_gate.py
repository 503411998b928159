"""Tests that need provisioned files skip on a developer's machine but fail in CI (``SGLANG_EXT_REQUIRE_MODEL``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REQUIRE_MODEL_ENV, require_model, skip_or_fail


@pytest.mark.parametrize("value", [None, "", "0", "false", "No"])
def test_skip_or_fail_skips_when_provisioning_is_optional(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(REQUIRE_MODEL_ENV, raising=False)
    else:
        monkeypatch.setenv(REQUIRE_MODEL_ENV, value)
    with pytest.raises(pytest.skip.Exception, match="the model is missing"):
        skip_or_fail("the model is missing")


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_skip_or_fail_fails_when_provisioning_is_required(monkeypatch, value):
    monkeypatch.setenv(REQUIRE_MODEL_ENV, value)
    with pytest.raises(pytest.fail.Exception, match=f"the model is missing.*{REQUIRE_MODEL_ENV} is set"):
        skip_or_fail("the model is missing")


def test_require_model_reads_the_cache(monkeypatch, tmp_path):
    """An empty ``SGLANG_EXT_CACHE``: skipped by default, a failure naming the model and the fetch command in CI."""
    monkeypatch.setenv("SGLANG_EXT_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv(REQUIRE_MODEL_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_model("smollm2-135m")
    monkeypatch.setenv(REQUIRE_MODEL_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=r"smollm2-135m not provisioned \(`sglang-ext models fetch"):
        require_model("smollm2-135m")


def test_no_test_skips_on_missing_provisioning_directly():
    """Every "not provisioned" skip goes through ``skip_or_fail``/``require_model``; a plain ``pytest.skip`` or
    ``skipif`` on provisioning would be silent in CI again."""
    offenders = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        text = path.read_text()
        for m in re.finditer(r"pytest\.(skip\(|mark\.skipif\()[^\n]*(provision|is_provisioned)", text):
            offenders.append(f"{path.name}:{text.count(chr(10), 0, m.start()) + 1}")
    assert not offenders, f"use conftest.skip_or_fail / require_model instead of a plain skip: {offenders}"
