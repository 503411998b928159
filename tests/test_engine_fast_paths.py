"""The engine's per-step fast paths give exactly the reference path's results.

* the target's fast forward (HF module arithmetic inlined) is bit-identical to running the HF modules: logits,
  features, hidden states and every cache entry it writes;
* the engine's fast step (cached tree shapes, greedy rows verified from one batched argmax, slice cache writes)
  produces the same tokens, acceptance counters and finish reasons as the reference step (a ``DraftTree`` per
  request, ``verify_greedy_tree`` / ``verify_tree``), greedy and seeded stochastic, chains and trees, batch 1 and 4;
* the pieces agree with the core: tree shapes with ``DraftTree``, the greedy walk with ``verify_greedy_tree``,
  the single-buffer KV commit with a per-layer gather.
"""

from __future__ import annotations

import random

import pytest
import torch

from sglang_ext.core.drafters.base import Draft, StatelessDrafter
from sglang_ext.core.drafters.eagle import EagleDrafter
from sglang_ext.core.drafters.ngram import NgramDrafter
from sglang_ext.core.greedy import verify_greedy_tree
from sglang_ext.core.kv_cache import SlotKVCache, StepLayout
from sglang_ext.core.processing import SamplingParams
from sglang_ext.core.tree import DraftTree
from sglang_ext.engine.engine import Engine, EngineConfig, GenerationRequest, _greedy_walk, _TreeShape
from sglang_ext.engine.target import TargetModel
from sglang_ext.models.tiny import tiny_llama
from test_engine import random_eagle

VOCAB = 96


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(vocab_size=VOCAB, hidden_size=64, num_layers=2, seed=3)


def random_tree(rng: random.Random, n: int, vocab: int = VOCAB) -> tuple[list[int], list[int]]:
    parents = [-1] + [rng.randrange(i) for i in range(1, n)]
    tokens = [rng.randrange(vocab) for _ in range(n)]
    return tokens, parents


# ---- target forward --------------------------------------------------------------------------------------------
def _fresh_cache(target: TargetModel, slots: int, lengths: list[int], seed: int) -> SlotKVCache:
    cache = target.new_cache(slots, 64)
    g = torch.Generator().manual_seed(seed)
    cache.storage.copy_(torch.randn(cache.storage.shape, generator=g))
    cache.lengths[:] = torch.tensor(lengths)
    return cache


@pytest.mark.parametrize("case", ["chain_b1", "tree_ragged", "prefill_logits_for", "hidden_only"])
def test_fast_forward_is_bit_identical_to_the_modules(tiny, case):
    target = TargetModel(tiny, feature_layers=(0, 1))
    assert target.use_fast_forward
    rng = random.Random(7)
    g = torch.Generator().manual_seed(1)
    first_slot, lengths = 0, [9]
    kwargs: dict = {}
    if case == "chain_b1":
        T = 3
        ids = torch.randint(0, VOCAB, (1, T), generator=g)
        visible = torch.ones(T, T, dtype=torch.bool).tril().unsqueeze(0)
        depths = torch.arange(T).unsqueeze(0)
    elif case in ("tree_ragged", "hidden_only"):
        first_slot, lengths = 1, [0, 5, 17, 11]  # slots 1..3, different lengths: scatter writes
        B, T = 3, 6
        ids = torch.randint(0, VOCAB, (B, T), generator=g)
        visible = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)
        depths = torch.zeros(B, T, dtype=torch.long)
        for b in range(B):
            n = rng.randint(1, T)
            tree = DraftTree.from_lists(*map(lambda x: [x], random_tree(rng, n)), scheme="topk")
            visible[b, :n, :n] = tree.attention_mask[0]
            depths[b, :n] = tree.depths[0]
        kwargs = {"first_slot": first_slot, "hidden_only": case == "hidden_only"}
    else:
        T = 7
        ids = torch.randint(0, VOCAB, (1, T), generator=g)
        visible = torch.ones(T, T, dtype=torch.bool).tril().unsqueeze(0)
        depths = torch.arange(T).unsqueeze(0)
        sel = torch.zeros(1, T, dtype=torch.bool)
        sel[0, -1] = True
        kwargs = {"logits_for": sel}
    outs, caches = [], []
    for fast in (False, True):
        target.use_fast_forward = fast
        cache = _fresh_cache(target, 4, lengths + [0] * (4 - len(lengths)), seed=5)
        outs.append(target.forward(cache, ids, visible, depths, **kwargs))
        caches.append(cache)
    ref, new = outs
    for name in ("logits", "features", "hidden"):
        a, b = getattr(ref, name), getattr(new, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name
    assert torch.equal(caches[0].storage, caches[1].storage)


def test_fast_forward_falls_back_for_other_layers():
    model = tiny_llama(vocab_size=VOCAB, hidden_size=64, num_layers=2, seed=4)
    model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: o)
    target = TargetModel(model)
    assert not target.use_fast_forward  # a hook (or any non-plain layer) means the HF modules run
    cache = target.new_cache(1, 16)
    out = target.forward(cache, torch.tensor([[3, 4]]), torch.ones(1, 2, 2, dtype=torch.bool).tril(), torch.arange(2)[None])
    assert out.logits.shape == (1, 2, VOCAB)


# ---- engine: fast step vs reference step -----------------------------------------------------------------------
class OracleTreeDrafter(StatelessDrafter):
    """Trees whose accepted path is never a prefix: at every level a wrong token first, then the target's greedy
    token (whose children continue the tree), so verification walks to nodes 2, 4, ... and commit must gather."""

    name = "oracle-tree"

    def __init__(self, model, depth: int) -> None:
        self.model, self.depth = model, depth

    def draft(self, requests):
        out = []
        for r in requests:
            k = min(self.depth, r.num_steps)
            with torch.inference_mode():
                cont = self.model.generate(torch.tensor([list(r.tokens)]), max_new_tokens=max(k, 1), do_sample=False,
                                           pad_token_id=0, eos_token_id=None)[0, len(r.tokens):].tolist()
            tokens, parents, right = [r.tokens[-1]], [-1], 0
            for level in range(k):
                tokens += [(cont[level] + 1) % VOCAB, cont[level]]
                parents += [right, right]
                right = len(tokens) - 1
            out.append(Draft(tokens=tokens, parents=parents, scheme="topk"))
        return out


def build(model, kind: str, fast: bool, max_batch: int) -> Engine:
    num_steps, topk, budget = {"off": (0, 1, None), "ngram": (3, 1, None), "chain2": (2, 1, None), "chain3": (3, 1, None),
                               "tree": (3, 2, 6), "tree3": (2, 3, 8), "oracle": (3, 2, None)}[kind]
    if kind.startswith(("chain", "tree")):
        target = TargetModel(model, feature_layers=(0, 1))
        drafter = EagleDrafter(random_eagle(target), num_slots=max_batch, max_len=512, topk=topk, num_draft_tokens=budget)
    else:
        target = TargetModel(model)
        drafter = {"off": None, "ngram": NgramDrafter(), "oracle": OracleTreeDrafter(model, 3)}[kind]
    target.use_fast_forward = fast
    cfg = EngineConfig(max_batch_size=max_batch, num_steps=num_steps, topk=topk, num_draft_tokens=budget,
                       prefill_chunk=7, context_length=256, fast_paths=fast, eos_token_ids=(5,))
    return Engine(target, drafter, cfg)


def workload() -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(2)
    samplings = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.9),
                 SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=0.0),
                 SamplingParams(temperature=1.3), SamplingParams(temperature=0.6, top_p=0.7, top_k=20)]
    reqs = []
    for i in range(6):
        n = int(torch.randint(3, 20, (1,), generator=g))
        base = torch.randint(6, VOCAB, (n,), generator=g).tolist()
        reqs.append(GenerationRequest(base + base[: n // 2], max_new_tokens=[9, 21, 14, 30, 6, 17][i],
                                      sampling=samplings[i], seed=100 + i, ignore_eos=i == 3, rid=f"r{i}"))
    return reqs


def run(engine: Engine) -> list:
    reqs = workload()
    states = [engine.add_request(r) for r in reqs[:3]]
    engine.step()
    states += [engine.add_request(r) for r in reqs[3:]]  # later arrivals: ragged batches, slot compaction
    while engine.has_work():
        engine.step()
    return [(s.rid, s.output_ids, s.finish_reason, s.spec_verify_ct, s.spec_num_correct_drafts,
             s.spec_num_proposed_drafts, s.spec_correct_drafts_histogram) for s in states]


@pytest.mark.parametrize("kind", ["off", "ngram", "chain2", "chain3", "tree", "tree3", "oracle"])
@pytest.mark.parametrize("max_batch", [1, 4])
def test_fast_step_matches_reference_step(tiny, kind, max_batch):
    ref = run(build(tiny, kind, fast=False, max_batch=max_batch))
    new = run(build(tiny, kind, fast=True, max_batch=max_batch))
    assert new == ref
    assert any(r[1] for r in ref)
    if kind == "oracle":  # the oracle's trees are accepted off-prefix, so the gathering commit really ran
        assert any(r[4] > 0 for r in ref)


# ---- the pieces ----------------------------------------------------------------------------------------------------
def test_tree_shape_and_greedy_walk_match_the_core():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        width = n + rng.randint(0, 3)
        tokens, parents = random_tree(rng, n, vocab=4)  # small vocab: duplicate siblings and matches are common
        tree = DraftTree.from_lists([tokens], [parents], scheme="topk")
        shape = _TreeShape.build(parents, width)
        ref_vis = torch.eye(width, dtype=torch.bool)
        ref_vis[:n, :n] = tree.attention_mask[0]
        assert torch.equal(shape.visible, ref_vis)
        assert shape.depths[:n] == tree.depths[0].tolist() and shape.depths[n:] == [0] * (width - n)
        argmax = [rng.randrange(4) for _ in range(n)]
        want = verify_greedy_tree(tree, torch.tensor([argmax]))
        assert _greedy_walk(tokens, shape.children, argmax) == (want.accepted_nodes[0], want.emitted[0])


def test_single_buffer_commit_and_move_match_per_layer_copies():
    g = torch.Generator().manual_seed(3)
    cache = SlotKVCache(3, 2, 2, 4, 20)
    cache.storage.copy_(torch.randn(cache.storage.shape, generator=g))
    cache.lengths[:] = torch.tensor([5, 7])
    before = [t.clone() for t in (*cache.keys, *cache.values)]
    cache.commit(1, [0, 2, 5])
    for old, new in zip(before, (*cache.keys, *cache.values)):
        want = old.clone()
        want[1, :, 7:10] = old[1, :, [7, 9, 12]]
        assert torch.equal(new, want)
    assert cache.lengths.tolist() == [5, 10]
    cache.move(1, 0)
    assert torch.equal(cache.storage[:, :, 0, :, :10], cache.storage[:, :, 1, :, :10])
    assert cache.lengths.tolist() == [10, 0]


@pytest.mark.parametrize("lengths", [[6, 6, 6], [6, 3, 9]])  # one start for all rows: slice copies; ragged: index_copy_
def test_kv_writes_agree_with_indexed_assignment(lengths):
    g = torch.Generator().manual_seed(4)
    B, T, H, D, first = 3, 2, 2, 4, 1
    k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(2))
    cache = SlotKVCache(2, B + first, H, D, 16)
    cache.storage.copy_(torch.randn(cache.storage.shape, generator=g))
    cache.lengths[first:] = torch.tensor(lengths)
    want = cache.storage.clone()
    layout = StepLayout(cache, B, torch.ones(B, T, T, dtype=torch.bool).tril(), first_slot=first)
    layout.write(1, k, v)
    rows = torch.arange(first, first + B)[:, None].expand(B, T)
    want[0, 1][rows, :, layout.write_pos] = k.transpose(1, 2)  # the indexed write every layer used to do
    want[1, 1][rows, :, layout.write_pos] = v.transpose(1, 2)
    assert torch.equal(cache.storage, want)


def test_non_finite_logits_still_name_the_request(tiny):
    from sglang_ext.core.processing import NonFiniteLogitsError

    engine = build(tiny, "chain2", fast=True, max_batch=2)
    forward = engine.target.forward

    def poisoned(*a, **k):
        out = forward(*a, **k)
        if out.logits.shape[0] == 2:  # the decode step of both requests (prefills run one request at a time)
            out.logits = out.logits.clone()
            out.logits[1, 0, 3] = float("nan")
        return out

    engine.target.forward = poisoned
    engine.add_request(GenerationRequest([7, 8, 9], max_new_tokens=4, rid="fine"))
    engine.add_request(GenerationRequest([7, 8, 10], max_new_tokens=4, rid="poisoned"))
    with pytest.raises(NonFiniteLogitsError, match="poisoned"):
        engine.step()
