"""Online adaptation inside the reference engine: capture on the serving path, hot swaps between steps, and a
trainer process that may die, all without changing a single greedy output or losing a request."""

from __future__ import annotations

import os
import signal
import time

import pytest

from sglang_ext.engine.engine import GenerationRequest
from sglang_ext.online import OnlineLearning

from test_engine import hf_greedy, make_engine, prompts  # noqa: E402  (tests/ is on sys.path under pytest)

FAST_ROUNDS = {"n_init": 2, "n_threshold": 64, "learner": "adam", "lr": 3e-3, "epochs": 1, "gate_margin": -10.0,
               "gate_z": 0.0, "eval_fraction": 0.25, "trainer_threads": 1, "shift_epsilon": 1.0}


@pytest.fixture(scope="module")
def tiny():
    from sglang_ext.models.tiny import tiny_llama

    return tiny_llama(vocab_size=96, hidden_size=64, num_layers=2, seed=3)


def _online_engine(tiny, tmp_path, config=FAST_ROUNDS, round_delay_s=0.0):
    engine = make_engine(tiny, "eagle", num_steps=3, max_batch=3)
    model = engine.drafter.model
    online = OnlineLearning(model, engine.target.embed_tokens.weight, engine.target.lm_head.weight, tmp_path / "handoff",
                            dict(config), expect_target=model.config.target, round_delay_s=round_delay_s)
    engine.attach_online(online.start())
    return engine, online


def _serve(engine, ps, max_new, until=None, deadline_s=120.0):
    states = [engine.add_request(GenerationRequest(p, max_new_tokens=max_new)) for p in ps]
    t0 = time.monotonic()
    while engine.has_work():
        engine.step()
        if until is not None and until() and time.monotonic() - t0 < deadline_s:
            time.sleep(0.01)
    return states


def test_greedy_identity_while_the_drafter_is_swapped_under_load(tiny, tmp_path):
    engine, online = _online_engine(tiny, tmp_path)
    try:
        ps = prompts(21, 30)
        first = _serve(engine, ps[:10], 24)  # fills the buffer: a round starts
        deadline = time.monotonic() + 90
        later: list = []
        while online.status()["deployed"] < 1 and time.monotonic() < deadline:  # keep serving while it trains
            later += _serve(engine, ps[10:12], 24)
        assert online.status()["deployed"] >= 1, online.status()
        later += _serve(engine, ps[12:], 24)
        assert engine.drafter.version >= 1  # the engine swapped a new drafter in between steps
        for p, s in zip(ps[:10] + ps[10:12] * ((len(later) - 18) // 2) + ps[12:], first + later):
            assert s.output_ids == hf_greedy(tiny, p, 24)
        assert online.status()["capture_bytes_used"] <= online.buffer.byte_budget
    finally:
        online.stop()


def test_killing_the_trainer_loses_no_request(tiny, tmp_path):
    engine, online = _online_engine(tiny, tmp_path, round_delay_s=5.0)  # rounds stay in flight long enough to kill
    try:
        ps = prompts(33, 16)
        states = [engine.add_request(GenerationRequest(p, max_new_tokens=20)) for p in ps]
        killed = False
        while engine.has_work():
            engine.step()
            if not killed and online.trainer.in_flight:
                os.kill(online.trainer.pid, signal.SIGKILL)
                killed = True
        assert killed, "no training round started: the test did not exercise a kill"
        deadline = time.monotonic() + 60
        while online.status()["restarts"] < 1 and time.monotonic() < deadline:
            engine.step()  # an idle step still polls the supervisor
            time.sleep(0.05)
        st = online.status()
        assert st["restarts"] >= 1 and st["alive"] and st["dropped_rounds"] >= 1
        assert all(s.finished and s.finish_reason["type"] == "length" for s in states)
        for p, s in zip(ps, states):
            assert s.output_ids == hf_greedy(tiny, p, 20)
        more = _serve(engine, prompts(34, 2), 8)  # still serving after the restart
        assert all(len(s.output_ids) == 8 for s in more)
    finally:
        online.stop()


def test_capture_sees_committed_positions_only(tiny, tmp_path):
    engine, online = _online_engine(tiny, tmp_path, config={**FAST_ROUNDS, "n_threshold": 10_000})
    try:
        ps = prompts(5, 3)
        states = _serve(engine, ps, 10)
        # every prompt token but the last is prefilled; each decode step commits root + accepted path
        expected = sum(len(p) - 1 + s.spec_verify_ct + s.spec_num_correct_drafts for p, s in zip(ps, states))
        assert online.buffer.num_tokens == expected
    finally:
        online.stop()


def test_server_reports_the_trainer_in_metrics_and_survives_its_death(tmp_path):
    """`--online-learning` through the real flags and HTTP server: /metrics shows the trainer, a SIGKILL of it is
    counted as a restart, and requests keep being served."""
    import argparse
    import threading

    import httpx
    import uvicorn
    from sglang_ext.models.provision import model_dir

    from conftest import require_model

    require_model("smollm2-135m", "tokenizer")
    from transformers import AutoTokenizer

    from sglang_ext.engine.launch import add_engine_args, build_engine_from_parts, online_from_args
    from sglang_ext.models.tiny import tiny_llama
    from sglang_ext.engine.target import TargetModel
    from sglang_ext.server.app import EngineRunner, create_app
    from test_engine import random_eagle

    tok = AutoTokenizer.from_pretrained(model_dir("smollm2-135m"))
    model = tiny_llama(vocab_size=49152, hidden_size=64, num_layers=2, seed=0)
    draft = random_eagle(TargetModel(model, feature_layers=(0, 1)))
    engine, info = build_engine_from_parts(model, tok, "EAGLE", num_steps=2, draft_model=draft, max_running_requests=2,
                                           context_length=256, model_name="tiny")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--online-learning", "--online-handoff-dir", str(tmp_path / "h"), "--online-n-init", "1",
                              "--online-n-threshold", "16", "--online-gate-margin", "-10"])
    online = online_from_args(args, engine)
    runner = EngineRunner(engine, tok, model_name="tiny", info=info)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(runner), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            def complete() -> None:
                r = client.post("/v1/completions", json={"model": "tiny", "prompt": "one two three four", "max_tokens": 8})
                assert r.status_code == 200, r.text

            def metric(name: str) -> float:
                text = client.get("/metrics").text
                line = next(line for line in text.splitlines() if line.startswith(f"sglang_ext:online_{name}{{"))
                return float(line.rsplit(" ", 1)[1])

            for _ in range(3):
                complete()
            assert metric("alive") == 1.0 and metric("version") >= 1.0
            os.kill(online.trainer.pid, signal.SIGKILL)
            deadline = time.time() + 60
            while metric("restarts") < 1 and time.time() < deadline:
                complete()  # each request's steps poll the supervisor
            assert metric("restarts") >= 1.0 and metric("alive") == 1.0
            complete()
    finally:
        srv.should_exit = True
        thread.join(15)
        runner.stop()
    assert not online.status()["alive"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
