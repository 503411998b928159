"""KV cache sizing (``--max-total-tokens``, ``--mem-fraction-static``), the start-up cache report, and the lazily
committed cache storage (zero-filled like ``torch.zeros``, resident only where used).

Tiny random-weight Llamas throughout: every engine builds and runs in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sglang_ext.core.drafters.eagle_model import EagleConfig, EagleDraftModel
from sglang_ext.core.kv_cache import LAZY_ENV, SlotKVCache, lazy_zeros
from sglang_ext.engine import launch
from sglang_ext.engine.engine import GenerationRequest
from sglang_ext.engine.launch import LaunchError, add_engine_args, build_engine, build_engine_from_parts
from sglang_ext.models.tiny import tiny_llama

CONTEXT = 128


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, max_positions=512, seed=0)


def eagle_draft(model, seed: int = 0) -> EagleDraftModel:
    torch.manual_seed(seed)
    return EagleDraftModel(EagleConfig.for_target(model.config, feature_layers=[0, 1]))


def build(model, algorithm="NONE", **kw):
    kw.setdefault("context_length", CONTEXT)
    kw.setdefault("eos_token_ids", ())
    if algorithm == "EAGLE" and "draft_model" not in kw:
        kw["draft_model"] = eagle_draft(model)
    return build_engine_from_parts(model, None, algorithm, **kw)


def prompts(n: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(2, 120, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def outputs(engine, n_new: int = 12) -> list[list[int]]:
    states = engine.run([GenerationRequest(p, max_new_tokens=n_new) for p in prompts()])
    return [s.output_ids for s in states]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve")
    add_engine_args(p)
    return p


# ---- flags ---------------------------------------------------------------------------------------------------------
def test_flags_parse_with_sglang_names_and_default_to_unset():
    args = parser().parse_args([])
    assert args.max_total_tokens is None and args.mem_fraction_static is None
    args = parser().parse_args(["--max-total-tokens", "20000", "--mem-fraction-static", "0.7"])
    assert args.max_total_tokens == 20000 and args.mem_fraction_static == 0.7


@pytest.mark.parametrize("argv, flag", [
    (["--max-total-tokens", "0"], "--max-total-tokens"), (["--max-total-tokens", "many"], "--max-total-tokens"),
    (["--mem-fraction-static", "0"], "--mem-fraction-static"), (["--mem-fraction-static", "1"], "--mem-fraction-static"),
    (["--mem-fraction-static", "1.5"], "--mem-fraction-static"), (["--mem-fraction-static", "-0.2"], "--mem-fraction-static"),
    (["--mem-fraction-static", "nan"], "--mem-fraction-static"), (["--mem-fraction-static", "half"], "--mem-fraction-static"),
])
def test_bad_flag_values_fail_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(argv)
    assert flag in capsys.readouterr().err


def test_programmatic_bad_values_are_launch_errors_before_any_model_loads(tiny):
    with pytest.raises(LaunchError, match="--mem-fraction-static"):
        build(tiny, mem_fraction_static=1.0)
    with pytest.raises(LaunchError, match="--max-total-tokens"):
        build(tiny, max_total_tokens=0)
    # build_engine checks them before loading: a model path that does not exist is never reached
    args = parser().parse_args(["--model-path", "/nonexistent/model"])
    args.mem_fraction_static = 2.0
    with pytest.raises(LaunchError, match="--mem-fraction-static 2.0"):
        build_engine(args)


# ---- --max-total-tokens ------------------------------------------------------------------------------------------
def test_default_sizing_reports_the_pool_and_keeps_the_batch(tiny):
    engine, info = build(tiny, max_running_requests=4)
    assert engine.cache.num_slots == 4 and info["max_running_requests"] == 4
    assert info["max_total_tokens"] == 4 * engine.cache.max_len == 4 * (CONTEXT + 2)
    assert info["kv_cache"]["sized_by"] == "--max-running-requests"
    assert not any("lowered" in n for n in info["notes"])
    json.dumps(info)  # /server_info serves it


def test_max_total_tokens_lowers_the_batch_with_a_note(tiny):
    per_slot = CONTEXT + 2  # context + one tree node + 1 without speculation
    engine, info = build(tiny, max_running_requests=8, max_total_tokens=3 * per_slot + per_slot - 1)
    assert engine.cache.num_slots == 3 and engine.config.max_batch_size == 3 and info["max_running_requests"] == 3
    assert info["max_total_tokens"] == 3 * per_slot
    assert (f"--max-total-tokens {4 * per_slot - 1} fits 3 requests of context {CONTEXT}; max running requests "
            "lowered from 8 to 3") in info["notes"]
    assert info["kv_cache"]["sized_by"] == "--max-total-tokens"
    reference, _ = build(tiny, max_running_requests=8)
    assert outputs(engine) == outputs(reference)  # five requests through three slots: queued, same greedy tokens


def test_max_total_tokens_above_the_batch_changes_nothing(tiny):
    engine, info = build(tiny, max_running_requests=2, max_total_tokens=100_000)
    assert engine.cache.num_slots == 2 and not any("lowered" in n for n in info["notes"])


@pytest.mark.parametrize("algorithm, kw", [
    ("NONE", {}), ("NGRAM", {"num_steps": 3}), ("EAGLE", {"num_steps": 2}),
    ("EAGLE", {"num_steps": 3, "topk": 2, "num_draft_tokens": 5}), ("EAGLE", {"num_steps": 2, "topk": 3}),
])
def test_the_plan_uses_the_engines_own_slot_length(tiny, algorithm, kw):
    """Exactly k slots' positions give k slots, one position less gives k - 1, for every tree shape."""
    probe, _ = build(tiny, algorithm, max_running_requests=1, **kw)
    per_slot = probe.cache.max_len
    engine, info = build(tiny, algorithm, max_running_requests=4, max_total_tokens=3 * per_slot, **kw)
    assert engine.cache.num_slots == 3 and info["kv_cache"]["positions_per_slot"] == per_slot
    engine, _ = build(tiny, algorithm, max_running_requests=4, max_total_tokens=3 * per_slot - 1, **kw)
    assert engine.cache.num_slots == 2
    if algorithm == "EAGLE":
        assert engine.drafter.cache.num_slots == 2  # the drafter's cache follows the lowered batch


def test_max_total_tokens_below_one_request_fails_naming_both_flags(tiny):
    with pytest.raises(LaunchError) as e:
        build(tiny, max_total_tokens=100)
    msg = str(e.value)
    assert "--max-total-tokens 100" in msg and f"--context-length {CONTEXT}" in msg and str(CONTEXT + 2) in msg


# ---- --mem-fraction-static ---------------------------------------------------------------------------------------
def per_slot_bytes(engine) -> int:
    d = engine.drafter.cache.nbytes() // engine.drafter.cache.num_slots if getattr(engine.drafter, "cache", None) else 0
    return engine.cache.nbytes() // engine.cache.num_slots + d


@pytest.mark.parametrize("algorithm", ["NONE", "EAGLE"])
def test_mem_fraction_static_arithmetic(tiny, algorithm, monkeypatch):
    """budget = F x total - weights; slots = budget // bytes of one slot (target positions + the drafter's)."""
    probe, _ = build(tiny, algorithm, max_running_requests=1, num_steps=2 if algorithm == "EAGLE" else None)
    slot = per_slot_bytes(probe)
    draft = probe.drafter.model if algorithm == "EAGLE" else None
    weights = launch.weight_bytes(tiny, draft)
    if draft is not None:  # the drafter's own weights count: the bound target tensors only once
        assert weights > launch.weight_bytes(tiny) and launch.weight_bytes(tiny, tiny) == launch.weight_bytes(tiny)
    F = 0.5
    total = int((weights + 3 * slot + slot // 2) / F)
    monkeypatch.setattr(launch, "device_memory_bytes", lambda device: total)
    kw = {"num_steps": 2} if algorithm == "EAGLE" else {}
    engine, info = build(tiny, algorithm, max_running_requests=8, mem_fraction_static=F, **kw)
    assert engine.cache.num_slots == 3 and info["max_running_requests"] == 3
    per_slot = engine.cache.max_len
    pool = (int(F * total) - weights) * per_slot // slot
    assert info["max_total_tokens"] == 3 * per_slot
    assert (f"--mem-fraction-static {F} ({pool} tokens) fits 3 requests of context {CONTEXT}; max running requests "
            "lowered from 8 to 3") in info["notes"]
    kv = info["kv_cache"]
    assert kv["sized_by"] == "--mem-fraction-static" and kv["memory_total_bytes"] == total
    assert kv["weight_bytes"] == weights and info["mem_fraction_static"] == F
    # a larger fraction than the batch needs keeps the batch
    monkeypatch.setattr(launch, "device_memory_bytes", lambda device: total * 100)
    engine, info = build(tiny, algorithm, max_running_requests=8, mem_fraction_static=F, **kw)
    assert engine.cache.num_slots == 8 and not any("lowered" in n for n in info["notes"])


def test_mem_fraction_static_too_small_fails_naming_the_flags(tiny, monkeypatch):
    monkeypatch.setattr(launch, "device_memory_bytes", lambda device: 4 * launch.weight_bytes(tiny))
    with pytest.raises(LaunchError) as e:
        build(tiny, mem_fraction_static=0.2)  # 0.2 x total is less than the weights
    assert "--mem-fraction-static 0.2" in str(e.value) and f"--context-length {CONTEXT}" in str(e.value)


def test_both_flags_take_the_smaller_pool_as_sglang_does(tiny, monkeypatch):
    probe, _ = build(tiny, max_running_requests=1)
    slot, per_slot = per_slot_bytes(probe), probe.cache.max_len
    weights = launch.weight_bytes(tiny)
    monkeypatch.setattr(launch, "device_memory_bytes", lambda device: 2 * (weights + 4 * slot))  # F 0.5: 4 slots
    engine, info = build(tiny, max_running_requests=8, mem_fraction_static=0.5, max_total_tokens=2 * per_slot)
    assert engine.cache.num_slots == 2 and info["kv_cache"]["sized_by"] == "--max-total-tokens"
    assert any("caps the --mem-fraction-static 0.5 pool" in n for n in info["notes"])
    engine, info = build(tiny, max_running_requests=8, mem_fraction_static=0.5, max_total_tokens=100 * per_slot)
    assert engine.cache.num_slots == 4 and info["kv_cache"]["sized_by"] == "--mem-fraction-static"
    assert any("is larger than the --mem-fraction-static 0.5 pool" in n for n in info["notes"])


def test_device_memory_on_cpu_is_host_ram():
    total = launch.device_memory_bytes("cpu")
    with open("/proc/meminfo") as f:
        mem_total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert 0 < total <= mem_total


# ---- the report ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, algorithm", [(torch.float32, "EAGLE"), (torch.bfloat16, "NGRAM")])
def test_report_bytes_match_the_caches(tiny, dtype, algorithm):
    # bfloat16 without a drafter: the EAGLE drafter's attention fails in bfloat16 (float32 queries; found here,
    # independent of the cache allocation), so its report is checked in float32
    model = tiny if dtype == torch.float32 else tiny_llama(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                                                           max_positions=512, seed=0).to(dtype)
    engine, info = build(model, algorithm, num_steps=2, max_running_requests=3)
    kv = info["kv_cache"]
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    size = torch.empty((), dtype=dtype).element_size()
    assert kv["dtype"] == str(dtype).removeprefix("torch.") and engine.cache.storage.dtype == dtype
    assert (kv["layers"], kv["kv_heads"], kv["head_dim"]) == (cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim)
    assert kv["bytes_per_token"] == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * size
    assert kv["target_bytes"] == engine.cache.nbytes() == kv["bytes_per_token"] * kv["slots"] * kv["positions_per_slot"]
    assert info["max_total_tokens"] == kv["max_total_tokens"] == 3 * engine.cache.max_len
    note = next(n for n in info["notes"] if n.startswith("KV cache: "))
    assert f"{kv['bytes_per_token']:,} B/token" in note and f"{kv['max_total_tokens']:,} max total tokens" in note
    assert "GiB reserved" in note
    assert not engine.cache.storage.any()
    if algorithm == "EAGLE":
        d = kv["draft"]
        assert d["bytes_per_token"] == 1 * 2 * cfg.num_key_value_heads * head_dim * size
        assert d["bytes"] == engine.drafter.cache.nbytes() and d["slots"] == 3
        assert kv["total_bytes"] == engine.cache.nbytes() + engine.drafter.cache.nbytes()
        assert "drafter cache" in note and not engine.drafter.cache.storage.any()
    else:
        assert kv["draft"] is None and kv["total_bytes"] == engine.cache.nbytes()
    assert len(outputs(engine, 6)) == 5  # storage viewed from bytes (bfloat16 too) runs


# ---- lazy storage ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lazy_zeros_are_zeros(dtype):
    t = lazy_zeros((2, 3, 5, 7), dtype)
    assert t.dtype == dtype and t.shape == (2, 3, 5, 7) and t.is_contiguous() and not t.any()
    assert t.data_ptr() % 64 == 0
    t[1, 2] = 1.5  # writable, and independent of any other allocation
    assert lazy_zeros((2, 3, 5, 7), dtype).sum().item() == 0
    assert lazy_zeros((0, 4), dtype).shape == (0, 4)


def test_env_switch_gives_eagerly_committed_zeros(monkeypatch):
    monkeypatch.setenv(LAZY_ENV, "0")
    cache = SlotKVCache(2, 2, 2, 8, 16)
    assert not cache.storage.any() and cache.storage.untyped_storage().nbytes() == cache.nbytes()


@pytest.mark.parametrize("algorithm, kw", [("NONE", {}), ("NGRAM", {"num_steps": 3}),
                                           ("EAGLE", {"num_steps": 3, "topk": 2, "num_draft_tokens": 6})])
def test_greedy_outputs_identical_with_eager_and_lazy_storage(tiny, algorithm, kw, monkeypatch):
    lazy, info = build(tiny, algorithm, max_running_requests=3, **kw)
    assert info["kv_cache"]["allocation"] == "lazy"
    got = outputs(lazy, 16)
    monkeypatch.setenv(LAZY_ENV, "0")
    eager, info = build(tiny, algorithm, max_running_requests=3, **kw)
    assert info["kv_cache"]["allocation"] == "eager"
    assert got == outputs(eager, 16)
    # the storage really differs in kind: lazily mapped, page aligned, vs torch's allocator
    assert lazy.cache.storage.data_ptr() % 4096 == 0


RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from sglang_ext.engine.launch import build_engine_from_parts
    from sglang_ext.engine.engine import GenerationRequest
    from sglang_ext.models.tiny import tiny_llama

    def rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    model = tiny_llama(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=4, max_positions=16384)
    before = rss()
    engine, info = build_engine_from_parts(model, None, "NONE", context_length=16384, eos_token_ids=())
    built = rss()
    engine.run([GenerationRequest([5, 6, 7, 8, 9], max_new_tokens=8) for _ in range(4)])
    ran = rss()
    print(json.dumps({"nominal": engine.cache.nbytes(), "build": built - before, "run": ran - before,
                      "context": info["context_length"]}))
""")


def test_default_size_cache_commits_far_less_than_its_nominal_size():
    """The default 8 slots of a 16384-token context: 1 GiB nominal, but resident only where requests touched it
    (a few positions of each slot's rows; torch.zeros would commit all of it at start-up)."""
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True, timeout=300,
                         env={**os.environ, LAZY_ENV: "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["nominal"] >= 1 << 30, r  # the cache is big enough for the check to mean something
    assert r["build"] < r["nominal"] / 8, r
    assert r["run"] < r["nominal"] / 4, r
