"""Online drafter adaptation (issue 4): capture, Algorithm 1, learners, deploy gate, hand-off, trainer process.

Tiny random-weight models only; the whole file runs in well under a minute on two cores.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_ext.core.drafters.eagle import EagleDrafter
from sglang_ext.core.drafters.eagle_model import EagleConfig, EagleDraftModel
from sglang_ext.core.learning.capture import (
    LOGP_FLOOR,
    CaptureBuffer,
    CapturedSample,
    batch_samples,
    draft_correct_for_step,
    pack_samples,
    to_training_batch,
    unpack_samples,
)
from sglang_ext.core.learning.control import SelectiveTraining, resolve
from sglang_ext.core.learning.gate import DeployGate, acceptance_score, paired_standard_error, split_eval
from sglang_ext.core.learning.handoff import (
    latest_version,
    load_version,
    prune,
    publish,
    versions,
)
from sglang_ext.core.learning.learners import (
    LEARNERS,
    Optimistic,
    hedge_weights,
    make_learner,
    mean_loss,
    weighted_ttt_loss,
)
from sglang_ext.core.learning.replay import ReplayWindow
from sglang_ext.engine.target import TargetModel
from sglang_ext.models.tiny import tiny_llama
from sglang_ext.training.drafter import TargetTeacher, ttt_loss

V, VD = 96, 80


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def target():
    return TargetModel(tiny_llama(vocab_size=V, hidden_size=64, num_layers=3, seed=5), feature_layers=(0, 2))


def progressions(n: int, seed: int, length: int = 24) -> list[list[int]]:
    """A learnable language: arithmetic progressions mod 90 (as in test_training)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        s0, stride = int(torch.randint(0, 90, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        out.append([2 + (s0 + stride * i) % 90 for i in range(length)])
    return out


def new_drafter(target: TargetModel, seed: int = 0, vocab: int | None = VD) -> EagleDraftModel:
    torch.manual_seed(seed)
    m = EagleDraftModel(EagleConfig.for_target(target.config, [0, 2], draft_vocab_size=vocab,
                                               target_identity={"name": "tiny"}))
    if vocab is not None:
        m.set_draft_vocab(torch.arange(2, 2 + vocab))
    return m.bind_target(target.embed_tokens.weight, target.lm_head.weight)


@torch.no_grad()
def target_rows(target: TargetModel, seq: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[S, F]`` and full-vocabulary logits ``[S, V]`` of one sequence (a prefill with the LM head)."""
    S = len(seq)
    out = target.forward(target.new_cache(1, S), torch.tensor([seq]), torch.ones(S, S, dtype=torch.bool).tril().unsqueeze(0),
                         torch.arange(S).unsqueeze(0), hidden_only=True)
    return out.features[0], torch.nn.functional.linear(out.hidden[0], target.lm_head.weight)


def capture(target: TargetModel, seqs: list[list[int]], topk: int = 8, dtype=torch.float32,
            chunks: tuple[int, ...] = (7, 1, 3)) -> list[CapturedSample]:
    """Feed sequences through a CaptureBuffer the way the engine would: committed rows in chunks, in order."""
    buf = CaptureBuffer(1 << 30, topk=topk, feature_dtype=dtype)
    for i, s in enumerate(seqs):
        feats, logits = target_rows(target, s)
        pos, c = 0, 0
        while pos < len(s):
            n = chunks[c % len(chunks)]
            buf.add(f"r{i}", torch.tensor(s[pos:pos + n]), feats[pos:pos + n], logits[pos:pos + n])
            pos, c = pos + n, c + 1
        buf.finish(f"r{i}", alpha=0.5)
    return buf.drain()


@pytest.fixture(scope="module")
def data(target):
    """Captured training and held-out rounds of the learnable language."""
    return capture(target, progressions(32, 1)), capture(target, progressions(8, 2))


# ---- capture ---------------------------------------------------------------------------------------------
def test_capture_alignment_matches_the_teacher(target):
    """Rows captured step by step give exactly ttt_loss's (features, tokens, logp) from one teacher forward."""
    seqs = progressions(3, 7, length=20)
    vocab = torch.arange(2, 2 + VD)
    samples = capture(target, seqs, topk=V, chunks=(5, 1, 2, 4))  # top-k = whole vocabulary: no truncation
    tokens, feats, logp, valid = batch = to_training_batch(samples, vocab)
    t_feats, t_logp = TargetTeacher(target, vocab)(torch.tensor(seqs))
    assert torch.equal(tokens, torch.tensor(seqs)) and bool(valid.all())
    torch.testing.assert_close(feats, t_feats)
    torch.testing.assert_close(logp.exp(), t_logp.exp(), atol=2e-3, rtol=0)  # float16 log-probs
    assert torch.equal(batch.target_top1, torch.stack([target_rows(target, s)[1].argmax(-1) for s in seqs]))
    model = new_drafter(target)
    with torch.no_grad():
        ref, _ = ttt_loss(model, t_feats, tokens, t_logp, valid, 3, 0.8)
        got, _ = ttt_loss(model, feats, tokens, logp, valid, 3, 0.8)
        unit = weighted_ttt_loss(model, batch, 3, 0.8)
    assert abs(float(got) - float(ref)) < 1e-2 * float(ref)
    assert abs(float(unit) - float(got)) < 1e-5  # unit weights: exactly ttt_loss


def test_topk_truncation_prefill_rows_and_osd_weights(target):
    seq = progressions(1, 3, length=12)[0]
    feats, logits = target_rows(target, seq)
    buf = CaptureBuffer(1 << 20, topk=4)
    buf.add("a", torch.tensor(seq[:5]), feats[:5])  # prefill: no distribution
    buf.add("a", torch.tensor(seq[5:8]), feats[5:8], torch.log_softmax(logits[5:8], -1),  # log-probs work too
            draft_correct_for_step(2, drafted_next=True))
    buf.add("a", torch.tensor(seq[8:]), feats[8:], logits[8:], draft_correct_for_step(3, drafted_next=False))
    (s,) = [buf.finish("a")]
    assert s.draft_correct.tolist() == [-1] * 5 + [1, 1, 0] + [1, 1, 1, -1]
    vocab = torch.arange(V)
    b = to_training_batch([s], vocab, wrong_weight=4.0)
    # prefill rows: one-hot of the committed next token; the last row has no next token, no label
    for r in range(5):
        assert float(b.logp[0, r, seq[r + 1]]) == 0.0 and int(b.target_top1[0, r]) == seq[r + 1]
    # soft rows: the top-4 mass renormalised, nothing elsewhere
    p = torch.softmax(logits[6], -1)
    top = p.topk(4)
    torch.testing.assert_close(b.logp[0, 6].exp()[top.indices], top.values / top.values.sum(), atol=2e-3, rtol=0)
    assert int((b.logp[0, 6] > LOGP_FLOOR).sum()) == 4 and int(b.target_top1[0, 6]) == int(top.indices[0])
    assert b.label_weight[0].tolist() == [1.0] * 7 + [4.0] + [1.0] * 4
    # a reduced draft vocabulary without the row's top ids: no label for it
    tiny_vocab = torch.tensor([t for t in range(V) if t not in set(logits[9].topk(4).indices.tolist())])
    assert float(to_training_batch([s], tiny_vocab).label_weight[0, 9]) == 0.0
    # packing for the trainer process round-trips
    (back,) = unpack_samples(pack_samples([s]))
    assert all(torch.equal(x, y) for x, y in zip(back._tensors(), s._tensors())) and back.rid == "a"


def _stored_bytes(buf: CaptureBuffer) -> int:
    closed = sum(s.nbytes for s in buf._closed)
    return closed + sum(c.nbytes for r in buf._open.values() for c in r.chunks)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 40), st.booleans()), min_size=1, max_size=60),
       st.integers(0, 2**16))
def test_byte_budget_is_never_exceeded_and_eviction_is_oldest_first(chunks, seed):
    F, k = 8, 4
    row = 4 + 2 * F + 4 * k + 2 * k + 1 + 1  # token int32, bf16 features, int32 ids, fp16 logp, flags
    total = sum(n for _, n, _ in chunks)
    budget = max(row, total * row // 10)  # a stream about 10x the budget
    buf = CaptureBuffer(budget, topk=k, max_sample_len=10**6)
    g = torch.Generator().manual_seed(seed)
    closed_order: list[CapturedSample] = []
    for req, n, finish in chunks:
        rid = f"r{req}"
        buf.add(rid, torch.randint(0, 50, (n,), generator=g), torch.randn(n, F, generator=g),
                torch.randn(n, 50, generator=g), torch.rand(n, generator=g) > 0.5)
        assert buf.bytes_used <= budget
        assert buf.bytes_used == _stored_bytes(buf) == buf.num_tokens * row
        if finish:
            s = buf.finish(rid)
            if s is not None:
                closed_order.append(s)
        assert buf.bytes_used <= budget and buf.bytes_used == _stored_bytes(buf)
    kept = list(buf.samples())
    newest = closed_order[len(closed_order) - len(kept):]
    assert [id(s) for s in kept] == [id(s) for s in newest]  # survivors: the newest closed samples, in order
    assert buf.evicted_tokens + buf.dropped_tokens + buf.num_tokens == total
    drained = buf.drain()
    assert [id(s) for s in drained] == [id(s) for s in kept] and buf.num_samples == 0


def test_open_runs_are_truncated_from_the_front_oldest_first():
    F, k = 4, 2
    row = 4 + 2 * F + 6 * k + 2
    buf = CaptureBuffer(20 * row, topk=k, max_sample_len=100)
    buf.add("old", torch.arange(10), torch.zeros(10, F), torch.zeros(10, 8))
    buf.add("new", torch.arange(10), torch.zeros(10, F), torch.zeros(10, 8))
    buf.add("new", torch.arange(10, 14), torch.zeros(4, F), torch.zeros(4, 8))  # 4 rows over: from "old"'s front
    assert buf.evicted_tokens == 4 and buf.bytes_used == 20 * row
    assert buf.finish("old").tokens.tolist() == list(range(4, 10))  # still contiguous
    s = CaptureBuffer(1 << 20, topk=k, max_sample_len=8)
    s.add("long", torch.arange(20), torch.zeros(20, F), torch.zeros(20, 8))
    assert s.num_samples == 2 and [x.tokens.tolist() for x in s.samples()] == [list(range(8)), list(range(8, 16))]
    assert s.finish("long").tokens.tolist() == list(range(16, 20))


# ---- Algorithm 1 --------------------------------------------------------------------------------------------
def test_algorithm1_shift_reenables_collection_and_plateau_pauses_it():
    c = SelectiveTraining(lambda_short=0.8, lambda_long=0.98, shift_epsilon=0.05, n_init=4, n_threshold=100)
    for a in (0.5, 0.7, 0.6, 0.6):  # initialisation: both EMAs = the mean of the first N_init
        assert c.observe_request(a) and c.collecting
    assert c.short == c.long == pytest.approx(0.6) and c.events[-1].kind == "init"
    assert c.observe_request(None) and c.requests == 4  # no measurement: nothing changes
    for _ in range(10):  # stationary: no shift
        c.observe_request(0.6)
    c.on_round("deploy")
    assert c.collecting  # deploying keeps collecting
    c.on_round("plateau")
    assert not c.collecting and not c.observe_request(0.6)  # paused: the request's rows are not stored
    c.on_round("neutral")
    assert not c.collecting
    # a shift: 0.6 -> 0.3; by hand: short 0.8*0.6 + 0.2*0.3 = 0.54, long 0.98*0.6 + 0.02*0.3 = 0.594 - 0.05 = 0.544
    assert c.observe_request(0.3) and c.collecting and c.events[-1].kind == "shift"
    assert c.short == pytest.approx(0.54) and c.long == pytest.approx(0.594)
    # a small dip does not trigger: 0.6 -> 0.5 moves short by 0.02 only
    d = SelectiveTraining(n_init=1, shift_epsilon=0.05)
    d.observe_request(0.6)
    d.on_round("plateau")
    assert not d.observe_request(0.5) and not d.collecting
    assert not c.ready(99) and c.ready(100)
    with pytest.raises(ValueError):
        c.on_round("maybe")
    assert SelectiveTraining.from_config({"n_init": 3, "unrelated": 1}).n_init == 3


def test_a_plateau_pause_resumes_after_resume_after_requests_or_on_a_rise_when_asked():
    c = SelectiveTraining(n_init=1, resume_after=5)
    c.observe_request(0.6)
    c.on_round("plateau")  # paused at request 1
    assert [c.observe_request(0.6) for _ in range(4)] == [False] * 4  # requests 2..5
    assert c.observe_request(0.6) and c.events[-1].kind == "resume"  # request 6: 5 requests after the pause
    tide = SelectiveTraining(n_init=1, resume_after=0)  # as published: only a drop resumes
    tide.observe_request(0.6)
    tide.on_round("plateau")
    assert not any(tide.observe_request(0.6) for _ in range(1000))
    # a rise: 0.6 -> 0.9 moves short by 0.06 > 0.05 in one request; TIDE's rule ignores it, "either" resumes
    for direction, resumes in (("drop", False), ("either", True)):
        d = SelectiveTraining(n_init=1, shift_epsilon=0.05, shift_direction=direction, resume_after=0)
        d.observe_request(0.6)
        d.on_round("plateau")
        assert d.observe_request(0.9) is resumes and (d.events[-1].kind == "shift") is resumes
    with pytest.raises(ValueError, match="shift_direction"):
        SelectiveTraining.from_config({"shift_direction": "up"})


# ---- learners -----------------------------------------------------------------------------------------------
LRS = {"sgd": 0.5, "adam": 3e-3, "momentum": 0.1, "optimistic": 0.3, "hedge": 2e-3}


@pytest.mark.parametrize("name", LEARNERS)
def test_each_learner_lowers_the_loss_over_rounds(target, data, name):
    train, _ = data
    model = new_drafter(target)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = batch_samples(train, 24 * 8, model.draft_vocab)
    learner = make_learner(learner=name, lr=LRS[name], epochs=2, grad_clip=1.0)
    losses = [mean_loss(model, batches)]
    m = model
    for _ in range(3):
        new, stats = learner.round(m, batches)
        assert new is not m and new.embed_weight is m.embed_weight  # fresh model, frozen target parts shared
        learner.commit()
        m = new
        losses.append(mean_loss(m, batches))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the deployed model is untouched
    assert losses[-1] < losses[0] - 0.4 and losses[1] < losses[0], losses
    assert stats.tokens == sum(b.num_tokens for b in batches) and stats.loss_last_epoch < stats.loss_first_epoch + 1e-3


def test_optimistic_update_matches_the_formula_on_a_quadratic():
    r"""f_t(w) = a_t/2 (w - c_t)^2; ŵ_{t+1} = ŵ_t - η g_t, w_{t+1} = ŵ_{t+1} - η g_t, g_t = f_t'(w_t)."""
    eta = 0.1
    rule = Optimistic(eta)
    w = torch.tensor([1.0], requires_grad=True)
    # by hand for a=1, c=0: g0 = 1, ŵ1 = 0.9, w1 = 0.8; g1 = 0.8, ŵ2 = 0.82, w2 = 0.74
    expected_first = [0.8, 0.74]
    w_hat, w_ref = 1.0, 1.0
    for t, (a, c) in enumerate([(1.0, 0.0), (1.0, 0.0), (2.0, 0.5), (0.5, -1.0), (3.0, 0.2)]):
        loss = 0.5 * a * (w - c) ** 2
        (g,) = torch.autograd.grad(loss, [w])
        rule.step({"w": w.data}, {"w": g})
        g_ref = a * (w_ref - c)
        w_hat -= eta * g_ref
        w_ref = w_hat - eta * g_ref
        assert float(w.detach()) == pytest.approx(w_ref, abs=1e-6)
        assert float(rule.state["w"]["w_hat"]) == pytest.approx(w_hat, abs=1e-6)
        assert float(rule.state["w"]["h"]) == pytest.approx(g_ref, abs=1e-6)
        if t < 2:
            assert float(w.detach()) == pytest.approx(expected_first[t], abs=1e-6)


def test_persistent_state_follows_the_deployed_model(target, data):
    """Momentum/optimistic state carries across committed rounds and is undone by a rollback."""
    train, _ = data
    model = new_drafter(target)
    batches = batch_samples(train[:8], 24 * 8, model.draft_vocab)
    learner = make_learner(learner="optimistic", lr=0.1, epochs=1)
    m1, s1 = learner.round(model, batches)
    learner.commit()
    snapshot = {k: v["w_hat"].clone() for k, v in learner.rule.state.items()}
    _, s2 = learner.round(m1, batches)
    assert s2.extra["continued"] and not s1.extra["continued"]
    learner.rollback()  # the gate refused round 2: state is back to after round 1
    assert all(torch.equal(snapshot[k], v["w_hat"]) for k, v in learner.rule.state.items())
    _, s3 = learner.round(m1, batches)
    assert s3.extra["continued"]
    _, s4 = make_learner(learner="optimistic", lr=0.1, epochs=1).round(model, batches)
    assert not s4.extra["continued"]


def test_hedge_weights_match_hand_computation(target, data):
    # the two rules on fixed numbers
    e = [math.exp(-1.0 * x) for x in (1.0, 2.0, 3.0)]
    assert hedge_weights("cumulative", [1.0, 2.0, 3.0], eta=1.0) == pytest.approx([x / sum(e) for x in e])
    e = [math.exp(-x / 0.5) for x in (0.3, 0.1, 0.2)]
    assert hedge_weights("last-chunk", [0.3, 0.1, 0.2], tau=0.5) == pytest.approx([x / sum(e) for x in e])
    assert hedge_weights("cumulative", [1000.0, 1001.0, 1e6], eta=10.0)[0] == pytest.approx(1.0, abs=1e-4)  # stable
    train, _ = data
    model = new_drafter(target)
    batches = batch_samples(train[:12], 24 * 8, model.draft_vocab)
    for rule in ("cumulative", "last-chunk"):
        learner = make_learner(learner="hedge", lr=2e-3, epochs=1, hedge_rule=rule, hedge_eta=2.0, hedge_tau=0.05)
        assert learner.lrs == pytest.approx([1e-3, 2e-3, 4e-3])
        m, pre_sum = model, [0.0, 0.0, 0.0]
        for _ in range(2):
            m, stats = learner.round(m, batches)
            learner.commit()
            x = stats.extra
            if rule == "cumulative":  # p_i ∝ exp(-eta * sum of pre-training losses)
                pre_sum = [a + b for a, b in zip(pre_sum, x["expert_pre_losses"])]
                assert x["cum_losses"] == pytest.approx(pre_sum)
                ex = [math.exp(-2.0 * (L - min(pre_sum))) for L in pre_sum]
            else:  # p = softmax(-last training loss / tau)
                fl = x["expert_final_losses"]
                ex = [math.exp(-(L - min(fl)) / 0.05) for L in fl]
            assert x["weights"] == pytest.approx([v / sum(ex) for v in ex])
            merged = {n: sum(p * e[n] for p, e in zip(x["weights"], learner.experts)) for n in learner.experts[0]}
            got = dict(m.named_parameters())
            assert all(torch.allclose(got[n], merged[n], atol=1e-6) for n in merged)
        assert not torch.equal(learner.experts[0]["fc.weight"], learner.experts[2]["fc.weight"])  # LRs differ


# ---- deploy gate --------------------------------------------------------------------------------------------
def _poison(samples: list[CapturedSample], seed: int) -> list[CapturedSample]:
    """Shuffle the target labels across all positions of the round (features and tokens unchanged)."""
    ids = torch.cat([s.topk_ids for s in samples])
    lp = torch.cat([s.topk_logp for s in samples])
    perm = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for s in samples:
        n = len(s)
        sel = perm[start:start + n]
        out.append(CapturedSample(s.rid, s.tokens, s.features, ids[sel], lp[sel], s.has_dist, s.draft_correct))
        start += n
    return out


def test_gate_accepts_a_trained_round_and_rejects_a_poisoned_one(target, data):
    train, held = data
    vocab = torch.arange(2, 2 + VD)
    eval_batches = batch_samples(held, 24 * 8, vocab)
    gate = DeployGate(gate_margin=0.02, gate_z=1.0, gate_steps=3)
    start = new_drafter(target)
    learner = make_learner(learner="adam", lr=3e-3, epochs=3)
    trained, _ = learner.round(start, batch_samples(train, 24 * 8, vocab))
    good = gate.decide(start, trained, eval_batches)
    assert good.deploy and good.outcome == "deploy" and good.candidate_score > good.current_score + 0.05, good
    poisoned, _ = make_learner(learner="adam", lr=3e-3, epochs=3).round(
        trained, batch_samples(_poison(train, 0), 24 * 8, vocab))
    bad = gate.decide(trained, poisoned, eval_batches)
    assert not bad.deploy and bad.outcome == "plateau" and bad.candidate_score < bad.current_score, bad
    same = gate.decide(trained, trained, eval_batches)
    assert not same.deploy and same.outcome == "neutral"
    score = acceptance_score(trained, eval_batches, steps=3)
    assert 0 <= score.accept_len <= 3 and score.chains == sum(len(s) - 3 for s in held)
    tr, ev = split_eval(train, 0.25, seed=1)
    assert len(ev) == 8 and len(tr) == 24 and not set(map(id, tr)) & set(map(id, ev))


def test_gate_scores_only_chains_over_generated_rows_and_prefill_rows_weigh_less(target):
    """Prompt (prefill) rows are never drafted in serving: the gate scores no chain whose target rows are prompt text,
    and training weighs them by ``prefill_weight``."""
    vocab = torch.arange(2, 2 + VD)
    seqs = progressions(2, 5, length=20)
    buf = CaptureBuffer(1 << 30, topk=8)
    for i, s in enumerate(seqs):
        feats, logits = target_rows(target, s)
        buf.add(f"p{i}", torch.tensor(s[:12]), feats[:12])  # prefill: no distribution
        buf.add(f"p{i}", torch.tensor(s[12:]), feats[12:], logits[12:])  # decode rows
        buf.finish(f"p{i}", alpha=0.5)
    samples = buf.drain()
    batch = to_training_batch(samples, vocab, prefill_weight=0.25)
    assert batch.generated[:, :12].sum() == 0 and bool(batch.generated[:, 12:].all())
    w = batch.label_weight
    assert torch.all(w[:, :11][w[:, :11] > 0] == 0.25) and torch.all(w[:, 12:-1] == 1.0)
    score = acceptance_score(new_drafter(target), [batch], steps=3)
    # target rows 12..19 are generated; chain c has target rows c+1..c+3, so c = 11..16: 6 chains per sequence
    assert score.chains == 2 * 6


# ---- hand-off -----------------------------------------------------------------------------------------------
def test_handoff_is_atomic_under_a_concurrent_reader(target, tmp_path):
    model = new_drafter(target)
    d = tmp_path / "handoff"
    assert latest_version(d) is None
    stop, seen, errors = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            v = latest_version(d)
            if v is None:
                continue
            try:
                m = load_version(d, v, expect_target={"name": "tiny"})
                fills = {float(p.detach().flatten()[0]) for p in m.parameters()}
                if fills != {float(v)} or any(not torch.all(p == v) for p in m.parameters()):
                    errors.append(f"version {v} read partially: {sorted(fills)[:3]}")
                seen.add(v)
            except Exception as e:  # noqa: BLE001  (a half-written version would land here)
                errors.append(f"version {v}: {type(e).__name__}: {e}")

    th = threading.Thread(target=reader)
    th.start()
    try:
        for v in range(1, 13):
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float(v))
            assert publish(model, d, extra={"v": v}) == v
    finally:
        stop.set()
        th.join()
    assert not errors, errors[:3]
    assert seen and latest_version(d) == 12 and versions(d) == list(range(1, 13))
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temp left behind
    assert prune(d, keep=3) == list(range(1, 10)) and versions(d) == [10, 11, 12]
    with pytest.raises(ValueError, match="trained for target"):
        load_version(d, 12, expect_target={"name": "other"})


# ---- trainer process + serving facade -----------------------------------------------------------------------
def _wait(cond, timeout: float, poll) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        poll()
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_trainer_process_deploys_survives_a_kill_and_the_server_swaps(target, tmp_path):
    from sglang_ext.online import OnlineLearning

    model = new_drafter(target)
    seqs = progressions(60, 11)
    rows = [target_rows(target, s) for s in seqs]
    config = {"n_init": 2, "n_threshold": 8 * 24, "learner": "adam", "lr": 3e-3, "epochs": 2, "batch_tokens": 24 * 8,
              "gate_margin": -10.0, "gate_z": 0.0, "eval_fraction": 0.25, "capture_topk": 8, "trainer_threads": 1}
    online = OnlineLearning(model, target.embed_tokens.weight, target.lm_head.weight, tmp_path / "h", config,
                            expect_target={"name": "tiny"}, round_delay_s=0.5).start()
    drafter = EagleDrafter(model, num_slots=1, max_len=64)
    fed = iter(range(len(seqs)))

    def serve_until_round():  # the engine's calls: capture committed rows per step, finish per request
        while not online.trainer.in_flight:
            i = next(fed)
            feats, logits = rows[i]
            online.capture(f"q{i}", torch.tensor(seqs[i][:10]), feats[:10])  # prefill
            online.capture(f"q{i}", torch.tensor(seqs[i][10:]), feats[10:], logits[10:],
                           draft_correct_for_step(13, drafted_next=True))
            online.finish_request(f"q{i}", 0.5)

    swapped: list[EagleDraftModel] = []

    def poll():
        m = online.poll()
        if m is not None:
            drafter.swap_model(m)
            swapped.append(m)

    try:
        assert latest_version(tmp_path / "h") == 1  # the serving drafter, published at start
        serve_until_round()
        _wait(lambda: len(swapped) == 1 and online.trainer.stats["rounds"] == 1, 60, poll)
        st = online.status()
        assert st["deployed"] == 1 and st["version"] == 2 and drafter.version == 1 and st["alive"]
        assert swapped[0].embed_weight is not None and swapped[0].fc.weight.dtype == model.fc.weight.dtype
        # the trainer lowered its own priority (default trainer_nice 10): serving goes first on shared cores
        assert os.getpriority(os.PRIO_PROCESS, online.trainer.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
        # idle after a round (the child checks on the server every PARENT_CHECK_S): the same child is still there
        from sglang_ext.online.trainer import PARENT_CHECK_S

        pid = online.trainer.pid
        time.sleep(2.5 * PARENT_CHECK_S)
        poll()
        assert online.trainer.pid == pid and online.trainer.stats["restarts"] == 0 and online.status()["alive"]
        # kill the child mid-round: detected on poll, restarted, the round dropped, v2 still served
        serve_until_round()
        _wait(lambda: online.trainer.stats["last_started"] == 2, 30, poll)
        os.kill(online.trainer.pid, signal.SIGKILL)
        _wait(lambda: online.trainer.stats["restarts"] == 1, 30, poll)
        st = online.status()
        assert st["dropped_rounds"] == 1 and "code -9" in st["last_error"] and st["in_flight"] == 0
        assert latest_version(tmp_path / "h") == 2 and len(swapped) == 1
        # a later round still deploys through the new child
        serve_until_round()
        _wait(lambda: len(swapped) == 2 and online.trainer.stats["rounds"] == 2, 60, poll)
        st = online.status()
        assert st["version"] == 3 and st["deployed"] == 2 and st["restarts"] == 1 and st["trainer_cpu_seconds"] > 0
        assert st["capture_bytes_used"] <= online.buffer.byte_budget and st["collecting"]
    finally:
        online.stop()
    assert not online.status()["alive"]


def test_paused_collection_captures_nothing_and_rounds_wait_for_the_threshold(target, tmp_path):
    from sglang_ext.online import OnlineLearning

    online = OnlineLearning(new_drafter(target), target.embed_tokens.weight, target.lm_head.weight, tmp_path / "h",
                            {"n_init": 1, "n_threshold": 1000})  # not started: no process, the serving side only
    feats, logits = target_rows(target, progressions(1, 0)[0])
    online.capture("a", torch.arange(5), feats[:5], logits[:5])
    online.finish_request("a", 0.5)
    assert online.buffer.num_samples == 1 and not online.trainer.in_flight  # below N_threshold: no round
    online.control.on_round("plateau")
    online.capture("b", torch.arange(5), feats[:5], logits[:5])
    online.finish_request("b", 0.5)
    assert online.buffer.num_tokens == 5 and online.buffer.num_samples == 1 and not online.collecting
    assert online.status()["capture_tokens"] == 5 and online.status()["rounds"] == 0


# ---- the same machinery with the SpecBlock drafter --------------------------------------------------------------------
def new_block_drafter(target: TargetModel, seed: int = 0):
    from sglang_ext.core.drafters.specblock_model import SpecBlockConfig, SpecBlockDraftModel

    torch.manual_seed(seed)
    m = SpecBlockDraftModel(SpecBlockConfig.for_target(target.config, [0, 2], draft_vocab_size=VD,
                                                       target_identity={"name": "tiny"}, block_size=3))
    m.set_draft_vocab(torch.arange(2, 2 + VD))
    return m.bind_target(target.embed_tokens.weight, target.lm_head.weight)


@pytest.mark.parametrize("update", ["full", "head"])
def test_learners_gate_and_handoff_take_the_block_drafter(target, data, tmp_path, update):
    """A round trains a SpecBlock drafter (all weights, or only the rank head + last layer: the update bandit's
    head-only arm), the gate scores its serving chain, and the hand-off publishes and reloads it."""
    from sglang_ext.core.drafters.specblock_model import SpecBlockDraftModel
    from sglang_ext.core.learning.learners import head_names, trainable_names

    train, held = data
    start = new_block_drafter(target)
    vocab = start.draft_vocab
    batches = batch_samples(train, 24 * 8, vocab)
    learner = make_learner(learner="adam", lr=1e-2, epochs=8, ttt_steps=6, update=update)
    trained, stats = learner.round(start, batches)
    # (its valid-prefix-masked loss can rise as more rows enter the chain: the gate score below is the judge)
    assert isinstance(trained, SpecBlockDraftModel) and stats.tokens > 0
    changed = {k for k, v in trained.state_dict().items() if not torch.equal(v, start.state_dict()[k])}
    if update == "head":
        heads = head_names(start)
        assert changed and all(any(k.startswith(h) for h in heads) for k in changed), changed
        assert set(trainable_names(start, "head")) < set(trainable_names(start))
    else:
        assert any(k.startswith("fc") for k in changed) and any(k.startswith("layers.0") for k in changed)
    eval_batches = batch_samples(held, 24 * 8, vocab)
    gate = DeployGate(gate_margin=0.02, gate_z=1.0, gate_steps=6)
    decision = gate.decide(start, trained, eval_batches)
    assert decision.candidate_score > decision.current_score and decision.chains == sum(len(s) - 6 for s in held)
    if update == "full":
        assert decision.deploy
    v = publish(trained, tmp_path / "handoff")
    back = load_version(tmp_path / "handoff", v, expect_target={"name": "tiny"})
    assert isinstance(back, SpecBlockDraftModel)
    for k, t in trained.state_dict().items():
        assert torch.equal(back.state_dict()[k], t)


# ---- replay window, sample weights, clustered gate ------------------------------------------------------------
def test_sample_weights_scale_every_row_of_their_sample(target, data):
    train, _ = data
    vocab = torch.arange(2, 2 + VD)
    plain = to_training_batch(train[:3], vocab)
    weighted = to_training_batch(train[:3], vocab, sample_weights=[1.0, 0.5, 0.0])
    assert torch.equal(weighted.label_weight[0], plain.label_weight[0])
    assert torch.allclose(weighted.label_weight[1], 0.5 * plain.label_weight[1])
    assert not weighted.label_weight[2].any()
    with pytest.raises(ValueError, match="2 sample weights for 3 samples"):
        to_training_batch(train[:3], vocab, sample_weights=[1.0, 1.0])


def test_replay_window_weights_by_age_and_drops_the_oldest(data):
    train, _ = data
    sizes = [len(s) for s in train]
    w = ReplayWindow(max_tokens=sum(sizes[:5]), decay=0.5)
    assert w.training_set(train[:2]) == (list(train[:2]), [1.0, 1.0])  # empty window: the round only
    w.add(train[:2])
    w.add(train[2:4])
    samples, weights = w.training_set(train[4:5])
    assert samples == [*train[:4], train[4]] and weights == [0.25, 0.25, 0.5, 0.5, 1.0]
    w.add(train[4:8])  # over budget: the oldest samples leave first
    assert w.tokens <= sum(sizes[:5]) and len(w) < 8
    kept, _ = w.training_set([])
    assert kept == train[8 - len(kept):8]
    assert ReplayWindow.from_config({"replay_tokens": 0}) is None
    with pytest.raises(ValueError, match="replay_decay"):
        ReplayWindow(10, 1.5)


def test_train_round_with_replay_trains_on_past_rounds_and_gates_on_fresh_rows(target, data):
    from sglang_ext.online import ONLINE_PARAMS
    from sglang_ext.online.trainer import train_round

    train, _ = data
    config = resolve(ONLINE_PARAMS, {"learner": "adam", "lr": 3e-3, "epochs": 2, "batch_tokens": 24 * 8,
                                     "replay_tokens": 10_000, "replay_decay": 0.7}, "test")
    window = ReplayWindow.from_config(config)
    learner, gate = make_learner(config), DeployGate(config)
    model = new_drafter(target)
    first = second = None
    for i, chunk in enumerate((train[:16], train[16:])):
        candidate, stats, result = train_round(model, chunk, learner, gate, config, round_index=i, replay=window)
        if result.deploy:
            model = candidate
        first, second = (stats, second) if i == 0 else (first, stats)
    assert second.tokens > first.tokens  # round 2 trained on round 1's training rows as well
    assert second.extra["replay_tokens"] == window.tokens and len(window) == len(train) - 2 * round(16 * 0.2)


def test_clustered_standard_error_is_larger_for_correlated_chains():
    torch.manual_seed(0)
    per_request = torch.randn(12)
    d = per_request.repeat_interleave(10) + 0.01 * torch.randn(120)  # 10 nearly identical chains per request
    groups = torch.arange(12).repeat_interleave(10)
    plain, clustered = paired_standard_error(d), paired_standard_error(d, groups)
    assert clustered > 2.5 * plain  # ~sqrt(10) x: the independent estimate is far too small
    independent = torch.randn(120)
    ratio = paired_standard_error(independent, torch.arange(120)) / paired_standard_error(independent)
    assert 0.9 < ratio < 1.1  # one chain per group: the two estimates agree
    assert paired_standard_error(d, torch.zeros(120, dtype=torch.long)) == float("inf")


def test_gate_with_request_clustered_se_still_deploys_a_real_gain(target, data):
    train, _ = data
    held = capture(target, progressions(32, 3))
    vocab = torch.arange(2, 2 + VD)
    eval_batches = batch_samples(held, 24 * 8, vocab)
    start = new_drafter(target)
    trained, _ = make_learner(learner="adam", lr=3e-3, epochs=3).round(start, batch_samples(train, 24 * 8, vocab))
    chain = DeployGate(gate_margin=0.0, gate_z=1.645, gate_se="chain").decide(start, trained, eval_batches)
    request = DeployGate(gate_margin=0.0, gate_z=1.645, gate_se="request").decide(start, trained, eval_batches)
    assert request.deploy and request.delta_se > chain.delta_se, (request, chain)
    assert acceptance_score(trained, eval_batches).groups.unique().numel() == len(held)
