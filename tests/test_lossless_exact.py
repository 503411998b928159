"""Exact enumeration: every rule reproduces the processed target distribution to 1e-12.

The checker's own expected law is built by ``process_logits``, the function that also prepares the verifier's
input, so a processing bug would cancel out there. Every test here therefore also compares the enumerated law with
:func:`independent_target_law`, computed from the toy logits by the plain reference in ``reference_sampling``.
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch

from sglang_ext.core import DraftTree, greedy_verify_fn, verify_chain_tree, verify_tree
from sglang_ext.core.drafters.base import Draft, DraftRequest
from sglang_ext.core.drafters.ngram import NgramDrafter
from sglang_ext.core.lossless import (LosslessCase, ToyModel, TreeSpec, check_lossless_exact, draft_tree,
                                      target_distribution)
from sglang_ext.core.processing import SamplingParams

from reference_sampling import reference_target_probs


def independent_target_law(case: LosslessCase) -> dict:
    """Joint law of the first ``num_tokens`` tokens per prompt, from the toy target's raw logits and the plain
    reference processing (no ``process_logits`` anywhere)."""
    sp = case.target_params

    def law(prompt: tuple[int, ...]) -> dict:
        dist: dict = {(): 1.0}
        for _ in range(case.num_tokens):
            dist = {seq + (t,): w * pt for seq, w in dist.items()
                    for t, pt in enumerate(reference_target_probs(case.target.logits(prompt + seq).tolist(),
                                                                  sp.temperature, sp.top_k, sp.top_p)) if pt > 0}
        return dist

    per_prompt = [law(tuple(p)) for p in case.prompts]
    return {tuple(seq for seq, _ in combo): math.prod(w for _, w in combo)
            for combo in itertools.product(*[d.items() for d in per_prompt])}


def assert_matches_independent_target(report, case: LosslessCase, tol: float = 1e-12) -> None:
    """The enumerated law of the speculative pipeline equals the independently processed target law."""
    expected = independent_target_law(case)
    keys = set(report.observed) | set(expected)
    worst = max(keys, key=lambda k: abs(report.observed.get(k, 0.0) - expected.get(k, 0.0)))
    err = abs(report.observed.get(worst, 0.0) - expected.get(worst, 0.0))
    assert err <= tol, (f"speculative law differs from the independently processed target by {err:.3e} at {worst}: "
                        f"{report.observed.get(worst, 0.0)} vs {expected.get(worst, 0.0)}")

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
    pytest.param(SamplingParams(0.7, top_p=0.85, top_k=3), id="T0.7-top_k3-top_p0.85"),
    pytest.param(SamplingParams(2.0, top_p=0.75), id="T2-top_p0.75"),
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
    assert_matches_independent_target(report, case)
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
    assert_matches_independent_target(report, case)
    assert max(report.expected.values()) == pytest.approx(1.0)  # greedy: a point mass


def test_multi_step_enumeration_agrees():
    """The default one-step-plus-completion check and the full multi-step enumeration agree."""
    case = LosslessCase(target=ToyModel(3, seed=5), draft=ToyModel(3, seed=6), spec=TreeSpec("chain", (1, 1)),
                        num_tokens=3)
    report = check_lossless_exact(verify_chain_tree, case, steps="all")
    assert report.max_abs_error <= 1e-12
    assert_matches_independent_target(report, case)


def test_batched_requests_are_independent():
    """Two prompts verified in one batch: the joint law is the product of the two target laws."""
    case = LosslessCase(target=ToyModel(3, seed=7, zero_fraction=0.2), draft=ToyModel(3, seed=8),
                        spec=TreeSpec("without_replacement", (2,)), prompts=((0,), (1, 2)), num_tokens=2)
    report = check_lossless_exact(verify_tree, case)
    assert report.max_abs_error <= 1e-12
    assert_matches_independent_target(report, case)


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
    report = check_lossless_exact(verify_fn, case)
    assert report.max_abs_error <= 1e-12
    assert_matches_independent_target(report, case)
    if temperature == 0.0:
        assert check_lossless_exact(greedy_verify_fn, case).max_abs_error <= 1e-12


@pytest.mark.parametrize("temperature", [0.0, 0.3, 0.6, 1.0, 1.7, 3.0])
@pytest.mark.parametrize("top_k, top_p", [(-1, 1.0), (2, 1.0), (3, 1.0), (-1, 0.9), (-1, 0.6), (3, 0.8), (2, 0.5)])
def test_checker_target_law_is_the_independent_reference(temperature, top_k, top_p):
    """The law the checker compares against (``target_distribution``) is the independently processed target, at every
    temperature and filter: temperature first, then top-k, then top-p on the renormalised top-k set."""
    case = LosslessCase(target=ToyModel(6, seed=41, zero_fraction=0.15, scale=2.0), draft=ToyModel(6, seed=42),
                        spec=TreeSpec("chain", (1,)), target_params=SamplingParams(temperature, top_p, top_k),
                        prompts=((0,), (3, 1)), num_tokens=2)
    expected = independent_target_law(case)
    got = target_distribution(case)
    assert set(got) == set(expected)
    assert max(abs(got[k] - expected[k]) for k in expected) <= 1e-12


# ---- every tree constructor the engine uses, under the exact checker ----------------------------------------------
# The checker's default drafter builds trees with ``DraftTree.from_lists`` directly. The engine builds them through
# ``Draft.chain`` (EAGLE's sampled chains, scheme "chain" with q; n-gram and greedy EAGLE chains, scheme "topk") and
# ``Draft(tokens, parents, "topk")`` (EAGLE trees), then ``Draft.as_tree``; ``DraftTree.chain`` is the batched
# constructor for chains. A constructor that puts q at the wrong node, drops a node or mislinks a parent changes the
# law, so each is run through the exact checker here rather than only checked for shape.
def _sample_chain(draft: ToyModel, draft_params: SamplingParams, ctx: tuple[int, ...], k: int, rng):
    """``k`` tokens, ``x_i ~ q(.|ctx, x_<i)``; returns them and the q each was drawn from."""
    tokens, qs = [], []
    for _ in range(k):
        q = draft.probs(ctx + tuple(tokens), draft_params)
        tokens.append(int(rng.categorical(q.unsqueeze(0))[0]))
        qs.append(q)
    return tokens, qs


def drafter_draft_tree_chain(draft, draft_params, contexts, spec, rng):
    """``DraftTree.chain`` on a ragged batch: prompt ``b`` drafts ``K - b`` tokens (so one prompt may draft none)."""
    K, V = len(spec.branching), draft.vocab_size
    B = len(contexts)
    draft_tokens = torch.zeros(B, K, dtype=torch.long)
    draft_probs = torch.zeros(B, K, V, dtype=torch.float64)
    num_draft = torch.tensor([max(K - b, 0) for b in range(B)])
    node_ctx = []
    for b, ctx in enumerate(contexts):
        tokens, qs = _sample_chain(draft, draft_params, ctx, int(num_draft[b]), rng)
        for i, (t, q) in enumerate(zip(tokens, qs)):
            draft_tokens[b, i], draft_probs[b, i] = t, q  # draft_probs[b, i]: the q draft_tokens[b, i] was drawn from
        node_ctx.append([ctx] + [ctx + tuple(tokens[: i + 1]) for i in range(len(tokens))])
    roots = torch.tensor([ctx[-1] for ctx in contexts])
    return DraftTree.chain(roots, draft_tokens, draft_probs, num_draft=num_draft), node_ctx


def drafter_eagle_sampled_chain(draft, draft_params, contexts, spec, rng):
    """EAGLE's sampled chain: ``Draft.chain(root, drafted, scheme="chain", draft_probs=[q_1..q_k, 0])`` then
    ``as_tree`` (one request, as the engine verifies each sampled request on its own)."""
    (ctx,) = contexts
    tokens, qs = _sample_chain(draft, draft_params, ctx, len(spec.branching), rng)
    probs = torch.stack(qs + [torch.zeros(draft.vocab_size, dtype=torch.float64)])
    tree = Draft.chain(ctx[-1], tokens, scheme="chain", draft_probs=probs).as_tree()
    return tree, [[ctx] + [ctx + tuple(tokens[: i + 1]) for i in range(len(tokens))]]


def drafter_ngram(draft, draft_params, contexts, spec, rng):
    """The real n-gram drafter (deterministic proposals: a ``topk``-scheme ``Draft.chain``) on the prompt history."""
    (ctx,) = contexts
    (d,) = NgramDrafter().draft([DraftRequest(slot=0, tokens=list(ctx), num_steps=len(spec.branching), greedy=False)])
    assert d.scheme == "topk" and d.num_nodes > 1, "the prompt must give the n-gram drafter something to propose"
    proposed = tuple(d.tokens[1:])
    return d.as_tree(), [[ctx] + [ctx + proposed[: i + 1] for i in range(len(proposed))]]


def drafter_eagle_tree(draft, draft_params, contexts, spec, rng):
    """An EAGLE-style top-k tree handed over as ``Draft(tokens, parents, "topk")`` and built by ``as_tree``."""
    (ctx,) = contexts
    tree, node_ctx = draft_tree(draft, draft_params, contexts, spec, rng)
    n = int(tree.num_nodes[0])
    d = Draft(tokens=tree.tokens[0, :n].tolist(), parents=tree.parents[0, :n].tolist(), scheme="topk")
    return d.as_tree(), node_ctx


RAGGED = ((0,), (1, 2), (2,))  # DraftTree.chain drafts 2, 1 and 0 tokens for these
CONSTRUCTORS = [
    pytest.param(drafter_draft_tree_chain, verify_chain_tree, "chain", (1, 1), RAGGED, id="DraftTree.chain-vectorised"),
    pytest.param(drafter_draft_tree_chain, verify_tree, "chain", (1, 1), RAGGED, id="DraftTree.chain-tree-walk"),
    pytest.param(drafter_eagle_sampled_chain, verify_tree, "chain", (1, 1, 1), ((2,),), id="Draft.chain-sampled"),
    pytest.param(drafter_eagle_sampled_chain, verify_chain_tree, "chain", (1, 1, 1), ((2,),),
                 id="Draft.chain-sampled-vectorised"),
    pytest.param(drafter_ngram, verify_tree, "topk", (1, 1, 1), ((0, 1, 2, 0, 2, 1, 0, 1),), id="Draft.chain-ngram"),
    pytest.param(drafter_eagle_tree, verify_tree, "topk", (2, 2), ((1,),), id="Draft-topk-tree"),
]


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(1.3, top_p=0.9, top_k=3)],
                         ids=["T1", "T1.3-k3-p0.9"])
@pytest.mark.parametrize("drafter, verify_fn, scheme, branching, prompts", CONSTRUCTORS)
def test_engine_tree_constructors_are_exactly_lossless(drafter, verify_fn, scheme, branching, prompts, params):
    """Trees from each constructor, verified by the rules the engine applies to them, emit the target's law exactly
    (and the enumeration really branched: drafts were random or coins were flipped)."""
    case = LosslessCase(target=ToyModel(4, seed=51, zero_fraction=0.2), draft=ToyModel(4, seed=52),
                        spec=TreeSpec(scheme, branching), target_params=params, prompts=prompts,
                        num_tokens=len(branching) + 1, drafter=drafter)
    report = check_lossless_exact(verify_fn, case)
    assert report.max_abs_error <= 1e-12 and report.branches > 1
    assert_matches_independent_target(report, case)
