"""Speculation-control policies: each rule against hand-computed numbers, bounds under random streams, the DSDE
cap, bandit regret, the TIDE on/off rule, composition, configs and state round trips.

Expected values are computed here from the formulas written out (closed forms, explicit weights), never by
calling the implementation under test.
"""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_ext.core.policies import (
    LENGTH_POLICIES,
    POLICIES,
    BatchView,
    ComposedPolicy,
    Decision,
    Param,
    Policy,
    UpdateRoundStats,
    apply_batch_cap,
    make_policy,
    oracle_static,
    throughput_gain,
    tunables,
)
from sglang_ext.core.policies.config import (
    load_policy_config,
    policy_from_dict,
    policy_to_dict,
    save_policy_config,
)
from sglang_ext.core.signals import RequestStep, StepResult


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
class LinearCost:
    """A known cost model: V(b, t) = 10 ms + 1 ms per batched token; 2 ms per draft step."""

    def verify_seconds(self, batch_size: int, tokens_per_request: int, context_len: int = 0) -> float:
        return 0.010 + 0.001 * batch_size * tokens_per_request

    def draft_seconds(self, batch_size: int, depth: int) -> float:
        return 0.002 * depth


def spec_step(pairs, verify=0.02, draft=0.005, **kw) -> StepResult:
    """A speculative step from (rid, proposed, accepted) triples."""
    return StepResult(requests=[RequestStep(r, k, a) for r, k, a in pairs], speculated=True,
                      verify_seconds=verify, draft_seconds=draft, **kw)


def closed_form_tokens(alpha: float, k: int) -> float:
    return k + 1.0 if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def wvar(x, w):
    mu = sum(a * b for a, b in zip(x, w)) / sum(w)
    return sum(b * (a - mu) ** 2 for a, b in zip(x, w)) / sum(w)


# ----------------------------------------------------------------------------------------------------------------
# Param additions and the registry
# ----------------------------------------------------------------------------------------------------------------
def test_param_nullable_json_and_tunable():
    p = Param("decay", None, 0.5, 0.999)
    assert p.check(None) is None and p.check("0.9") == 0.9
    with pytest.raises(ValueError, match=r"decay=2.0 outside \[0.5, 0.999\]"):
        p.check(2.0)
    j = Param("arms", [1, 2], kind="json")
    assert j.check([{"k": 1}]) == [{"k": 1}] and not j.tunable
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        j.check({1, 2})
    assert Param("k", 4, 0, 8, "int").tunable


def test_registry_and_tunables():
    assert set(POLICIES) == {"static", "dsde", "tide-control", "sglang-adaptive", "goodput", "bandit", "update-bandit"}
    assert "update-bandit" not in LENGTH_POLICIES
    names = {p.name for p in tunables("dsde")}
    assert {"max_k", "decay", "window", "variant", "cap"} <= names
    assert "arms" not in {p.name for p in tunables("bandit")}  # JSON, not searchable
    for name in POLICIES:
        for p in tunables(name):
            assert p.kind == "choice" or (p.low is not None and p.high is not None), (name, p.name)
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope")
    with pytest.raises(ValueError, match="no parameter"):
        make_policy("static", depth=3)


# ----------------------------------------------------------------------------------------------------------------
# static + oracle
# ----------------------------------------------------------------------------------------------------------------
def test_static_and_oracle():
    d = make_policy("static", k=3).decide(BatchView(["a", "b"]))
    assert d.speculate and d.lengths == {"a": 3, "b": 3}
    d0 = make_policy("static", k=0).decide(BatchView(["a"]))
    assert not d0.speculate and d0.lengths == {"a": 0}
    calls = []

    def evaluate(k):
        calls.append(k)
        return {1: 100.0, 2: 150.0, 3: 170.0, 4: 170.0, 5: 120.0}[k]

    best, table = oracle_static(evaluate, [5, 3, 1, 4, 2, 3])
    assert best == 3  # tie 3/4 at 170 goes to the smaller k
    assert table == {1: 100.0, 2: 150.0, 3: 170.0, 4: 170.0, 5: 120.0}
    assert calls == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------------------------------------------
# DSDE
# ----------------------------------------------------------------------------------------------------------------
def test_dsde_warmup_doubles_until_max_then_holds():
    p = make_policy("dsde", cost_cap=False, window=30, init_k=2, max_k=10)
    seen = [p.decide(BatchView(["r"])).lengths["r"]]
    for accepted_all in (True, True, True, False):
        k = seen[-1]
        p.observe(StepResult([RequestStep("r", k, k if accepted_all else 1, kl=[0.1] * k)]))
        seen.append(p.decide(BatchView(["r"])).lengths["r"])
    assert seen == [2, 4, 8, 10, 10]  # 2 -> 4 -> 8 -> min(16, 10); a rejection keeps k = max(k, min_k)


@pytest.mark.parametrize("temperature, expected", [(0.0, 1), (2.0, 3)])
def test_dsde_bounds_and_rule_by_hand(temperature, expected):
    p = make_policy("dsde", cost_cap=False, window=9, init_k=4, max_k=10)  # code variant: decay 0.9, factor 0.5, min_frac 0.1
    warm_kl = [0.05, 0.1, 0.1, 0.15]
    step_kl = [0.2, 0.3, 0.2, 0.3, 0.2, 0.1, 0.9, 0.1]
    p.observe(StepResult([RequestStep("r", 4, 4, kl=warm_kl)]))
    assert p.decide(BatchView(["r"])).lengths["r"] == 8  # warm-up doubling
    p.observe(StepResult([RequestStep("r", 8, 2, kl=step_kl, temperature=temperature)]))
    # end of warm-up (history reached W = 9): samples are the first step only
    k_max = min(10, max(1, round(4 * (1 + 0.5 * (sum(warm_kl) / 4) / 0.15))))  # round(4 * 1.3333) = 5
    k_min = min(k_max, max(1, math.ceil(0.1 * k_max)))  # 1
    assert (k_max, k_min) == (5, 1)
    hist = (warm_kl + step_kl)[-9:]
    short = wvar(hist[-3:], [0.9**2, 0.9, 1.0])
    long = wvar(hist, [0.9**i for i in range(8, -1, -1)])
    kl_last = sum(step_kl) / 8
    sf = math.exp(2.0 * (kl_last / temperature if temperature else kl_last)) - 1
    r = short / long * sf
    want = max(k_min, math.ceil((k_max - k_min) * (1 - r) + k_min)) if r <= 1 else k_min
    assert want == expected  # T = 0: r = 3.28 > 1 -> k_min; T = 2: r = 0.68 -> ceil(2.26) = 3
    assert p.decide(BatchView(["r"])).lengths["r"] == expected


def test_dsde_paper_variant_constants():
    p = make_policy("dsde", cost_cap=False, variant="paper", window=9, init_k=4, max_k=10)
    assert (p.decay, p.max_factor, p.min_frac, p.k_floor) == (0.85, 1.0, 0.0, 2)
    p.observe(StepResult([RequestStep("r", 4, 4, kl=[0.05, 0.1, 0.1, 0.15])]))
    p.observe(StepResult([RequestStep("r", 8, 2, kl=[0.1] * 8)]))
    # k_max' = round(4 * (1 + 1.0 * 0.1 / 0.15)) = round(6.67) = 7; k_min' = SL_min = 2
    assert p.bounds("r") == (2, 7)
    q = make_policy("dsde", variant="paper", decay=0.9)  # an explicit constant wins over the variant
    assert q.decay == 0.9 and q.max_factor == 1.0


def test_dsde_without_kl_uses_the_acceptance_proxy():
    p = make_policy("dsde", cost_cap=False, window=6, init_k=4, max_k=10, miss_kl=0.5)
    p.observe(StepResult([RequestStep("r", 4, 4)]))  # proxy [0, 0, 0, 0]; warm-up: 4 >= 4 -> k = 8
    p.observe(StepResult([RequestStep("r", 8, 1, temperature=0.7)]))  # proxy [0, 0.5]: history is full
    # bounds: max accepted 4, proxy KLs all 0 (max treated as 1) -> k_max' = 4, k_min' = ceil(0.4) = 1
    hist = [0, 0, 0, 0, 0, 0.5]
    r = wvar(hist[-2:], [0.9, 1]) / wvar(hist, [0.9**i for i in range(5, -1, -1)]) * (math.exp(2 * 0.25) - 1)
    assert r == pytest.approx(0.9625, abs=1e-3)  # no division by T for the proxy
    assert p.decide(BatchView(["r"])).lengths["r"] == max(1, math.ceil((4 - 1) * (1 - r) + 1)) == 2


def test_batch_cap_by_hand():
    lengths, cap = apply_batch_cap({"a": 2, "b": 3, "c": 7})
    assert cap == 4 and lengths == {"a": 2, "b": 3, "c": 4}  # ceil(12 / 3) = 4
    lengths, cap = apply_batch_cap({"a": 1, "b": 2})
    assert cap == 2 and lengths == {"a": 1, "b": 2}  # ceil(1.5) = 2
    assert apply_batch_cap({}) == ({}, None)


def _drive_dsde(policy, steps, data_rng: random.Random):
    """Feed random steps; after each decide check the cap invariant."""
    pool = [f"r{i}" for i in range(6)]
    for _ in range(steps):
        rids = data_rng.sample(pool, data_rng.randint(1, 5))
        preds = policy.predictions(rids)
        d = policy.decide(BatchView(rids))
        steady = {r: k for r, k in preds.items() if not policy.warming_up(r)}
        cap = math.ceil(sum(steady.values()) / len(steady)) if steady else None
        for r in rids:
            assert d.lengths[r] <= preds[r]  # nobody drafts more than it predicted
            assert policy.k_floor <= d.lengths[r] <= policy.config["max_k"]
            if policy.config["cap"] and r in steady:
                assert d.lengths[r] == min(preds[r], cap)
            else:
                assert d.lengths[r] == preds[r]
        result = []
        for r in rids:
            k = d.lengths[r]
            a = data_rng.randint(0, k)
            kl = [data_rng.uniform(0, 3) for _ in range(k)] if data_rng.random() < 0.8 else []
            result.append(RequestStep(r, k, a, kl=kl, temperature=data_rng.choice([0.0, 0.7, 1.0])))
        policy.observe(StepResult(result))
        if data_rng.random() < 0.1:
            policy.release(data_rng.choice(rids))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cap=st.booleans(), variant=st.sampled_from(["code", "paper"]),
       window=st.integers(2, 12))
def test_dsde_cap_property(seed, cap, variant, window):
    policy = make_policy("dsde", cost_cap=False, cap=cap, variant=variant, window=window, max_k=8, init_k=3)
    _drive_dsde(policy, 40, random.Random(seed))


@pytest.mark.parametrize("accepted, cap", [
    (3, 3),  # α = 3/4: G(1..4) = 1.75/.014, 2.3125/.017, 2.7344/.020, 3.0508/.023 = 125.0, 136.0, 136.7, 132.6
    (0, 1),  # α = 0: every extra position is pure cost, so the cap is the floor 1
])
def test_dsde_cost_cap_by_hand(accepted, cap):
    """One request, V(1, t) = 10 ms + 1 ms·t, D = 2 ms per depth: the cap is the goodput-optimal depth."""
    p = make_policy("dsde", cost_model=LinearCost(), init_k=4, max_k=10, window=30)
    p.observe(StepResult([RequestStep("r", 4, accepted, kl=[0.1] * 4)]))
    assert p.predictions(["r"])["r"] == 4  # still in warm-up, a rejection keeps k
    d = p.decide(BatchView(["r"]))
    assert d.lengths["r"] == cap and d.info["cost_cap"] == cap


def test_dsde_cost_cap_probes_until_costs_are_learned():
    """Without a cost model the fit needs two depths: every other step is capped at 1 until it has them."""
    p = make_policy("dsde", init_k=4, max_k=4, window=30)
    seen = []
    for _ in range(4):
        d = p.decide(BatchView(["r"]))
        k = d.lengths["r"]
        seen.append(k)
        p.observe(StepResult([RequestStep("r", k, 0, kl=[1.0] * k)], verify_seconds=0.010 + 0.003 * (k + 1),
                             draft_seconds=0.002 * k, verify_tokens=k + 1))
    assert seen[:2] == [4, 1]
    assert p.learned.knows_verify() and p.learned.knows_draft()
    assert seen[2:] == [1, 1]  # α = 0 once learned: nothing beyond the floor pays


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), variant=st.sampled_from(["code", "paper"]))
def test_dsde_cost_cap_only_shortens(seed, variant):
    """Fed the same steps, the cost-capped policy drafts min(published DSDE's length, its cost cap), never < 1."""
    rng = random.Random(seed)
    capped = make_policy("dsde", variant=variant, window=6, max_k=8, init_k=3, cost_model=LinearCost())
    plain = make_policy("dsde", variant=variant, window=6, max_k=8, init_k=3, cost_cap=False)
    pool = [f"r{i}" for i in range(6)]
    for _ in range(30):
        rids = rng.sample(pool, rng.randint(1, 5))
        dc, dp = capped.decide(BatchView(rids)), plain.decide(BatchView(rids))
        c = dc.info["cost_cap"]
        for r in rids:
            assert 1 <= dc.lengths[r] <= dp.lengths[r]
            assert dc.lengths[r] == (dp.lengths[r] if c is None else min(dp.lengths[r], c))
        steps = []
        for r in rids:
            k = dc.lengths[r]
            steps.append(RequestStep(r, k, rng.randint(0, k), kl=[rng.uniform(0, 3) for _ in range(k)]))
        capped.observe(StepResult(steps))
        plain.observe(StepResult(steps))


# ----------------------------------------------------------------------------------------------------------------
# tide-control
# ----------------------------------------------------------------------------------------------------------------
# b = 4, gamma = 3: T(4) = 0.014, T(16) = 0.026, D0*gamma = 0.006
#   c*gamma = 0.006 / 0.014 = 0.42857, beta = 0.026 / 0.014 = 1.85714, denominator 2.28571
HAND_DENOM = 0.006 / 0.014 + 0.026 / 0.014


@pytest.mark.parametrize("accepted, alpha, speculate", [
    ([2, 1, 2, 1], 0.6, False),  # s = 6, trials = 3+2+3+2 = 10; E = (1-0.6^4)/0.4 = 2.176 -> 0.952
    ([3, 2, 1, 1], 0.7, True),  # s = 7, trials = 3+3+2+2 = 10; E = (1-0.7^4)/0.3 = 2.533 -> 1.108
])
def test_tide_speculates_iff_speedup_above_one(accepted, alpha, speculate):
    p = make_policy("tide-control", cost_model=LinearCost(), explore=0.0, min_trials=1, depth="fixed")
    rids = ["a", "b", "c", "d"]
    p.observe(spec_step([(r, 3, a) for r, a in zip(rids, accepted)]))
    assert p.alpha(4) == pytest.approx(alpha)
    expected = closed_form_tokens(alpha, 3) / HAND_DENOM
    assert p.predicted_speedup(4) == pytest.approx(expected)
    assert (expected > 1) == speculate
    d = p.decide(BatchView(rids))
    assert d.speculate == speculate
    assert d.lengths == {r: (3 if speculate else 0) for r in rids}


def test_tide_with_callables_and_alpha_one():
    p = make_policy("tide-control", verify_cost=lambda b, t: 0.010 + 0.001 * b * t, draft_cost=lambda b: 0.002,
                    explore=0.0)
    p.observe(spec_step([(r, 3, 3) for r in "abcd"]))  # everything accepted: alpha = 1
    assert p.alpha(4) == 1.0
    assert p.predicted_speedup(4) == pytest.approx(4.0 / HAND_DENOM)  # E -> gamma + 1, no 0/0
    assert p.decide(BatchView(list("abcd"))).speculate


def test_tide_learns_costs_online_and_explores_first():
    p = make_policy("tide-control", explore=0.0, min_trials=1, depth="fixed")
    rids = list("abcd")
    assert p.decide(BatchView(rids)).speculate  # nothing measured: speculate (measures alpha, T(b(g+1)), D0)
    p.observe(spec_step([(r, 3, a) for r, a in zip(rids, [3, 2, 1, 1])], verify=0.026, draft=0.006,
                        verify_tokens=16))
    d = p.decide(BatchView(rids))
    assert not d.speculate and "plain" in d.info["reason"]  # T(b) unmeasured: a plain step
    p.observe(StepResult([RequestStep(r, 0, 0) for r in rids], speculated=False, verify_seconds=0.014,
                         verify_tokens=4))
    assert p.predicted_speedup(4) == pytest.approx(closed_form_tokens(0.7, 3) / HAND_DENOM)
    assert p.decide(BatchView(rids)).speculate


def test_tide_learned_costs_interpolate_over_batch_and_depth():
    p = make_policy("tide-control", explore=0.0)
    p.observe(StepResult([RequestStep("a", 0, 0)] * 2, speculated=False, verify_seconds=0.012, verify_tokens=2))
    p.observe(StepResult([RequestStep("a", 0, 0)] * 6, speculated=False, verify_seconds=0.016, verify_tokens=6))
    p.observe(spec_step([("a", 3, 1)] * 2, verify=0.018, draft=0.006, verify_tokens=8))  # t = 4 at b = 2
    costs = p.learned
    assert costs.verify_seconds(4, 1) == pytest.approx(0.014)  # halfway between b = 2 and b = 6
    assert costs.verify_seconds(2, 3) == pytest.approx(0.012 + (0.018 - 0.012) * (3 - 1) / (4 - 1))
    assert costs.verify_seconds(2, 7) == pytest.approx(0.012 + (0.018 - 0.012) * (7 - 1) / (4 - 1))
    assert costs.draft_seconds(2, 5) == pytest.approx(5 * 0.006 / 3)
    assert p.predicted_speedup(2, gamma=2) is not None  # gamma 2 was never run, yet it can be priced


def test_tide_epsilon_exploration_tries_both_modes():
    p = make_policy("tide-control", cost_model=LinearCost(), explore=0.3, seed=7, depth="fixed")
    p.observe(spec_step([("a", 3, 3)]))
    modes = [p.decide(BatchView(["a"])).speculate for _ in range(200)]
    assert 0 < modes.count(False) < modes.count(True)


# depth="best": the same model asked about every depth 1..gamma (module docstring of tide.py)
#   LinearCost at b = 4: R_off = 4 / 0.014; R_on(g) = 4 E(alpha, g) / (0.002 g + 0.010 + 0.004 (g + 1))
def _rates_by_hand(alpha: float, gamma: int, b: int = 4) -> dict[int, float]:
    return {g: b * closed_form_tokens(alpha, g) / (0.002 * g + 0.010 + 0.001 * b * (g + 1)) for g in range(1, gamma + 1)}


@pytest.mark.parametrize("accepted", [[2, 1, 2, 1], [3, 2, 1, 1], [1, 0, 0, 1], [3, 3, 3, 2]])
def test_tide_best_depth_is_the_argmax_of_the_predicted_rate(accepted):
    p = make_policy("tide-control", cost_model=LinearCost(), explore=0.0, min_trials=1, gamma=3)
    rids = list("abcd")
    p.observe(spec_step([(r, 3, a) for r, a in zip(rids, accepted)]))
    rates = _rates_by_hand(p.alpha(4), 3)
    best = max(rates, key=lambda g: (rates[g], -g))
    assert p.best_depth(4) == best
    for g, r in rates.items():
        assert p.predicted_rate(4, True, g) == pytest.approx(r)
    on = rates[best] / (4 / 0.014) > 1.0
    d = p.decide(BatchView(rids))
    assert (d.speculate, d.info["gamma"]) == (on, best)
    assert d.lengths == {r: (best if on else 0) for r in rids}


def test_tide_best_depth_speculates_where_the_fixed_depth_would_not():
    """alpha = 0.6 at b = 4: gamma = 3 predicts 0.952x (off), gamma = 1 predicts 1.6 / 0.020 vs 1 / 0.014: 1.12x."""
    rids = list("abcd")
    fixed = make_policy("tide-control", cost_model=LinearCost(), explore=0.0, min_trials=1, depth="fixed")
    best = make_policy("tide-control", cost_model=LinearCost(), explore=0.0, min_trials=1)
    for p in (fixed, best):
        p.observe(spec_step([(r, 3, a) for r, a in zip(rids, [2, 1, 2, 1])]))
    assert not fixed.decide(BatchView(rids)).speculate
    d = best.decide(BatchView(rids))
    assert d.speculate and d.lengths == {r: 1 for r in rids}
    assert best.predicted_speedup(4, 1) == pytest.approx(1.6 / 0.020 * 0.014)
    assert ComposedPolicy(make_policy("static", k=3), cap=False, onoff=best).decide(BatchView(rids)).speculate is False


def test_tide_best_depth_flips_explore_every_other_option_within_budget():
    p = make_policy("tide-control", cost_model=LinearCost(), explore=0.5, explore_budget=0.5, min_trials=1, seed=5)
    p.observe(spec_step([("a", 3, 3)], verify=0.014, draft=0.006, verify_tokens=4))  # alpha 1: gamma 3 is best
    seen = set()
    for _ in range(300):
        d = p.decide(BatchView(["a"]))
        k = d.lengths["a"]
        seen.add(k)
        p.observe(spec_step([("a", k, k)], verify=0.010 + 0.001 * (k + 1), draft=0.002 * k, verify_tokens=k + 1)
                  if k else StepResult([RequestStep("a", 0, 0)], speculated=False, verify_seconds=0.011,
                                       verify_tokens=1))
    assert seen == {0, 1, 2, 3}
    assert p.explore_loss <= 0.5 * p.seconds_seen + 0.011


# ----------------------------------------------------------------------------------------------------------------
# sglang-adaptive
# ----------------------------------------------------------------------------------------------------------------
def test_sglang_adaptive_step_up_by_hand():
    p = make_policy("sglang-adaptive")  # slot 1: [1, 3, 5, 7], initial 3, ema starts at 2
    steps = []
    for _ in range(20):
        steps.append(p.decide(BatchView(["a"])).lengths["a"])
        p.observe(spec_step([("a", steps[-1], 3)]))
    # ema_n = 3 - 0.8^n; first recompute after batch 15 (warm-up 10 + interval 5): ema = 3 - 0.8^15 = 2.965
    # down: prev 1 -> threshold 1 - 0.5 - 0.25 = 0.25, no; up: 2.965 > 3 - 0.5 -> 5; 2.965 > 4.5? no -> 5
    assert steps[:15] == [3] * 15 and steps[15:] == [5] * 5
    assert p.slots[1].ema == pytest.approx(3 - 0.8**20)


def test_sglang_adaptive_down_hysteresis_by_hand():
    p = make_policy("sglang-adaptive", initial_steps=5)  # slot 1, ema starts at 4, down_hysteresis -0.25
    rids = list("abcde")
    for accepted in [[2, 2, 3, 2, 3]] * 15:  # batch mean 2.4
        p.observe(spec_step(list(zip(rids, [5] * 5, accepted))))
    ema = 2.4 + (4 - 2.4) * 0.8**15  # 2.456: above 3 - 0.5 - 0.25 = 2.25 (below 2.5: no hysteresis would drop)
    assert p.slots[1].ema == pytest.approx(ema)
    assert p.decide(BatchView(rids)).lengths["a"] == 5
    for _ in range(5):  # batch mean 2.0
        p.observe(spec_step([(r, 5, 2) for r in rids]))
    assert 2.0 + (ema - 2.0) * 0.8**5 <= 2.25  # now it drops one candidate (and not to 1: 2.15 > 1 - 0.75)
    assert p.decide(BatchView(rids)).lengths["a"] == 3


def test_sglang_adaptive_turns_off_then_probes():
    p = make_policy("sglang-adaptive")  # 8 requests route to slot 8: [0, 1, 3]
    rids = [f"r{i}" for i in range(8)]
    for _ in range(15):
        d = p.decide(BatchView(rids))
        p.observe(spec_step([(r, d.lengths[r], 0) for r in rids]))
    # ema = 2 * 0.8^15 = 0.070 <= 1 - 0.5 (to 1) and <= 0.5 (to 0): off
    d = p.decide(BatchView(rids))
    assert not d.speculate and set(d.lengths.values()) == {0}
    for _ in range(5):  # at 0 steps the EMA is frozen; after one interval it probes the next candidate up
        p.observe(StepResult([RequestStep(r, 0, 0) for r in rids], speculated=False, verify_seconds=0.01))
    assert p.decide(BatchView(rids)).lengths["r0"] == 1
    assert p.slots[8].ema == pytest.approx(2 * 0.8**15)


def test_sglang_adaptive_routing():
    p = make_policy("sglang-adaptive")
    assert [p.route(b) for b in (1, 5, 8, 31, 32, 100)] == [1, 1, 8, 8, 32, 64]
    q = make_policy("sglang-adaptive", cuda_graph_bs=[1, 2, 4, 16])
    assert q.route(5) == 8  # padded to the CUDA-graph size 16, then the largest slot <= 16
    with pytest.raises(ValueError, match="candidate_steps"):
        make_policy("sglang-adaptive", slots={"1": {"candidate_steps": []}})


# ----------------------------------------------------------------------------------------------------------------
# goodput
# ----------------------------------------------------------------------------------------------------------------
def _hand_goodput(alphas, k):
    b = len(alphas)
    seconds = 0.010 + 0.001 * b * (k + 1) + 0.002 * k
    return sum(closed_form_tokens(a, k) for a in alphas) / seconds


def test_goodput_argmax_by_hand():
    p = make_policy("goodput", cost_model=LinearCost(), explore=0.0)
    p.observe(spec_step([("a", 8, 4)]))  # alpha_a = 4 / 5 = 0.8
    want = max(range(9), key=lambda k: (_hand_goodput([0.8], k), -k))
    assert want == 3  # G = 90.9, 128.6, 143.5, 147.6, 146.2, ...
    assert p.decide(BatchView(["a"])).lengths == {"a": 3}
    p.observe(spec_step([("b", 8, 1)]))  # alpha_b = 1 / 2
    want2 = max(range(9), key=lambda k: (_hand_goodput([0.8, 0.5], k), -k))
    d = p.decide(BatchView(["a", "b"]))
    assert d.lengths == {"a": want2, "b": want2} and d.info["goodput"] == pytest.approx(_hand_goodput([0.8, 0.5], want2))


def test_goodput_turns_speculation_off_when_nothing_is_accepted():
    p = make_policy("goodput", cost_model=LinearCost(), explore=0.0)
    p.observe(spec_step([("a", 4, 0)]))  # alpha = 0: every extra token only costs
    d = p.decide(BatchView(["a"]))
    assert not d.speculate and d.lengths == {"a": 0}


def test_goodput_one_pass_over_a_profile_decides_as_scoring_every_depth():
    """With a profile's cost model goodput takes its compiled argmax (α per request, every depth's totals and price in
    one pass); the same costs behind a plain verify/draft interface are scored depth by depth in Python. Every
    decision and reported goodput must be the same, across α that differ per request, new requests and contexts."""
    from pathlib import Path

    from sglang_ext.core.costs import CostModel

    cost = CostModel.fit(Path(__file__).resolve().parents[1] / "traces" / "profiles" / "cpu-2core-smollm2-135m.json")

    class PlainCosts:  # no depth_parts / depth_seconds: priced one depth at a time
        def verify_seconds(self, b, t, ctx=0):
            return cost.verify_seconds(b, t, ctx)

        def draft_seconds(self, b, d):
            return cost.draft_seconds(b, d)

    fast, plain = make_policy("goodput", cost_model=cost), make_policy("goodput", cost_model=PlainCosts())
    rng = random.Random(3)
    pool = [f"r{i}" for i in range(40)]
    chosen = set()
    for _ in range(200):
        rids = rng.sample(pool, rng.randint(1, 32))
        view = BatchView(rids, context_lens=[rng.randint(1, 3000) for _ in rids])
        df, dp = fast.decide(view), plain.decide(view)
        assert df.lengths == dp.lengths and df.info == dp.info
        k = df.lengths[rids[0]]
        chosen.add(k)
        step = StepResult([RequestStep(r, k, rng.randint(0, k) if rng.random() < 0.5 else k) for r in rids],
                          speculated=k > 0)
        fast.observe(step)
        plain.observe(step)
        if rng.random() < 0.2:
            gone = rng.choice(rids)
            fast.release(gone)
            plain.release(gone)
    assert len(chosen) > 2  # the argmax moved with α and the batch, not stuck at one depth


def test_goodput_learns_linear_costs_online():
    p = make_policy("goodput", explore=0.0)
    cost = LinearCost()
    for _ in range(12):
        d = p.decide(BatchView(["a"]))
        k = d.lengths["a"]
        a = min(k, 4)  # a request accepting 4 of 8 once, then matching
        p.observe(StepResult([RequestStep("a", k, a if k < 8 else 4)], speculated=k > 0,
                             verify_seconds=cost.verify_seconds(1, k + 1), draft_seconds=cost.draft_seconds(1, k),
                             verify_tokens=k + 1))
    assert p._costs_known()
    assert p.learned.verify_seconds(1, 5) == pytest.approx(cost.verify_seconds(1, 5), rel=1e-6)
    assert p.learned.draft_seconds(1, 3) == pytest.approx(cost.draft_seconds(1, 3), rel=1e-6)
    alpha = p.alpha("a")
    want = max(range(9), key=lambda k: (_hand_goodput([alpha], k), -k))
    assert p.decide(BatchView(["a"])).lengths["a"] == want


# ----------------------------------------------------------------------------------------------------------------
# bandits
# ----------------------------------------------------------------------------------------------------------------
def _pull(policy, reward):
    """One bandit round with a single request: ``reward(arm)`` tokens/s (1 token in 1/reward seconds)."""
    d = policy.decide(BatchView(["a"]))
    arm = d.info["arm"]
    r = reward(arm)
    policy.observe(StepResult([RequestStep("a", d.lengths["a"], 0)], verify_seconds=1.0 / r, config=d.info))
    return arm


def test_ucb1_by_hand():
    p = make_policy("bandit", algorithm="ucb1", arms=[1, 2])
    seq = iter([100.0, 200.0, 150.0, 100.0])
    arms = [_pull(p, lambda arm: next(seq)) for _ in range(4)]
    # warm-up 0, 1; t=2: 0 + sqrt(2 ln 2) vs 1 + sqrt(2 ln 2) -> 1
    # t=3: arm1 mean 175 -> 0.75: 0 + sqrt(2 ln 3) = 1.482 vs 0.75 + sqrt(ln 3) = 1.798 -> 1
    assert arms == [0, 1, 1, 1]
    # t=4: arm1 mean 150 -> 0.5: sqrt(2 ln 4) = 1.665 vs 0.5 + sqrt(2 ln 4 / 3) = 1.461 -> 0
    assert math.sqrt(2 * math.log(4)) > 0.5 + math.sqrt(2 * math.log(4) / 3)
    assert p.decide(BatchView(["a"])).info["arm"] == 0


def _regret_curve(algorithm: str, steps: int, seed: int = 0):
    means = [300.0, 500.0, 700.0, 900.0]
    env = random.Random(1234)
    p = make_policy("bandit", algorithm=algorithm, seed=seed)  # default arms k = 1..4
    regret, curve = 0.0, []
    for _ in range(steps):
        arm = _pull(p, lambda a: max(env.gauss(means[a], 50.0), 1.0))
        regret += max(means) - means[arm]
        curve.append(regret)
    return curve


@pytest.mark.parametrize("algorithm", ["ucb1", "thompson"])
def test_bandit_regret_is_sublinear(algorithm):
    curve = _regret_curve(algorithm, 4000)
    r1k, r4k = curve[999], curve[3999]
    assert r1k > 0
    assert r4k / r1k < 2.5  # linear regret would give 4
    assert r4k / 4000 < r1k / 1000  # average regret per step decreases


def test_bandit_arms_configs_and_contexts():
    p = make_policy("bandit", arms=[0, {"k": 3, "tree_budget": 16, "drafter": "ngram"}], context="pow2")
    d0 = p.decide(BatchView(["a"]))
    assert not d0.speculate and d0.lengths == {"a": 0}
    p.observe(StepResult([RequestStep("a", 0, 0)], speculated=False, verify_seconds=0.01, config=d0.info))
    d1 = p.decide(BatchView(["a"]))
    assert (d1.lengths, d1.tree_budget, d1.drafter) == ({"a": 3}, 16, "ngram")
    assert p.decide(BatchView(list("abcde"))).info["context"] == "4"  # a fresh table for batch sizes 4..7
    with pytest.raises(ValueError, match=r"arms\[1\] has unknown field"):
        make_policy("bandit", arms=[1, {"k": 2, "depth": 3}])


def test_thompson_is_seeded():
    def run(seed):
        p = make_policy("bandit", algorithm="thompson", seed=seed)
        env = random.Random(5)
        return [_pull(p, lambda a: 100.0 * (a + 1) + env.random()) for _ in range(60)]

    assert run(3) == run(3)
    assert run(3) != run(4)


# ----------------------------------------------------------------------------------------------------------------
# update bandit
# ----------------------------------------------------------------------------------------------------------------
def test_update_bandit_by_hand():
    b = make_policy("update-bandit")  # H = 60 s, w = 1, discount 0.9, c = 2
    stats = UpdateRoundStats(acceptance=0.5, tokens_per_second=100.0)
    assert b.choose_update(stats) == "head"  # untried: head first (cheaper)
    b.observe_update("head", gain=20.0, cost=2.0)  # x = 20 / 0.5 = 40
    # round 2: head: N = 1 -> ln(max(1, e)) = 1; 40 + 40 * sqrt(2) = 96.57 -> 60 * 96.57 * 0.5 - 2 * 100 > 0,
    # but full is untried -> full
    assert b.choose_update({"acceptance": 0.5, "tokens_per_second": 100.0}) == "full"
    b.observe_update("full", gain=30.0, cost=10.0)  # x = 60; scale = 60
    # round 3 (head discounted once to n = 0.9, s = 36; N = 1.9 -> ln(e) = 1):
    v_head = 60 * (36 / 0.9 + 60 * math.sqrt(2 / 0.9)) * 0.5 - 2.0 * 100
    v_full = 60 * (60 / 1.0 + 60 * math.sqrt(2 / 1.0)) * 0.5 - 10.0 * 100
    values = b.values(stats)
    assert values["head"] == pytest.approx(v_head) and values["full"] == pytest.approx(v_full)
    assert v_head > v_full > 0
    assert b.choose_update(stats) == "head"


def test_update_bandit_skips_when_cost_exceeds_gain():
    b = make_policy("update-bandit", discount=1.0, ucb_c=0.0)
    for action in ("head", "full"):
        assert b.choose_update(UpdateRoundStats(0.5, 100.0)) == action
        b.observe_update(action, gain=0.1, cost=5.0)  # tiny gain, expensive
    # head: 60 * 0.2 * 0.5 - 5 * 100 < 0, full likewise -> skip
    assert b.choose_update(UpdateRoundStats(0.5, 100.0)) == "skip"
    # a perfect drafter has no headroom: nothing to gain
    assert make_policy("update-bandit").choose_update(UpdateRoundStats(1.0, 100.0)) == "skip"
    with pytest.raises(TypeError, match="not draft lengths"):
        b.decide(BatchView(["a"]))


def test_throughput_gain_by_hand():
    # depth 3, alpha 0.5 -> 0.7, 4 requests, 20 ms steps
    want = 4 * ((1 - 0.7**4) / 0.3 - (1 - 0.5**4) / 0.5) / 0.02
    assert throughput_gain(0.5, 0.7, 3, 0.02, batch_size=4) == pytest.approx(want)


# ----------------------------------------------------------------------------------------------------------------
# composition
# ----------------------------------------------------------------------------------------------------------------
class FixedLengths(Policy):
    name = "fixed-lengths-test"

    def __init__(self, lengths):
        super().__init__()
        self.lengths = lengths
        self.observed = 0

    def decide(self, batch):
        return Decision(speculate=True, lengths={r: self.lengths[r] for r in batch.rids})

    def observe(self, result):
        self.observed += 1


class RecordingOnOff(Policy):
    name = "onoff-test"

    def __init__(self, on):
        super().__init__()
        self.on, self.asked = on, []

    def should_speculate(self, batch_size, gamma):
        self.asked.append((batch_size, gamma))
        return self.on

    def decide(self, batch):  # pragma: no cover - ComposedPolicy uses should_speculate
        raise AssertionError


def test_composed_cap_and_onoff():
    length = FixedLengths({"a": 2, "b": 3, "c": 7})
    onoff = RecordingOnOff(on=True)
    c = ComposedPolicy(length, cap=True, onoff=onoff)
    d = c.decide(BatchView(["a", "b", "c"]))
    assert d.lengths == {"a": 2, "b": 3, "c": 4} and d.info["sl_cap"] == 4
    assert onoff.asked == [(3, 3)]  # gamma = ceil(mean(2, 3, 4)) = 3
    onoff.on = False
    d = c.decide(BatchView(["a", "b", "c"]))
    assert not d.speculate and d.lengths == {"a": 0, "b": 0, "c": 0}
    c.observe(spec_step([("a", 0, 0)]))
    assert length.observed == 1
    assert ComposedPolicy(length, cap=False).decide(BatchView(["c"])).lengths == {"c": 7}


def test_composed_with_dsde_and_tide():
    tide = make_policy("tide-control", cost_model=LinearCost(), explore=0.0, min_trials=1, depth="fixed")
    c = ComposedPolicy(make_policy("dsde", cost_cap=False, cap=False, init_k=3), cap=True, onoff=tide)
    rids = list("abcd")
    assert c.decide(BatchView(rids)).speculate  # alpha unknown: tide explores by speculating
    c.observe(spec_step([(r, 3, a) for r, a in zip(rids, [2, 1, 2, 1])]))  # alpha 0.6 -> speedup < 1 at gamma 3
    d = c.decide(BatchView(rids))
    assert not d.speculate and set(d.lengths.values()) == {0}


# ----------------------------------------------------------------------------------------------------------------
# bounds under random streams, for every length policy
# ----------------------------------------------------------------------------------------------------------------
LENGTH_CASES = {
    "static": ({"k": 5}, 5),
    "dsde": ({"max_k": 7, "window": 5}, 7),
    "tide-control": ({"gamma": 4, "explore": 0.2}, 4),
    "sglang-adaptive": ({"warmup": 2, "update_interval": 1}, 7),
    "goodput": ({"max_k": 6, "explore": 0.2}, 6),
    "bandit": ({"arms": [0, 2, {"k": 6, "tree_budget": 8}], "algorithm": "thompson"}, 6),
}


def test_every_length_policy_has_a_bounds_case():
    assert set(LENGTH_CASES) == set(LENGTH_POLICIES)


@pytest.mark.parametrize("name", sorted(LENGTH_CASES))
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_lengths_stay_in_bounds(name, seed):
    params, k_max = LENGTH_CASES[name]
    policy = make_policy(name, **params)
    rng = random.Random(seed)
    pool = [f"r{i}" for i in range(70)]
    for _ in range(30):
        rids = rng.sample(pool, rng.choice([1, 2, 5, 8, 40, 64]))
        d = policy.decide(BatchView(rids, context_lens=[rng.randint(1, 500) for _ in rids]))
        assert set(d.lengths) == set(rids)
        assert all(isinstance(k, int) and 0 <= k <= k_max for k in d.lengths.values())
        if not d.speculate:
            assert all(k == 0 for k in d.lengths.values())
        json.dumps(d.info)  # what hosts echo back in StepResult.config must stay serialisable
        steps = []
        for r in rids:
            k = d.lengths[r] if rng.random() < 0.8 else rng.randint(0, 12)  # hosts may clip or differ
            a = rng.randint(0, k)
            kl = [rng.expovariate(1.0) for _ in range(k)] if rng.random() < 0.5 else []
            steps.append(RequestStep(r, k, a, kl=kl, temperature=rng.choice([0.0, 1.0])))
        secs = rng.choice([0.0, rng.uniform(1e-4, 0.1)])
        policy.observe(StepResult(steps, speculated=any(s.proposed for s in steps), verify_seconds=secs,
                                  draft_seconds=rng.uniform(0, 0.01), verify_tokens=sum(s.proposed + 1 for s in steps),
                                  config=d.info))
        for r in rng.sample(rids, rng.randint(0, len(rids))):
            policy.release(r)


# ----------------------------------------------------------------------------------------------------------------
# config files and state
# ----------------------------------------------------------------------------------------------------------------
def _warmed(name):
    params, _ = LENGTH_CASES.get(name, ({}, 0))
    p = make_policy(name, **params)
    if name == "update-bandit":
        p.choose_update(UpdateRoundStats(0.4, 200.0))
        p.observe_update("head", 12.0, 1.5)
        return p
    rng = random.Random(1)
    for _ in range(25):
        rids = ["a", "b", "c"]
        d = p.decide(BatchView(rids))
        p.observe(StepResult([RequestStep(r, d.lengths[r], rng.randint(0, d.lengths[r]),
                                          kl=[rng.random() for _ in range(d.lengths[r])]) for r in rids],
                             speculated=d.speculate, verify_seconds=rng.uniform(0.01, 0.03),
                             draft_seconds=0.004 if d.speculate else 0.0, config=d.info,
                             verify_tokens=sum(d.lengths.values()) + 3))
    return p


def _next_decisions(p, n=10):
    if p.role != "length":
        return [p.choose_update(UpdateRoundStats(0.5, 100.0)) for _ in range(n)]
    out = []
    for i in range(n):
        d = p.decide(BatchView(["a", "b", "c"]))
        out.append(d.lengths)
        p.observe(StepResult([RequestStep(r, d.lengths[r], d.lengths[r] // 2) for r in "abc"],
                             speculated=d.speculate, verify_seconds=0.02, draft_seconds=0.003, config=d.info))
    return out


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_config_round_trip_with_state(name, tmp_path):
    p = _warmed(name)
    path = tmp_path / "policy.json"
    save_policy_config(path, p)
    raw = json.loads(path.read_text())
    assert raw["policy"] == name and raw["params"] == json.loads(json.dumps(p.config))
    q = load_policy_config(path)
    assert type(q) is type(p) and q.config == json.loads(json.dumps(p.config))
    assert json.dumps(q.state_dict(), sort_keys=True) == json.dumps(p.state_dict(), sort_keys=True)
    assert _next_decisions(q) == _next_decisions(p)  # same state (RNG included) -> same future


def test_state_dict_round_trip_into_a_fresh_policy():
    p = _warmed("dsde")
    fresh = make_policy("dsde", **p.config)
    fresh.load_state_dict(json.loads(json.dumps(p.state_dict())))
    assert fresh.predictions(["a", "b", "c"]) == p.predictions(["a", "b", "c"])
    assert _next_decisions(fresh) == _next_decisions(p)


def test_composed_config_round_trip(tmp_path):
    c = ComposedPolicy(make_policy("dsde", cost_cap=False, cap=False, max_k=6), cap=True,
                       onoff=make_policy("tide-control", gamma=2, explore=0.0))
    c.observe(spec_step([("a", 3, 2)], verify_tokens=4))
    path = tmp_path / "composed.json"
    save_policy_config(path, c)
    back = load_policy_config(path, cost_model=LinearCost())  # extras reach the policies that take them
    assert isinstance(back, ComposedPolicy) and back.cap
    assert back.length_policy.config == c.length_policy.config
    assert isinstance(back.onoff.given_costs, LinearCost)
    assert policy_to_dict(back) == policy_to_dict(c)


@pytest.mark.parametrize("content, message", [
    ({"policy": "dsde", "params": {"max_k": 999}}, "policy.json: dsde.max_k=999 outside [1, 32]"),
    ({"policy": "dsde", "params": {"maxk": 3}}, "policy.json: dsde.maxk is not a parameter"),
    ({"policy": "dsde", "params": {"variant": "blog"}}, "policy.json: dsde.variant='blog' is not one of"),
    ({"policy": "dsde", "params": {"min_k": 5, "max_k": 3}}, "policy.json: dsde: min_k=5 > max_k=3"),
    ({"policy": "nope"}, "policy.json: policy='nope' is unknown"),
    ({"params": {}}, "policy.json: policy is missing"),
    ({"policy": "static", "parms": {}}, "policy.json: parms is not a config key"),
    ({"policy": "bandit", "params": {"arms": [1, {"k": 99}]}}, "policy.json: bandit.arms[1].k=99 is not an int"),
    ({"policy": "composed", "params": {"length": {"policy": "dsde", "params": {"window": 0}}}},
     "policy.json: composed.length.dsde.window=0 outside [2, 1024]"),
    ({"policy": "bandit", "params": {}, "state": {"tables": {"1": {"n": [1], "sum": [1.0], "lo": 1, "hi": 1}}}},
     "policy.json: bandit.state does not fit"),
])
def test_config_errors_name_file_and_key(tmp_path, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "policy.json").write_text(json.dumps(content))
    with pytest.raises(ValueError) as e:
        load_policy_config("policy.json")
    assert str(e.value).startswith(message), str(e.value)


def test_config_invalid_json_names_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json: invalid JSON"):
        load_policy_config(path)
    with pytest.raises(ValueError, match=r"<config>: config is not an object"):
        policy_from_dict([1, 2])


def _tide_with_known_model(**kw):
    """tide-control at b = 1 with LinearCost and α = 1 measured: the rule speculates (speedup 4 / 1.8 > 1)."""
    p = make_policy("tide-control", cost_model=LinearCost(), min_trials=1, depth="fixed", **kw)
    p.observe(spec_step([("a", 3, 3)], verify=0.014, draft=0.006, verify_tokens=4))
    return p


def test_tide_exploration_budget_bounds_what_flips_lose():
    """Every flip is priced against the rule's predicted rate for the mode it replaced, and flips stop while their
    summed loss exceeds explore_budget × all step time: here a flip to a plain step (0.011 s for 1 token) replaces a
    predicted 4 tokens in 0.020 s, so it loses 0.011 − 1/200 = 0.006 s."""
    p = _tide_with_known_model(explore=0.5, explore_budget=0.05, seed=3)
    rate_on = p.predicted_rate(1, True)
    assert rate_on == pytest.approx(4 / (0.006 + 0.014))
    flips = 0
    for _ in range(400):
        d = p.decide(BatchView(["a"]))
        if d.speculate:
            p.observe(spec_step([("a", 3, 3)], verify=0.014, draft=0.006, verify_tokens=4))
        else:
            flips += 1
            p.observe(StepResult([RequestStep("a", 0, 0)], speculated=False, verify_seconds=0.011, verify_tokens=1))
    loss_per_flip = 0.011 - 1 / rate_on
    assert p.explore_loss == pytest.approx(flips * loss_per_flip)
    assert p.explore_loss <= 0.05 * p.seconds_seen + loss_per_flip  # at most one flip past the line
    assert flips > 10  # still explores, within budget
    unbudgeted = _tide_with_known_model(explore=0.5, explore_budget=0.5, seed=3)
    unflipped = sum(not unbudgeted.decide(BatchView(["a"])).speculate for _ in range(400))
    assert unflipped > 3 * flips  # the budget is what held exploration back


def test_tide_exploration_budget_zero_keeps_to_the_rule():
    p = _tide_with_known_model(explore=0.5, explore_budget=0.0)
    p.observe(StepResult([RequestStep("a", 0, 0)], speculated=False, verify_seconds=0.011, verify_tokens=1))
    p.explore_loss = 1e-9  # any loss at all, and a zero budget admits no flip
    assert all(p.decide(BatchView(["a"])).speculate for _ in range(100))
    state = p.state_dict()
    q = make_policy("tide-control", cost_model=LinearCost(), explore_budget=0.0, depth="fixed")
    q.load_state_dict(state)
    assert (q.explore_loss, q.seconds_seen) == (p.explore_loss, p.seconds_seen)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 8)), min_size=1, max_size=12), st.integers(0, 3))
def test_best_length_cap_equals_the_brute_force_search(reqs, floor):
    """The one-pass cap search gives batch_goodput's own argmax (ties: the smaller cap)."""
    from sglang_ext.core.policies.goodput import batch_goodput, best_length_cap

    class Costs:
        def verify_seconds(self, b, t, ctx=0):
            return 0.04 + 0.003 * b * t + 1e-6 * ctx * b

        def draft_seconds(self, b, d):
            return d * (0.004 + 0.0005 * b)

    alphas, lengths = [r[0] for r in reqs], [r[1] for r in reqs]
    cap, g = best_length_cap(Costs(), alphas, lengths, floor, 100)
    top = max(lengths)
    if top <= floor:
        assert (cap, g) == (None, None)
        return
    brute = [(batch_goodput(Costs(), alphas, [min(k, c) for k in lengths], 100), c) for c in range(floor, top + 1)]
    best_g = max(x[0] for x in brute)
    assert g == pytest.approx(best_g, rel=1e-12)
    assert cap == min(c for x, c in brute if x >= best_g * (1 - 1e-12))


def test_capped_expected_totals_has_the_bits_of_the_scalar_loop():
    """The array form adds the same floats in the same order as summing expected_tokens request by request."""
    from sglang_ext.core.policies.goodput import capped_expected_totals
    from sglang_ext.core.signals import expected_tokens

    rng = random.Random(3)
    for _ in range(400):
        b, top = rng.randint(1, 70), rng.randint(0, 12)
        alphas = [rng.random() * 1.2 - 0.1 for _ in range(b)]
        lengths = None if rng.random() < 0.3 else [rng.randint(-1, top) for _ in range(b)]
        want = []
        for c in range(top + 1):
            total = 0.0
            for r, a in enumerate(alphas):
                k = top if lengths is None else lengths[r]
                total += expected_tokens(a, min(k, c)) if k >= 0 else 0.0
            want.append(total)
        assert capped_expected_totals(alphas, lengths, top) == want


def test_depth_seconds_has_the_bits_of_pricing_one_depth_at_a_time():
    """A profile's cost model prices every depth of a step at once with the same floats as verify + draft per depth
    (goodput's scores and DSDE's cost cap compare these numbers, so a last-bit change would change decisions); a
    duck-typed cost model without the method is priced one depth at a time, None where it cannot answer."""
    from pathlib import Path

    from sglang_ext.core.costs import CostModel
    from sglang_ext.core.policies._estimators import depth_seconds

    profile = Path(__file__).resolve().parents[1] / "traces" / "profiles" / "cpu-2core-smollm2-135m.json"
    cost = CostModel.fit(profile)
    rng = random.Random(5)
    for _ in range(300):
        b, lo = rng.randint(0, 80), rng.randint(0, 3)
        hi, ctx = rng.randint(lo, 12), rng.randint(0, 9000)
        want = [cost.verify_seconds(b, c + 1, ctx) + (cost.draft_seconds(b, c) if c > 0 else 0.0)
                for c in range(lo, hi + 1)]
        assert cost.depth_seconds(b, lo, hi, ctx) == want
        assert depth_seconds(cost, b, lo, hi, ctx) == want

    class Partial:
        def verify_seconds(self, b, t, ctx=0):
            return None if t > 3 else 0.01 * b * t

        def draft_seconds(self, b, d):
            return 0.002 * d

    assert depth_seconds(Partial(), 4, 0, 4) == [0.04, 0.08 + 0.002, 0.12 + 0.004, None, None]
