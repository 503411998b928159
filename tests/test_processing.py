"""Target processing: temperature, top-k, top-p, and refusal of non-finite logits.

The convention (temperature, then top-k, then top-p on the renormalised top-k set, ties by lowest token id) is
stated and computed independently in ``reference_sampling``; the tests at the end check the core against it at
temperatures other than 1, and against SGLang's own sampling utilities.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from conftest import require_module
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sglang_ext.core.processing import NonFiniteLogitsError, SamplingParams, process_logits

from reference_sampling import reference_target_probs, top_p_margin


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


# ---- the order of temperature, top-k and top-p, against an independent reference --------------------------------
# ``reference_sampling`` states the convention (temperature, then top-k, then top-p on the renormalised top-k set,
# ties by lowest token id: what the core documents and what SGLang's speculative verification does) and computes it
# in plain Python, sharing no code with ``process_logits``. Every test above runs at temperature 1, where "mask
# chosen before or after the temperature" cannot be told apart; these run at other temperatures.

TEMPERATURES = [0.05, 0.3, 0.5, 0.7, 1.3, 2.0, 4.0]


def test_top_p_set_is_chosen_after_the_temperature_hand_computed():
    """p = [0.1, 0.4, 0.2, 0.3]. At T = 0.5 (p ∝ p²: [.033, .533, .133, .3]) top-p 0.5 keeps token 1 alone; at
    T = 1 it would keep {1, 3}. At T = 2 (p ∝ √p: [.163, .325, .230, .282]) top-p 0.62 keeps {1, 3, 2}; at T = 1 it
    would keep {1, 3}. A mask chosen at temperature 1 and only then tempered gets both wrong."""
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]], dtype=torch.float64))
    assert process_logits(logits, SamplingParams(0.5, top_p=0.5)).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    sqrt = torch.tensor([0.0, 0.4, 0.2, 0.3], dtype=torch.float64).sqrt()
    assert torch.allclose(process_logits(logits, SamplingParams(2.0, top_p=0.62))[0], sqrt / sqrt.sum(), atol=1e-15)
    # top-k's set does not move with the temperature, but its values do
    sq = torch.tensor([0.0, 0.16, 0.0, 0.09], dtype=torch.float64)
    assert torch.allclose(process_logits(logits, SamplingParams(0.5, top_k=2))[0], sq / sq.sum(), atol=1e-15)
    # top-k then top-p on the renormalised top-k set: T = 0.5, k = 3 keeps [.16, .09, .04] / .29 = [.55, .31, .14];
    # top-p 0.8 then keeps the first two (mass-before .55 < .8, then .86 >= .8)
    kp = torch.tensor([0.0, 0.16, 0.0, 0.09], dtype=torch.float64)
    assert torch.allclose(process_logits(logits, SamplingParams(0.5, top_p=0.8, top_k=3))[0], kp / kp.sum(), atol=1e-15)


def test_top_p_boundary_and_ties_hand_computed():
    """Exact boundaries, where summation order cannot matter: two tokens of probability exactly 1/2 and top-p 1/2
    keep only the first (the token whose mass-before *equals* top-p is dropped), and it is the lower token id; top-k
    among equal probabilities keeps the lowest ids."""
    logits = torch.tensor([[float("-inf"), 2.0, 2.0]], dtype=torch.float64)
    assert process_logits(logits, SamplingParams(0.7, top_p=0.5)).tolist() == [[0.0, 1.0, 0.0]]
    assert process_logits(logits, SamplingParams(0.7, top_p=0.5 + 1e-9)).tolist() == [[0.0, 0.5, 0.5]]
    ties = torch.tensor([[1.0, 3.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
    assert process_logits(ties, SamplingParams(1.7, top_k=2)).tolist() == [[0.0, 0.5, 0.0, 0.5, 0.0]]
    assert reference_target_probs([float("-inf"), 2.0, 2.0], 0.7, top_p=0.5) == [0.0, 1.0, 0.0]
    assert reference_target_probs([1.0, 3.0, 1.0, 3.0, 3.0], 1.7, top_k=2) == [0.0, 0.5, 0.0, 0.5, 0.0]


# logits on a grid of 1/4 (so equal logits, hence exact probability ties, are common) with some masked entries
GRID_LOGIT = st.one_of(st.integers(-16, 16).map(lambda i: i / 4), st.just(float("-inf")))
ROW = st.lists(GRID_LOGIT, min_size=2, max_size=10).filter(lambda r: any(x != float("-inf") for x in r))
PARAMS = st.builds(
    SamplingParams,
    temperature=st.one_of(st.sampled_from(TEMPERATURES + [0.0]), st.floats(0.05, 5.0)),
    top_p=st.one_of(st.just(1.0), st.floats(0.02, 1.0)),
    top_k=st.integers(-1, 11),
)


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.tuples(ROW, PARAMS), min_size=1, max_size=4), width=st.integers(2, 10))
def test_property_process_logits_matches_the_independent_reference(rows, width):
    """Per-request parameters in one batch, at arbitrary temperatures: every row equals the plain reference."""
    rows = [((r * width)[:width], sp) for r, sp in rows]  # one width per batch
    rows = [(r, sp) for r, sp in rows if any(x != float("-inf") for x in r)]
    assume(rows)
    assume(all(top_p_margin(r, sp.temperature, sp.top_k, sp.top_p) > 1e-9 for r, sp in rows))
    logits = torch.tensor([r for r, _ in rows], dtype=torch.float64)
    out = process_logits(logits, [sp for _, sp in rows])
    for b, (r, sp) in enumerate(rows):
        expected = torch.tensor(reference_target_probs(r, sp.temperature, sp.top_k, sp.top_p), dtype=torch.float64)
        assert torch.allclose(out[b], expected, rtol=1e-12, atol=1e-15), (r, sp, out[b].tolist(), expected.tolist())


# ---- SGLang's own sampling utilities (they import on the CPU) ------------------------------------------------------
@pytest.fixture(scope="module")
def sglang_sampling():
    require_module("sglang")
    from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch
    from sglang.srt.speculative.dflash_utils import build_speculative_verify_target_probs

    return SimpleNamespace(spec_target=build_speculative_verify_target_probs,
                           plain_filter=top_k_top_p_min_p_sampling_from_probs_torch)


def _sglang_info(params: list[SamplingParams], vocab: int) -> SimpleNamespace:
    """SGLang's ``SamplingBatchInfo`` fields the two utilities read (top-k off is ``k = vocab``, top-p off is 1)."""
    return SimpleNamespace(
        temperatures=torch.tensor([[sp.temperature] for sp in params], dtype=torch.float64),
        top_ks=torch.tensor([sp.top_k if sp.top_k > 0 else vocab for sp in params]),
        top_ps=torch.tensor([sp.top_p for sp in params], dtype=torch.float64),
        need_top_k_sampling=any(0 < sp.top_k < vocab for sp in params),
        need_top_p_sampling=any(sp.top_p < 1.0 for sp in params),
    )


CONTINUOUS_PARAMS = st.builds(SamplingParams, temperature=st.floats(0.05, 5.0),
                              top_p=st.one_of(st.just(1.0), st.floats(0.02, 1.0)), top_k=st.integers(-1, 12))


@settings(max_examples=60, deadline=None)
@given(params=st.lists(CONTINUOUS_PARAMS, min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1),
       sparse=st.booleans(), draft_token_num=st.integers(1, 3))
def test_property_core_equals_sglang_speculative_verify_target(sglang_sampling, params, seed, sparse, draft_token_num):
    """``process_logits`` is SGLang's speculative-verification target (``build_speculative_verify_target_probs``,
    top-k first then top-p on the renormalised set, the same order as ``eagle_utils``'s verify) at any temperature,
    with any top-k and top-p. Continuous logits (no ties, whose order SGLang leaves to ``torch.topk``) and no top-p
    within 1e-9 of a boundary (SGLang keeps a token whose mass-before equals top-p; the core does not)."""
    V = 12
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(params), draft_token_num, V, generator=gen, dtype=torch.float64) * 3
    for b, sp in enumerate(params):
        assume(all(top_p_margin(logits[b, i].tolist(), sp.temperature, sp.top_k, sp.top_p) > 1e-9
                   for i in range(draft_token_num)))
    ours = process_logits(logits, params)
    theirs = sglang_sampling.spec_target(next_token_logits=logits.reshape(-1, V), sampling_info=_sglang_info(params, V),
                                         draft_token_num=draft_token_num, bs=len(params), use_sparse_topk=sparse)
    assert torch.allclose(ours, theirs.to(torch.float64), rtol=1e-12, atol=1e-15)


@settings(max_examples=60, deadline=None)
@given(params=st.lists(CONTINUOUS_PARAMS, min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1))
def test_property_sglang_plain_sampler_is_the_joint_convention(sglang_sampling, params, seed):
    """SGLang's *non-speculative* torch sampler (``top_k_top_p_min_p_sampling_from_probs_torch``; FlashInfer's is
    called with ``filter_apply_order="joint"``) measures top-p on the full distribution, not the top-k-renormalised
    one: the reference's ``joint=True``. Pinned so that the difference from the core (next test) stays a known one."""
    V = 12
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(params), V, generator=gen, dtype=torch.float64) * 3
    for b, sp in enumerate(params):
        assume(top_p_margin(logits[b].tolist(), sp.temperature, sp.top_k, sp.top_p, joint=True) > 1e-9)
    info = _sglang_info(params, V)
    probs = torch.softmax(logits / info.temperatures, dim=-1)
    _, kept, index, _ = sglang_sampling.plain_filter(probs.clone(), info.top_ks, info.top_ps, None, False, None, None,
                                                     return_filtered_probs=True)
    filtered = torch.zeros_like(probs).scatter(-1, index.long(), kept)
    filtered = filtered / filtered.sum(dim=-1, keepdim=True)
    for b, sp in enumerate(params):
        expected = reference_target_probs(logits[b].tolist(), sp.temperature, sp.top_k, sp.top_p, joint=True)
        assert torch.allclose(filtered[b], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_core_and_sglang_plain_sampler_differ_only_with_top_k_and_top_p_both_on(sglang_sampling):
    """p = [0.5, 0.3, 0.2], top-k 2, top-p 0.6. The core (and SGLang's speculative verify) renormalises the top-k set
    to [0.625, 0.375] before top-p, so only token 0 survives; SGLang's plain sampler measures 0.5 < 0.6 on the full
    distribution and keeps tokens 0 and 1. With only one of the two filters on, they agree."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    assert process_logits(logits, SamplingParams(1.0, top_p=0.6, top_k=2)).tolist() == [[1.0, 0.0, 0.0]]
    assert reference_target_probs(logits[0].tolist(), 1.0, 2, 0.6, joint=True) == pytest.approx([0.625, 0.375, 0.0])
    for sp in (SamplingParams(1.0, top_p=0.6, top_k=2), SamplingParams(1.0, top_p=0.6), SamplingParams(1.0, top_k=2)):
        info = _sglang_info([sp], 3)
        _, kept, index, _ = sglang_sampling.plain_filter(torch.exp(logits), info.top_ks, info.top_ps, None, False,
                                                         None, None, return_filtered_probs=True)
        sglang = torch.zeros(1, 3, dtype=torch.float64).scatter(-1, index.long(), kept)
        sglang = sglang / sglang.sum()
        core = process_logits(logits, sp)
        assert torch.allclose(sglang, core) == (sp.top_k < 0 or sp.top_p == 1.0), sp
