"""analysis.sim_speed: the whole-command speed table, and its pairing against another checkout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis import sim_speed

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "traces" / "profiles" / "cpu-2core-smollm2-135m.json"


def test_pairs_against_a_checkout_and_reports_the_ratio(tmp_path):
    out = tmp_path / "speed"
    rc = sim_speed.main(["--trace", str(ROOT / "traces" / "tiny_chat.jsonl"), "--profile", str(PROFILE),
                         "--policies", "static", "--repeats", "1", "--vs-checkout", str(ROOT), "--out", str(out)])
    assert rc == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["policy"] == "static" and len(row["runs"]) == len(row["vs_runs"]) == 1
    assert row["same_requests_vs"] is True  # the same code on both sides finishes the same requests
    assert row["speedup_vs"] > 0 and row["runs"][0]["requests"] > 0
    assert "Paired against" in (out / "results.md").read_text()


def test_a_directory_that_is_not_a_checkout_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        sim_speed.main(["--trace", str(ROOT / "traces" / "tiny_chat.jsonl"), "--profile", str(PROFILE),
                        "--vs-checkout", str(tmp_path), "--out", str(tmp_path / "o")])
