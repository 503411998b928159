"""Policies in the reference engine: greedy identity holds with every policy on, and the engine drafts exactly the
per-request lengths the policy decided (ragged lengths inside one batched verify)."""

from __future__ import annotations

import json

import pytest

from sglang_ext.core.policies import LENGTH_POLICIES, ComposedPolicy, make_policy
from sglang_ext.core.policies.base import BatchView, Decision, Policy
from sglang_ext.core.signals import StepResult
from sglang_ext.engine.engine import GenerationRequest

from test_engine import hf_greedy, make_engine, prompts  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def tiny():
    from sglang_ext.models.tiny import tiny_llama

    return tiny_llama(vocab_size=96, hidden_size=64, num_layers=2, seed=3)


def _policy(name: str) -> Policy:
    overrides = {"static": {"k": 3}, "dsde": {"max_k": 4, "init_k": 2, "window": 6}, "tide-control": {"gamma": 3},
                 "goodput": {}, "bandit": {}, "sglang-adaptive": {}}
    return make_policy(name, **overrides.get(name, {}))


@pytest.mark.parametrize("name", [*LENGTH_POLICIES, "composed"])
@pytest.mark.parametrize("kind", ["eagle", "ngram"])
def test_greedy_identity_with_every_policy(tiny, name, kind):
    policy = (ComposedPolicy(make_policy("dsde", max_k=4, init_k=2, window=6, cap=False), cap=True,
                             onoff=make_policy("tide-control", gamma=3, explore=0.3, explore_budget=0.5))
              if name == "composed" else _policy(name))
    engine = make_engine(tiny, kind, num_steps=4, max_batch=3)
    engine.policy = policy
    ps = prompts(11, 6)
    states = []
    for i, p in enumerate(ps):  # requests of different lengths join while others run
        states.append(engine.add_request(GenerationRequest(p, max_new_tokens=6 + 3 * i)))
        engine.step()
    results = []
    while engine.has_work():
        engine.step()
        if engine.last_result is not None:
            results.append(engine.last_result)
    for p, s, i in zip(ps, states, range(len(ps))):
        assert s.output_ids == hf_greedy(tiny, p, 6 + 3 * i), f"{name}/{kind}: request {i} differs from plain greedy"
    assert results and all(isinstance(r, StepResult) for r in results)
    if kind == "eagle" and name in ("dsde", "composed"):  # q recorded for greedy requests: KL reaches the policy
        assert any(len(r.kl) for res in results for r in res.requests)
    json.dumps(policy.state_dict())  # still serialisable after a real run


class _Scripted(Policy):
    """A policy whose decisions are scripted per request, to check the engine obeys them exactly."""

    name = "scripted"

    def __init__(self, lengths: dict[str, int], speculate: bool = True) -> None:
        super().__init__()
        self.lengths, self.speculate, self.seen = lengths, speculate, []

    def decide(self, batch: BatchView) -> Decision:
        return Decision(self.speculate, {rid: self.lengths[rid] for rid in batch.rids})

    def observe(self, result: StepResult) -> None:
        self.seen.append({r.rid: r.proposed for r in result.requests})


@pytest.mark.parametrize("kind", ["eagle", "ngram"])
def test_ragged_lengths_in_one_verify(tiny, kind):
    engine = make_engine(tiny, kind, num_steps=4, max_batch=3)
    ps = prompts(5, 3)
    want = {"a": 0, "b": 2, "c": 4}
    engine.policy = _Scripted(want)
    states = [engine.add_request(GenerationRequest(p, max_new_tokens=12, rid=rid)) for p, rid in zip(ps, want)]
    engine.step()
    first = engine.policy.seen[0]
    assert first["a"] == 0 and first["b"] <= 2 and first["c"] <= 4
    if kind == "eagle":  # the EAGLE drafter always proposes the full depth it is asked for
        assert first == want
    for step in engine.policy.seen:
        assert all(step[r] <= want[r] for r in step)
    while engine.has_work():
        engine.step()
    for p, s in zip(ps, states):
        assert s.output_ids == hf_greedy(tiny, p, 12)


def test_policy_switching_speculation_off_is_plain_decoding(tiny):
    engine = make_engine(tiny, "eagle", num_steps=3, max_batch=2)
    engine.policy = _Scripted({"x": 3, "y": 3}, speculate=False)
    ps = prompts(8, 2)
    states = [engine.add_request(GenerationRequest(p, max_new_tokens=9, rid=r)) for p, r in zip(ps, "xy")]
    while engine.has_work():
        engine.step()
    assert all(all(v == 0 for v in step.values()) for step in engine.policy.seen)
    assert all(s.spec_num_proposed_drafts == 0 for s in states)
    for p, s in zip(ps, states):
        assert s.output_ids == hf_greedy(tiny, p, 9)


def test_policy_flags_and_config(tmp_path):
    import argparse

    from sglang_ext.core.policies.config import save_policy_config
    from sglang_ext.engine.launch import LaunchError, add_engine_args, policy_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert policy_from_args(parser.parse_args([])) is None
    p = policy_from_args(parser.parse_args(["--speculative-policy", "dsde", "--speculative-policy-param", "max_k=6",
                                            "--speculative-policy-param", "variant=paper"]))
    assert p.name == "dsde" and p.config["max_k"] == 6 and p.config["variant"] == "paper"
    path = tmp_path / "policy.json"
    save_policy_config(path, make_policy("static", k=2))
    assert policy_from_args(parser.parse_args(["--speculative-policy-config", str(path)])).config["k"] == 2
    for argv, needle in ((["--speculative-policy", "nope"], "--speculative-policy 'nope'"),
                         (["--speculative-policy", "dsde", "--speculative-policy-param", "max_k=999"], "max_k=999"),
                         (["--speculative-policy-param", "k=2"], "needs --speculative-policy"),
                         (["--speculative-policy-config", str(tmp_path / "missing.json")], "missing.json")):
        with pytest.raises(LaunchError, match=needle.replace("(", r"\(")):
            policy_from_args(parser.parse_args(argv))
