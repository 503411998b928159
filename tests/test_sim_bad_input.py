"""`sglang-ext sim` on bad or awkward input: every error names the file and line (or the flag), every abort leaves
both partial files, and what the profile does not cover is reported (or refused with --strict-profile)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sglang_ext.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "traces" / "profiles" / "cpu-2core-smollm2-135m.json"  # batch <= 8, context <= 1,024, chunks <= 512


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # rich wraps long messages at the terminal width; keep each on one line


def _trace(path: Path, rows: list[dict], raw_tail: bytes = b"") -> Path:
    path.write_bytes(("\n".join(json.dumps(r) for r in rows) + "\n").encode() + raw_tail)
    return path


def _rows(n: int, prompt: int = 100, out: int = 8) -> list[dict]:
    return [{"arrival": 0.2 * i, "prompt_tokens": prompt, "output_tokens": out} for i in range(n)]


def _replay(trace: Path, out: Path, *extra: str) -> int:
    return main(["sim", "replay", "--trace", str(trace), "--profile", str(PROFILE), "--out", str(out), *extra])


def test_non_utf8_trace_line_is_named_and_earlier_requests_are_kept(tmp_path, capsys):
    trace = _trace(tmp_path / "t.jsonl", _rows(4), b'{"arrival": 9, "prompt_tokens": 5, "output_tokens": 2, "x": "\xff"}\n')
    assert _replay(trace, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"{trace}:5" in err.replace("\n", "") and "not UTF-8" in err
    part = json.loads((tmp_path / "out" / "partial.json").read_text())
    assert part["summary"]["requests"] == 4 and (tmp_path / "out" / "requests.partial.csv").is_file()


def test_non_utf8_csv_profile_and_policy_config_name_their_file(tmp_path, capsys):
    azure = tmp_path / "a.csv"
    azure.write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
                      b"2023-11-16 18:15:50.9951690,396,10\xfe\n")
    assert main(["sim", "replay", "--trace", str(azure), "--format", "azure", "--profile", str(PROFILE),
                 "--out", str(tmp_path / "o1")]) == 1
    assert f"{azure}:3" in capsys.readouterr().err.replace("\n", "")
    bad_profile = tmp_path / "p.json"
    bad_profile.write_bytes(b'{"format": "\xff"}')
    trace = _trace(tmp_path / "t.jsonl", _rows(3))
    assert main(["sim", "replay", "--trace", str(trace), "--profile", str(bad_profile), "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err.replace("\n", "")
    assert str(bad_profile) in err and "not UTF-8" in err
    cfg = tmp_path / "policy.json"
    cfg.write_bytes(b'{"policy": "dsde\xff"}')
    assert _replay(trace, tmp_path / "o3", "--policy-config", str(cfg)) == 1
    err = capsys.readouterr().err.replace("\n", "")
    assert str(cfg) in err and "not UTF-8" in err


def test_bad_json_message_reads_cleanly(tmp_path, capsys):
    trace = _trace(tmp_path / "t.jsonl", _rows(2), b'{"arrival": 1, "prompt_tokens": "\n')
    assert _replay(trace, tmp_path / "out") == 1
    err = capsys.readouterr().err.replace("\n", "")
    assert f"{trace}:3" in err and "column" in err and "at at" not in err


def test_empty_trace_is_an_error_and_an_empty_csv_has_every_column(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"trace": {"name": "empty"}}\n')
    assert _replay(empty, tmp_path / "out") == 1
    assert "no requests" in capsys.readouterr().err
    assert main(["sim", "sweep", "--trace", str(empty), "--profile", str(PROFILE), "--grid", "k=1",
                 "--out", str(tmp_path / "sw")]) == 1
    from sglang_ext.formats.results import LATENCY_COLUMNS, REQUEST_COLUMNS, SimResult, write_requests_csv

    res = SimResult({}, {})
    with open(write_requests_csv(res, tmp_path / "r.csv"), newline="") as f:
        header = next(csv.reader(f))
    assert header == [*REQUEST_COLUMNS, *LATENCY_COLUMNS] and len(header) == 13


def test_requests_that_never_fit_are_rejected_not_fatal(tmp_path):
    rows = _rows(6)
    rows[3] = {"arrival": 0.6, "prompt_tokens": 5000, "output_tokens": 20, "id": "huge"}
    rows[4] = {"arrival": 0.8, "prompt_tokens": 9000, "output_tokens": 20, "id": "too-long"}  # > 8,192 positions
    trace = _trace(tmp_path / "t.jsonl", rows)
    assert _replay(trace, tmp_path / "out", "--kv-capacity", "4000") == 0
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["summary"]["requests"] == 4 and res["summary"]["rejected"] == 2 and res["summary"]["unfinished"] == 0
    reasons = {r["id"]: r["reason"] for r in res["rejected"]}
    assert "kv_capacity=4000" in reasons["huge"] and "max_context_len=8192" in reasons["too-long"]
    assert _replay(trace, tmp_path / "out2", "--max-context-len", "100000") == 0  # no KV limit, model limit raised
    assert json.loads((tmp_path / "out2" / "result.json").read_text())["summary"]["rejected"] == 0


def test_ctrl_c_writes_both_partial_files(tmp_path, monkeypatch):
    from simulator.model import Simulation

    real = Simulation.run

    def interrupted(self, until=None):
        real(self, until=2.0)
        raise KeyboardInterrupt

    monkeypatch.setattr(Simulation, "run", interrupted)
    assert _replay(_trace(tmp_path / "t.jsonl", _rows(40)), tmp_path / "out") == 130
    assert (tmp_path / "out" / "partial.json").is_file() and (tmp_path / "out" / "requests.partial.csv").is_file()


def test_time_scale_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["sim", "replay", "--trace", "x.jsonl", "--profile", str(PROFILE), "--out", "o", "--time-scale", "0"])
    assert "--time-scale '0': must be a finite number > 0" in capsys.readouterr().err


def test_extrapolation_is_reported_and_strict_profile_refuses_it(tmp_path, capsys):
    trace = _trace(tmp_path / "t.jsonl", _rows(30, prompt=2000, out=20))  # 2,000-token prompts, batch up to 16
    assert _replay(trace, tmp_path / "out", "--max-batch-size", "16", "--max-prefill-tokens", "2048") == 0
    beyond = json.loads((tmp_path / "out" / "result.json").read_text())["summary"]["beyond_profile"]
    assert beyond["prefill.tokens"]["measured_max"] == 512 and beyond["prefill.tokens"]["largest"] == 2000
    assert beyond["verify.context_len"]["largest"] > 1024
    assert "beyond the profile" in capsys.readouterr().out
    assert _replay(trace, tmp_path / "strict", "--max-batch-size", "16", "--max-prefill-tokens", "2048",
                   "--strict-profile") == 1
    assert "--strict-profile" in capsys.readouterr().err.replace("\n", "")
    assert (tmp_path / "strict" / "partial.json").is_file() and (tmp_path / "strict" / "requests.partial.csv").is_file()


def test_workers_split_the_replicas_and_merge_one_result(tmp_path):
    """--workers 2: the same requests, each on the replica round-robin gives it, merged with global numbers."""
    trace = _trace(tmp_path / "t.jsonl", _rows(40, prompt=120, out=12))
    assert _replay(trace, tmp_path / "one", "--replicas", "4") == 0
    assert _replay(trace, tmp_path / "two", "--replicas", "4", "--workers", "2") == 0
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["summary"]["requests"] == one["summary"]["requests"] == 40
    assert sorted(two["requests"]["index"]) == list(range(40))
    routed = {i: i % 4 for i in range(40)}  # round-robin, as one process routes them
    assert dict(zip(one["requests"]["index"], one["requests"]["replica"])) == routed
    assert dict(zip(two["requests"]["index"], two["requests"]["replica"])) == routed
    assert two["summary"]["output_tokens"] == one["summary"]["output_tokens"]
    with pytest.raises(SystemExit):
        main(["sim", "replay", "--trace", str(trace), "--profile", str(PROFILE), "--out", "o", "--workers", "0"])
    assert _replay(trace, tmp_path / "bad", "--replicas", "3", "--workers", "2") == 1
    assert _replay(trace, tmp_path / "bad2", "--replicas", "4", "--workers", "2", "--router", "least-loaded") == 1
