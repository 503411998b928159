"""Per-token logprobs in the reference engine: SGLang's convention, identical with speculation on and off.

The convention (``sglang_ext.engine.engine.token_logprobs``), written out again plainly in :func:`reference`:
greedy requests (``temperature == 0`` or ``top_k == 1``) get ``log_softmax(z)``, sampled requests
``log_softmax(z / T)`` with no top-k / top-p truncation, ``z`` the target's logits at the position that emitted the
token. The tests check the engine's records against

* a teacher-forced reference: one plain full forward of the HF model over ``prompt + output`` (no cache, no
  tree), for greedy and seeded sampled requests, speculation off, EAGLE chains and EAGLE trees (topk > 1);
* speculation off (greedy): identical tokens and logprobs;
* SGLang's own ``compute_spec_logprobs`` on the same logits;

and that the records stay aligned with ``output_ids`` whatever truncates a step (max_new_tokens, stop tokens),
that requests which did not ask record nothing (and cost nothing), that ``top_logprobs`` is validated, and that the
reference step (``fast_paths=False``) records exactly what the fast step records.

The drafters: the EAGLE drafter with random weights almost never proposes what a random target wants, so
:class:`PlantedEagle` (the real EAGLE drafter: its feature path, cache and tree shapes) plants the target's own
greedy continuation along the *last* child at each level for a random number of levels: drafts are really
accepted, partly accepted and rejected, and in trees accepted off the first branch. :class:`DeepTreeOracle`
ignores the step's draft budget (a tree host must cope), so a step emits past ``max_new_tokens`` and ``_append``
must cut it.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_ext.core.drafters.base import Draft, StatelessDrafter
from sglang_ext.core.drafters.eagle import EagleDrafter
from sglang_ext.core.processing import SamplingParams
from sglang_ext.engine import engine as engine_mod
from sglang_ext.engine.engine import (Engine, EngineConfig, GenerationRequest, RequestError, RequestState,
                                      _top_logprobs, token_logprobs)
from sglang_ext.engine.target import TargetModel
from sglang_ext.models.tiny import tiny_llama
from test_engine import random_eagle

VOCAB = 96
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(vocab_size=VOCAB, hidden_size=64, num_layers=2, seed=3)
    with torch.no_grad():  # a sharper target: sampled requests accept planted greedy drafts often, fewer near-ties
        model.lm_head.weight.mul_(30.0)
    return model


@torch.inference_mode()
def greedy_continuation(model, tokens: list[int], n: int) -> list[int]:
    ids = list(tokens)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(tokens):]


class PlantedEagle(EagleDrafter):
    """The EAGLE drafter with the target's greedy continuation planted along the last child of each level, for a
    seeded random number of levels (0 .. num_steps): real acceptances of every length, off-prefix in trees. Planted
    drafts are point masses (scheme ``topk``), which stochastic verification handles losslessly."""

    def __init__(self, model, hf, seed: int, **kw) -> None:
        super().__init__(model, **kw)
        self.hf, self.rng = hf, random.Random(seed)

    def draft(self, requests):
        drafts = super().draft(requests)
        for r, d in zip(requests, drafts):
            children: list[list[int]] = [[] for _ in d.tokens]
            for i in range(1, d.num_nodes):
                children[d.parents[i]].append(i)
            depth = self.rng.randint(0, r.num_steps)
            cont = greedy_continuation(self.hf, list(r.tokens), depth) if depth else []
            cur = 0
            for want in cont:
                if not children[cur]:
                    break
                same = [c for c in children[cur] if d.tokens[c] == want]
                cur = same[0] if same else children[cur][-1]
                d.tokens[cur] = want
            d.scheme, d.draft_probs, d.proposal_probs = "topk", None, None
        return drafts


class DeepTreeOracle(StatelessDrafter):
    """Depth-3 trees whatever the step's budget: at each level a wrong token first, then the target's greedy token
    (whose child continues), so whole trees are accepted off the first branch and a step can emit 4 tokens even
    when the request has fewer left."""

    name = "deep-tree-oracle"

    def __init__(self, hf) -> None:
        self.hf = hf

    def draft(self, requests):
        out = []
        for r in requests:
            tokens, parents, right = [r.tokens[-1]], [-1], 0
            for tok in greedy_continuation(self.hf, list(r.tokens), 3):
                tokens += [(tok + 1) % VOCAB, tok]
                parents += [right, right]
                right = len(tokens) - 1
            out.append(Draft(tokens=tokens, parents=parents, scheme="topk"))
        return out


KINDS = {  # num_steps, topk, num_draft_tokens
    "off": (0, 1, None), "eagle-chain": (3, 1, None), "eagle-tree": (3, 2, 6), "eagle-random-tree": (3, 2, 6),
    "deep-tree": (3, 2, None),
}


def build(model, kind: str, fast: bool = True, max_batch: int = 4, eos: tuple[int, ...] = ()) -> Engine:
    num_steps, topk, budget = KINDS[kind]
    if kind.startswith("eagle"):
        target = TargetModel(model, feature_layers=(0, 1))
        cls_kw = dict(num_slots=max_batch, max_len=512, topk=topk, num_draft_tokens=budget)
        eagle = random_eagle(target)
        drafter = (EagleDrafter(eagle, **cls_kw) if kind == "eagle-random-tree"
                   else PlantedEagle(eagle, model, seed=11, **cls_kw))
    else:
        target = TargetModel(model)
        drafter = DeepTreeOracle(model) if kind == "deep-tree" else None
    target.use_fast_forward = fast
    cfg = EngineConfig(max_batch_size=max_batch, num_steps=num_steps, topk=topk, num_draft_tokens=budget,
                       prefill_chunk=7, context_length=256, fast_paths=fast, eos_token_ids=eos)
    return Engine(target, drafter, cfg)


SAMPLINGS = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.9),
             SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=1.3),
             SamplingParams(temperature=0.8, top_k=1), SamplingParams(temperature=0.6, top_p=0.7, top_k=20),
             SamplingParams(temperature=0.0)]
TOPS = [5, 0, 20, 3, 1, 7, 2]


def workload(samplings=SAMPLINGS, max_new: int = 24) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(2)
    reqs = []
    for i, sp in enumerate(samplings):
        n = int(torch.randint(3, 16, (1,), generator=g))
        prompt = torch.randint(6, VOCAB, (n,), generator=g).tolist()
        reqs.append(GenerationRequest(prompt, max_new_tokens=max_new - i, sampling=sp, seed=100 + i, rid=f"r{i}",
                                      logprobs=True, top_logprobs=TOPS[i % len(TOPS)]))
    return reqs


def run(engine: Engine, reqs: list[GenerationRequest]) -> list[RequestState]:
    states = [engine.add_request(r) for r in reqs[:3]]
    engine.step()
    states += [engine.add_request(r) for r in reqs[3:]]  # later arrivals: ragged batches, slot compaction
    while engine.has_work():
        engine.step()
    return states


@torch.inference_mode()
def reference(model, state: RequestState) -> torch.Tensor:
    """Teacher-forced expected logprobs ``[len(output), V]``: one full forward over prompt + output, then the
    convention plainly: greedy ``z - logsumexp(z)``, sampled ``z/T - logsumexp(z/T)`` (no top-k / top-p)."""
    prompt, out = state.request.prompt_ids, state.output_ids
    z = model(torch.tensor([prompt + out])).logits[0].double()
    z = z[len(prompt) - 1: len(prompt) - 1 + len(out)]  # the logits that predict output token i
    sp = state.request.sampling
    if not (sp.temperature == 0.0 or sp.top_k == 1):
        z = z / sp.temperature
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def check_top_list(top: list[tuple[int, float]], ref_row: torch.Tensor, k: int) -> None:
    """``top`` is ref_row's top-k up to near-ties: values match the reference of their ids, sorted decreasing with
    exact ties by lowest id, every id clearly above the k-th value is there, none clearly below it."""
    assert len(top) == k
    ids = [t for t, _ in top]
    vals = [v for _, v in top]
    assert len(set(ids)) == k
    for t, v in top:
        assert abs(v - float(ref_row[t])) <= TOL, (t, v, float(ref_row[t]))
    for (t0, v0), (t1, v1) in zip(top, top[1:]):
        assert v0 > v1 or (v0 == v1 and t0 < t1)
    kth = float(ref_row.topk(k).values[-1])
    clearly_in = torch.nonzero(ref_row > kth + TOL).squeeze(1).tolist()
    assert set(clearly_in) <= set(ids)
    assert min(float(ref_row[t]) for t in ids) >= kth - TOL
    assert all(math.isfinite(v) for v in vals)


def assert_records_close(a: RequestState, b: RequestState) -> None:
    """``b``'s records equal ``a``'s over ``b``'s tokens (a prefix of ``a``'s) within TOL; top ids equal except where
    a near-tie (a gap under 2 TOL, or the list's last place) may swap them."""
    n = len(b.output_ids)
    assert n and b.output_ids == a.output_ids[:n]
    assert len(b.output_token_logprobs) == n
    assert max(abs(x - y) for x, y in zip(a.output_token_logprobs, b.output_token_logprobs)) <= TOL
    k = b.request.top_logprobs
    assert len(b.output_top_logprobs) == (n if k else 0)
    for ta, tb in zip(a.output_top_logprobs, b.output_top_logprobs):
        assert len(ta) == len(tb) == k
        for j, ((ia, va), (ib, vb)) in enumerate(zip(ta, tb)):
            assert abs(va - vb) <= TOL
            if ia != ib:
                assert j == k - 1 or any(abs(va - v) <= 2 * TOL for jj, (_, v) in enumerate(ta) if jj != j), (ta, tb)


def check_against_reference(model, state: RequestState) -> None:
    out = state.output_ids
    assert out and len(state.output_token_logprobs) == len(out)
    ref = reference(model, state)
    got = torch.tensor(state.output_token_logprobs, dtype=torch.float64)
    want = ref[torch.arange(len(out)), torch.tensor(out)]
    assert torch.allclose(got, want, atol=TOL, rtol=0), (state.rid, (got - want).abs().max())
    k = state.request.top_logprobs
    if k:
        assert len(state.output_top_logprobs) == len(out)
        for i, top in enumerate(state.output_top_logprobs):
            check_top_list(top, ref[i], k)
    else:
        assert state.output_top_logprobs == []


# ---- the teacher-forced reference ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["off", "eagle-chain", "eagle-tree", "deep-tree"])
def test_records_match_a_teacher_forced_forward(tiny, kind):
    states = run(build(tiny, kind), workload())
    for s in states:
        check_against_reference(tiny, s)
    if kind != "off":  # speculation really emitted several tokens per step, greedy and sampled
        for greedy in (True, False):
            group = [s for s in states if s.request.sampling.greedy == greedy]
            assert any(a >= 2 for s in group for a in s.accept_record), (kind, greedy)


def test_the_reference_check_catches_a_wrong_convention(tiny):
    """The checks above can fail: records from log_softmax(z) for a sampled request, or from the wrong row, are
    refused."""
    states = run(build(tiny, "eagle-chain"), workload())
    sampled = next(s for s in states if not s.request.sampling.greedy and s.request.sampling.temperature != 1.0)
    good = list(sampled.output_token_logprobs)
    sampled.output_token_logprobs = (reference(tiny, sampled) * sampled.request.sampling.temperature).log_softmax(-1)[
        torch.arange(len(good)), torch.tensor(sampled.output_ids)].tolist()  # untempered
    with pytest.raises(AssertionError):
        check_against_reference(tiny, sampled)
    sampled.output_token_logprobs = good[1:] + good[:1]  # one row off
    with pytest.raises(AssertionError):
        check_against_reference(tiny, sampled)


# ---- speculation off == on ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["eagle-chain", "eagle-tree", "eagle-random-tree", "deep-tree"])
def test_greedy_records_are_identical_with_speculation_on_and_off(tiny, kind):
    greedy = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_k=1)] * 3
    off = run(build(tiny, "off"), workload(greedy))
    on = run(build(tiny, kind), workload(greedy))
    if kind != "eagle-random-tree":
        assert sum(s.spec_num_correct_drafts for s in on) > 0
    for a, b in zip(off, on):
        assert b.output_ids == a.output_ids
        assert_records_close(a, b)


def test_sampled_records_follow_each_engines_own_tokens(tiny):
    """Sampled tokens may differ between speculation on and off (the law is the same, the draws are not); each
    engine's records are the convention's value for its own tokens."""
    sampled = [SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.0, top_k=5),
               SamplingParams(temperature=1.3)]
    for kind in ("off", "eagle-chain", "eagle-tree"):
        for s in run(build(tiny, kind), workload(sampled)):
            check_against_reference(tiny, s)


# ---- SGLang's own computation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sp", [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=1),
                                SamplingParams(temperature=0.7, top_p=0.8, top_k=10), SamplingParams(temperature=1.4)])
def test_convention_equals_sglangs_compute_spec_logprobs(sp):
    from types import SimpleNamespace as NS

    from conftest import require_module

    require_module("sglang")
    from sglang.srt.layers.logprob_processor import compute_spec_logprobs

    z = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    tokens = torch.tensor([3, 50, 7, 95])
    # SGLang turns temperature 0 into (T=1, top_k=1); a batch of one greedy request is "all greedy"
    batch = NS(seq_lens=[0], token_ids_logprobs=None, top_logprobs_nums=[5],
               sampling_info=NS(is_all_greedy=sp.greedy, temperatures=torch.tensor([[sp.temperature or 1.0]])))
    out = NS(next_token_logits=z.clone())
    compute_spec_logprobs(batch, out, tokens, chain_stride=4)
    ours = token_logprobs(z, sp)
    assert torch.allclose(ours[torch.arange(4), tokens], out.next_token_logprobs[0], atol=1e-6)
    for i, top in enumerate(_top_logprobs(ours, 5)):
        assert torch.allclose(torch.tensor([v for _, v in top]), out.next_token_top_logprobs_val[i], atol=1e-6)
        assert [t for t, _ in top] == out.next_token_top_logprobs_idx[i].tolist()


# ---- alignment under truncation -------------------------------------------------------------------------------------
def _single(tiny, kind: str, **kw) -> RequestState:
    prompt = [9, 40, 17, 33, 61, 8]
    req = GenerationRequest(prompt, sampling=SamplingParams(temperature=0.0), logprobs=True, top_logprobs=4,
                            ignore_eos=True, **kw)
    return build(tiny, kind, max_batch=1).run([req])[0]


@pytest.mark.parametrize("max_new", [1, 2, 3, 5, 6, 7, 10])
def test_max_new_tokens_cuts_a_step_and_keeps_the_records_aligned(tiny, max_new):
    full = _single(tiny, "deep-tree", max_new_tokens=12)
    assert max(full.accept_record) == 3  # whole depth-3 trees accepted: steps emit 4 tokens
    cut = _single(tiny, "deep-tree", max_new_tokens=max_new)
    assert cut.output_ids == full.output_ids[:max_new]
    assert cut.finish_reason == {"type": "length", "length": max_new}
    assert len(cut.output_token_logprobs) == len(cut.output_top_logprobs) == max_new
    assert_records_close(full, cut)  # float noise only: the cut run's steps and trees differ at the end
    check_against_reference(tiny, cut)


@pytest.mark.parametrize("kind", ["deep-tree", "eagle-tree", "off"])
@pytest.mark.parametrize("via", ["stop_token_ids", "eos"])
def test_a_stop_token_mid_step_keeps_the_records_aligned(tiny, kind, via):
    full = _single(tiny, "deep-tree", max_new_tokens=16)
    # a stop token whose first occurrence is not the last token of its step in the full run (so the cut is mid-step)
    ends, pos = set(), -1
    for a in full.accept_record:
        pos += a + 1
        ends.add(pos)
    j = next(i for i, t in enumerate(full.output_ids) if i >= 2 and i not in ends and t not in full.output_ids[:i])
    stop = full.output_ids[j]
    prompt = [9, 40, 17, 33, 61, 8]
    req = GenerationRequest(prompt, max_new_tokens=16, sampling=SamplingParams(temperature=0.0), logprobs=True,
                            top_logprobs=4, stop_token_ids=[stop] if via == "stop_token_ids" else [])
    cut = build(tiny, kind, max_batch=1, eos=(stop,) if via == "eos" else ()).run([req])[0]
    assert cut.output_ids == full.output_ids[:j + 1]
    assert cut.finish_reason == {"type": "stop", "matched": stop}
    assert len(cut.output_token_logprobs) == len(cut.output_top_logprobs) == j + 1
    assert_records_close(full, cut)
    check_against_reference(tiny, cut)


# ---- who records what -----------------------------------------------------------------------------------------------
def test_only_requests_that_ask_record_and_others_cost_nothing(tiny, monkeypatch):
    reqs = workload()
    reqs[0].logprobs, reqs[0].top_logprobs = False, 0  # nothing
    reqs[1].logprobs, reqs[1].top_logprobs = True, 0  # logprobs only
    reqs[2].logprobs, reqs[2].top_logprobs = False, 3  # top_logprobs > 0 implies logprobs
    states = run(build(tiny, "eagle-tree"), reqs)
    assert states[0].output_ids and states[0].output_token_logprobs == [] and states[0].output_top_logprobs == []
    assert len(states[1].output_token_logprobs) == len(states[1].output_ids) and states[1].output_top_logprobs == []
    assert len(states[2].output_token_logprobs) == len(states[2].output_top_logprobs) == len(states[2].output_ids)
    for s in states[1:]:
        check_against_reference(tiny, s)

    def boom(*a, **k):
        raise AssertionError("logprobs computed for a request that did not ask")

    monkeypatch.setattr(engine_mod, "token_logprobs", boom)
    quiet = workload()
    for r in quiet:
        r.logprobs, r.top_logprobs = False, 0
    for s in run(build(tiny, "eagle-tree"), quiet):
        assert s.output_ids and s.output_token_logprobs == [] and s.output_top_logprobs == []


@pytest.mark.parametrize("bad", [-1, 21, 100, 2.5, True, "3"])
def test_top_logprobs_out_of_range_is_refused_naming_the_field(tiny, bad):
    engine = build(tiny, "off")
    with pytest.raises(RequestError, match=r"^top_logprobs: ") as e:
        engine.add_request(GenerationRequest([5, 6, 7], top_logprobs=bad))
    assert e.value.field == "top_logprobs"
    assert not engine.has_work()


@pytest.mark.parametrize("k", [0, 1, 20])
def test_top_logprobs_in_range_is_accepted(tiny, k):
    s = build(tiny, "off").run([GenerationRequest([5, 6, 7], max_new_tokens=3, top_logprobs=k)])[0]
    assert len(s.output_ids) == 3
    assert [len(t) for t in s.output_top_logprobs] == ([k] * 3 if k else [])
    assert len(s.output_token_logprobs) == (3 if k else 0)


# ---- the reference step records exactly what the fast step records -------------------------------------------------
@pytest.mark.parametrize("kind", ["off", "eagle-chain", "eagle-tree", "deep-tree"])
def test_fast_paths_off_records_exactly_the_same(tiny, kind):
    def records(fast: bool):
        return [(s.output_ids, s.output_token_logprobs, s.output_top_logprobs, s.finish_reason)
                for s in run(build(tiny, kind, fast=fast), workload())]

    ref, new = records(False), records(True)
    assert new == ref
    assert all(r[1] for r in ref)


# ---- the pieces ------------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, -0.5, -1.0, -2.0, -7.25, float("-inf")]), min_size=1, max_size=30),
       k=st.integers(1, 20))
def test_top_lists_sort_by_value_then_lowest_id(values, k):
    lp = torch.tensor([values])
    top = _top_logprobs(lp, k)[0]
    want = sorted(range(len(values)), key=lambda i: (-values[i], i))[:min(k, len(values))]
    assert [t for t, _ in top] == want
    assert [v for _, v in top] == [values[i] for i in want]


def test_token_logprobs_are_finite_and_untruncated():
    z = torch.tensor([[2.0, 1.0, 0.0, float("-inf"), -30.0]])
    sp = SamplingParams(temperature=0.5, top_k=2, top_p=0.5)
    lp = token_logprobs(z, sp)
    assert torch.isfinite(lp).all()  # top-k/top-p would drop tokens 2..4; their values stay finite
    assert torch.allclose(lp[0, :3], torch.log_softmax(z[0, :3] / 0.5, -1) + torch.logsumexp(z[0, :3] / 0.5, -1)
                          - torch.logsumexp(torch.tensor([4.0, 2.0, 0.0, -60.0]), -1))
    assert float(lp[0, 3]) == torch.finfo(torch.float32).min  # a masked token: clamped, as SGLang does
    greedy = token_logprobs(z, SamplingParams(temperature=0.0))
    assert torch.allclose(greedy[0, :3], z[0, :3] - torch.logsumexp(z[0], -1))
