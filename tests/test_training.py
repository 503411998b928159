"""Drafter training: the unrolled training graph is the serving graph, loss falls, checkpoints are guarded."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from sglang_ext.core.drafters.eagle import EagleDrafter
from sglang_ext.core.drafters.eagle_model import EagleDraftModel
from sglang_ext.engine.target import TargetModel
from sglang_ext.models.tiny import tiny_llama
from sglang_ext.core.drafters.eagle_ttt import ttt_forward
from sglang_ext.training.drafter import DrafterTrainer, TargetTeacher, TrainConfig, draft_vocabulary
from test_online_learning import progressions  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def target():
    return TargetModel(tiny_llama(vocab_size=96, hidden_size=64, num_layers=3, seed=5), feature_layers=(0, 2))


def test_training_time_test_matches_serving(target):
    """Step j of the unrolled training forward equals depth j of the serving drafter (drafted = true tokens)."""
    trainer = DrafterTrainer(target, "tiny", TrainConfig(feature_layers=[0, 2], draft_vocab_size=None), "/tmp/unused")
    model = trainer.new_model(torch.arange(96)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, 96, (1, 20), generator=g)
    teacher = TargetTeacher(target, model.draft_vocab)
    feats, _ = teacher(x)
    with torch.no_grad():
        outs = ttt_forward(model, feats, x, steps=3)
    r = 11  # root position
    drafter = EagleDrafter(model, num_slots=1, max_len=64)
    drafter.admit(0)
    drafter.observe(0, feats[0, :r], x[0, 1:r + 1].tolist())
    with torch.no_grad():
        a = drafter._absorb_pending(0, 1)
        torch.testing.assert_close(model.logits(a)[0], outs[0][0, r - 1], rtol=1e-4, atol=1e-4)
        for depth in (1, 2):  # feed the true next tokens as if they had been drafted
            tok = x[:, r + depth].view(1, 1)
            vis = torch.ones(1, 1, depth, dtype=torch.bool)
            a = drafter._step(0, tok, a.view(1, 1, -1), vis, depth - 1, depth).squeeze(1)
            torch.testing.assert_close(model.logits(a)[0], outs[depth][0, r - 1 + depth], rtol=1e-4, atol=1e-4)


def test_training_lowers_loss_saves_and_resumes(target, tmp_path):
    g = torch.Generator().manual_seed(1)
    # a learnable language: arithmetic progressions mod 90
    seqs = []
    for _ in range(64):
        start, stride = int(torch.randint(0, 90, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        seqs.append([2 + (start + stride * i) % 90 for i in range(24)])
    cfg = TrainConfig(feature_layers=[0, 2], draft_vocab_size=80, ttt_steps=2, batch_tokens=24 * 8, lr=3e-3,
                      warmup_steps=2, epochs=6, checkpoint_every=10)
    report = DrafterTrainer(target, "tiny", cfg, tmp_path / "d").train(seqs, heldout=seqs[:8], progress=False, log=lambda *_: None)
    hist = __import__("json").loads((tmp_path / "d" / "history.json").read_text())
    assert hist[-1]["kl"][0] < 0.5 * hist[0]["kl"][0], (hist[0]["kl"], hist[-1]["kl"], report)
    assert report["heldout"]["top1"][0] > 0.1  # chance is 1/80
    model = EagleDraftModel.load(tmp_path / "d", expect_target={"name": "tiny"})
    assert model.config.draft_vocab_size == 80 and model.draft_vocab.numel() == 80
    with pytest.raises(ValueError, match="trained for target name='tiny'"):
        EagleDraftModel.load(tmp_path / "d", expect_target={"name": "smollm2-135m"})


def test_resume_is_deterministic(target, tmp_path):
    seqs = [[2 + (i * 7 + j) % 90 for j in range(16)] for i in range(40)]
    cfg = TrainConfig(feature_layers=[0, 2], draft_vocab_size=None, ttt_steps=2, batch_tokens=16 * 4, epochs=2,
                      checkpoint_every=5, warmup_steps=1)
    DrafterTrainer(target, "tiny", cfg, tmp_path / "full").train(seqs, progress=False)
    # interrupted run: stop after the first checkpoint by training on a plan that raises
    t = DrafterTrainer(target, "tiny", cfg, tmp_path / "part")
    calls = {"n": 0}
    real = t.target.forward

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(*a, **k)

    t.target.forward = flaky
    with pytest.raises(KeyboardInterrupt):
        t.train(seqs, progress=False)
    t.target.forward = real
    assert (tmp_path / "part" / "trainer_state" / "state.pt").is_file()
    DrafterTrainer(target, "tiny", cfg, tmp_path / "part").train(seqs, progress=False, log=lambda *_: None)
    a = EagleDraftModel.load(tmp_path / "full").state_dict()
    b = EagleDraftModel.load(tmp_path / "part").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_draft_vocabulary_keeps_frequent_and_forced_ids():
    v = draft_vocabulary([[5, 5, 5, 6, 6, 7]], size=3, vocab_size=50, always=[1])
    assert v.tolist() == [1, 5, 6]


def test_split_catch_up_matches_the_padded_absorb(target):
    """Backlogs of 40, 5 and 25 pairs: the split catch-up (40 and 25 alone, then one batched absorb) gives the same
    root states and drafts as padding all three to 40, commits the same cache lengths, and times the catch-up."""
    trainer = DrafterTrainer(target, "tiny", TrainConfig(feature_layers=[0, 2], draft_vocab_size=None), "/tmp/unused")
    model = trainer.new_model(torch.arange(96)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(2, 96, (1, 60), generator=g)
    feats, _ = TargetTeacher(target, model.draft_vocab)(x)
    backlogs = (40, 5, 25)
    roots = []
    for split in (1000, None):  # 1000: never split (the padded absorb); None: the class default
        drafter = EagleDrafter(model, num_slots=3, max_len=128)
        if split is not None:
            drafter.catch_up_split = split
        for slot, n in enumerate(backlogs):
            drafter.admit(slot)
            drafter.observe(slot, feats[0, :n], x[0, 1:n + 1].tolist())
        with torch.no_grad():
            roots.append(drafter._absorb_pending(0, 3))
        assert drafter.cache.lengths[:3].tolist() == list(backlogs)
        if split is None:
            assert drafter.catch_up_split < 25 and drafter.last_catch_up_seconds > 0
        else:
            assert drafter.last_catch_up_seconds < 1e-3  # nothing split: only the check
    torch.testing.assert_close(roots[0], roots[1], rtol=1e-5, atol=1e-5)


def test_the_core_imports_nothing_from_training_or_the_engine():
    """One home per idea: the online learners and the gate reuse the core's training-time-test forward; the core
    never reaches back into the offline trainer (or the engine) for it."""
    core = Path(__file__).resolve().parents[1] / "sglang_ext" / "core"
    for path in [*(core / "learning").glob("*.py"), core / "drafters" / "eagle_ttt.py"]:
        tree = ast.parse(path.read_text())
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        bad = {m for m in mods if m.startswith(("sglang_ext.training", "sglang_ext.engine"))}
        assert not bad, f"{path.name} imports {sorted(bad)}"


# ---- both architectures from one feature cache ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def progression_cache(target, tmp_path_factory):
    from sglang_ext.training.feature_cache import FeatureCache

    return FeatureCache.build(target, progressions(64, 1), tmp_path_factory.mktemp("fc") / "cache", target_name="tiny",
                              batch_tokens=24 * 8, progress=False, log=lambda *_: None)


def test_specblock_trains_from_the_feature_cache(target, progression_cache, tmp_path):
    """The block drafter learns a learnable language from cached features alone (the target never runs in training),
    and its checkpoint loads through the one dispatcher."""
    from sglang_ext.core.drafters.checkpoint import load_draft_model
    from sglang_ext.core.drafters.specblock_model import SpecBlockDraftModel

    cfg = TrainConfig(feature_layers=[0, 2], draft_vocab_size=80, batch_tokens=24 * 8, lr=3e-3, warmup_steps=2,
                      epochs=8, arch="specblock", ttt_blocks=2, rank_start=0.3, eval_depth=6)
    t = DrafterTrainer(target, "tiny", cfg, tmp_path / "sb")
    real = t.target.forward
    t.target.forward = None  # any target forward during training would fail
    try:
        report = t.train([], progress=False, log=lambda *_: None, cache=progression_cache)
    finally:
        t.target.forward = real
    hist = __import__("json").loads((tmp_path / "sb" / "history.json").read_text())
    assert hist[-1]["accept_len"] > hist[0]["accept_len"] + 0.2, (hist[0], hist[-1])
    assert report["arch"] == "specblock" and report["feature_cache"]
    heldout = DrafterTrainer(target, "tiny", cfg, tmp_path / "unused")
    from sglang_ext.training.drafter import evaluate

    model = load_draft_model(tmp_path / "sb", expect_target={"name": "tiny"})
    assert isinstance(model, SpecBlockDraftModel) and model.config.draft_vocab_size == 80
    model.bind_target(target.embed_tokens.weight, target.lm_head.weight)
    ev = evaluate(model, TargetTeacher(target, model.draft_vocab), progressions(8, 9), cfg, torch.device("cpu"),
                  trainer=heldout)
    assert ev["accept_len"] > 0.1 and len(ev["top1"]) == 6 and 0.0 <= ev["rank_acc"] <= 1.0


def test_eagle_from_the_cache_matches_eagle_from_the_target(target, progression_cache, tmp_path):
    """The cache only saves target forwards: training from it follows the live run (float16 storage aside)."""
    cfg = TrainConfig(feature_layers=[0, 2], draft_vocab_size=80, ttt_steps=2, batch_tokens=24 * 8, lr=3e-3,
                      warmup_steps=2, epochs=2)
    DrafterTrainer(target, "tiny", cfg, tmp_path / "live").train(progressions(64, 1), progress=False, log=lambda *_: None)
    DrafterTrainer(target, "tiny", cfg, tmp_path / "cached").train([], progress=False, log=lambda *_: None,
                                                                   cache=progression_cache)
    import json

    live = json.loads((tmp_path / "live" / "history.json").read_text())
    cached = json.loads((tmp_path / "cached" / "history.json").read_text())
    assert len(live) == len(cached)
    assert abs(live[-1]["loss"] - cached[-1]["loss"]) < 0.05 * live[-1]["loss"]


def test_max_steps_cuts_the_plan_and_its_schedule(target, progression_cache, tmp_path):
    """--max-steps: equal work for comparisons, whatever the machine's speed; the LR schedule ends at the cut."""
    import json

    cfg = TrainConfig(feature_layers=[0, 2], draft_vocab_size=None, batch_tokens=24 * 4, epochs=2, warmup_steps=1,
                      max_steps=3)
    report = DrafterTrainer(target, "tiny", cfg, tmp_path / "cut").train([], progress=False, log=lambda *_: None,
                                                                          cache=progression_cache)
    assert report["train_steps"] == 3 and report["planned_steps"] > 3
    assert len(json.loads((tmp_path / "cut" / "history.json").read_text())) == 3


def test_specblock_resume_is_deterministic(target, progression_cache, tmp_path):
    cfg = TrainConfig(feature_layers=[0, 2], draft_vocab_size=None, batch_tokens=24 * 4, epochs=1, checkpoint_every=4,
                      warmup_steps=1, arch="specblock", block_size=3)
    DrafterTrainer(target, "tiny", cfg, tmp_path / "full").train([], progress=False, cache=progression_cache)
    calls = {"n": 0}
    real = type(progression_cache).batch

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    type(progression_cache).batch = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            DrafterTrainer(target, "tiny", cfg, tmp_path / "part").train([], progress=False, cache=progression_cache)
    finally:
        type(progression_cache).batch = real
    assert (tmp_path / "part" / "trainer_state" / "state.pt").is_file()
    DrafterTrainer(target, "tiny", cfg, tmp_path / "part").train([], progress=False, log=lambda *_: None,
                                                                 cache=progression_cache)
    from sglang_ext.core.drafters.checkpoint import load_draft_model

    a = load_draft_model(tmp_path / "full").state_dict()
    b = load_draft_model(tmp_path / "part").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
