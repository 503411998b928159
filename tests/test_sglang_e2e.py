"""The plugin inside a real SGLang 0.5.23 server on this CPU (SGLang's CPU engine, PyTorch stand-in kernels).

One server at a time, each started once per test (start-up is 1.5-2.5 min on 2 cores): plain decoding (the
reference outputs), NGRAM, EAGLE3 with our converted drafter, and EAGLE3 with a policy and online learning. Every
speculative server must return greedy outputs token-identical to plain decoding on the same prompts.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import require_module

require_module("sglang")

from sglang_ext.core.policies import make_policy  # noqa: E402
from sglang_ext.models.provision import fetch_model, model_dir  # noqa: E402
from sglang_ext.sglang_plugin import TRACE_ENV  # noqa: E402
from sglang_ext.sglang_plugin.export import export_eagle3  # noqa: E402
from sglang_ext.sglang_plugin.online import OnlineBridge  # noqa: E402
from sglang_ext.sglang_plugin.steps import read_decision_log, replay_decisions  # noqa: E402
from sglang_ext.testing.sglang_cpu.launcher import SGLangCPUServer, run_engine  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.sglang_server]

DRAFTER = Path(__file__).resolve().parents[1] / "drafters" / "smollm2-135m-eagle"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "Q: What is 17 + 25?\nA:",
    "List three primary colours:",
    "Once upon a time, in a small village,",
    "import numpy as np\n\n# compute the mean of an array\n",
    "The theory of relativity says that",
]
MAX_NEW = 32
EAGLE3_ARGS = ("--speculative-algorithm", "EAGLE3", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
               "--speculative-num-draft-tokens", "4")


@pytest.fixture(scope="module")
def server_cls():
    """The launcher: SGLang's CPU engine with the stand-in kernels here (tests/test_sglang_gpu.py: CUDA)."""
    return SGLangCPUServer


@pytest.fixture(scope="module")
def target_dir() -> Path:
    fetch_model("smollm2-135m")
    return model_dir("smollm2-135m")


@pytest.fixture(scope="module")
def eagle3_dir(target_dir, tmp_path_factory) -> Path:
    return export_eagle3(DRAFTER, tmp_path_factory.mktemp("eagle3") / "drafter", target_model_dir=target_dir)


def _greedy(server, prompts=PROMPTS):
    return server.generate(list(prompts), max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def plain(server_cls, target_dir, tmp_path_factory):
    """Reference outputs of SGLang without speculation (and which processes loaded the plugin)."""
    trace = tmp_path_factory.mktemp("plugin") / "loads.jsonl"
    with server_cls(target_dir, env={**os.environ, TRACE_ENV: str(trace)}) as server:
        results = _greedy(server)
    assert all(len(r.output_ids) > 0 for r in results)
    loads = [json.loads(line) for line in trace.read_text().splitlines()]
    return {"ids": [r.output_ids for r in results], "loads": loads}


def _assert_identical(results, plain, label):
    for i, (r, ref) in enumerate(zip(results, plain["ids"])):
        assert r.output_ids == ref, f"{label}: prompt {i} ({PROMPTS[i]!r}) differs from plain decoding"


def test_plugin_loads_in_every_server_process(plain):
    # the launcher, the scheduler and the detokenizer each run load_plugins() (SGLang spawns them)
    pids = {entry["pid"] for entry in plain["loads"]}
    assert len(pids) >= 3, plain["loads"]


def test_ngram_is_identical_to_plain(server_cls, target_dir, plain):
    with server_cls(target_dir, "--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "4") as s:
        results = _greedy(s)
    _assert_identical(results, plain, "NGRAM")
    assert sum(r.meta_info.get("spec_verify_ct", 0) for r in results) > 0


def test_eagle3_with_converted_drafter_is_identical_to_plain(server_cls, target_dir, eagle3_dir, plain):
    with server_cls(target_dir, *EAGLE3_ARGS, "--speculative-draft-model-path", str(eagle3_dir)) as s:
        results = _greedy(s)
    _assert_identical(results, plain, "EAGLE3")
    accept = [r.meta_info["spec_accept_length"] for r in results]
    assert sum(accept) / len(accept) > 1.2, accept  # the converted drafter really drafts (1.0 = nothing accepted)


def _status(handoff: Path) -> dict:
    path = handoff / OnlineBridge.STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def test_eagle3_with_policy_and_online_learning(server_cls, target_dir, eagle3_dir, plain, tmp_path):
    """dsde decides the steps inside SGLang (equal to the core policy on the same accept counts), the online learner
    deploys new drafter versions while serving, outputs stay identical, and a killed trainer does not stop serving."""
    handoff, decisions = tmp_path / "handoff", tmp_path / "decisions.jsonl"
    args = [*EAGLE3_ARGS, "--speculative-draft-model-path", str(eagle3_dir), "--enable-metrics",
            "--speculative-policy", "dsde", "--speculative-policy-param", "window=8",  # a non-default value
            "--speculative-policy-log", str(decisions),
            "--online-learning", "--online-handoff-dir", str(handoff), "--online-n-init", "1",
            "--online-n-threshold", "64", "--online-gate-margin", "-10", "--online-gate-z", "0"]
    with server_cls(target_dir, *args) as s:
        deployed_at = None
        for round_ in range(8):
            _assert_identical(_greedy(s), plain, f"EAGLE3+dsde+online round {round_}")
            if _status(handoff).get("serving_version", 1) > 1:
                deployed_at = round_
                break
            time.sleep(2.0)
        status = _status(handoff)
        assert deployed_at is not None, f"no drafter version deployed while serving; status {status}\n{s.log_tail()}"
        _assert_identical(_greedy(s), plain, "after a drafter swap")

        metrics = s.get_text("/metrics")
        for name in ("sglang_ext:spec_steps", "sglang_ext:policy_decisions", "sglang_ext:online_drafter_version",
                     "sglang_ext:online_buffer_bytes"):
            assert name in metrics, name

        # The status file is rewritten about once a second, so its pid can be a child that already exited and is
        # being replaced; either way the serving side must restart it, which is what this checks.
        status = _status(handoff)
        pid, restarts_before = status["pid"], status.get("restarts", 0)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone: the restart below must still happen
        _assert_identical(_greedy(s), plain, "after the trainer was killed")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _status(handoff).get("restarts", 0) <= restarts_before:
            _greedy(s, PROMPTS[:2])
            time.sleep(1.0)
        after = _status(handoff)
        assert after.get("restarts", 0) > restarts_before, after
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (after.get("alive") and after.get("pid") != pid):
            _greedy(s, PROMPTS[:1])  # the status file is written between scheduler steps
            time.sleep(1.0)
            after = _status(handoff)
        assert after.get("alive") and after["pid"] != pid, after

    records = read_decision_log(decisions)
    steps = [r["steps"] for r in records if "steps" in r]
    assert len(steps) > 20 and max(steps) <= 3
    # the flag's value reached the scheduler intact: the replay with window=8 matches
    assert replay_decisions(make_policy("dsde", window=8), records, max_steps=3) == steps


def test_offline_engine_takes_our_keywords(server_cls, target_dir, eagle3_dir, plain):
    """``sglang.Engine(speculative_policy=..., ...)`` through :func:`sglang_ext.sglang_plugin.engine`."""
    if server_cls is not SGLangCPUServer:
        pytest.skip("the offline Engine runner uses the CPU harness")
    outputs = run_engine(target_dir, PROMPTS, sampling_params={"max_new_tokens": MAX_NEW},
                         engine_kwargs={"speculative_algorithm": "EAGLE3", "speculative_num_steps": 3,
                                        "speculative_eagle_topk": 1, "speculative_num_draft_tokens": 4,
                                        "speculative_draft_model_path": str(eagle3_dir),
                                        "speculative_policy": "tide-control"})
    assert [o["output_ids"] for o in outputs] == plain["ids"]
    with pytest.raises(RuntimeError, match="max_k=99"):
        run_engine(target_dir, PROMPTS[:1], engine_kwargs={"speculative_algorithm": "EAGLE3",
                                                           "speculative_draft_model_path": str(eagle3_dir),
                                                           "speculative_policy": "dsde",
                                                           "speculative_policy_param": {"max_k": 99}}, timeout=300)
