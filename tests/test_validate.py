"""`sglang-ext replay` (the engine's trace driver), `sglang-ext sim validate` (simulator vs engine), the simulator's
reference-engine schedule, recorded-KL replay, and DSDE's fast WVIR (identical decisions)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sglang_ext.core.policies import make_policy
from sglang_ext.core.policies.base import BatchView
from tests.dsde_reference import ReferenceDSDE, weighted_variance, wvir, wvir_many
from sglang_ext.core.signals import RequestStep, StepResult
from simulator.acceptance import (
    CategoryAcceptance,
    ParametricAcceptance,
    ReplayAcceptance,
    kl_positions_from_steps,
)
from sglang_ext.formats.results import SimResult
from simulator.model import SimConfig, simulate
from sglang_ext.formats.trace import Request, Trace, read_trace
from simulator.validate import (
    CalibratedCost,
    RecordedRun,
    compare,
    derive_trace,
    fit_calibration,
    overhead_features,
    relative_error,
    row_passes,
    time_scale_for,
)

ROOT = Path(__file__).resolve().parents[1]


# ---- a tiny engine ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from sglang_ext.models.tiny import tiny_llama

    return tiny_llama(vocab_size=96, hidden_size=64, num_layers=2, seed=3)


def tiny_engine(model, kind: str = "static", num_steps: int = 3, max_batch: int = 4):
    from sglang_ext.core.drafters.eagle_model import EagleConfig, EagleDraftModel
    from sglang_ext.engine.launch import build_engine_from_parts
    from sglang_ext.engine.target import TargetModel

    if kind == "off":
        engine, _ = build_engine_from_parts(model, None, "NONE", max_running_requests=max_batch, context_length=256,
                                            prefill_chunk=16, eos_token_ids=(1,))
        return engine
    target = TargetModel(model, feature_layers=(0, 1))
    torch.manual_seed(0)
    draft = EagleDraftModel(EagleConfig.for_target(target.config, feature_layers=[0, 1]))
    policy = make_policy("dsde", max_k=num_steps, window=4) if kind == "dsde" else None
    engine, _ = build_engine_from_parts(model, None, "EAGLE", num_steps=num_steps, draft_model=draft,
                                        max_running_requests=max_batch, context_length=256, prefill_chunk=16,
                                        eos_token_ids=(1,), policy=policy)
    return engine


def tiny_requests(n: int = 7) -> list[Request]:
    return [Request(0.004 * i, 3 + 5 * i, 3 + 3 * i, id=f"r{i}") for i in range(n)]


@pytest.mark.parametrize("kind", ["static", "dsde", "off"])
def test_replay_records_acceptance_for_every_request(tiny, kind, tmp_path):
    from sglang_ext.engine.replay import PromptSource, load_signals, replay

    engine = tiny_engine(tiny, kind)
    reqs = tiny_requests()
    run = replay(engine, reqs, PromptSource(vocab_size=96, seed=1), warmup=1)
    assert run.complete and len(run.requests) == len(reqs)
    for rec, req in zip(run.requests, reqs):
        assert rec.done and rec.emitted == req.output_tokens  # outputs forced to the trace's length
        assert rec.first_token >= rec.arrival and rec.finish >= rec.first_token
        if kind == "off":
            continue
        assert len(rec.acceptance) == rec.verify_steps > 0  # one record per verify step
        assert sum(a + 1 for a in rec.acceptance) == req.output_tokens  # each step commits accepted + 1
    # every step's batch adds up: requests x verify steps = the requests' verify steps
    if kind != "off":
        assert sum(s.batch_size for s in run.steps) == sum(r.verify_steps for r in run.requests)
    paths = run.save(tmp_path / kind)
    back = read_trace(paths["trace"])
    assert [r.output_tokens for r in back] == [r.output_tokens for r in reqs]
    if kind == "off":
        assert all(r.acceptance is None for r in back)
    else:
        assert [list(r.acceptance) for r in back] == [rec.acceptance for rec in run.requests]
    res = SimResult.load(paths["result"])
    sim = simulate(back, _Const(), make_policy("static", k=0), SimConfig(schedule="reference"))
    assert set(res.summary) == set(sim.summary)  # the same schema, field by field
    assert res.summary["requests"] == len(reqs) and res.summary["output_tokens"] == sum(r.output_tokens for r in reqs)
    if kind == "dsde":  # KL of every proposed position, aligned with the steps
        kl = load_signals(paths["signals"])
        assert set(kl) == {r.id for r in reqs}
        for rec in run.requests:
            assert len(rec.kl) == len(rec.acceptance)
            assert all(len(k) >= a for k, a in zip(rec.kl, rec.acceptance))
    # what `sim validate --rejudge` reads back is what the live run handed the simulator
    live, saved = RecordedRun.from_replay(run), RecordedRun.load(tmp_path / kind)
    assert [(r.prompt_tokens, r.output_tokens, r.acceptance, r.id) for r in saved.recorded] == \
        [(r.prompt_tokens, r.output_tokens, r.acceptance, r.id) for r in live.recorded]
    assert [(s.batch_size, s.depths, s.accepted) for s in saved.steps] == [(s.batch_size, s.depths, s.accepted)
                                                                          for s in live.steps]
    assert [s.verify_forward_s for s in saved.steps] == pytest.approx([s.verify_forward_s for s in live.steps], abs=1e-6)
    assert saved.summary["throughput_tok_s"] == pytest.approx(live.summary["throughput_tok_s"])
    assert (saved.kl is None) == (live.kl is None) and (saved.kl or {}).keys() == (live.kl or {}).keys()
    import gzip

    steps = tmp_path / kind / "steps.jsonl"  # stored results keep their steps compressed
    with gzip.open(steps.with_suffix(".jsonl.gz"), "wt", encoding="utf-8") as f:
        f.write(steps.read_text())
    steps.unlink()
    assert [s.verify_forward_s for s in RecordedRun.load(tmp_path / kind).steps] == [s.verify_forward_s for s in saved.steps]
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("trace.jsonl", "result.json"):
        (bad / name).write_text((tmp_path / kind / name).read_text())
    (bad / "steps.jsonl").write_text('{"start": 0.0}\n')
    with pytest.raises(ValueError, match=r"bad/steps\.jsonl:1: not a step record"):
        RecordedRun.load(bad)
    for rid in (live.kl or {}):
        assert saved.kl[rid] == pytest.approx(live.kl[rid], abs=1e-5)


def test_replay_prompts_are_exact_length_and_seeded():
    from sglang_ext.engine.replay import PromptSource

    src = PromptSource(vocab_size=50, seed=3)
    assert len(src.make(0, 17)) == 17 and src.make(0, 17) == PromptSource(vocab_size=50, seed=3).make(0, 17)
    assert src.make(0, 17) != src.make(1, 17)


def test_replay_prompts_from_real_text(tmp_path):
    from sglang_ext.engine.replay import PromptSource

    class Tok:  # a character tokenizer with a chat template of fixed tokens around the message
        chat_template = "x"

        def encode(self, text, add_special_tokens=False):
            return [ord(c) % 200 + 2 for c in text]

        def apply_chat_template(self, messages, add_generation_prompt=True, return_dict=True):
            return {"input_ids": [1, 1] + self.encode(messages[0]["content"]) + [0, 1, 0]}

    src = PromptSource(["hello world", "second prompt text"], Tok(), seed=0)
    assert src.prefix == [1, 1] and src.suffix == [0, 1, 0]
    for n in (3, 6, 40, 200):
        ids = src.make(5, n)
        assert len(ids) == n
        if n > 5:
            assert ids[:2] == [1, 1] and ids[-3:] == [0, 1, 0]


def test_replay_bad_trace_line_keeps_partial_results(tiny, tmp_path):
    from sglang_ext.engine.replay import PromptSource, replay
    from sglang_ext.formats.trace import stream_trace

    f = tmp_path / "bad.jsonl"
    lines = [json.dumps({"arrival": 0.002 * i, "prompt_tokens": 6, "output_tokens": 5}) for i in range(3)]
    lines.append('{"arrival": 0.01, "prompt_tokens": 0, "output_tokens": 5}')
    lines.append(json.dumps({"arrival": 0.02, "prompt_tokens": 6, "output_tokens": 5}))
    f.write_text("\n".join(lines) + "\n")
    run = replay(tiny_engine(tiny), stream_trace(f), PromptSource(vocab_size=96), warmup=0)
    assert not run.complete and "bad.jsonl:4" in run.error
    assert sum(r.done for r in run.requests) == 3  # the requests before the bad line ran to the end
    paths = run.save(tmp_path / "out")
    assert paths["result"].name == "result.partial.json" and paths["trace"].name == "trace.partial.jsonl"
    assert SimResult.load(paths["result"]).summary["requests"] == 3


def _cli(*argv: str) -> int:
    from sglang_ext.cli import main

    return main(list(argv))


def test_cli_malformed_trace_names_file_and_line(tmp_path, capsys):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"arrival": 0.0, "prompt_tokens": 10, "output_tokens": 5}\n'
                 '{"arrival": 0.5, "prompt_tokens": 10, "output_tokens": 5}\n'
                 '{"arrival": 1.0, "prompt_tokens": "ten", "output_tokens": 5}\n')
    assert _cli("sim", "validate", "--trace", str(f), "--out", str(tmp_path / "v")) == 1
    assert "broken.jsonl:3" in capsys.readouterr().err
    g = tmp_path / "first.jsonl"
    g.write_text('{"arrival": 0.0, "prompt_tokens": 10}\n')
    assert _cli("replay", "--trace", str(g), "--out", str(tmp_path / "r")) == 1  # before any model loads
    assert "first.jsonl:1" in capsys.readouterr().err


def test_cli_malformed_profile_names_the_file(tmp_path, capsys):
    p = tmp_path / "prof.json"
    p.write_text('{"format": "sglang-ext-profile/1", "meta": {"model": "m", "hardware": "h"}, '
                 '"target": [{"batch_size": 1, "tokens_per_request": 1, "seconds": -1}]}')
    assert _cli("sim", "validate", "--profile", str(p), "--out", str(tmp_path / "v")) == 1
    err = capsys.readouterr().err
    assert "prof.json" in err and "target[0].seconds" in err


# ---- validate's arithmetic ----------------------------------------------------------------------------------------
def _summary(thr, e50, e90, t50=0.1, t90=0.2, tpot=0.05, al=1.5):
    return {"throughput_tok_s": thr, "e2e_s": {"p50": e50, "p90": e90}, "ttft_s": {"p50": t50, "p90": t90},
            "tpot_s": {"p50": tpot}, "mean_acceptance_length": al}


def test_validate_error_computation_by_hand():
    real = _summary(100.0, 2.0, 4.0)
    ok = compare(real, _summary(104.0, 2.19, 3.62, t50=0.15))
    assert ok["throughput"]["rel_error"] == pytest.approx(0.04) and ok["throughput"]["pass"]
    assert ok["e2e_p50"]["rel_error"] == pytest.approx(0.095) and ok["e2e_p50"]["pass"]
    assert ok["e2e_p90"]["rel_error"] == pytest.approx(-0.095) and ok["e2e_p90"]["pass"]
    assert ok["ttft_p50"]["rel_error"] == pytest.approx(0.5) and ok["ttft_p50"]["pass"] is None  # shown, not judged
    assert row_passes(ok)
    bad = compare(real, _summary(94.0, 2.0, 4.5))
    assert not bad["throughput"]["pass"] and bad["e2e_p50"]["pass"] and not bad["e2e_p90"]["pass"]
    assert not row_passes(bad)
    assert math.isnan(relative_error(1.0, 0.0)) and math.isnan(relative_error(math.nan, 1.0))
    assert compare(_summary(0.0, 1.0, 1.0), _summary(1.0, 1.0, 1.0))["throughput"]["pass"] is False


def test_time_scale_and_derived_trace():
    src = Trace(tuple(Request(float(i), 100 + i, 40, "chat") for i in range(11)))
    assert time_scale_for(src, 2.0) == pytest.approx(0.5)  # natural rate 1 req/s -> 2 req/s: arrivals x 0.5
    d = derive_trace(src, start=3, count=4, prompt_scale=0.5, output_scale=0.25, max_prompt_tokens=52, prefix="c")
    assert [r.arrival for r in d] == [0.0, 1.0, 2.0, 3.0]
    assert [r.prompt_tokens for r in d] == [52, 52, 52, 52] and [r.output_tokens for r in d] == [10] * 4
    assert [r.id for r in d] == ["c0", "c1", "c2", "c3"]


def test_calibration_recovers_overhead_and_speed():
    from simulator.validate import profiled_parts

    class Cost:
        def prefill_seconds(self, t, c=0):
            return 0.01 + 1e-4 * t

        def draft_seconds(self, b, d):
            return 0.002 * d

        def verify_seconds(self, b, t, c=0):
            return 0.03 + 0.002 * b * t

    rng = random.Random(0)
    truth = (0.004, 0.0015, 0.02, 2e-5)
    steps = []
    for _ in range(200):
        B = rng.randint(1, 8)
        admitted = [rng.randint(10, 300) for _ in range(rng.choice([0, 0, 0, 1, 2]))][:B]
        backlog = max([p - 1 for p in admitted] + [rng.randint(1, 3)])
        s = SimpleNamespace(batch_size=B, admitted=admitted, depths=[2] * B, backlog_max=backlog, context_max=200)
        pre, dr, ve = profiled_parts(s, Cost(), 512)
        f = overhead_features(s, True)
        # the machine is 30 % slower than profiled: the forwards take longer, the overhead is what it is
        s.prefill_forward_s, s.verify_forward_s = 1.3 * pre, 1.3 * ve
        s.draft_call_s = 1.3 * dr + truth[3] * f[3]
        s.outside = float(np.dot(truth[:3], f[:3])) + rng.uniform(-1e-4, 1e-4)
        s.cycle = s.outside + s.prefill_forward_s + s.verify_forward_s + s.draft_call_s
        steps.append(s)
    steps[5].outside += 2.0  # a neighbour took the CPU for 2 s: trimmed
    steps[5].cycle += 2.0
    fit = fit_calibration(steps, Cost(), 512, True)
    got = fit["coefficients"]
    assert fit["trimmed"] >= 1
    for name, want in zip(("overhead_s", "overhead_per_request_s", "overhead_per_admit_s", "absorb_per_token_s"), truth):
        assert got[name] == pytest.approx(want, rel=0.05, abs=2e-4)
    assert fit["speed"] == pytest.approx({"prefill": 1.3, "verify": 1.3, "draft": 1.3}, rel=1e-3)
    assert fit["forward_rel_error"] == pytest.approx(1 / 1.3 - 1, rel=1e-6)  # the profile is 23 % fast now
    assert abs(fit["total_rel_error_in_sample"]) < 0.01 and fit["total_rel_error_profile_only"] < -0.2
    assert fit["total_rel_error_overhead_only"] < -0.1  # the overhead cannot make up for a slower machine
    scaled = CalibratedCost(Cost(), fit["speed"])
    assert scaled.verify_seconds(2, 3) == pytest.approx(1.3 * Cost().verify_seconds(2, 3), rel=1e-3)


# ---- the simulator's reference schedule --------------------------------------------------------------------------
class _Const:
    def __init__(self, v=0.01, dr=0.004, pre=0.05):
        self.v, self.dr, self.pre = v, dr, pre

    def verify_seconds(self, batch_size, tokens_per_request, context_len=0):
        return self.v

    def draft_seconds(self, batch_size, depth):
        return self.dr if depth > 0 else 0.0

    def prefill_seconds(self, tokens, context_len=0):
        return self.pre if tokens > 0 else 0.0


def perfect() -> ParametricAcceptance:
    return ParametricAcceptance(default=CategoryAcceptance(1.0, math.inf), decay=1.0)


def test_reference_schedule_by_hand():
    """1 request, prompt 100, 10 output tokens, static k=3, everything accepted, reference engine:

    iteration 1: prefill 99 tokens (one chunk, pre) + draft dr + verify v  -> tokens 1..4 (TTFT at its end)
    iteration 2: dr + v -> 8;  iteration 3: k = min(3, 10 - 8 - 1) = 1: dr + v -> 10
    """
    v, dr, pre = 0.01, 0.004, 0.05
    res = simulate(Trace((Request(0.0, 100, 10),)), _Const(v, dr, pre), make_policy("static", k=3),
                   SimConfig(schedule="reference"), acceptance=perfect())
    assert res.requests["first_token"][0] == pytest.approx(pre + dr + v)
    assert res.requests["finish"][0] == pytest.approx(pre + 3 * (dr + v))
    assert res.summary["iterations"] == 3 and res.summary["spec_steps"] == 3
    # chunked: 1100-token prompt -> 1099 tokens in chunks of 512 = 3 prefill forwards in the first iteration
    res = simulate(Trace((Request(0.0, 1100, 1),)), _Const(v, dr, pre), make_policy("static", k=0),
                   SimConfig(schedule="reference", max_prefill_tokens=512), acceptance=perfect())
    assert res.requests["first_token"][0] == pytest.approx(3 * pre + v) and res.summary["iterations"] == 1


def test_reference_schedule_overhead_absorb_and_depth_cap():
    v, dr, pre = 0.01, 0.004, 0.05
    cfg = SimConfig(schedule="reference", max_draft_tokens=2, overhead_s=0.001, overhead_per_request_s=0.002,
                    overhead_per_admit_s=0.003, absorb_per_token_s=1e-4, record_steps=True)
    res = simulate(Trace((Request(0.0, 51, 7),)), _Const(v, dr, pre), make_policy("static", k=5), cfg,
                   acceptance=perfect())
    # k capped at 2: steps emit 3, 3, 1 (k = min(2, 7 - 6 - 1) = 0: a plain step)
    assert res.steps["depth"] == [2, 2, 0]
    first = pre + dr + 1e-4 * 1 * (50 - 1) + v + 0.001 + 0.002 + 0.003  # the drafter absorbs the 50 prompt pairs
    second = dr + 1e-4 * (3 - 1) + v + 0.003  # 3 pending pairs (2 accepted + 1)
    assert res.requests["first_token"][0] == pytest.approx(first)
    assert res.requests["finish"][0] == pytest.approx(first + second + v + 0.003)
    with pytest.raises(ValueError, match="kv_capacity"):
        SimConfig(schedule="reference", kv_capacity=1000)


def test_replayed_acceptance_is_exact_under_the_reference_schedule():
    trace = Trace((Request(0.0, 20, 13, acceptance=(3, 0, 3, 3)),))  # 4 + 1 + 4 + 4 = 13 tokens
    res = simulate(trace, _Const(), make_policy("static", k=3), SimConfig(schedule="reference"),
                   acceptance=ReplayAcceptance(ParametricAcceptance(default=CategoryAcceptance(0.0, math.inf))))
    assert res.summary["spec_steps"] == 4 and res.summary["accepted_tokens"] == 9  # step for step as recorded


def test_recorded_kl_replayed_by_position():
    kl = kl_positions_from_steps([(1, [0.1, 0.2]), (0, [0.3, 0.4]), (2, [0.5, 0.6])])
    # step 0 at position 0 proposes 0, 1; step 1 at 2 proposes 2, 3; step 2 at 3 proposes 3 (kept: 0.4), 4
    assert kl == [0.1, 0.2, 0.3, 0.4, 0.6]
    m = ReplayAcceptance(ParametricAcceptance(default=CategoryAcceptance(0.7, math.inf)), kl={"a": kl})
    m.reset(0)
    st = m.start(Request(0.0, 5, 8, acceptance=(1, 0, 2, 1), id="a"))
    _, got = m.sample(st, 3, 3, True)
    assert got[:2] == [0.4, 0.6] and got[2] > 0  # position 5 was never proposed: synthetic
    st2 = m.start(Request(0.0, 5, 8, acceptance=(1, 0, 2, 1), id="other"))
    assert m.sample(st2, 3, 3, True)[1] != got[:3]


# ---- DSDE: fast WVIR, identical decisions ----------------------------------------------------------------------
def old_weighted_variance(x, decay):
    n = len(x)
    w = [decay ** (n - 1 - i) for i in range(n)]
    sw = sum(w)
    mu = sum(wi * xi for wi, xi in zip(w, x)) / sw
    return sum(wi * (xi - mu) ** 2 for wi, xi in zip(w, x)) / sw


def old_wvir(history, decay):
    x = list(history)
    n = len(x)
    if n < 2:
        return 0.0
    short = max(1, n // 3)
    long_var = old_weighted_variance(x, decay)
    if long_var < 1e-6:
        return 20.0
    return old_weighted_variance(x[-short:], decay) / long_var


def _random_history(rng: random.Random) -> list[float]:
    n = rng.randint(0, 40)
    kind = rng.random()
    if kind < 0.3:
        return [rng.choice([0.0, 0.5]) for _ in range(n)]  # the acceptance-only proxy
    if kind < 0.5:
        return [round(rng.random(), 2) for _ in range(n)]
    return [rng.expovariate(1.0) * rng.random() for _ in range(n)]


def test_weighted_variance_is_bit_identical_to_the_plain_formula():
    rng = random.Random(0)
    for _ in range(20000):
        x = _random_history(rng)
        d = rng.choice([0.85, 0.9, rng.uniform(0.5, 0.999)])
        if x:
            assert weighted_variance(x, d) == old_weighted_variance(x, d)
        assert wvir(x, d) == old_wvir(x, d)


def test_batched_wvir_matches():
    rng = random.Random(1)
    for _ in range(300):
        n = rng.choice([2, 9, 30])
        hs = [[rng.expovariate(1.0) for _ in range(n)] if rng.random() < 0.8 else [0.5] * n
              for _ in range(rng.randint(1, 40))]
        got = wvir_many(hs, 0.9)
        want = [old_wvir(h, 0.9) for h in hs]
        assert got == pytest.approx(want, rel=1e-12)


class _OldDSDE(ReferenceDSDE):
    """DSDE as it was: one request at a time, the plain two-pass WVIR."""

    wvir_fn = staticmethod(old_wvir)


class _StepCosts:
    """V(b, t) = 10 ms + 0.4 ms·b·t, D(b, d) = d·(2 ms + 0.1 ms·b): a cost cap that binds at some depths."""

    def verify_seconds(self, b, t, context_len=0):
        return 0.010 + 0.0004 * b * t

    def draft_seconds(self, b, d):
        return d * (0.002 + 0.0001 * b)


def _profile_costs():
    from sglang_ext.core.costs import CostModel

    return CostModel.fit(Path(__file__).resolve().parents[1] / "traces" / "profiles" / "cpu-2core-smollm2-135m.json")


@pytest.mark.parametrize("cost_cap", [False, "duck-typed", "profile"])
@pytest.mark.parametrize("seed", range(6))
def test_fast_dsde_decides_exactly_as_before(seed, cost_cap):
    """The compiled implementation against the per-request one (tests/dsde_reference.py), decision by decision;
    with a profile's cost model the package takes its one-pass decision (lengths, SL cap, cost cap compiled together)
    while the reference prices depth by depth."""
    rng = random.Random(seed)
    params = {"window": rng.choice([6, 12, 30]), "max_k": 8, "init_k": 3, "variant": rng.choice(["code", "paper"]),
              "cost_cap": bool(cost_cap)}
    costs = {"cost_model": _StepCosts() if cost_cap == "duck-typed" else _profile_costs()} if cost_cap else {}
    new, old = make_policy("dsde", **costs, **params), _OldDSDE(**costs, **params)
    pool = [f"r{i}" for i in range(24)]
    capped = 0
    for _ in range(150):
        rids = rng.sample(pool, rng.randint(1, 20))
        dn, do = new.decide(BatchView(rids)), old.decide(BatchView(rids))
        assert dn.lengths == do.lengths and dn.info == do.info
        capped += dn.info.get("cost_cap") is not None
        steps = []
        for r in rids:
            k = dn.lengths[r]
            a = rng.randint(0, k)
            kl = [rng.uniform(0, 3) for _ in range(k)] if rng.random() < 0.7 else []
            steps.append(RequestStep(r, k, a, kl=kl, temperature=rng.choice([0.0, 0.7])))
        new.observe(StepResult(steps))
        old.observe(StepResult(steps))
        if rng.random() < 0.1:
            gone = rng.choice(rids)
            new.release(gone)
            old.release(gone)
        if rng.random() < 0.05:  # a saved and restored policy carries on identically
            restored = make_policy("dsde", **costs, **params)
            restored.load_state_dict(json.loads(json.dumps(new.state_dict())))
            new = restored
    assert capped > 0 or not cost_cap  # the cost cap was exercised, not only declined


def test_dsde_compiles_once_whatever_its_window():
    """DSDE's compiled steps take the same argument types for every window (the KL window ring is its own array,
    not a record field), so tuning ``window`` does not compile them again for each value."""
    from sglang_ext.core.policies._estimators import kernels

    def run(window: int) -> None:
        p = make_policy("dsde", window=window)
        rids = [f"r{i}" for i in range(5)]
        for _ in range(3):
            d = p.decide(BatchView(rids))
            p.observe(StepResult([RequestStep(r, d.lengths[r], 0, kl=[0.5] * d.lengths[r]) for r in rids]))

    run(7)
    compiled = len(kernels().dsde_observe.signatures), len(kernels().dsde_lengths.signatures)
    for window in (9, 31, 100):
        run(window)
    assert (len(kernels().dsde_observe.signatures), len(kernels().dsde_lengths.signatures)) == compiled


# ---- end to end on the real model -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_sim_validate_end_to_end_on_the_real_model(tmp_path):
    """A very small validation: 4 requests, one load, speculation off and static k; checks the plumbing (the
    numbers on so few requests on a shared machine say little)."""
    out = tmp_path / "v"
    rc = _cli("sim", "validate", "--head", "4", "--calibration-requests", "6", "--configs", "off,static",
              "--loads", "light=0.5", "--max-prompt-tokens", "48", "--max-output-tokens", "10", "--wait-idle", "0",
              "--warmup", "1", "--threads", "1", "--out", str(out))
    assert rc in (0, 2)  # 2: ran, but an error exceeded its tolerance
    report = json.loads((out / "validate.json").read_text())
    assert report["complete"] and [r["config"] for r in report["rows"]] == ["off", "static"]
    for row in report["rows"]:
        assert row["requests"] == 4
        assert all(row["errors"][m]["rel_error"] is not None for m in ("throughput", "e2e_p50", "e2e_p90"))
    assert set(report["calibrations"]) == {"calibration-off", "calibration-static"}
    assert all(r["calibration"]["speed"]["verify"] > 0 for r in report["rows"])
    static = read_trace(out / "light-static" / "trace.jsonl")
    assert all(r.acceptance is not None for r in static)
    # --rejudge: the same recorded runs judged again without the engine; the same profile gives the same errors
    again = tmp_path / "again"
    flags = ("--head", "4", "--calibration-requests", "6", "--configs", "off,static", "--max-prompt-tokens", "48",
             "--max-output-tokens", "10", "--threads", "1")
    assert _cli("sim", "validate", *flags, "--rejudge", str(out), "--out", str(again)) in (0, 2)
    redo = json.loads((again / "validate.json").read_text())
    assert redo["rejudged_from"] == str(out) and [r["config"] for r in redo["rows"]] == ["off", "static"]
    for a, b in zip(report["rows"], redo["rows"]):
        for m in ("throughput", "e2e_p50", "e2e_p90"):
            assert b["errors"][m]["rel_error"] == pytest.approx(a["errors"][m]["rel_error"], abs=2e-3)
    # a flag that disagrees with the recording is named
    assert _cli("sim", "validate", *flags, "--calibrate", "row", "--rejudge", str(out), "--out", str(again)) == 1
    assert _cli("sim", "validate", *flags, "--configs", "dsde", "--rejudge", str(out), "--out", str(again)) == 1


@pytest.mark.slow
def test_sim_validate_repeats_judge_medians_and_rank(tmp_path):
    """``--repeats 2`` over three configurations (tide-control among them): every row runs twice in rotated order,
    the verdict is on the medians, the configurations are ranked per load, and --rejudge reproduces all of it."""
    out = tmp_path / "v"
    # 8 calibration requests of up to 8 tokens: >= 8 steps even when k1 accepts every draft (two tokens per step)
    flags = ("--head", "3", "--calibration-requests", "8", "--configs", "off,k1,tide-control", "--loads", "queue=2",
             "--max-prompt-tokens", "32", "--max-output-tokens", "8", "--threads", "1", "--repeats", "2")
    rc = _cli("sim", "validate", *flags, "--wait-idle", "0", "--warmup", "1", "--out", str(out))
    assert rc in (0, 2)
    report = json.loads((out / "validate.json").read_text())
    assert report["complete"] and report["repeats"] == 2
    runs = [(r["repeat"], r["config"]) for r in report["rows"]]
    assert runs[:3] == [(0, "off"), (0, "k1"), (0, "tide-control")]
    assert runs[3:] == [(1, "k1"), (1, "tide-control"), (1, "off")]  # rotated: another configuration runs first
    assert all((out / r["tag"] / "result.json").is_file() and r["tag"].endswith(f"-r{r['repeat']}")
               for r in report["rows"])
    medians = {m["config"]: m for m in report["medians"]}
    assert set(medians) == {"off", "k1", "tide-control"}
    for m in medians.values():
        thr = m["metrics"]["throughput"]
        assert m["repeats"] == 2 and len(thr["real"]) == 2
        assert thr["real_spread"]["median"] == pytest.approx(sum(thr["real"]) / 2)
    rank = report["ranking"]["queue"]
    assert set(rank) == {"throughput", "e2e_p90"}
    assert sorted(rank["throughput"]["engine_order"]) == ["k1", "off", "tide-control"]
    assert report["pass"] == (all(m["pass"] for m in report["medians"]) and
                              all(r["pass"] for r in rank.values()))
    again = tmp_path / "again"
    assert _cli("sim", "validate", *flags, "--rejudge", str(out), "--out", str(again)) in (0, 2)
    redo = json.loads((again / "validate.json").read_text())
    assert [r["tag"] for r in redo["rows"]] == [r["tag"] for r in report["rows"]]
    assert redo["ranking"]["queue"]["throughput"]["engine_order"] == rank["throughput"]["engine_order"]
    for a, b in zip(report["medians"], redo["medians"]):
        assert b["metrics"]["throughput"]["real"] == a["metrics"]["throughput"]["real"]


def test_reference_schedule_catch_up_is_unpadded_per_request():
    """Two fresh prompts (51 and 21 tokens) in one batch: each catches up alone on all but its last pair
    (CATCH_UP_SPLIT = 16 < 50, 20), as the EAGLE drafter does, so the catch-up costs absorb · (49 + 19), not the
    padded absorb · 2 · 49; the step reports it apart from its steady drafting cost."""
    from sglang_ext.core.costs import CATCH_UP_SPLIT

    assert CATCH_UP_SPLIT < 20
    v, dr, pre = 0.01, 0.004, 0.05
    seen = []

    policy = make_policy("static", k=2)
    observe = policy.observe
    policy.observe = lambda result: (seen.append(result), observe(result))
    cfg = SimConfig(schedule="reference", absorb_per_token_s=1e-4)
    res = simulate(Trace((Request(0.0, 51, 3), Request(0.0, 21, 3))), _Const(v, dr, pre), policy, cfg,
                   acceptance=perfect())
    assert seen[0].catch_up_seconds == pytest.approx(1e-4 * (49 + 19))
    assert seen[0].draft_seconds == pytest.approx(dr)  # both rows left with one pair: no padded rest
    assert res.requests["first_token"][0] == pytest.approx(2 * pre + dr + 1e-4 * (49 + 19) + v)
