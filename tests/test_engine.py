"""The reference engine: greedy identity with plain decoding under continuous batching, for every drafter."""

from __future__ import annotations

import pytest
import torch

from sglang_ext.core.drafters.eagle import EagleDrafter
from sglang_ext.core.drafters.eagle_model import EagleConfig, EagleDraftModel
from sglang_ext.core.drafters.ngram import NgramDrafter
from sglang_ext.core.processing import SamplingParams
from sglang_ext.engine.engine import Engine, EngineConfig, GenerationRequest, RequestError
from sglang_ext.engine.target import TargetModel
from sglang_ext.models.tiny import tiny_llama


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(vocab_size=96, hidden_size=64, num_layers=2, seed=3)


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def prompts(seed: int, count: int, vocab: int = 96) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        n = int(torch.randint(2, 30, (1,), generator=g))
        base = torch.randint(2, vocab, (n,), generator=g).tolist()
        out.append(base + base[: n // 2])  # some repetition so the n-gram drafter has material
    return out


def random_eagle(target: TargetModel, seed: int = 0, draft_vocab: int | None = None) -> EagleDraftModel:
    torch.manual_seed(seed)
    cfg = EagleConfig.for_target(target.config, feature_layers=list(target.feature_layers))
    m = EagleDraftModel(cfg)
    if draft_vocab:
        m.set_draft_vocab(torch.arange(draft_vocab))
    return m.bind_target(target.embed_tokens.weight, target.lm_head.weight)


def make_engine(model, kind: str, num_steps: int, max_batch: int, topk: int = 1, budget: int | None = None) -> Engine:
    if kind == "eagle":
        target = TargetModel(model, feature_layers=(0, 1))
        drafter = EagleDrafter(random_eagle(target), num_slots=max_batch, max_len=512, topk=topk, num_draft_tokens=budget)
    else:
        target = TargetModel(model)
        drafter = NgramDrafter() if kind == "ngram" else None
    cfg = EngineConfig(max_batch_size=max_batch, num_steps=num_steps, topk=topk, num_draft_tokens=budget,
                       prefill_chunk=7, context_length=256)
    return Engine(target, drafter, cfg)


@pytest.mark.parametrize("kind,num_steps,topk,budget", [
    ("off", 0, 1, None), ("ngram", 3, 1, None), ("eagle", 2, 1, None), ("eagle", 3, 2, 6), ("eagle", 2, 3, 8),
])
@pytest.mark.parametrize("max_batch", [1, 4])
def test_greedy_identical_to_hf_under_continuous_batching(tiny, kind, num_steps, topk, budget, max_batch):
    ps = prompts(seed=1, count=7)
    lengths = [5, 17, 9, 23, 3, 12, 30]
    engine = make_engine(tiny, kind, num_steps, max_batch, topk, budget)
    states = [engine.add_request(GenerationRequest(p, max_new_tokens=n)) for p, n in zip(ps[:4], lengths[:4])]
    engine.step()
    engine.step()  # later requests arrive mid-run
    states += [engine.add_request(GenerationRequest(p, max_new_tokens=n)) for p, n in zip(ps[4:], lengths[4:])]
    while engine.has_work():
        engine.step()
    for s, p, n in zip(states, ps, lengths):
        assert s.output_ids == hf_greedy(tiny, p, n), (kind, s.rid)
        assert s.finish_reason["type"] == "length"
    if kind != "off":
        assert all(s.spec_verify_ct > 0 for s in states)


def test_bad_requests_are_named(tiny):
    engine = make_engine(tiny, "off", 0, 2)
    with pytest.raises(RequestError, match="prompt"):
        engine.add_request(GenerationRequest([], max_new_tokens=3))
    with pytest.raises(RequestError, match="context length"):
        engine.add_request(GenerationRequest([3] * 250, max_new_tokens=10))
    with pytest.raises(RequestError, match="vocabulary"):
        engine.add_request(GenerationRequest([3, 500], max_new_tokens=10))
    with pytest.raises(RequestError, match="max_new_tokens"):
        engine.add_request(GenerationRequest([3, 4], max_new_tokens=0))


def test_eos_stops_and_seeded_sampling_is_reproducible(tiny):
    engine = make_engine(tiny, "eagle", 2, 3)
    engine.config.eos_token_ids = ()
    sp = SamplingParams(temperature=0.8, top_p=0.9)
    a = engine.run([GenerationRequest([5, 6, 7, 8], max_new_tokens=20, sampling=sp, seed=11)])[0]
    b = engine.run([GenerationRequest([5, 6, 7, 8], max_new_tokens=20, sampling=sp, seed=11)])[0]
    assert a.output_ids == b.output_ids and len(a.output_ids) == 20
    stop_tok = a.output_ids[4]
    c = engine.run([GenerationRequest([5, 6, 7, 8], max_new_tokens=20, sampling=sp, seed=11, stop_token_ids=[stop_tok])])[0]
    first = a.output_ids.index(stop_tok)
    assert c.output_ids == a.output_ids[: first + 1]
    assert c.finish_reason == {"type": "stop", "matched": stop_tok}


def test_launch_sizes_the_drafter_cache_for_a_long_prompt_beside_a_long_request(tiny):
    """A batched absorb pads every row to the longest pending run: a request near the end of its context beside a
    freshly admitted long prompt needs about twice the context in the drafter's cache (regression)."""
    from sglang_ext.engine.launch import build_engine_from_parts

    target = TargetModel(tiny, feature_layers=(0, 1))
    engine, _ = build_engine_from_parts(tiny, None, "EAGLE", num_steps=2, draft_model=random_eagle(target),
                                        max_running_requests=2, context_length=64, eos_token_ids=())
    long_running = engine.add_request(GenerationRequest([3, 4, 5, 6], max_new_tokens=56))
    while len(long_running.output_ids) < 50:
        engine.step()
    late = engine.add_request(GenerationRequest([(7 * i) % 90 + 2 for i in range(50)], max_new_tokens=4))
    while engine.has_work():
        engine.step()
    assert len(long_running.output_ids) == 56 and len(late.output_ids) == 4
    assert long_running.output_ids == hf_greedy(tiny, [3, 4, 5, 6], 56)


@pytest.mark.parametrize("kind", ["eagle", "ngram"])
def test_one_token_prompt_beside_others(tiny, kind):
    """A one-token prompt has nothing to prefill, so a feature drafter has no pair to start from on its first step:
    it drafts nothing that step and speculates from the next one (regression: the EAGLE drafter raised)."""
    engine = make_engine(tiny, kind, num_steps=2, max_batch=2)
    ps = [[7], prompts(4, 1)[0]]
    states = engine.run([GenerationRequest(p, max_new_tokens=10) for p in ps])
    for p, s in zip(ps, states):
        assert s.output_ids == hf_greedy(tiny, p, 10)
    solo = engine.run([GenerationRequest([9], max_new_tokens=6)])[0]
    assert solo.output_ids == hf_greedy(tiny, [9], 6)


@pytest.mark.parametrize("topk", [1, 2])
def test_eagle_runs_in_bfloat16(topk):
    """A bfloat16 target with its bfloat16 drafter: the drafter's RoPE follows the activations' dtype, so its
    queries meet its cached keys in one dtype (they were float32 against bfloat16 keys before), and every request
    runs to its length with speculative steps."""
    from sglang_ext.models.tiny import tiny_llama

    model = tiny_llama(vocab_size=96, hidden_size=64, num_layers=2, seed=3).to(torch.bfloat16)
    target = TargetModel(model, feature_layers=(0, 1))
    draft = random_eagle(target).to(torch.bfloat16)
    engine = Engine(target, EagleDrafter(draft, num_slots=2, max_len=256, topk=topk,
                                         num_draft_tokens=4 if topk > 1 else None),
                    EngineConfig(max_batch_size=2, num_steps=2, topk=topk, num_draft_tokens=4 if topk > 1 else None,
                                 prefill_chunk=7, context_length=128))
    states = engine.run([GenerationRequest(p, max_new_tokens=10) for p in prompts(seed=5, count=3)])
    assert [len(s.output_ids) for s in states] == [10, 10, 10]
    assert all(s.spec_verify_ct > 0 for s in states)
    cos, sin = draft.rope(torch.arange(4).view(1, 4), torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16
