"""The discrete-event model (`simulator.model`), its acceptance models, cluster, metrics, tuner and `sim` CLI."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from sglang_ext.core.policies import make_policy
from simulator.acceptance import (
    CategoryAcceptance,
    Drift,
    ParametricAcceptance,
    ReplayAcceptance,
    acceptance_from_json,
    fit_acceptance,
    parse_acceptance,
    positions_from_steps,
    synthetic_recording,
)
from sglang_ext.formats.results import SimResult
from simulator.model import SimConfig, Simulation, SimulationError, simulate
from sglang_ext.formats.trace import Request, Trace, read_trace

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "traces" / "tiny_chat.jsonl"
CPU_PROFILE = ROOT / "traces" / "profiles" / "cpu-2core-smollm2-135m.json"


class LinearCost:
    """An analytic cost model: verify = a + b·B·t + c·B·ctx, draft = d·depth, prefill through verify(1, T, ctx)."""

    def __init__(self, a=5e-3, b=2e-5, c=4e-8, d=2e-3, train=1e-5):
        self.a, self.b, self.c, self.d, self.train = a, b, c, d, train

    def verify_seconds(self, batch_size, tokens_per_request, context_len=0):
        return self.a + self.b * batch_size * tokens_per_request + self.c * batch_size * context_len

    def draft_seconds(self, batch_size, depth):
        return self.d * depth if depth > 0 else 0.0

    def train_seconds(self, tokens):
        return self.train * tokens


class ConstCost:
    """Every forward costs ``v``, every draft ``dr`` (depth > 0): the hand-checkable case."""

    def __init__(self, v=0.01, dr=0.004):
        self.v, self.dr = v, dr

    def verify_seconds(self, batch_size, tokens_per_request, context_len=0):
        return self.v

    def draft_seconds(self, batch_size, depth):
        return self.dr if depth > 0 else 0.0


def perfect() -> ParametricAcceptance:
    return ParametricAcceptance(default=CategoryAcceptance(1.0, math.inf), decay=1.0)


def acc(alpha=0.7, decay=0.95, **kw) -> ParametricAcceptance:
    return ParametricAcceptance(default=CategoryAcceptance(alpha, 20.0), decay=decay, **kw)


def small_trace(n=40, rate=4.0, seed=0, prompt=(50, 400), out=(5, 120)) -> Trace:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    t -= t[0]
    return Trace(tuple(Request(round(float(a), 6), int(rng.integers(*prompt)), int(rng.integers(*out)), "chat")
                       for a in t))


# ---- the model: exact cases ----------------------------------------------------------------------------------------
def test_hand_checked_single_request():
    """1 request, prompt 100 (one chunk), 10 output tokens, static k=3, every draft accepted.

    t=0     prefill (verify cost v)                → token 1 at v (TTFT)
    step 1  k=3: draft dr + verify v → 4 tokens    → 5
    step 2  k=3                                    → 9
    step 3  k=min(3, 10-9-1)=0: plain step, v only → 10
    finish = v + 2(dr + v) + v
    """
    v, dr = 0.01, 0.004
    res = simulate(Trace((Request(0.0, 100, 10),)), ConstCost(v, dr), make_policy("static", k=3), seed=0,
                   acceptance=perfect())
    assert res.summary["requests"] == 1
    assert res.requests["first_token"][0] == pytest.approx(v)
    assert res.requests["finish"][0] == pytest.approx(v + 2 * (dr + v) + v)
    assert res.summary["iterations"] == 4
    assert res.summary["spec_steps"] == 2 and res.summary["accepted_tokens"] == 6
    assert res.summary["mean_acceptance_length"] == pytest.approx(4.0)
    assert res.summary["tpot_s"]["p50"] == pytest.approx((2 * (dr + v) + v) / 9)


def test_speedup_ratio_matches_cost_model():
    """Speculation off vs static k=3 with perfect acceptance: the decode-time ratio is exactly
    (k+1)·T(1,1) / (D(1,k) + T(1,k+1)) when the output after the first token is a multiple of k+1."""
    cost = LinearCost(a=5e-3, b=2e-5, c=0.0, d=2e-3)
    k, n_dec = 3, 400
    trace = Trace((Request(0.0, 64, n_dec + 1),))
    off = simulate(trace, cost, make_policy("static", k=0), acceptance=perfect())
    on = simulate(trace, cost, make_policy("static", k=k), acceptance=perfect())
    decode = lambda r: r.requests["finish"][0] - r.requests["first_token"][0]
    expected = (k + 1) * cost.verify_seconds(1, 1) / (cost.draft_seconds(1, k) + cost.verify_seconds(1, k + 1))
    assert decode(off) / decode(on) == pytest.approx(expected, rel=1e-9)
    assert off.summary["iterations"] == 1 + n_dec and on.summary["iterations"] == 1 + n_dec // (k + 1)


def test_chunked_prefill_costs_one_iteration_per_chunk():
    res = simulate(Trace((Request(0.0, 1000, 1),)), ConstCost(0.01), make_policy("static", k=2),
                   SimConfig(max_prefill_tokens=256), acceptance=perfect())
    assert res.summary["iterations"] == 4  # ceil(1000 / 256) chunks; the last one emits the only token
    assert res.requests["first_token"][0] == pytest.approx(0.04)
    assert res.summary["time_share"]["prefill"] == pytest.approx(1.0)


def test_prefill_step_prices_each_chunk_with_its_own_prefix():
    """Two fresh 2,048-token prompts in one step cost about two prefills (one fixed cost), not one 4,096-token
    prompt (whose attention pairs grow as T^2); a long prompt's later chunk pays attention to its own prefix, not the
    mean prefix of the step's chunks."""
    from sglang_ext.core.costs import CostModel

    cost = CostModel.fit(CPU_PROFILE)
    one = cost.prefill_seconds(2048, 0)
    two = cost.prefill_batch_seconds([(2048, 0), (2048, 0)])
    assert cost.prefill_batch_seconds([(2048, 0)]) == pytest.approx(one)
    assert one * 1.5 < two <= 2 * one * (1 + 1e-9)
    assert cost.prefill_seconds(4096, 0) > 1.1 * two  # the old pricing: the batch as one prompt
    long, short = 7219, 100
    res = simulate(Trace((Request(0.0, long, 1, id="long"), Request(0.0, short, 1, id="short"))), cost,
                   make_policy("static", k=0), SimConfig(max_prefill_tokens=4096), acceptance=perfect())
    step1 = cost.prefill_batch_seconds([(4096, 0)])
    step2 = cost.prefill_batch_seconds([(long - 4096, 4096), (short, 0)])
    assert res.requests["first_token"][0] == pytest.approx(step1 + step2, rel=1e-9)
    assert step2 > cost.prefill_seconds(long - 4096 + short, round(4096 / 2))  # own prefix > mean prefix


# ---- determinism and conservation ------------------------------------------------------------------------------------
def test_same_seed_identical_result_different_seed_differs():
    trace = small_trace(60)
    run = lambda seed: simulate(trace, LinearCost(), make_policy("dsde"), SimConfig(max_batch_size=16),
                                seed=seed, acceptance=acc())
    a, b, c = run(1), run(1), run(2)
    assert a.outcome() == b.outcome()
    assert a.outcome() != c.outcome()


def test_conservation_every_request_finishes_with_its_tokens():
    trace = small_trace(80, rate=20.0)
    res = simulate(trace, LinearCost(), make_policy("static", k=4), SimConfig(max_batch_size=8), acceptance=acc())
    assert res.complete and res.summary["unfinished"] == 0
    assert sorted(res.requests["index"].tolist()) == list(range(len(trace)))
    order = np.argsort(res.requests["index"])
    assert res.requests["output_tokens"][order].tolist() == trace.output_tokens.tolist()
    assert res.summary["output_tokens"] == int(trace.output_tokens.sum())
    lat = res.latencies()
    assert (lat["ttft"] > 0).all() and (lat["e2e"] >= lat["ttft"]).all()


def test_kv_capacity_forces_preemption_and_everything_finishes():
    trace = Trace(tuple(Request(0.0, 300, 200) for _ in range(6)))
    cfg = SimConfig(kv_capacity=1200, max_batch_size=8)
    res = simulate(trace, LinearCost(), make_policy("static", k=4), cfg, acceptance=acc())
    assert res.summary["preemptions"] > 0
    assert res.summary["requests"] == 6 and res.summary["output_tokens"] == 6 * 200
    free = simulate(trace, LinearCost(), make_policy("static", k=4), SimConfig(max_batch_size=8), acceptance=acc())
    assert free.summary["preemptions"] == 0
    # a request that can never fit is rejected (counted, like a server's 4xx), not a crash; the others are served
    mixed = Trace((Request(0.0, 300, 20, id="a"), Request(0.1, 1000, 300, id="big"), Request(0.2, 300, 20, id="b")))
    res = simulate(mixed, LinearCost(), make_policy("static"), cfg)
    assert res.complete and res.summary["requests"] == 2 and res.summary["rejected"] == 1
    assert res.summary["unfinished"] == 0
    assert res.rejected == [{"index": 1, "id": "big", "arrival": 0.1, "prompt_tokens": 1000, "output_tokens": 300,
                             "reason": "needs 1300 KV tokens > kv_capacity=1200"}]
    ctx = simulate(mixed, LinearCost(), make_policy("static"), SimConfig(max_context_len=512))
    assert ctx.summary["rejected"] == 1 and "max_context_len=512" in ctx.rejected[0]["reason"]


def test_mixed_schedule_and_prefill_first_both_conserve():
    trace = small_trace(40, rate=10.0)
    for schedule in ("mixed", "prefill_first"):
        res = simulate(trace, LinearCost(), make_policy("static", k=3),
                       SimConfig(schedule=schedule, max_prefill_tokens=128, kv_capacity=4000), acceptance=acc())
        assert res.summary["requests"] == 40 and res.summary["output_tokens"] == int(trace.output_tokens.sum())


# ---- the policies are the core's, driven through the host protocol ---------------------------------------------------
def test_policy_objects_are_the_cores():
    trace = small_trace(30, rate=10.0)
    for name in ("static", "dsde", "tide-control", "sglang-adaptive", "goodput", "bandit"):
        policy = make_policy(name, cost_model=LinearCost()) if name in ("tide-control", "goodput") \
            else make_policy(name)
        assert type(policy).__module__.startswith("sglang_ext.core.policies")
        sim = Simulation(trace, LinearCost(), policy, SimConfig(max_batch_size=8), acceptance=acc())
        res = sim.run()
        assert sim.policies[0] is policy
        assert res.summary["requests"] == 30, name
        assert res.config["policy"]["class"].startswith("sglang_ext.core.policies")


def test_dsde_batch_cap_respected_in_simulated_decisions():
    policy = make_policy("dsde", window=8)
    seen = {"capped_steps": 0, "checked": 0}
    orig = policy.observe

    def observe(result):
        cap = result.config.get("sl_cap")
        if cap is not None and result.batch_size > 1:
            seen["capped_steps"] += 1
            for r in result.requests:
                if policy.bounds(r.rid) is not None:  # post-warm-up requests are the capped ones
                    assert r.proposed <= cap
                    seen["checked"] += 1
        for r in result.requests:  # the synthetic KL covers every proposed position
            assert len(r.kl) == r.proposed
        orig(result)

    policy.observe = observe
    trace = small_trace(40, rate=20.0, out=(60, 200))
    res = simulate(trace, LinearCost(), policy, SimConfig(max_batch_size=16), acceptance=acc(0.75, 0.9))
    assert res.summary["requests"] == 40
    assert seen["capped_steps"] > 10 and seen["checked"] > 50


def test_admit_and_release_balance():
    class Spy:
        name = "spy"

        def __init__(self):
            self.admitted, self.released, self.live = [], [], set()

        def admit(self, rid):
            self.admitted.append(rid)
            self.live.add(rid)

        def release(self, rid):
            self.released.append(rid)
            self.live.discard(rid)

        def decide(self, batch):
            from sglang_ext.core.policies import Decision

            assert set(batch.rids) <= self.live
            return Decision(True, {rid: 2 for rid in batch.rids})

        def observe(self, result):
            assert {r.rid for r in result.requests} <= self.live

    spy = Spy()
    trace = Trace(tuple(Request(0.0, 300, 100) for _ in range(5)))
    simulate(trace, LinearCost(), spy, SimConfig(kv_capacity=900), acceptance=acc())
    assert sorted(spy.admitted) == sorted(spy.released) == [f"r{i}" for i in range(5)]


# ---- acceptance models -------------------------------------------------------------------------------------------------
def test_fit_recovers_alpha_and_decay():
    rec = synthetic_recording(alpha=0.8, decay=0.85, k=6, requests=200, steps=40, seed=3)
    fit = fit_acceptance(rec, k=6)
    assert fit.alpha == pytest.approx(0.8, rel=0.1)
    assert fit.decay == pytest.approx(0.85, rel=0.1)
    assert fit.steps == 200 * 40
    model = fit.model()
    assert model.decay == fit.decay


def test_parametric_acceptance_matches_its_formula():
    """E[accepted] for depth k = Σ_{j=1..k} Π_{i=1..j} α δ^{i-1}."""
    alpha, decay, k = 0.7, 0.9, 5
    rec = synthetic_recording(alpha, decay, k, requests=1, steps=40000, seed=0)
    expected = sum(math.prod(alpha * decay ** (i - 1) for i in range(1, j + 1)) for j in range(1, k + 1))
    assert np.mean(rec[0]) == pytest.approx(expected, rel=0.02)


def test_replay_by_position_and_clip():
    assert positions_from_steps([3, 0, 2]) == [3, 2, 1, 0, 0, 2, 1, 0]
    m = ReplayAcceptance(perfect())
    m.reset(0)
    st = m.start(Request(0.0, 10, 8, acceptance=(3, 0, 2)))
    assert m.sample(st, 0, 4, False)[0] == 3  # the recorded step
    assert m.sample(st, 0, 2, False)[0] == 2  # clipped: min(recorded, k)
    assert m.sample(st, 1, 4, False)[0] == 2  # inside a recorded accepted run
    assert m.sample(st, 4, 4, False)[0] == 0
    assert m.sample(st, 20, 3, False)[0] == 3  # past the record: the (perfect) fallback


def test_replay_acceptance_json_keeps_recorded_kl():
    """Sweep and tune workers get the model as JSON: the recorded KL must survive the trip (DSDE reads it)."""
    kl = {"r0": [0.5, None, 1.25], "r1": [0.0]}
    m = acceptance_from_json(json.loads(json.dumps(ReplayAcceptance(acc(0.3), kl=kl).to_json())))
    assert isinstance(m, ReplayAcceptance) and m.kl == kl and m.fallback.default.alpha == pytest.approx(0.3)
    m.reset(0)
    st = m.start(Request(0.0, 10, 8, acceptance=(2, 0), id="r0"))
    assert m.sample(st, 0, 3, True)[1][0] == 0.5 and m.sample(st, 0, 3, True)[1][2] == 1.25
    assert acceptance_from_json(ReplayAcceptance(acc(0.3)).to_json()).kl is None
    with pytest.raises(ValueError, match="kl"):
        acceptance_from_json({"kind": "replay", "kl": [1, 2]})


def test_replayed_trace_acceptance_drives_the_simulation():
    trace = Trace((Request(0.0, 20, 13, acceptance=(3, 3, 3)),))
    res = simulate(trace, ConstCost(), make_policy("static", k=3), acceptance=ReplayAcceptance(acc(0.0)))
    # recorded by output position: steps started at 0, 4, 8. The simulated prefill emits position 0, so the first
    # simulated step starts at 1, inside the first recorded run (3 - 1 = 2 accepted), then at 4 and 8 (3 each)
    assert res.summary["spec_steps"] == 3 and res.summary["accepted_tokens"] == 2 + 3 + 3
    assert res.summary["output_tokens"] == 13


def test_drift_lowers_and_trainer_raises_acceptance():
    trace = small_trace(60, rate=2.0, out=(80, 160))
    base = simulate(trace, LinearCost(), make_policy("static", k=4), acceptance=acc(0.6, 1.0))
    drift = simulate(trace, LinearCost(), make_policy("static", k=4),
                     acceptance=acc(0.6, 1.0, drift=Drift(((0.0, 1.0), (5.0, 0.5)))))
    cfg = SimConfig(trainer="separate", train_round_tokens=2000, train_gain=0.5)
    trained = simulate(trace, LinearCost(), make_policy("static", k=4), cfg, acceptance=acc(0.6, 1.0, ceiling=0.95))
    al = lambda r: r.summary["mean_acceptance_length"]
    assert al(drift) < al(base) < al(trained)
    assert trained.summary["train_rounds"] >= 3
    shared = simulate(trace, LinearCost(), make_policy("static", k=4), SimConfig(trainer="shared",
                      train_round_tokens=2000, train_gain=0.5), acceptance=acc(0.6, 1.0, ceiling=0.95))
    assert shared.summary["busy_s"]["train"] > 0 and shared.summary["train_rounds"] >= 1
    assert trained.summary["busy_s"]["train"] == 0  # a separate device does not take serving time


def test_acceptance_spec_parsing(tmp_path):
    m = parse_acceptance("alpha=0.6,conc=50,decay=0.9,code.alpha=0.85,drift=0:1;100:0.5")
    assert isinstance(m, ParametricAcceptance) and m.categories["code"].alpha == 0.85 and m.drift(50) == 0.75
    assert isinstance(parse_acceptance(None), ReplayAcceptance)
    assert isinstance(parse_acceptance("replay:alpha=0.5"), ReplayAcceptance)
    f = tmp_path / "acc.json"
    f.write_text(json.dumps({"recording": synthetic_recording(0.7, 1.0, 4, 20, 30), "k": 4}))
    assert parse_acceptance(str(f)).default.alpha == pytest.approx(0.7, rel=0.1)
    with pytest.raises(ValueError, match="unknown key"):
        parse_acceptance("alpah=0.5")


# ---- cluster -----------------------------------------------------------------------------------------------------------
def test_replicas_share_load_and_routers_differ():
    trace = small_trace(80, rate=40.0, out=(50, 150))
    one = simulate(trace, LinearCost(), make_policy("static", k=3), SimConfig(max_batch_size=4), acceptance=acc())
    results = {}
    for router in ("round-robin", "least-loaded", "least-tokens"):
        res = simulate(trace, LinearCost(), make_policy("static", k=3),
                       SimConfig(max_batch_size=4, replicas=3, router=router), acceptance=acc())
        assert res.summary["requests"] == 80
        assert set(res.requests["replica"].tolist()) == {0, 1, 2}
        assert res.summary["e2e_s"]["mean"] < one.summary["e2e_s"]["mean"]
        results[router] = res.requests["replica"].tolist()
    assert results["round-robin"] != results["least-loaded"]


# ---- robustness ----------------------------------------------------------------------------------------------------------
def test_streaming_trace_error_keeps_partial_result(tmp_path):
    from sglang_ext.formats.trace import stream_trace

    f = tmp_path / "bad.jsonl"
    lines = [json.dumps({"arrival": i * 0.1, "prompt_tokens": 50, "output_tokens": 20}) for i in range(10)]
    lines.insert(7, '{"arrival": 0.75, "prompt_tokens": -3, "output_tokens": 20}')
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(SimulationError, match=r"bad\.jsonl:8") as e:
        simulate(stream_trace(f), LinearCost(), make_policy("static", k=2), acceptance=acc())
    part = e.value.result
    assert not part.complete and "bad.jsonl:8" in part.error
    assert part.summary["requests"] == 7  # every request read before the bad line ran to completion


def test_interrupt_leaves_a_readable_partial_result():
    policy = make_policy("static", k=2)
    calls = {"n": 0}
    orig = policy.decide

    def decide(view):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        return orig(view)

    policy.decide = decide
    sim = Simulation(small_trace(30, rate=2.0), LinearCost(), policy, acceptance=acc())
    with pytest.raises(KeyboardInterrupt):
        sim.run()
    part = sim.result()
    assert not part.complete and "interrupted" in part.error
    assert 0 < part.summary["requests"] < 30


def test_result_json_round_trip(tmp_path):
    res = simulate(small_trace(10), LinearCost(), make_policy("static", k=2), acceptance=acc())
    back = SimResult.load(res.save(tmp_path / "r.json"))
    assert back.summary == json.loads(json.dumps(res.summary))
    assert back.requests["finish"].tolist() == res.requests["finish"].tolist()


# ---- the real cost model (sglang_ext.core.costs) --------------------------------------------------------------------------
def test_profile_loaded_through_costs_module():
    from sglang_ext.core.costs import CostModel

    cost = CostModel.fit(CPU_PROFILE)
    trace = read_trace(TINY).head(10)
    res = simulate(trace, cost, make_policy("tide-control", cost_model=cost), acceptance=acc())
    assert res.summary["requests"] == 10 and res.summary["throughput_tok_s"] > 0
    assert res.summary["busy_s"]["verify"] > 0


# ---- CLI ------------------------------------------------------------------------------------------------------------------
def _cli(*argv: str) -> int:
    from sglang_ext.cli import main

    return main(list(argv))


def test_cli_replay_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    rc = _cli("sim", "replay", "--trace", str(TINY), "--profile", str(CPU_PROFILE), "--policy", "dsde",
              "--policy-param", "max_k=6", "--acceptance", "alpha=0.7,decay=0.95", "--head", "12",
              "--max-batch-size", "8", "--seed", "3", "--out", str(out))
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    assert res["complete"] and res["summary"]["requests"] == 12
    assert res["config"]["policy"]["params"]["max_k"] == 6 and res["config"]["seed"] == 3
    assert (out / "requests.csv").read_text().count("\n") == 13
    assert "throughput" in capsys.readouterr().out


def test_cli_replay_bad_line_names_file_line_and_writes_partial(tmp_path, capsys):
    lines = TINY.read_text().splitlines()
    lines[9] = lines[9].replace('"output_tokens": ', '"output_tokens": "x", "oops": ')
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    rc = _cli("sim", "replay", "--trace", str(bad), "--profile", str(CPU_PROFILE), "--policy", "static",
              "--acceptance", "alpha=0.7", "--out", str(out))
    assert rc == 1
    assert "bad.jsonl:10" in capsys.readouterr().err
    part = json.loads((out / "partial.json").read_text())
    assert part["complete"] is False and "bad.jsonl:10" in part["error"]
    assert part["summary"]["requests"] == 8  # lines 2..9 (line 1 is the header)


def test_cli_bad_profile_names_the_file(tmp_path, capsys):
    prof = tmp_path / "p.json"
    prof.write_text('{"format": "sglang-ext-profile/1", "meta": {"model": "m", "hardware": "h"}, "target": []}')
    rc = _cli("sim", "replay", "--trace", str(TINY), "--profile", str(prof), "--out", str(tmp_path / "o"))
    assert rc == 1
    assert "p.json" in capsys.readouterr().err


def test_cli_tune_writes_a_loadable_config(tmp_path):
    from sglang_ext.core.policies.config import load_policy_config

    cfg = tmp_path / "static.json"
    rc = _cli("sim", "tune", "--trace", str(TINY), "--profile", str(CPU_PROFILE), "--policy", "static",
              "--params", "k", "--objective", "throughput", "--head", "8", "--maxiter", "1", "--popsize", "3",
              "--acceptance", "alpha=0.8,decay=0.95", "--out", str(cfg))
    assert rc == 0
    policy = load_policy_config(cfg)
    assert policy.name == "static" and 0 <= policy.config["k"] <= 64
    report = json.loads((tmp_path / "static.tune.json").read_text())
    assert report["best"]["k"] == policy.config["k"] and report["evaluations"] >= 2
    assert report["score"] >= report["default_score"]


def test_cli_replay_loads_a_policy_config(tmp_path):
    from sglang_ext.core.policies.config import save_policy_config

    cfg = tmp_path / "dsde.json"
    save_policy_config(cfg, make_policy("dsde", max_k=5), include_state=False)
    out = tmp_path / "run"
    rc = _cli("sim", "replay", "--trace", str(TINY), "--profile", str(CPU_PROFILE), "--policy-config", str(cfg),
              "--head", "5", "--out", str(out))
    assert rc == 0
    assert json.loads((out / "result.json").read_text())["config"]["policy"]["params"]["max_k"] == 5


def test_sweep_grid_over_policy_engine_and_load(tmp_path):
    from simulator.tune import sweep, write_sweep

    trace = small_trace(30, rate=10.0)
    rows = sweep(trace, LinearCost(), "static", {"k": [0, 3], "max_batch_size": [4], "time_scale": [1.0, 0.5]},
                 acceptance=acc(0.8, 1.0), jobs=1)
    assert [r.grid for r in rows] == [{"k": k, "max_batch_size": 4, "time_scale": s}
                                      for k in (0, 3) for s in (1.0, 0.5)]
    al = {(r.grid["k"], r.grid["time_scale"]): r.summary["mean_acceptance_length"] for r in rows}
    assert al[(0, 1.0)] == 1.0 and al[(3, 1.0)] > 2.0
    csv_path, json_path = write_sweep(rows, tmp_path)
    assert csv_path.read_text().count("\n") == 5
    from analysis.sim_plots import plot_sweep

    assert plot_sweep(json.loads(json_path.read_text())["rows"], "k", tmp_path / "s.png").stat().st_size > 0


def test_latency_cdf_plot(tmp_path):
    from analysis.sim_plots import main

    res = simulate(small_trace(20), LinearCost(), make_policy("static", k=2), acceptance=acc())
    f = res.save(tmp_path / "result.json")
    assert main([str(f), "-o", str(tmp_path / "cdf.png")]) == 0
    assert (tmp_path / "cdf.png").stat().st_size > 0


def test_parallel_sweep_equals_serial():
    from simulator.tune import sweep

    trace = small_trace(20, rate=10.0)
    kw = {"acceptance": acc(0.8, 0.95), "seed": 4}
    serial = sweep(trace, LinearCost(), "dsde", {"max_k": [2, 6]}, jobs=1, **kw)
    parallel = sweep(trace, LinearCost(), "dsde", {"max_k": [2, 6]}, jobs=2, **kw)
    assert [r.summary for r in serial] == [r.summary for r in parallel]
    assert serial[0].summary != serial[1].summary


def test_adaptation_pays_after_the_first_round_lands():
    """A separate trainer whose rounds take a measured 4 s: the trained and static replays match before the first
    round lands (same seed, same acceptance draws), and from a window after it the trained run is faster in
    every window; round times are recorded in the summary."""
    from simulator.adaptation import adaptation_pays

    trace = small_trace(120, rate=3.0, out=(60, 120))
    policy = lambda: make_policy("static", k=4)  # noqa: E731
    static = simulate(trace, LinearCost(), policy(), acceptance=acc(0.3, 1.0, ceiling=0.9))
    cfg = SimConfig(trainer="separate", train_round_tokens=1500, train_gain=0.5, train_round_seconds=4.0)
    trained = simulate(trace, LinearCost(), policy(), cfg, acceptance=acc(0.3, 1.0, ceiling=0.9))
    times = trained.summary["train_round_times"]
    assert len(times) >= 2 and times == sorted(times) and "train_round_times" not in static.summary
    assert all(b - a >= 4.0 - 1e-9 for a, b in zip(times, times[1:]))  # one round at a time, 4 s each
    rep = adaptation_pays(static, trained, window_s=trace.duration / 8)
    assert rep["train_round_times_s"][0] == pytest.approx(times[0] - trace.requests[0].arrival)
    assert rep["pays_after_s"] is not None and rep["pays_after_s"] < trace.duration
    assert rep["speedup_second_half"] > 1.05
    assert all(w["tpot_speedup"] > 1.0 for w in rep["windows"] if w["start_s"] >= rep["pays_after_s"])
    assert rep["windows"][0]["tpot_speedup"] == pytest.approx(1.0, abs=0.02)  # nothing learned yet
    with pytest.raises(ValueError, match="window"):
        adaptation_pays(static, trained, 0.0)
    with pytest.raises(ValueError, match="train_round_seconds"):
        SimConfig(trainer="separate", train_round_seconds=0.0)


def test_cli_replay_compare_static(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ("sim", "replay", "--trace", str(TINY), "--profile", str(CPU_PROFILE), "--policy", "static",
             "--acceptance", "alpha=0.3,decay=1,ceiling=0.8", "--max-batch-size", "8", "--out", str(out))
    assert _cli(*flags, "--compare-static") == 1
    assert "--trainer separate|shared" in " ".join(capsys.readouterr().err.split())
    assert _cli(*flags, "--compare-static", "--trainer", "separate", "--train-round-tokens", "500",
                "--train-gain", "0.5", "--train-round-seconds", "2", "--window", "5") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "adaptation pays after" in text and "TPOT speed-up" in text
    rep = json.loads((out / "adaptation.json").read_text())
    assert rep["window_s"] == 5 and rep["train_round_times_s"]
    assert (out / "result-static.json").is_file() and (out / "result-trained.json").is_file()
    with pytest.raises(SystemExit):  # argparse: a positive number
        _cli(*flags, "--trainer", "separate", "--train-round-seconds", "-1")
    assert "--train-round-seconds" in capsys.readouterr().err


@pytest.mark.parametrize(("trained", "decay"), [(False, 0.9), (True, 0.9), (False, 1.0)])
@pytest.mark.parametrize("path", ["compiled", "arrays", "loop", "switching"])
def test_every_draw_path_matches_a_plain_per_request_draw(trained, decay, path):
    """The compiled draw, the array draw and the small-batch loop (and a run that switches between them) give, for
    every request, what a plain loop over the same two seeded streams gives: ``k_r`` uniforms per request, the
    accepted run while ``u < α δ^i`` (running product), and KL ``(-ln α + i(-ln δ)) z``; across batch sizes 1..70,
    depths -1..8, drift, training and stream refills."""
    from simulator.acceptance import _BLOCK, Drift, ParametricAcceptance, RequestAcceptance

    rng = random.Random(7)
    m = ParametricAcceptance(decay=decay, drift=Drift(((0.0, 1.0), (10.0, 0.7))), kl_noise=0.3)
    m.compiled = path == "compiled"
    m.small_batch = {"arrays": 0, "loop": 10**9}.get(path, 16)
    m.reset(3)
    m.set_time(5.0)
    if trained:
        m.improve(0.3)
    _, u_ss, z_ss = np.random.SeedSequence(3).spawn(3)
    u = np.random.default_rng(u_ss).random(4 * _BLOCK)
    z = np.exp(0.3 * np.random.default_rng(z_ss).standard_normal(4 * _BLOCK) - 0.5 * 0.3 * 0.3)
    ui = zi = 0
    for _ in range(700):
        b = rng.randint(1, 70)
        states = [RequestAcceptance(rng.choice([rng.random(), 1.0, 0.0, 0.99995])) for _ in range(b)]
        ks = [rng.randint(-1, 8) for _ in range(b)]
        if rng.random() < 0.3:  # one depth for the whole batch (the array draw's uniform case)
            ks = [rng.randint(1, 8)] * b
        want_kl = rng.random() < 0.5
        if path == "switching":
            m.compiled = rng.random() < 0.5
            if rng.random() < 0.5:  # the same states list again: its α may be reused
                states = getattr(m, "_last_states", None) or states
                b = len(states)
                ks = [rng.randint(-1, 8) for _ in range(b)]
        got, kl = m.sample_batch(states, [0] * b, ks, want_kl)
        for r, (st, k) in enumerate(zip(states, ks)):
            if k <= 0:
                assert got[r] == 0
                continue
            alpha = m.effective_alpha(st.alpha)
            n, p = 0, alpha
            while n < k and u[ui + n] < p:
                n += 1
                p *= decay
            assert got[r] == n
            if want_kl:
                base = -math.log(alpha) if alpha > 0 else 50.0
                want = [(base + i * -math.log(decay)) * z[zi + i] for i in range(k)]
                assert kl[r, :k].tolist() == pytest.approx(want, rel=1e-12)
                zi += k
            ui += k
        assert (kl is None) == (not want_kl or max(ks) <= 0)
    assert ui > 2 * _BLOCK  # the streams were refilled on the way


def _busy_trace(n: int, seed: int, recorded: bool = False) -> list[Request]:
    """Requests arriving faster than one replica serves them (batches fill up), some with recorded acceptance."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(4.0)
        o = rng.randint(1, 60)
        acc = tuple(rng.randint(0, 4) for _ in range(o)) if recorded and rng.random() < 0.4 else None
        out.append(Request(t, rng.randint(4, 300), o, acceptance=acc, id=f"q{i}"))
    return out


_STEP_CASES = {  # name: (engine configuration, policy)
    "prefill_first-cap": (SimConfig(max_draft_tokens=3, max_batch_size=48, record_steps=True), "dsde"),
    "mixed-kv-preemption": (SimConfig(schedule="mixed", kv_capacity=1500, max_batch_size=32, record_steps=True),
                            "static"),
    "reference-absorb": (SimConfig(schedule="reference", absorb_per_token_s=1e-4, max_batch_size=16,
                                   max_prefill_tokens=128, record_steps=True), "dsde"),
    "replicas-least-tokens": (SimConfig(replicas=2, router="least-tokens", record_steps=True), "goodput"),
    "replay-recorded": (SimConfig(record_steps=True), "tide-control"),
    "switching": (SimConfig(kv_capacity=2500, record_steps=True), "dsde"),
}


@pytest.mark.parametrize("case", sorted(_STEP_CASES))
def test_compiled_replica_step_matches_the_python_step(case, monkeypatch):
    """The replica's two ways through a decode step — Python over the request objects, compiled passes over the
    running requests' rows — give the same replay: every request's times and counts, the summary and every step,
    across per-request and uniform lengths, a depth cap, KV preemption (rows popped and written back), the
    reference schedule's first tokens and drafter backlogs, a router that reads outstanding tokens, recorded
    acceptance (positions read from the rows), and a run that switches to the compiled step part-way."""
    from sglang_ext.core.costs import CostModel
    from simulator.model import Replica

    cost = CostModel.fit(CPU_PROFILE)
    config, policy = _STEP_CASES[case]
    trace = _busy_trace(400, 11, recorded=case == "replay-recorded")

    def run(compiled: bool, switch_at: float | None = None) -> tuple[SimResult, Simulation]:
        monkeypatch.setattr(Replica, "compiled", compiled if switch_at is None else False)
        extra = {} if policy == "static" else {"cost_model": cost}
        sim = Simulation(trace, cost, make_policy(policy, **extra), config, seed=4)
        if switch_at is not None:  # Python steps up to switch_at, compiled ones after
            sim.run(until=switch_at)
            assert all(r._rows is None for r in sim.replicas)
            monkeypatch.setattr(Replica, "compiled", True)
            sim.error = None
        return sim.run(), sim

    (python, sp), (compiled, sc) = run(False), run(True, 30.0 if case == "switching" else None)
    assert all(r._rows is None for r in sp.replicas) and all(r._rows is not None for r in sc.replicas)
    assert python.complete and compiled.complete
    for name in python.requests:
        assert np.array_equal(python.requests[name], compiled.requests[name], equal_nan=True), name
    assert python.summary == compiled.summary and python.steps == compiled.steps
    assert len(python.requests["finish"]) == len(trace) and max(python.steps["depth"]) > 1
    if config.kv_capacity is not None:  # requests were preempted (and their rows written back) on the way
        assert python.requests["preemptions"].sum() > 0


def test_draw_turns_compiled_after_enough_requests(monkeypatch):
    """With ``compiled`` left to the model, a run draws steps of more than ``small_batch`` requests on the array path
    until it has drawn ``compile_after`` requests in them, then with the compiled pass (loading numba then; here
    already loaded), and small steps always with the Python loop — the same numbers throughout as a model kept on
    the Python paths."""
    import sys

    from simulator.acceptance import ParametricAcceptance, RequestAcceptance, compiled_kernels

    auto, python = ParametricAcceptance(decay=0.9), ParametricAcceptance(decay=0.9)
    auto.compile_after, python.compiled = 100, False
    compiled_kernels()  # (loaded before numba is hidden below: never a second import of it)
    monkeypatch.delitem(sys.modules, "numba", raising=False)  # as if numba were not loaded yet
    used = []
    compiled = auto._sample_compiled
    monkeypatch.setattr(auto, "_sample_compiled", lambda *a: used.append(len(a[1])) or compiled(*a))
    for m in (auto, python):
        m.reset(5)
    rng = random.Random(2)
    large = 0  # requests drawn in steps above small_batch
    for _ in range(40):
        b = rng.choice([3, 20])
        states = [RequestAcceptance(rng.random()) for _ in range(b)]
        ks = [rng.randint(0, 6) for _ in states]
        before = len(used)
        a1, kl1 = auto.sample_batch(states, [0] * b, ks, True)
        a2, kl2 = python.sample_batch(states, [0] * b, ks, True)
        assert a1.tolist() == a2.tolist()
        assert all(kl1[r, :k].tolist() == kl2[r, :k].tolist() for r, k in enumerate(ks))  # (rows valid up to k_r)
        assert (len(used) > before) == (b > auto.small_batch and large >= 100)  # compiled: large steps after 100
        large += b if b > auto.small_batch else 0
    assert used
