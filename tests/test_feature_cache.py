"""Feature cache: what it serves equals what the target computes, it is bounded, resumable and refuses mismatches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sglang_ext.engine.target import TargetModel
from sglang_ext.models.tiny import tiny_llama
from sglang_ext.training.drafter import TargetTeacher, draft_vocabulary, pad_batch
from sglang_ext.training.feature_cache import FeatureCache, FeatureCacheError

QUIET = {"progress": False, "log": lambda *_: None}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target():
    return TargetModel(tiny_llama(vocab_size=96, hidden_size=64, num_layers=3, seed=5), feature_layers=(0, 2))


@pytest.fixture(scope="module")
def seqs():
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(3, 40, (24,), generator=g).tolist()
    return [torch.randint(2, 96, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def built(target, seqs, tmp_path_factory):
    return FeatureCache.build(target, seqs, tmp_path_factory.mktemp("fc") / "cache", target_name="tiny",
                              batch_tokens=128, **QUIET)


def count_forwards(monkeypatch, target, fail_after: int | None = None) -> list[int]:
    calls = [0]
    real = TargetModel.forward

    def forward(*args, **kwargs):
        if fail_after is not None and calls[0] >= fail_after:
            raise KeyboardInterrupt("simulated interruption")
        calls[0] += 1
        return real(target, *args, **kwargs)

    monkeypatch.setattr(target, "forward", forward)
    return calls


def all_arrays(cache: FeatureCache) -> list[np.ndarray]:
    return [np.asarray(cache._rows(i, a)) for i in range(len(cache)) for a in range(3)]


def test_batch_matches_teacher(target, seqs, built):
    assert len(built) == len(seqs) and built.lengths == [len(s) for s in seqs]
    assert all(built.sequence(i) == s for i, s in enumerate(seqs))
    meta = built.meta
    assert meta["feature_layers"] == [0, 2] and meta["feature_dim"] == 128 and meta["hidden_size"] == 64
    assert meta["target"]["name"] == "tiny" and meta["dropped_sequences"] == 0 and len(meta["shards"]) > 2

    vocab = draft_vocabulary(seqs, 48, 96, always=[1])
    teacher = TargetTeacher(target, vocab)
    idx = [5, 0, 17, 9, 23]  # mixed lengths, drawn from different shards
    tokens, valid = pad_batch([seqs[i] for i in idx])
    feats_ref, logp_ref = teacher(tokens)
    toks, val, feats, logp = built.batch(idx, teacher.lm_rows)
    assert torch.equal(toks, tokens) and torch.equal(val, valid)
    assert feats.dtype == logp.dtype == torch.float32 and logp.shape == logp_ref.shape
    scale = feats_ref[valid].abs().max()
    torch.testing.assert_close(feats[valid], feats_ref[valid], rtol=0, atol=1e-2 * float(scale))
    torch.testing.assert_close(logp[valid], logp_ref[valid], rtol=0, atol=2e-2)
    agree = (logp[valid].argmax(-1) == logp_ref[valid].argmax(-1)).float().mean()
    assert agree >= 0.97, agree
    assert not feats[~valid].any() and not logp[~valid].any()
    # the comparison has teeth: another sequence's features are far off
    other, _ = teacher(pad_batch([seqs[1]])[0])
    n = min(len(seqs[0]), len(seqs[1]))
    assert (built.batch([0], teacher.lm_rows)[2][0, :n] - other[0, :n]).abs().max() > 10 * 1e-2 * float(scale)


def test_byte_budget_drops_the_tail(target, seqs, tmp_path):
    per_token = 4 + 2 * (128 + 64)
    budget = sum(len(s) for s in seqs[:5]) * per_token + len(seqs[5]) * per_token - 1  # the 6th just misses
    logs = []
    cache = FeatureCache.build(target, seqs, tmp_path / "c", target_name="tiny", max_bytes=budget,
                               batch_tokens=128, progress=False, log=logs.append)
    assert len(cache) == 5 and cache.meta["num_sequences"] == 5
    assert cache.meta["dropped_sequences"] == len(seqs) - 5
    assert any("19 dropped" in m for m in logs), logs
    stored = sum(a.nbytes for a in all_arrays(cache))
    assert stored == cache.meta["bytes"] <= budget
    assert cache.meta["num_tokens"] == sum(len(s) for s in seqs[:5])


def test_resume_after_interruption(target, seqs, built, tmp_path, monkeypatch):
    shards = len(built.meta["shards"])
    calls = count_forwards(monkeypatch, target, fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        FeatureCache.build(target, seqs, tmp_path / "c", target_name="tiny", batch_tokens=128, **QUIET)
    with pytest.raises(FeatureCacheError, match="interrupted"):
        FeatureCache.open(tmp_path / "c")
    assert len(json.loads((tmp_path / "c" / "index.json").read_text())["shards"]) == 1
    monkeypatch.undo()
    calls = count_forwards(monkeypatch, target)
    cache = FeatureCache.build(target, seqs, tmp_path / "c", target_name="tiny", batch_tokens=128, **QUIET)
    assert calls[0] == shards - 1  # the finished shard was not recomputed
    assert cache.meta["shards"] == built.meta["shards"]
    assert all(np.array_equal(a, b) for a, b in zip(all_arrays(cache), all_arrays(built), strict=True))


def test_resume_after_losing_the_last_shard(target, seqs, built, tmp_path, monkeypatch):
    d = tmp_path / "c"
    shutil.copytree(built.directory, d)
    meta = json.loads((d / "index.json").read_text())
    last = meta["shards"].pop()
    meta["complete"] = False
    (d / "index.json").write_text(json.dumps(meta))
    (d / f"shard_{last['name']}.hidden.npy").unlink()  # the other two files stay behind, as a crash might leave them
    calls = count_forwards(monkeypatch, target)
    cache = FeatureCache.build(target, seqs, d, target_name="tiny", batch_tokens=128, **QUIET)
    assert calls[0] == 1
    assert all(np.array_equal(a, b) for a, b in zip(all_arrays(cache), all_arrays(built), strict=True))
    # a finished cache is not rebuilt
    calls[0] = 0
    FeatureCache.build(target, seqs, d, target_name="tiny", batch_tokens=128, **QUIET)
    assert calls[0] == 0


def test_mismatches_are_refused(target, seqs, built, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(built.directory, d)
    other_layers = TargetModel(target.model, feature_layers=(0, 1))
    with pytest.raises(FeatureCacheError, match=f"{d}.*feature_layers"):
        FeatureCache.build(other_layers, seqs, d, target_name="tiny", batch_tokens=128, **QUIET)
    with pytest.raises(FeatureCacheError, match=f"{d}.*sequences_digest"):
        FeatureCache.build(target, seqs[:-1], d, target_name="tiny", batch_tokens=128, **QUIET)
    with pytest.raises(FeatureCacheError, match=f"{d}.*target"):
        FeatureCache.build(target, seqs, d, target_name="other", batch_tokens=128, **QUIET)
    with pytest.raises(FeatureCacheError, match=f"{d}.*feature_layers"):
        FeatureCache.open(d, expect={"feature_layers": [0, 1]})
    with pytest.raises(FeatureCacheError, match=f"{d}.*target.name"):
        FeatureCache.open(d, expect={"target": {"name": "other"}})
    assert len(FeatureCache.open(d, expect={"target": {"name": "tiny"}, "feature_layers": (0, 2)})) == len(seqs)

    shard = FeatureCache.open(d).meta["shards"][0]["name"]
    (d / f"shard_{shard}.features.npy").write_bytes(b"garbage")
    with pytest.raises(FeatureCacheError, match=f"shard_{shard}.features.npy"):
        FeatureCache.open(d).batch([FeatureCache.open(d).meta["shards"][0]["sequences"][0]], torch.zeros(4, 64))
    (d / f"shard_{shard}.features.npy").unlink()
    with pytest.raises(FeatureCacheError, match=f"shard_{shard}.features.npy"):
        FeatureCache.open(d)

    (d / "index.json").write_text("{not json")
    for attempt in (lambda: FeatureCache.open(d),
                    lambda: FeatureCache.build(target, seqs, d, target_name="tiny", **QUIET)):
        with pytest.raises(FeatureCacheError, match=str(Path(d) / "index.json")):
            attempt()
