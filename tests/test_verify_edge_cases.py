"""Degenerate inputs are handled explicitly: impossible drafts raise, zero-probability drafts are never accepted."""

from __future__ import annotations

import pytest
import torch

from sglang_ext.core import (DraftTree, InvalidDraftError, TorchRandomSource, verify_chain, verify_greedy_chain,
                             verify_tree)


def uniform(*shape):
    return torch.full(shape, 1.0 / shape[-1], dtype=torch.float64)


def test_draft_with_zero_draft_probability_raises_naming_the_request():
    q = torch.tensor([[[0.5, 0.5, 0.0]]], dtype=torch.float64)
    with pytest.raises(InvalidDraftError, match="request 'r7'.*q\\(x\\) = 0"):
        verify_chain(torch.tensor([[2]]), q, uniform(1, 2, 3), TorchRandomSource(0), request_ids=["r7"])


def test_duplicate_sibling_in_without_replacement_tree_raises():
    q = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    tree = DraftTree.from_lists([[0, 1, 1]], [[-1, 0, 0]], "without_replacement", [torch.stack([q, q, q])])
    p = torch.tensor([[[0.0, 0.0, 1.0]] * 3], dtype=torch.float64)  # reject everything drafted
    with pytest.raises(InvalidDraftError, match="duplicate sibling"):
        verify_tree(tree, p, TorchRandomSource(0))


def test_draft_with_zero_target_probability_is_never_accepted():
    q = torch.tensor([[[0.0, 1.0, 0.0]]], dtype=torch.float64)  # always drafts token 1
    p = torch.tensor([[[0.3, 0.0, 0.7], [1.0, 0.0, 0.0]]], dtype=torch.float64)  # target never emits 1
    rng = TorchRandomSource(0)
    for _ in range(200):
        n_acc, nxt = verify_chain(torch.tensor([[1]]), q, p, rng)
        assert int(n_acc) == 0 and int(nxt) in (0, 2)


def test_identical_draft_and_target_always_accept():
    q = torch.tensor([[[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]]], dtype=torch.float64)
    p = torch.cat([q, torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64)], dim=1)
    rng = TorchRandomSource(3)
    for _ in range(100):
        n_acc, nxt = verify_chain(torch.tensor([[1, 0]]), q, p, rng)
        assert int(n_acc) == 2 and int(nxt) == 2  # bonus from p_{k+1}


def test_ragged_chains_in_one_batch():
    q = uniform(2, 3, 4)
    p = torch.zeros(2, 4, 4, dtype=torch.float64)
    p[:, :, 1] = 1.0  # target always says 1
    drafts = torch.tensor([[1, 1, 1], [1, 1, 1]])
    n_acc, nxt = verify_chain(drafts, q, p, TorchRandomSource(0), num_draft=torch.tensor([3, 1]))
    assert n_acc.tolist() == [3, 1] and nxt.tolist() == [1, 1]
    n_acc, nxt = verify_greedy_chain(drafts, p.argmax(-1), num_draft=torch.tensor([0, 2]))
    assert n_acc.tolist() == [0, 2]


def test_nan_target_is_refused():
    p = uniform(1, 2, 3)
    p[0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="request 0.*non-finite"):
        verify_chain(torch.tensor([[1]]), uniform(1, 1, 3), p, TorchRandomSource(0))
