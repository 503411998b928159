"""Each known pitfall, as a deliberately wrong verifier that the checker must catch.

A checker that passes everything proves nothing; these tests show it fails on the three classic bugs
(``../shared/reference/algorithms.md`` §1e), in exact mode and in Monte-Carlo mode.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sglang_ext.core import DraftTree, verify_tree
from sglang_ext.core.lossless import (LosslessCase, ToyModel, TreeSpec, check_lossless_exact,
                                      check_lossless_monte_carlo, draft_tree)
from sglang_ext.core.processing import SamplingParams


def topk_case(**kw) -> LosslessCase:
    kw.setdefault("num_tokens", 3)
    return LosslessCase(target=ToyModel(4, seed=21, zero_fraction=0.2), draft=ToyModel(4, seed=22),
                        spec=TreeSpec("topk", (2, 1)), **kw)


# -- pitfall 1: the draft softmax q used as the proposal of top-k-chosen nodes -------------------------
def verify_topk_with_draft_softmax(tree: DraftTree, target_probs, rng):
    """WRONG: treats deterministically chosen top-k children as if sampled from q (min(1, p/q) rule)."""
    return verify_tree(dataclasses.replace(tree, scheme="iid"), target_probs, rng)


def test_pitfall_draft_softmax_on_topk_nodes_is_caught():
    with pytest.raises(AssertionError, match="not lossless"):
        check_lossless_exact(verify_topk_with_draft_softmax, topk_case())
    assert check_lossless_exact(verify_tree, topk_case()).max_abs_error <= 1e-12  # the right rule passes


# -- pitfall 2: verifying with drafter weights updated after proposing --------------------------------
def online_update(q: torch.Tensor) -> torch.Tensor:
    """One deterministic 'learning step' applied to the drafter after it proposed (sharpens q)."""
    sharpened = q.clamp(min=0) ** 1.7
    return sharpened / sharpened.sum(dim=-1, keepdim=True).clamp(min=1e-300)


def verify_with_updated_drafter(tree: DraftTree, target_probs, rng):
    """WRONG: recomputes q from the drafter after its update instead of using the q that proposed."""
    return verify_tree(dataclasses.replace(tree, draft_probs=online_update(tree.draft_probs)), target_probs, rng)


@pytest.mark.parametrize("scheme, branching", [("chain", (1, 1)), ("iid", (2,)), ("without_replacement", (2, 1))])
def test_pitfall_update_then_verify_is_caught(scheme, branching):
    case = LosslessCase(target=ToyModel(4, seed=31), draft=ToyModel(4, seed=32), spec=TreeSpec(scheme, branching),
                        num_tokens=len(branching) + 1)
    with pytest.raises(AssertionError, match="not lossless"):
        check_lossless_exact(verify_with_updated_drafter, case)
    assert check_lossless_exact(verify_tree, case).max_abs_error <= 1e-12


# -- pitfall 3: duplicate siblings not removed -------------------------------------------------------
def topk_with_duplicate_sibling(draft, draft_params, contexts, spec, rng):
    """A top-k drafter whose tree repeats the root's first child as an extra sibling (e.g. two proposers agreeing)."""
    tree, node_ctx = draft_tree(draft, draft_params, contexts, spec, rng)
    tokens, parents, probs, ctxs = [], [], [], []
    for b in range(tree.batch_size):
        n = int(tree.num_nodes[b])
        first_child = int(tree.children[b, 0, 0])
        tokens.append(tree.tokens[b, :n].tolist() + [int(tree.tokens[b, first_child])])
        parents.append(tree.parents[b, :n].tolist() + [0])
        q = tree.draft_probs[b, :n]
        probs.append(torch.cat([q, torch.zeros(1, q.shape[-1], dtype=q.dtype)]))
        ctxs.append(node_ctx[b] + [node_ctx[b][first_child]])
    return DraftTree.from_lists(tokens, parents, "topk", probs), ctxs


def verify_without_dedup(tree, target_probs, rng):
    """WRONG: the cumulative (GPU-kernel) top-k rule without removing duplicate siblings."""
    return verify_tree(tree, target_probs, rng, dedup_topk=False)


def test_pitfall_duplicate_siblings_is_caught():
    case = topk_case(drafter=topk_with_duplicate_sibling)
    with pytest.raises(AssertionError, match="not lossless"):
        check_lossless_exact(verify_without_dedup, case)
    assert check_lossless_exact(verify_tree, case).max_abs_error <= 1e-12


# -- Monte-Carlo mode: passes the right rule, catches a wrong one --------------------------------------
def test_monte_carlo_mode_passes_correct_and_catches_wrong():
    case = topk_case(target_params=SamplingParams(1.0), num_tokens=2)
    ok = check_lossless_monte_carlo(verify_tree, case, samples=4000, seed=1)
    assert ok.p_value is not None and ok.p_value >= 1e-3
    with pytest.raises(AssertionError, match="chi-square"):
        check_lossless_monte_carlo(verify_topk_with_draft_softmax, case, samples=4000, seed=1)


def test_fixture_from_the_pytest_plugin(lossless_checker):
    """The ``lossless_checker`` fixture users get from the installed pytest plugin."""
    assert lossless_checker.exact(verify_tree, scheme="iid", branching=(2,)).max_abs_error <= 1e-12
    with pytest.raises(AssertionError):
        lossless_checker.exact(verify_topk_with_draft_softmax, scheme="topk", branching=(2,))
