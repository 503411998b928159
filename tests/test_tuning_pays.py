"""The "tuning pays" study (sglang_ext/studies/tuning_pays.py): its verdict, and one tiny end-to-end run on the real model
(record -> tune in the simulator -> held-out engine runs with greedy identity checked)."""

from __future__ import annotations

import json

import pytest

from sglang_ext.studies import tuning_pays as tp


def _arm(name, runs, identical=True):
    return tp.Arm(name, None if name == "off" else "dsde", {}, 0 if name == "off" else 4, list(runs),
                  [1.5] * len(runs), [identical] * len(runs))


def test_verdict_medians_and_bars():
    arms = [_arm("off", [10, 11]), _arm("defaults", [9, 9.5, 20]), _arm("tuned", [12, 12.2, 0]),
            _arm("max_k=1", [12.2, 12.3, 12.6]), _arm("max_k=2", [11, 11, 11])]
    v = tp.verdict(arms)
    assert v["tuned_tok_s"] == 12 and v["defaults_tok_s"] == 9.5  # medians: one wild run does not decide
    assert v["best_grid"] == "max_k=1" and v["best_grid_tok_s"] == 12.3
    assert v["beats_defaults"] and v["within_3pct_of_best_grid"]  # 12 / 12.3 = 0.976
    assert v["greedy_identical"]
    arms[3] = _arm("max_k=1", [13, 13, 13])  # 12 / 13 = 0.923: not within 3 %
    assert not tp.verdict(arms)["within_3pct_of_best_grid"]
    arms[2] = _arm("tuned", [12, 12, 12], identical=False)
    assert not tp.verdict(arms)["greedy_identical"]


def test_bad_grid_and_fixed_are_refused():
    with pytest.raises(SystemExit, match="--grid"):
        tp.Study(tp.parse_args(["--grid", "max_k"]))
    with pytest.raises(ValueError, match="warp"):
        tp.Study(tp.parse_args(["--fixed", "warp=1"]))


@pytest.mark.slow
def test_tuning_pays_end_to_end_tiny(tmp_path):
    out = tmp_path / "tp"
    rc = tp.main(["--requests", "3", "--max-output-tokens", "6", "--max-prompt-tokens", "48", "--grid", "max_k=1,2",
                  "--rounds", "1", "--maxiter", "1", "--popsize", "2", "--num-steps", "2", "--batch", "2",
                  "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    assert [a["name"] for a in report["arms"]] == ["off", "defaults", "tuned", "max_k=1", "max_k=2"]
    assert all(a["identical"] == [True] for a in report["arms"])
    assert report["verdict"]["greedy_identical"] is True
    cfg = json.loads((out / "tuned.json").read_text())
    assert cfg["policy"] == "dsde" and cfg["params"]["cost_cap"] is False
    assert "Verdict" in (out / "results.md").read_text()
