"""`analysis/learner_rates.py`: the round split and the flag parsing (the measurement itself runs the real model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from analysis.learner_rates import CaptureOnly, parse_lrs, split_rounds


def test_rounds_hold_at_least_n_tokens_in_capture_order():
    samples = [SimpleNamespace(tokens=[0] * n, i=i) for i, n in enumerate((30, 50, 40, 10, 70, 5))]
    rounds = split_rounds(samples, 80)
    assert [[s.i for s in r] for r in rounds] == [[0, 1], [2, 3, 4]]  # the 5-token tail (one sample) is left out
    assert all(sum(len(s.tokens) for s in r) >= 80 for r in rounds)
    assert split_rounds(samples[:1], 10) == []  # a round needs two samples: one is held back by the gate


def test_rates_flag_parsing_names_the_flag():
    assert parse_lrs(["sgd=0.01,0.1", "adam=1e-4"]) == {"sgd": [0.01, 0.1], "adam": [1e-4]}
    for bad in ("sgd", "sgd=", "sgd=x", "sgd=-1"):
        with pytest.raises(SystemExit, match="--lrs"):
            parse_lrs([bad])


def test_capture_only_hook_stores_finished_requests_and_never_swaps():
    import torch

    from sglang_ext.core.learning.capture import CaptureBuffer

    buf = CaptureBuffer(1 << 20, topk=2)
    hook = CaptureOnly(buf)
    hook.capture("a", torch.arange(5), torch.zeros(5, 4), torch.randn(5, 10))
    hook.finish_request("a", 0.5)
    assert hook.poll() is None
    (sample,) = buf.drain()
    assert sample.tokens.tolist() == [0, 1, 2, 3, 4] and sample.alpha == 0.5
