"""The SpecBlock drafter: serving equals the training unroll, greedy identity with HF, losslessness when sampling."""

from __future__ import annotations

import math

import pytest
import torch

from sglang_ext.core.drafters.base import DraftRequest
from sglang_ext.core.drafters.checkpoint import load_draft_model, make_feature_drafter
from sglang_ext.core.drafters.specblock import SpecBlockDrafter
from sglang_ext.core.drafters.specblock_model import (
    SpecBlockConfig,
    SpecBlockDraftModel,
    rank_features,
    rank_labels,
)
from sglang_ext.core.drafters.specblock_ttt import block_loss, block_ttt_forward
from sglang_ext.core.processing import SamplingParams
from sglang_ext.engine.engine import Engine, EngineConfig, GenerationRequest
from sglang_ext.engine.target import TargetModel
from sglang_ext.models.tiny import tiny_llama

from test_engine import hf_greedy, prompts  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(vocab_size=96, hidden_size=64, num_layers=2, seed=3)


def random_specblock(target: TargetModel, seed: int = 0, **overrides) -> SpecBlockDraftModel:
    """Random weights, with the shift mixing both halves (its identity init would hide a wrong shift partner) and
    a rank head biased towards every bucket (so give-ups and all branching widths occur)."""
    torch.manual_seed(seed)
    cfg = SpecBlockConfig.for_target(target.config, list(target.feature_layers), **overrides)
    m = SpecBlockDraftModel(cfg)
    for lin in m.shift_proj:
        torch.nn.init.normal_(lin.weight, std=0.08)
    if m.rank_head is not None:
        torch.nn.init.normal_(m.rank_head[2].weight, std=0.5)
    return m.bind_target(target.embed_tokens.weight, target.lm_head.weight).eval()


def target_features(target: TargetModel, tokens: torch.Tensor) -> torch.Tensor:
    B, S = tokens.shape
    cache = target.new_cache(B, S)
    vis = torch.ones(S, S, dtype=torch.bool).tril().expand(B, S, S)
    with torch.inference_mode():
        out = target.forward(cache, tokens, vis, torch.arange(S).expand(B, S), hidden_only=True)
    return out.features.float().clone()


# ---- the serving drafter computes exactly what training unrolls ----------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, {"shift": False}, {"inherit": False}, {"num_layers": 3, "block_size": 3}],
                         ids=["default", "no-shift", "no-inherit", "3-layers-K3"])
def test_serving_blocks_equal_the_training_unroll(tiny, overrides):
    """Block 1 (absorbed with the pending pairs, padded rows included) and block 2 from every slot M give the logits
    ``block_ttt_forward`` gives at the same index: the trainer optimises exactly what serving runs."""
    target = TargetModel(tiny, feature_layers=(0, 1))
    m = random_specblock(target, **overrides)
    K = m.config.block_size
    S = 24
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 96, (2, S), generator=g)
    feats = target_features(target, tokens)
    committed = [13, 9]  # different pending counts: the padded absorb path
    for M in range(1, K + 1):
        greedy_next = torch.randint(2, 96, (2, S), generator=g)
        with torch.no_grad():
            outs = block_ttt_forward(m, feats, tokens, greedy_next, [M])
        d = SpecBlockDrafter(m, num_slots=2, max_len=80)
        for b, n in enumerate(committed):
            d.admit(b)
            d.observe(b, feats[b, :n - 1], tokens[b, 1:n].tolist())
        states, cond_root, counts = d._first_block(0, 2)
        assert counts == [n - 1 for n in committed]
        cond = states[:, M - 1] if m.config.inherit else cond_root
        second = torch.tensor([[int(greedy_next[b, n - 2 + M])] for b, n in enumerate(committed)])
        s2 = d._later_block(0, second, cond.unsqueeze(1), torch.tensor([M, M]), K - 1,
                            [[list(range(M - 1))], [list(range(M - 1))]])
        for b, n in enumerate(committed):
            torch.testing.assert_close(m.logits(states[b]), outs[0].logits[b, :, n - 2], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(m.logits(s2[b, 0]), outs[1].logits[b, :, n - 2], atol=2e-5, rtol=1e-4)


def test_rank_features_and_labels():
    logits = torch.tensor([[5.0, 4.0, 3.0] + [-0.01 * i for i in range(30)]])  # no ties
    f = rank_features(logits)
    assert f.shape == (1, 15)
    assert f[0, 10] == pytest.approx(1.0, abs=1e-5)  # gap top1 - top2 of the normalised log-probs
    assert 0 < float(f[0, 13]) < 1 and float(f[0, 14]) > 0  # top-1 probability, entropy
    order = logits[0].argsort(descending=True)
    targets = torch.stack([order[0], order[1], order[3], order[4], order[9], order[10], order[30]])
    got = rank_labels(logits.expand(7, -1), targets)
    assert got.tolist() == [0, 1, 1, 2, 2, 3, 3]


def test_valid_prefix_mask_drops_rows_after_a_miss(tiny):
    """With the mask, only slot 0 is trained where slot 0 misses; without it every slot is."""
    target = TargetModel(tiny, feature_layers=(0, 1))
    m = random_specblock(target, rank_head=False)
    S = 16
    tokens = torch.randint(2, 96, (2, S), generator=torch.Generator().manual_seed(1))
    feats = target_features(target, tokens)
    with torch.no_grad():
        outs = block_ttt_forward(m, feats, tokens, torch.zeros_like(tokens), [])
    # a target whose greedy token is never slot 0's argmax
    wrong = (outs[0].logits[:, 0].argmax(-1) + 1) % 96
    logp = torch.full((2, S, 96), -30.0)
    logp[:, 1:].scatter_(-1, wrong.unsqueeze(-1), 0.0)
    logp = torch.log_softmax(logp, dim=-1)
    valid = torch.ones(2, S, dtype=torch.bool)
    masked, mm = block_loss(m, feats, tokens, logp, valid, [], rank_weight=0.0)
    unmasked, _ = block_loss(m, feats, tokens, logp, valid, [], prefix_mask=False, rank_weight=0.0)
    slot0 = -(logp[:, 1:S - 1].exp() * torch.log_softmax(outs[0].logits[:, 0, :S - 2], -1)).sum(-1).mean()
    assert float(masked.detach()) == pytest.approx(float(slot0), rel=1e-4)
    assert float(unmasked.detach()) > float(masked.detach()) * 1.5
    assert mm.accept_len == 0.0 and mm.top1[0] == 0.0


def test_logits_only_for_needed_rows_change_nothing(tiny):
    """The loss computes logits only on rows still on a correct prefix (or the rank chain): the loss, its gradient
    and the accepted length equal those of computing every row."""
    target = TargetModel(tiny, feature_layers=(0, 1))
    m = random_specblock(target).train()
    tokens = torch.randint(2, 96, (3, 18), generator=torch.Generator().manual_seed(4))
    feats = target_features(target, tokens)
    with torch.no_grad():
        # a teacher the drafter agrees with on every other row (its own slot-0 choice) and misses elsewhere, and a
        # rank head that predicts "give up": on the missed rows the draft chain ends but the rank chain goes on
        outs = block_ttt_forward(m, feats, tokens, torch.zeros_like(tokens), [])
        choice = outs[0].logits[:, 0].argmax(-1)
        miss = (torch.arange(17).view(1, -1) + torch.arange(3).view(-1, 1)) % 2 == 1
        choice = torch.where(miss, (choice + 7) % 96, choice)
        logp = torch.full((3, 18, 96), -20.0)
        logp[:, 1:].scatter_(-1, choice.unsqueeze(-1), 0.0)
        logp[:, :, 5] = -1.0  # and a second token that later slots may rank first
        logp = torch.log_softmax(logp, -1)
        m.rank_head[2].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 8.0]))
    valid = torch.ones(3, 18, dtype=torch.bool)
    valid[2, 12:] = False
    results = []
    for only in (True, False):
        m.zero_grad()
        loss, met = block_loss(m, feats, tokens, logp, valid, [2], only_needed_rows=only)
        loss.backward()
        results.append((float(loss.detach()), met.accept_len, {n: p.grad.clone() for n, p in m.named_parameters()
                                                              if p.grad is not None}))
    (l1, a1, g1), (l2, a2, g2) = results
    assert a1 >= 0.5 and l1 == pytest.approx(l2, rel=1e-5) and a1 == a2
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4)


def test_training_step_lowers_the_loss_and_trains_the_rank_head(tiny):
    target = TargetModel(tiny, feature_layers=(0, 1))
    m = random_specblock(target).train()
    tokens = torch.randint(2, 96, (4, 20), generator=torch.Generator().manual_seed(2))
    feats = target_features(target, tokens)
    with torch.inference_mode():
        logp = torch.log_softmax(20 * tiny(tokens).logits.float(), -1).clone()  # a peaked teacher
    valid = torch.ones(4, 20, dtype=torch.bool)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)

    def unmasked() -> tuple[float, float]:  # the masked loss grows as more rows enter the chain: judge the KL
        with torch.no_grad():
            loss, met = block_loss(m, feats, tokens, logp, valid, [2], prefix_mask=False, rank_weight=0.0)
        return met.kl[0], met.accept_len  # depth 1: later slots cannot see the tokens between

    before = unmasked()
    for step in range(25):
        loss, met = block_loss(m, feats, tokens, logp, valid, [2])
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert m.rank_head[0].weight.grad.abs().sum() > 0  # the rank loss reaches its head
            assert m.fc.weight.grad.abs().sum() > 0
        opt.step()
    after = unmasked()
    assert after[0] < 0.9 * before[0] and after[1] > before[1] + 0.2, (before, after)


def test_checkpoint_round_trip_and_dispatch(tiny, tmp_path):
    target = TargetModel(tiny, feature_layers=(0, 1))
    m = random_specblock(target, inherit=False)
    m.config.target = {"name": "tiny", "vocab_size": 96}
    m.save(tmp_path / "sb")
    loaded = load_draft_model(tmp_path / "sb", expect_target={"name": "tiny"})
    assert isinstance(loaded, SpecBlockDraftModel) and loaded.config.inherit is False
    for (k, v), (k2, v2) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(ValueError, match="trained for target name='tiny'"):
        load_draft_model(tmp_path / "sb", expect_target={"name": "other"})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"architecture": "medusa"}')
    with pytest.raises(ValueError, match=r"bad/config.json: architecture 'medusa'"):
        load_draft_model(tmp_path / "bad")


# ---- the engine: greedy identity, trees within budget ---------------------------------------------------------------
def make_engine(model, num_steps: int, max_batch: int, topk: int = 1, budget: int | None = None, **overrides) -> Engine:
    target = TargetModel(model, feature_layers=(0, 1))
    dm = random_specblock(target, **overrides)
    max_blocks = max(2, math.ceil(num_steps / dm.config.block_size))
    drafter = make_feature_drafter(dm, num_slots=max_batch, max_len=600, topk=topk, num_draft_tokens=budget,
                                   max_blocks=max_blocks)
    cfg = EngineConfig(max_batch_size=max_batch, num_steps=num_steps, topk=topk, num_draft_tokens=budget,
                       prefill_chunk=7, context_length=256)
    return Engine(target, drafter, cfg)


@pytest.mark.parametrize("num_steps,topk,budget,overrides", [
    (3, 1, None, {}), (7, 1, None, {}), (10, 1, None, {"block_size": 3}), (5, 1, None, {"rank_head": False}),
    (6, 3, 12, {}), (8, 4, 16, {"rank_head": False}), (4, 2, 6, {"inherit": False, "shift": False}),
], ids=["chain3", "chain7-2blocks", "chain10-K3-4blocks", "chain-no-rank", "tree6", "tree8-no-rank", "tree-ablated"])
@pytest.mark.parametrize("max_batch", [1, 4])
def test_greedy_identical_to_hf(tiny, num_steps, topk, budget, overrides, max_batch):
    ps = prompts(seed=5, count=6)
    lengths = [9, 17, 4, 23, 12, 30]
    engine = make_engine(tiny, num_steps, max_batch, topk, budget, **overrides)
    states = [engine.add_request(GenerationRequest(p, max_new_tokens=n)) for p, n in zip(ps[:3], lengths[:3])]
    engine.step()
    states += [engine.add_request(GenerationRequest(p, max_new_tokens=n)) for p, n in zip(ps[3:], lengths[3:])]
    while engine.has_work():
        engine.step()
    for s, p, n in zip(states, ps, lengths):
        assert s.output_ids == hf_greedy(tiny, p, n), s.rid
    assert all(s.spec_verify_ct > 0 for s in states)


def test_trees_stay_within_the_budget_and_are_trees(tiny):
    target = TargetModel(tiny, feature_layers=(0, 1))
    dm = random_specblock(target)
    d = SpecBlockDrafter(dm, num_slots=3, max_len=200, topk=5, num_draft_tokens=14)
    toks = torch.randint(2, 96, (3, 20), generator=torch.Generator().manual_seed(3))
    feats = target_features(target, toks)
    reqs = []
    for b in range(3):
        d.admit(b)
        n = 10 + 3 * b
        d.observe(b, feats[b, :n - 1], toks[b, 1:n].tolist())
        reqs.append(DraftRequest(slot=b, tokens=toks[b, :n].tolist(), num_steps=8))
    seen_depth = 0
    for draft in d.draft(reqs):
        assert 2 <= draft.num_nodes <= 14 and draft.parents[0] == -1
        depth = [0] * draft.num_nodes
        for i in range(1, draft.num_nodes):
            assert 0 <= draft.parents[i] < i
            depth[i] = depth[draft.parents[i]] + 1
        seen_depth = max(seen_depth, max(depth))
        # siblings are distinct tokens (a repeated sibling would be verified twice)
        kids: dict[int, list[int]] = {}
        for i in range(1, draft.num_nodes):
            kids.setdefault(draft.parents[i], []).append(draft.tokens[i])
        assert all(len(v) == len(set(v)) for v in kids.values())
    assert seen_depth > dm.config.block_size or d.blocks_run >= 2  # a second block ran


# ---- losslessness under sampling (Monte-Carlo, the real drafter in the real engine) ---------------------------------
def _exact_marginals(model, prompt: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact laws of the 2nd and 3rd generated tokens under plain sampling at T = 1 (enumerating the first two)."""
    with torch.inference_mode():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
        seq2 = torch.tensor([prompt + [a] for a in range(vocab)])
        p2 = torch.softmax(model(seq2).logits[:, -1].double(), -1)  # [a, b]
        seq3 = torch.tensor([prompt + [a, b] for a in range(vocab) for b in range(vocab)])
        p3 = torch.softmax(model(seq3).logits[:, -1].double(), -1).view(vocab, vocab, vocab)
    joint2 = p1.view(-1, 1) * p2
    return joint2.sum(0), (joint2.unsqueeze(-1) * p3).sum((0, 1))


def fit_drafter(dm: SpecBlockDraftModel, target: TargetModel, model, prompt: list[int], steps: int = 60) -> None:
    """A few full-batch steps on the target's own samples: a random drafter is almost never accepted, and a
    check where nothing is accepted cannot catch a wrong acceptance rule."""
    torch.manual_seed(0)
    with torch.inference_mode():
        seqs = model.generate(torch.tensor([prompt] * 48), do_sample=True, max_new_tokens=12, pad_token_id=0,
                              eos_token_id=None)
        logp = torch.log_softmax(model(seqs).logits.float(), -1).clone()
    feats = target_features(target, seqs)
    seqs = seqs.clone()
    valid = torch.ones(seqs.shape, dtype=torch.bool)
    dm.train()
    opt = torch.optim.Adam([p for p in dm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        loss, _ = block_loss(dm, feats, seqs, logp, valid, [1 + step % dm.config.block_size], prefix_mask=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dm.eval()


@pytest.mark.parametrize("topk,budget", [(1, None), (3, 8)], ids=["sampled-chain", "topk-tree"])
def test_sampling_is_lossless_monte_carlo(topk, budget):
    from scipy.stats import chisquare

    vocab = 12
    model = tiny_llama(vocab_size=vocab, hidden_size=32, num_layers=2, seed=7)
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)  # a peaked target, so a wrong rule shows
    prompt = [3, 5, 7, 2]
    want2, want3 = _exact_marginals(model, prompt, vocab)
    engine = make_engine(model, 4, 8, topk, budget)
    fit_drafter(engine.drafter.model, engine.target, model, prompt)
    engine.config.eos_token_ids = ()
    n = 1600
    reqs = [GenerationRequest(prompt, max_new_tokens=3, sampling=SamplingParams(temperature=1.0), seed=i, ignore_eos=True)
            for i in range(n)]
    outs = engine.run(reqs)
    got2 = torch.bincount(torch.tensor([o.output_ids[1] for o in outs]), minlength=vocab).double()
    got3 = torch.bincount(torch.tensor([o.output_ids[2] for o in outs]), minlength=vocab).double()
    assert sum(o.spec_num_correct_drafts for o in outs) > 0.2 * n  # drafts were accepted, not only rejected
    for got, want in ((got2, want2), (got3, want3)):
        keep = want * n >= 5  # chi-square needs expected counts >= 5; pool the rest
        exp = torch.cat([want[keep] * n, (want[~keep] * n).sum().view(1)])
        obs = torch.cat([got[keep], got[~keep].sum().view(1)])
        if exp[-1] < 1e-9:
            exp, obs = exp[:-1], obs[:-1]
        assert chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-4


def test_launch_serves_a_specblock_checkpoint(tiny, tmp_path):
    """``--speculative-draft-model-path`` pointing at a SpecBlock checkpoint: the launcher picks the block drafter,
    sizes its multi-layer cache, and serves it losslessly."""
    from sglang_ext.core.drafters.eagle_model import target_identity
    from sglang_ext.engine.launch import build_engine_from_parts, load_draft_model as launch_load

    target = TargetModel(tiny, feature_layers=(0, 1))
    m = random_specblock(target)
    m.config.target = target_identity("tiny", tiny.config)
    m.save(tmp_path / "sb")
    dm = launch_load(str(tmp_path / "sb"), "tiny", tiny.config)
    engine, info = build_engine_from_parts(tiny, None, "EAGLE", num_steps=9, draft_model=dm, max_running_requests=2,
                                           context_length=128, eos_token_ids=())
    assert isinstance(engine.drafter, SpecBlockDrafter) and engine.drafter.max_blocks == 3  # ceil(9 / 4)
    assert engine.drafter.cache.keys.__len__() == m.config.num_layers
    p = prompts(seed=8, count=1)[0]
    (s,) = engine.run([GenerationRequest(p, max_new_tokens=20)])
    assert s.output_ids == hf_greedy(tiny, p, 20) and s.spec_verify_ct > 0
