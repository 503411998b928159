"""Draft-tree layout: depths, children, tree attention mask, positions, paths, and validation."""

from __future__ import annotations

import pytest
import torch

from sglang_ext.core import DraftTree


def example_tree() -> DraftTree:
    #        0(root=7)
    #       /        \
    #     1(5)       2(6)
    #    /    \        \
    #  3(8)   4(9)     5(5)
    return DraftTree.from_lists([[7, 5, 6, 8, 9, 5], [7, 3]], [[-1, 0, 0, 1, 1, 2], [-1, 0]], "topk")


def test_structure():
    tree = example_tree()
    assert tree.depths.tolist() == [[0, 1, 1, 2, 2, 2], [0, 1, -1, -1, -1, -1]]
    assert tree.num_nodes.tolist() == [6, 2]
    assert tree.children[0, 0].tolist() == [1, 2]
    assert tree.children[0, 1].tolist() == [3, 4]
    assert tree.children[0, 2].tolist() == [5, -1]
    assert tree.num_children[0].tolist() == [2, 2, 1, 0, 0, 0]
    assert tree.max_depth == 2
    assert tree.path_to(0, 5) == [2, 5]
    assert tree.position_ids(torch.tensor([10, 3]))[0].tolist() == [10, 11, 11, 12, 12, 12]


def test_attention_mask_is_ancestor_or_self():
    mask = example_tree().attention_mask[0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)
    padded = example_tree().attention_mask[1]
    assert padded[3].tolist() == [False, False, False, True, False, False]  # padding sees only itself


def test_chain_constructor_with_ragged_lengths():
    tree = DraftTree.chain(torch.tensor([1, 2]), torch.tensor([[4, 5, 6], [7, 8, 9]]), num_draft=torch.tensor([3, 1]),
                           draft_probs=torch.full((2, 3, 10), 0.1))
    assert tree.tokens.tolist() == [[1, 4, 5, 6], [2, 7, -1, -1]]
    assert tree.parents.tolist() == [[-1, 0, 1, 2], [-1, 0, -1, -1]]
    assert tree.draft_probs.shape == (2, 4, 10)


@pytest.mark.parametrize("tokens, parents, message", [
    ([[1, 2]], [[0, 0]], "root"),
    ([[1, 2, 3]], [[-1, 2, 0]], "topological"),
    ([[-1, 2]], [[-1, 0]], "root token"),
])
def test_invalid_layouts_are_refused(tokens, parents, message):
    with pytest.raises(ValueError, match=message):
        DraftTree.from_lists(tokens, parents, "topk")


def test_scheme_needs_q_and_chain_needs_one_child():
    with pytest.raises(ValueError, match="needs draft_probs"):
        DraftTree.from_lists([[1, 2]], [[-1, 0]], "iid")
    with pytest.raises(ValueError, match="more than one child"):
        DraftTree.from_lists([[1, 2, 3]], [[-1, 0, 0]], "chain", [torch.full((3, 4), 0.25)])
    with pytest.raises(ValueError, match="unknown draft scheme"):
        DraftTree.from_lists([[1, 2]], [[-1, 0]], "beam")
