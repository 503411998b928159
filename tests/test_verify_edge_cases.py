"""Degenerate inputs are handled explicitly: impossible drafts raise, zero-probability drafts are never accepted."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_ext.core import (DraftTree, InvalidDraftError, TorchRandomSource, verify_chain, verify_greedy_chain,
                             verify_greedy_tree, verify_tree)


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


# ---- greedy chains: the first mismatch ends acceptance, wherever it is ---------------------------------------------
def plain_greedy_chain(drafts: list[int], argmax: list[int], num_draft: int) -> tuple[int, int]:
    """The rule written out: accept drafts while each equals the target's argmax before it; then emit the argmax."""
    n = 0
    while n < num_draft and drafts[n] == argmax[n]:
        n += 1
    return n, argmax[n]


def test_greedy_chain_rejects_at_every_position():
    """Row ``(K, r)``: the first ``r`` drafts match and draft ``r`` does not, for every ``r < K`` (and ``r = K``: all
    match). Acceptance must stop exactly at ``r``, the next token must be the target's argmax there, and nothing after a
    mismatch counts, even drafts that happen to match again."""
    for K in range(1, 6):
        argmax = torch.arange(K + 1).remainder(4).expand(K + 1, K + 1) + 1  # row r: 1, 2, 3, 4, 1, ...
        drafts = argmax[:, :K].clone()
        for r in range(K):
            drafts[r, r] = 0  # a mismatch at position r; the later drafts still equal the argmax
        n_acc, nxt = verify_greedy_chain(drafts, argmax)
        assert n_acc.tolist() == list(range(K + 1)), K
        assert nxt.tolist() == [int(argmax[r, r]) for r in range(K + 1)], K


@settings(max_examples=300, deadline=None)
@given(data=st.data(), B=st.integers(1, 6), K=st.integers(0, 6), V=st.integers(2, 4))
def test_property_greedy_chain_equals_the_plain_rule_and_the_tree_walk(data, B, K, V):
    """Random drafts over a small vocabulary (so matches and mismatches both happen at every position), ragged
    ``num_draft``: the vectorised rule equals the plain loop and :func:`verify_greedy_tree` on the same chain."""
    tok = st.integers(0, V - 1)
    drafts = torch.tensor(data.draw(st.lists(st.lists(tok, min_size=K, max_size=K), min_size=B, max_size=B)),
                          dtype=torch.long).reshape(B, K)
    argmax = torch.tensor(data.draw(st.lists(st.lists(tok, min_size=K + 1, max_size=K + 1), min_size=B, max_size=B)),
                          dtype=torch.long)
    num_draft = torch.tensor(data.draw(st.lists(st.integers(0, K), min_size=B, max_size=B)), dtype=torch.long)
    n_acc, nxt = verify_greedy_chain(drafts, argmax, num_draft=num_draft)
    expected = [plain_greedy_chain(drafts[b].tolist(), argmax[b].tolist(), int(num_draft[b])) for b in range(B)]
    assert list(zip(n_acc.tolist(), nxt.tolist())) == expected
    tree = DraftTree.chain(torch.zeros(B, dtype=torch.long), drafts, num_draft=num_draft, scheme="topk")
    walk = verify_greedy_tree(tree, argmax)
    assert walk.num_accepted.tolist() == n_acc.tolist() and walk.next_token.tolist() == nxt.tolist()
