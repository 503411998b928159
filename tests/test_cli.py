"""The console script: subcommands, exit codes, and flag errors that name the flag."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sglang_ext.cli import main


def test_lossless_subcommand_passes(capsys):
    assert main(["lossless", "--scheme", "without_replacement", "--branching", "2", "--temperature", "0.8"]) == 0
    assert "yes" in capsys.readouterr().out


def test_demo_without_model_runs_exact_checks(capsys):
    assert main(["demo", "--skip-model"]) == 0
    out = capsys.readouterr().out
    assert "all lossless checks passed" in out and "without_re" in out


def test_bad_branching_flag_names_the_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["lossless", "--branching", "2,0"])
    assert exc.value.code == 2
    assert "--branching '2,0'" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "sglang_ext", "models", "list"], capture_output=True, text=True, check=True)
    assert "smollm2-135m" in out.stdout


def test_replay_command_exits_with_everything_written(tmp_path):
    """``sim replay`` leaves without the interpreter's teardown: its printed table, both result files and its exit
    status must be complete all the same, and a failure still exits 1 with its message."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "sglang_ext", "sim", "replay", "--trace", str(root / "traces" / "tiny_chat.jsonl"),
           "--profile", str(root / "traces" / "profiles" / "cpu-2core-smollm2-135m.json"), "--policy", "dsde",
           "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "requests finished" in proc.stdout and proc.stdout.rstrip().endswith("requests.csv")
    rows = (tmp_path / "run" / "requests.csv").read_text().splitlines()
    assert len(rows) > 1 and rows[-1].count(",") == rows[0].count(",")
    assert (tmp_path / "run" / "result.json").read_text().rstrip().endswith("}")
    bad = subprocess.run([*cmd[:6], str(tmp_path / "missing.jsonl"), *cmd[7:]], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "missing.jsonl" in bad.stderr
