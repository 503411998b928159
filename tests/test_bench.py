"""`sglang-ext bench`: report pieces (fast) and the command end to end on the real model (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sglang_ext.bench import BenchRow, markdown_table, write_report
from sglang_ext.models.batching import left_pad


def test_left_pad_right_aligns_prompts():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_report_files(tmp_path):
    rows = [BenchRow("hf", 1, 2, 20, 2.0, 10.0, None, None, 2, 1.0),
            BenchRow("eagle-chain", 1, 2, 20, 1.0, 20.0, 1.6, 0.1, 2, 2.0, config={"draft_ms_per_step": 4.25})]
    table = markdown_table(rows)
    assert "| 1 | eagle-chain | 20.0 | 2.00× | 1.60 | 10% | 4.2 | 2/2 |" in table
    path = write_report(rows, tmp_path, {"date": "d", "command": "c", "machine": "m", "torch": "t", "threads": 2,
                                         "prompts": "p", "max_new_tokens": 8})
    assert path.read_text().count("|") > 10 and (tmp_path / "speedup.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text())["rows"][1]["accept_length"] == 1.6


@pytest.mark.slow
def test_bench_command_end_to_end(tmp_path, shared_data):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "sglang_ext", "bench", "--methods", "hf,off,ngram,eagle-chain", "--batch-sizes", "1,3",
           "--prompts", str(shared_data / "prompts" / "spec_bench_subset.jsonl"), "--per-set", "1",
           "--max-new-tokens", "8", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["method"], r["batch"]) for r in rows} == {(m, b) for m in ("hf", "off", "ngram", "eagle-chain") for b in (1, 3)}
    assert all(r["identical"] == r["requests"] for r in rows), [(r["method"], r["batch"], r["identical"]) for r in rows]


def test_bench_rejects_unknown_method():
    proc = subprocess.run([sys.executable, "-m", "sglang_ext", "bench", "--methods", "hf,warp"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--methods" in proc.stderr


@pytest.mark.slow
def test_bench_policies_beside_oracle_static(tmp_path, shared_data):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "sglang_ext", "bench", "--methods", "hf", "--batch-sizes", "1,2",
           "--policies", "dsde,dsde:cost_cap=false,tide-control", "--policy-max-steps", "2",
           "--prompts", str(shared_data / "prompts" / "spec_bench_subset.jsonl"), "--per-set", "1",
           "--max-new-tokens", "8", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    for b in (1, 2):
        mine = {r["method"]: r for r in rows if r["batch"] == b}
        oracle = next(r for m, r in mine.items() if m.startswith("oracle-static"))
        best = max(mine["static k=1"]["tokens_per_s"], mine["static k=2"]["tokens_per_s"])
        assert oracle["tokens_per_s"] == best and oracle["ratio_vs_oracle"] == 1.0
        assert {"policy dsde", "policy dsde:cost_cap=false", "policy tide-control"} <= set(mine)
        assert mine["policy dsde:cost_cap=false"]["config"]["policy"]["cost_cap"] is False
    assert all(r["identical"] == r["requests"] for r in rows), [(r["method"], r["batch"], r["identical"]) for r in rows]
    assert "× oracle-static" in (out / "results.md").read_text()


def test_bench_rejects_unknown_policy():
    proc = subprocess.run([sys.executable, "-m", "sglang_ext", "bench", "--policies", "dsde,psychic"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--policies" in proc.stderr and "psychic" in proc.stderr


@pytest.mark.parametrize("spec, word", [("dsde:warp=1", "warp"), ("dsde:max_k=99", "max_k"), ("dsde:max_k", "NAME:PARAM")])
def test_bench_rejects_bad_policy_parameter(spec, word):
    proc = subprocess.run([sys.executable, "-m", "sglang_ext", "bench", "--policies", spec], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and f"--policies {spec}" in proc.stderr and word in proc.stderr, proc.stderr


def test_paired_ratios_are_per_round_medians():
    """× off and × oracle-static pair each round's runs; an even round count takes the mean of the middle two."""
    from types import SimpleNamespace

    from sglang_ext.bench import BenchRow, _paired_ratios, _with_oracle

    tps = {"off": [10.0, 20.0, 10.0, 10.0], "static k=1": [11.0, 22.0, 12.0, 9.0], "static k=2": [9.0, 30.0, 8.0, 8.0],
           "policy x": [11.0, 20.0, 13.0, 10.0]}
    arms = [SimpleNamespace(method=m, runs=[(1.0, t) for t in ts]) for m, ts in tps.items()]
    rows = [BenchRow(m, 8, 1, 1, 1.0, sorted(ts)[2], None, None, 1, config={"tokens_per_s_per_round": ts})
            for m, ts in tps.items()]
    _paired_ratios(arms, rows)
    by = {r.method: r for r in rows}
    assert by["static k=1"].config["ratio_vs_off_per_round"] == pytest.approx([1.1, 1.1, 1.2, 0.9])
    assert by["static k=1"].ratio_vs_off == pytest.approx(1.1)
    assert by["policy x"].ratio_vs_off == pytest.approx((1.0 + 1.1) / 2)
    out = {r.method: r for r in _with_oracle(rows, 8, 2)}
    assert "oracle-static (k=1)" in out  # median tok/s 12 > 9 (k=2's one fast round does not make it the oracle)
    assert out["policy x"].config["ratio_vs_oracle_per_round"] == pytest.approx([1.0, 20 / 22, 13 / 12, 10 / 9])
    assert out["policy x"].ratio_vs_oracle == pytest.approx((1.0 + 13 / 12) / 2)
