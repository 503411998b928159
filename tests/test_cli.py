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
