"""The SGLang-on-CPU test harness (``sglang_ext.testing.sglang_cpu``): launcher mechanics, and real serving.

Fast tests check argument merging, the environment, the ``sitecustomize`` AMX claim and the process-group
clean-up with stand-in commands. The ``slow`` tests start real SGLang 0.5.23 servers on SmolLM2-135M with the
PyTorch stand-in kernels -- one server at a time: each module fixture starts its server, runs every request its
tests need, stops it and returns the recorded replies -- and check that greedy output is non-empty and
deterministic, and that NGRAM and EAGLE3 speculative decoding give token-identical output to plain decoding.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_module, skip_or_fail

from sglang_ext.testing.sglang_cpu import (
    DEFAULT_SERVER_ARGS,
    ENV_FLAG,
    STAND_IN_DIR,
    SGLangCPUServer,
    ServerStartError,
    harness_env,
    merge_args,
    run_engine,
)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Launcher mechanics (no SGLang server)
# ----------------------------------------------------------------------------------------------------------------


def test_merge_args_overrides_defaults_and_appends_new_flags():
    args = merge_args(DEFAULT_SERVER_ARGS, ["--dtype", "bfloat16", "--speculative-algorithm", "NGRAM",
                                            "--max-total-tokens=4096"])
    assert args.count("--dtype") == 1 and args[args.index("--dtype") + 1] == "bfloat16"
    assert args[args.index("--max-total-tokens") + 1] == "4096"
    assert "--disable-overlap-schedule" in args and args[-4:-2] == ["--speculative-algorithm", "NGRAM"]
    assert merge_args(DEFAULT_SERVER_ARGS, []) == list(DEFAULT_SERVER_ARGS)


def test_harness_env_puts_the_stand_in_first_once():
    env = harness_env({"PYTHONPATH": f"/somewhere{os.pathsep}{STAND_IN_DIR}", "KEEP": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(STAND_IN_DIR), "/somewhere"]
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["SGLANG_CPU_OMP_THREADS_BIND"] == "0"
    assert env[ENV_FLAG] == "1" and env["KEEP"] == "1"
    assert (STAND_IN_DIR / "common_ops.py").is_file() and (STAND_IN_DIR / "sitecustomize.py").is_file()


def _python(code: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_sitecustomize_claims_amx_only_when_armed_and_chains(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['CHAINED_SITECUSTOMIZE'] = 'ran'\n")
    code = "import os, torch; print(torch.cpu._is_amx_tile_supported(), os.environ.get('CHAINED_SITECUSTOMIZE'))"
    armed = harness_env()
    armed["PYTHONPATH"] += os.pathsep + str(tmp_path)
    assert _python(code, armed) == "True ran"
    unarmed = {k: v for k, v in armed.items() if k != ENV_FLAG}
    real = _python("import torch; print(torch.cpu._is_amx_tile_supported())", dict(os.environ))
    assert _python(code, unarmed) == f"{real} ran"


def test_sglang_selects_the_amx_path_under_the_harness_env():
    """What makes SGLang pick ``intel_amx``: ``cpu_has_amx_support()`` is true on any CPU under the harness."""
    require_module("sglang")
    code = "from sglang.srt.utils import cpu_has_amx_support; print(cpu_has_amx_support())"
    assert _python(code, harness_env()).splitlines()[-1] == "True"


class _FakeServer(SGLangCPUServer):
    """Runs ``script`` instead of SGLang, to exercise start-up failure and clean-up."""

    def __init__(self, script: str, **kwargs):
        super().__init__("unused-model", **kwargs)
        self.script = script

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.script]


def test_start_failure_reports_exit_code_and_log_tail(tmp_path):
    server = _FakeServer("import sys; print('boom: no model here', flush=True); sys.exit(3)",
                         log_path=tmp_path / "server.log", timeout=60)
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 3.*boom: no model here"):
        server.start()


def test_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
              f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(600)")
    server = _FakeServer(script, log_path=tmp_path / "server.log", timeout=4)
    with pytest.raises(ServerStartError, match="not healthy after 4 s"):
        server.start()
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists():
        state = Path(f"/proc/{child}/stat").read_text().split()[2] if Path(f"/proc/{child}/stat").exists() else "X"
        if state == "Z":
            break
        time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().split()[2] == "Z", \
        "the server's child process outlived stop()"
    assert server.proc is not None and server.proc.poll() is not None


# ----------------------------------------------------------------------------------------------------------------
# Real serving (slow)
# ----------------------------------------------------------------------------------------------------------------

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time,",
    "1, 2, 3, 4, 5,",
    "Monday, Tuesday, Wednesday,",
]
MAX_NEW_TOKENS = 32


@dataclass
class Run:
    """What one server configuration produced (the server is already stopped)."""

    startup_seconds: float
    batched: list  # GenerateResult per prompt, all prompts in one request
    batched_again: list  # the same request repeated
    single: object  # the first prompt alone
    log_path: Path


@pytest.fixture(scope="module")
def model_dir() -> Path:
    require_module("sglang")
    from sglang_ext.models.provision import fetch_model

    return fetch_model("smollm2-135m")


def _serve(model_dir: Path, *extra: str) -> Run:
    with SGLangCPUServer(model_dir, *extra, timeout=900) as server:
        batched = server.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS)
        batched_again = server.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS)
        single = server.generate(PROMPTS[0], max_new_tokens=MAX_NEW_TOKENS)
        return Run(server.startup_seconds, batched, batched_again, single, server.log_path)


@pytest.fixture(scope="module")
def plain_run(model_dir) -> Run:
    return _serve(model_dir)


@pytest.fixture(scope="module")
def ngram_run(model_dir, plain_run) -> Run:  # plain_run first: one server at a time, in a fixed order
    return _serve(model_dir, "--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "8")


@pytest.fixture(scope="module")
def eagle3_run(model_dir, ngram_run, tmp_path_factory) -> Run:
    from sglang_ext.sglang_plugin import export
    drafter = REPO / "drafters" / "smollm2-135m-eagle"
    if not (drafter / "config.json").is_file():
        skip_or_fail(f"{drafter} not present (the shipped drafter)")
    out = export.export_eagle3(drafter, tmp_path_factory.mktemp("eagle3") / "smollm2-135m-eagle3",
                               target_model_dir=model_dir)
    return _serve(model_dir, "--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", str(out),
                  "--speculative-num-steps", "3", "--speculative-eagle-topk", "2",
                  "--speculative-num-draft-tokens", "6")


def _ids(results) -> list[list[int]]:
    return [r.output_ids for r in results]


@pytest.mark.slow
def test_plain_greedy_is_non_empty_and_deterministic(plain_run):
    for prompt, r in zip(PROMPTS, plain_run.batched):
        assert 0 < len(r.output_ids) <= MAX_NEW_TOKENS and r.text.strip(), f"{prompt!r}: empty completion"
    assert _ids(plain_run.batched) == _ids(plain_run.batched_again)
    assert plain_run.single.output_ids == plain_run.batched[0].output_ids
    log = plain_run.log_path.read_text(errors="replace")
    # without the harness's AMX claim SGLang logs this and falls back to torch_native (no speculative verify)
    assert "does not support Intel AMX" not in log and "'attention_backend': 'intel_amx'" in log


def _assert_identical_to_plain(run: Run, plain: Run, name: str) -> None:
    for prompt, spec, base in zip(PROMPTS, run.batched, plain.batched):
        assert spec.output_ids == base.output_ids, f"{name} differs from plain greedy on {prompt!r}"
    assert _ids(run.batched_again) == _ids(plain.batched)
    verify_steps = sum(r.meta_info.get("spec_verify_ct", 0) for r in run.batched)
    accepted = sum(r.meta_info.get("spec_num_correct_drafts", 0) for r in run.batched)
    assert verify_steps > 0, f"{name}: no speculative verify step ran"
    assert accepted > 0, f"{name}: no draft token was ever accepted, so the tree/verify path is untested"


@pytest.mark.slow
def test_ngram_is_token_identical_to_plain_greedy(ngram_run, plain_run):
    _assert_identical_to_plain(ngram_run, plain_run, "NGRAM")


@pytest.mark.slow
def test_eagle3_is_token_identical_to_plain_greedy(eagle3_run, plain_run):
    _assert_identical_to_plain(eagle3_run, plain_run, "EAGLE3")


@pytest.mark.slow
def test_offline_engine_matches_the_server(model_dir, plain_run):
    outputs = run_engine(model_dir, PROMPTS[:2], sampling_params={"max_new_tokens": MAX_NEW_TOKENS})
    assert [o["output_ids"] for o in outputs] == _ids(plain_run.batched[:2])
