"""Target processing: temperature, top-k, top-p, and refusal of non-finite logits."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_ext.core.processing import NonFiniteLogitsError, SamplingParams, process_logits


def test_temperature_top_k_top_p_hand_computed():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]], dtype=torch.float64))
    p = process_logits(logits, SamplingParams(1.0))
    assert torch.allclose(p, torch.tensor([[0.1, 0.4, 0.2, 0.3]], dtype=torch.float64))
    # top-k 2 keeps 0.4 and 0.3
    p = process_logits(logits, SamplingParams(1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([[0, 4 / 7, 0, 3 / 7]], dtype=torch.float64))
    # top-p 0.65: 0.4 (< 0.65) then 0.3 crosses -> keep both
    p = process_logits(logits, SamplingParams(1.0, top_p=0.65))
    assert torch.allclose(p, torch.tensor([[0, 4 / 7, 0, 3 / 7]], dtype=torch.float64))
    # top-p 0.35: the first token already reaches it
    p = process_logits(logits, SamplingParams(1.0, top_p=0.35))
    assert torch.allclose(p, torch.tensor([[0, 1.0, 0, 0]], dtype=torch.float64))
    # temperature 0.5 squares the ratios
    p = process_logits(logits, SamplingParams(0.5))
    sq = torch.tensor([0.01, 0.16, 0.04, 0.09], dtype=torch.float64)
    assert torch.allclose(p[0], sq / sq.sum())


def test_greedy_is_first_argmax_on_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert process_logits(logits, SamplingParams(0.0)).tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_per_request_params():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]] * 2, dtype=torch.float64))
    p = process_logits(logits, [SamplingParams(0.0), SamplingParams(1.0)])
    assert p[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert torch.allclose(p[1], torch.exp(logits[1]))
    with pytest.raises(ValueError, match="2 requests|batch of 2"):
        process_logits(logits, [SamplingParams()])


@pytest.mark.parametrize("bad, kind", [(float("nan"), "NaN"), (float("inf"), r"\+inf")])
def test_non_finite_logits_name_the_request(bad, kind):
    logits = torch.zeros(3, 5)
    logits[2, 1] = bad
    with pytest.raises(NonFiniteLogitsError, match=rf"request 'req-c'.*{kind}"):
        process_logits(logits, SamplingParams(), request_ids=["req-a", "req-b", "req-c"])


def test_all_masked_row_is_refused_but_partial_mask_is_fine():
    logits = torch.zeros(2, 4)
    logits[0, :2] = float("-inf")
    p = process_logits(logits, SamplingParams())
    assert p[0].tolist() == [0.0, 0.0, 0.5, 0.5]
    logits[1, :] = float("-inf")
    with pytest.raises(NonFiniteLogitsError, match="request 1.*-inf everywhere"):
        process_logits(logits, SamplingParams())


def test_invalid_params_are_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)


@settings(max_examples=60, deadline=None)
@given(
    probs=st.lists(st.floats(0.001, 1.0), min_size=2, max_size=12),
    top_p=st.floats(0.05, 1.0),
    top_k=st.integers(-1, 12),
)
def test_property_top_k_top_p_keep_the_right_set(probs, top_p, top_k):
    base = torch.tensor(probs, dtype=torch.float64)
    base = base / base.sum()
    out = process_logits(torch.log(base).unsqueeze(0), SamplingParams(1.0, top_p=top_p, top_k=top_k))[0]
    assert math.isclose(float(out.sum()), 1.0, rel_tol=1e-12)
    kept = out > 0
    # kept tokens keep their relative probabilities
    assert torch.allclose(out[kept], base[kept] / base[kept].sum())
    # everything kept is at least as likely as everything dropped
    if (~kept).any():
        assert float(base[kept].min()) >= float(base[~kept].max())
    if top_k > 0:
        assert int(kept.sum()) <= top_k
    # top-p: the kept set minus its least likely member has mass < top_p (within the top-k set)
    after_k = base.clone()
    if 0 < top_k < len(base):
        after_k[torch.sort(-base, stable=True).indices[top_k:]] = 0
    after_k = after_k / after_k.sum()
    kept_mass = float(after_k[kept].sum())
    smallest = float(after_k[kept].min())
    assert kept_mass >= min(top_p, 1.0) - 1e-12
    assert kept_mass - smallest < top_p + 1e-12
