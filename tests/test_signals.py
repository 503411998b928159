"""Signals: KL / entropy over the vocabulary (DSDE's clamped definition), the chain α estimate, and the
per-request SignalHistory of the DSDE reference (tests/dsde_reference.py)."""

from __future__ import annotations

import math

import pytest
import torch

from sglang_ext.core.signals import (
    RequestStep,
    chain_trials,
    entropy,
    expected_tokens,
    kl_divergence,
)
from tests.dsde_reference import SignalHistory


def test_kl_matches_hand_value_and_is_batched():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.9, 0.1, 0.0])
    # clamped: the third entry is 1e-8 in both, contributing 1e-8 * (log 1e-8 - log 1e-8) = 0
    expected = 0.5 * (math.log(0.5) - math.log(0.9)) + 0.5 * (math.log(0.5) - math.log(0.1))
    assert kl_divergence(p, q).item() == pytest.approx(expected, rel=1e-6)
    batch_p = p.expand(2, 3, 3)
    batch_q = q.expand(2, 3, 3)
    out = kl_divergence(batch_p, batch_q)
    assert out.shape == (2, 3)
    assert torch.allclose(out, torch.full((2, 3), expected), rtol=1e-6)
    assert kl_divergence(p, p).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_clamps_disjoint_support_to_a_finite_value():
    p = torch.tensor([1.0, 0.0], dtype=torch.float64)
    q = torch.tensor([0.0, 1.0], dtype=torch.float64)
    # p~ = [1, 1e-8], q~ = [1e-8, 1]: 1*(0 - log 1e-8) + 1e-8*(log 1e-8 - 0)
    expected = -math.log(1e-8) + 1e-8 * math.log(1e-8)
    value = kl_divergence(p, q)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_kl_upcasts_half_precision():
    p = torch.tensor([0.25, 0.75], dtype=torch.float16)
    q = torch.tensor([0.5, 0.5], dtype=torch.float16)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    out = kl_divergence(p, q)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(expected, rel=1e-3)


def test_entropy_hand_values():
    assert entropy(torch.full((4,), 0.25)).item() == pytest.approx(math.log(4), rel=1e-6)
    assert entropy(torch.tensor([0.0, 1.0, 0.0])).item() == pytest.approx(0.0, abs=1e-7)
    rows = entropy(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    assert rows.tolist() == pytest.approx([math.log(2), -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))], rel=1e-6)


def test_chain_trials_and_expected_tokens():
    assert chain_trials(4, 4) == (4, 4)  # all accepted: no rejection trial
    assert chain_trials(4, 1) == (1, 2)  # one accepted, the second verified position rejected
    assert chain_trials(0, 0) == (0, 0)
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(1.0, 3) == pytest.approx(4.0)  # alpha -> 1: k + 1, no division by zero
    assert expected_tokens(0.0, 5) == pytest.approx(1.0)
    assert expected_tokens(0.7, 3) == pytest.approx((1 - 0.7**4) / 0.3)


def test_signal_history_per_position_acceptance_and_bounds():
    h = SignalHistory(kl_window=4, step_window=3)
    for k, a in [(3, 3), (3, 1), (2, 0)]:
        h.record(RequestStep("r", k, a, kl=[0.1] * k))
    # verified positions: (3,3) -> 0,1,2 all hits; (3,1) -> 0 hit, 1 miss; (2,0) -> 0 miss
    assert h.acceptance_by_position() == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert h.acceptance_rate() == pytest.approx((3 + 1 + 0) / (3 + 2 + 1))
    assert h.mean_accepted() == pytest.approx(4 / 3)
    assert len(h.kl) == 4  # 8 values recorded, deque keeps the last 4
    h.record(RequestStep("r", 1, 1, kl=[0.7]))
    assert list(h.proposed) == [3, 2, 1] and h.steps == 4  # step window bounded too
    assert h.mean_last_kl == pytest.approx(0.7)
    clone = SignalHistory.from_state(h.state_dict())
    assert clone.state_dict() == h.state_dict()
