"""Fitting a measured online-learning curve into the simulator's training model."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_ext.cli import main
from simulator.learning_fit import alpha_from_expected, chain_expected_accepted, fit_curve, fit_from_results


@given(st.floats(0.0, 1.0), st.integers(1, 6), st.floats(0.5, 1.0))
def test_alpha_and_expected_accepted_invert_each_other(alpha, k, decay):
    e = chain_expected_accepted(alpha, k, decay)
    assert 0.0 <= e <= k
    assert chain_expected_accepted(alpha_from_expected(e, k, decay), k, decay) == pytest.approx(e, abs=1e-9)


def test_fit_recovers_the_model_that_made_the_curve():
    a0, ceil, g = 0.4, 0.7, 0.25
    curve = [chain_expected_accepted(a0 + (1 - (1 - g) ** n) * (ceil - a0), 3) for n in range(1, 11)]
    fit = fit_curve(curve, chain_expected_accepted(a0, 3), round_tokens=4096)
    assert fit.gain == pytest.approx(g, abs=1e-4) and fit.ceiling == pytest.approx(ceil, abs=1e-4)
    assert fit.alpha_start == pytest.approx(a0, abs=1e-6) and fit.max_abs_error_accept_len < 1e-4
    assert "--train-gain 0.2500" in fit.flags() and "ceiling=0.7000" in fit.flags()


def test_a_flat_curve_fits_no_gain_or_no_room():
    s = chain_expected_accepted(0.5, 3)
    fit = fit_curve([s] * 6, s, round_tokens=1000)
    assert fit.gain * (fit.ceiling - fit.alpha_start) < 1e-3  # nothing learned: either no gain or no gap
    with pytest.raises(ValueError, match="at least one round"):
        fit_curve([], s, 1000)


def test_fit_learning_command_reads_a_learner_curve_file(tmp_path, capsys):
    curve = [chain_expected_accepted(0.4 + (1 - 0.7 ** n) * 0.3, 3) for n in range(1, 8)]
    data = {"meta": {"n_threshold": 2048, "gate_steps": 3}, "static": {"code": chain_expected_accepted(0.4, 3)},
            "results": {"online-adam": {"curve": [{"heldout": {"code": e}} for e in curve]}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "fit.json"
    assert main(["sim", "fit-learning", "--curve", str(path), "--variant", "online-adam", "--domain", "code",
                 "--out", str(out)]) == 0
    assert "--train-round-tokens 2048 --train-gain 0.3000" in capsys.readouterr().out
    assert json.loads(out.read_text())["gain"] == pytest.approx(0.3, abs=1e-4)
    assert main(["sim", "fit-learning", "--curve", str(path), "--variant", "sgd", "--domain", "code"]) == 1
    assert "variant 'sgd' (has: online-adam)" in " ".join(capsys.readouterr().err.split())
    late = fit_from_results(path, "online-adam", "code", first_round=3)  # a domain whose traffic starts later
    assert late.rounds == 4 and late.alpha_start == pytest.approx(0.4 + (1 - 0.7 ** 3) * 0.3, abs=1e-6)
    with pytest.raises(ValueError, match="--first-round 9 outside"):
        fit_from_results(path, "online-adam", "code", first_round=9)
    with pytest.raises(ValueError, match="no domain 'math'"):
        fit_from_results(path, "online-adam", "math")
