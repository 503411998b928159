"""Exact enumeration: every rule reproduces the processed target distribution to 1e-12."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_ext.core import greedy_verify_fn, verify_chain_tree, verify_tree
from sglang_ext.core.lossless import LosslessCase, ToyModel, TreeSpec, check_lossless_exact
from sglang_ext.core.processing import SamplingParams

RULES = [
    pytest.param(verify_chain_tree, "chain", (1, 1, 1), id="chain-vectorised"),
    pytest.param(verify_tree, "chain", (1, 1, 1), id="chain-tree-walk"),
    pytest.param(verify_tree, "iid", (2, 1), id="tree-stochastic-iid"),
    pytest.param(verify_tree, "without_replacement", (2, 1), id="tree-without-replacement"),
    pytest.param(verify_tree, "topk", (3, 2), id="tree-topk-deterministic"),
]
PARAMS = [
    pytest.param(SamplingParams(1.0), id="T1"),
    pytest.param(SamplingParams(0.6), id="T0.6"),
    pytest.param(SamplingParams(1.8), id="T1.8"),
    pytest.param(SamplingParams(0.9, top_p=0.7), id="T0.9-top_p0.7"),
    pytest.param(SamplingParams(1.0, top_p=0.9, top_k=3), id="T1-top_k3-top_p0.9"),
    pytest.param(SamplingParams(0.0), id="greedy-T0"),
]


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("verify_fn, scheme, branching", RULES)
def test_rule_is_exactly_lossless(verify_fn, scheme, branching, params):
    case = LosslessCase(
        target=ToyModel(4, seed=11, zero_fraction=0.2), draft=ToyModel(4, seed=12),
        spec=TreeSpec(scheme, branching), target_params=params, num_tokens=len(branching) + 1,
    )
    report = check_lossless_exact(verify_fn, case)
    assert report.max_abs_error <= 1e-12
    if not (scheme == "topk" and params.greedy):  # deterministic drafts + point-mass target: one branch
        assert report.branches > 1  # the drafts really were random / the coins really were flipped


@pytest.mark.parametrize("scheme, branching", [("chain", (1, 1, 1)), ("iid", (2, 1)), ("topk", (3, 2, 1))])
def test_greedy_verification_matches_target_argmax(scheme, branching):
    case = LosslessCase(
        target=ToyModel(4, seed=3), draft=ToyModel(4, seed=4), spec=TreeSpec(scheme, branching),
        target_params=SamplingParams(0.0), num_tokens=len(branching) + 1,
    )
    report = check_lossless_exact(greedy_verify_fn, case)
    assert report.max_abs_error <= 1e-12
    assert max(report.expected.values()) == pytest.approx(1.0)  # greedy: a point mass


def test_multi_step_enumeration_agrees():
    """The default one-step-plus-completion check and the full multi-step enumeration agree."""
    case = LosslessCase(target=ToyModel(3, seed=5), draft=ToyModel(3, seed=6), spec=TreeSpec("chain", (1, 1)),
                        num_tokens=3)
    report = check_lossless_exact(verify_chain_tree, case, steps="all")
    assert report.max_abs_error <= 1e-12


def test_batched_requests_are_independent():
    """Two prompts verified in one batch: the joint law is the product of the two target laws."""
    case = LosslessCase(target=ToyModel(3, seed=7, zero_fraction=0.2), draft=ToyModel(3, seed=8),
                        spec=TreeSpec("without_replacement", (2,)), prompts=((0,), (1, 2)), num_tokens=2)
    assert check_lossless_exact(verify_tree, case).max_abs_error <= 1e-12


SCHEME_SHAPES = st.sampled_from([
    ("chain", (1,)), ("chain", (1, 1)), ("chain", (1, 1, 1)),
    ("iid", (2,)), ("iid", (2, 1)), ("iid", (3,)),
    ("without_replacement", (2,)), ("without_replacement", (2, 1)), ("without_replacement", (4,)),
    ("topk", (2,)), ("topk", (2, 2)), ("topk", (3, 1, 1)), ("topk", (1, 2)),
])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=SCHEME_SHAPES,
    vocab=st.integers(3, 6),
    seed=st.integers(0, 10_000),
    temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.5, 2.5]),
    top_p=st.sampled_from([1.0, 0.95, 0.8, 0.5]),
    top_k=st.sampled_from([-1, 2, 3]),
    draft_temperature=st.sampled_from([0.5, 1.0, 2.0]),
    zero_fraction=st.sampled_from([0.0, 0.3]),
)
def test_property_random_cases_are_lossless(shape, vocab, seed, temperature, top_p, top_k, draft_temperature,
                                            zero_fraction):
    scheme, branching = shape
    if vocab >= 6 and len(branching) > 1 and scheme in ("iid", "without_replacement"):
        branching = branching[:1]  # keep the enumeration small
    case = LosslessCase(
        target=ToyModel(vocab, seed=2 * seed, zero_fraction=zero_fraction, scale=2.0),
        draft=ToyModel(vocab, seed=2 * seed + 1, zero_fraction=zero_fraction / 2),
        spec=TreeSpec(scheme, branching),
        target_params=SamplingParams(temperature, top_p, top_k),
        draft_params=SamplingParams(draft_temperature),
        num_tokens=len(branching) + 1,
    )
    verify_fn = verify_chain_tree if scheme == "chain" and seed % 2 else verify_tree
    assert check_lossless_exact(verify_fn, case).max_abs_error <= 1e-12
    if temperature == 0.0:
        assert check_lossless_exact(greedy_verify_fn, case).max_abs_error <= 1e-12
