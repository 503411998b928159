"""The HTTP server and the serve/generate CLI.

A real uvicorn server runs in a thread around an engine on a tiny random Llama whose vocabulary matches the
real SmolLM2 tokenizer, so chat templates, detokenisation and stop handling are the real ones while every
forward takes milliseconds.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch

from sglang_ext.cli import main
from sglang_ext.engine.launch import (
    LaunchError,
    build_engine_from_parts,
    load_draft_model,
    resolve_speculative,
)
from sglang_ext.models.provision import model_dir
from sglang_ext.models.tiny import tiny_llama
from sglang_ext.testing.http import serve_in_thread, sse_events

from conftest import require_model

MODEL = "tiny-smollm2"
CONTEXT = 256
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the"


@pytest.fixture(scope="module")
def server():
    require_model("smollm2-135m", "tokenizer")
    from transformers import AutoTokenizer

    from sglang_ext.server.app import EngineRunner, create_app

    tok = AutoTokenizer.from_pretrained(model_dir("smollm2-135m"))
    model = tiny_llama(vocab_size=49152, hidden_size=64, num_layers=2, seed=0)
    engine, info = build_engine_from_parts(model, tok, "NGRAM", num_steps=2, max_running_requests=4,
                                           context_length=CONTEXT, model_name=MODEL)
    runner = EngineRunner(engine, tok, model_name=MODEL, info=info)
    with serve_in_thread(create_app(runner)) as srv:
        yield SimpleNamespace(client=srv.client, url=srv.url, runner=runner, engine=engine, tokenizer=tok)


def _stream(client, path: str, body: dict) -> list[object]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r)


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


# ---- OpenAI endpoints ----------------------------------------------------------------------------------------
def test_completion_stream_equals_non_stream(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    r = server.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == MODEL
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 24
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 24
    meta = out["meta_info"]
    assert meta["spec_verify_ct"] > 0 and meta["spec_accept_length"] >= 1.0
    assert meta["spec_accept_length"] == pytest.approx(24 / meta["spec_verify_ct"])
    assert choice["meta_info"] == meta

    events = _stream(server.client, "/v1/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["meta_info"]["spec_verify_ct"] == meta["spec_verify_ct"]  # greedy: same run, same counters
    assert last["usage"]["completion_tokens"] == 24
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_chat_stream_equals_non_stream(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello. Say hello. Say hello."}],
            "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    r = server.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion"
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert out["meta_info"]["spec_verify_ct"] > 0 and "spec_accept_length" in out["meta_info"]
    # the prompt went through SmolLM2's chat template
    assert out["usage"]["prompt_tokens"] > len(server.tokenizer.encode("Say hello. Say hello. Say hello.")) + 5

    events = _stream(server.client, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20  # include_usage chunk
    final = chunks[-2]
    assert final["choices"][0]["finish_reason"] == "length" and final["meta_info"]["spec_verify_ct"] > 0
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == message["content"]


def test_stop_string_is_not_streamed(server):
    """A stop string taken from the greedy output: both modes end right before it, and never stream any of it."""
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    full = server.client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    words = [w for w in full.split(" ") if len(w) >= 2]
    if not words:
        pytest.skip("the random model produced no usable stop string")
    stop = words[len(words) // 2]
    cut = full.index(stop)
    r = server.client.post("/v1/completions", json={**body, "stop": [stop]}).json()
    assert r["choices"][0]["text"] == full[:cut]
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["matched_stop"] == stop
    chunks = _stream(server.client, "/v1/completions", {**body, "stop": stop, "stream": True})[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:cut]


def test_eight_concurrent_requests_match_sequential(server):
    prompts = [f"Request {i}: count {i} {i + 1} {i + 2} {i} {i + 1} {i + 2}" for i in range(8)]

    def ask(p: str) -> dict:
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": p, "max_tokens": 16, "temperature": 0,
                                                             "ignore_eos": True}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    elapsed = time.perf_counter() - t0
    assert all(o["usage"]["completion_tokens"] == 16 for o in together)
    alone = [ask(p) for p in prompts[:3]]  # batching must not mix requests up: greedy outputs are the same
    assert [o["choices"][0]["text"] for o in alone] == [o["choices"][0]["text"] for o in together[:3]]
    assert elapsed < 60


def test_seeded_sampling_repeats(server):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 7,
            "ignore_eos": True}
    a, b = (server.client.post("/v1/completions", json=body).json() for _ in range(2))
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["meta_info"]["spec_verify_ct"] > 0


def test_client_disconnect_aborts_the_stream(server, monkeypatch):
    """A client that goes away mid-stream frees its batch slot instead of generating to max_tokens."""
    forward = server.engine.target.forward

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(server.engine.target, "forward", slow)  # 200 tokens would take >= 2 s
    with server.client.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 200, "stream": True,
                                                               "ignore_eos": True, "temperature": 0}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text": ""' not in line:
                break
    t0 = time.perf_counter()
    while server.client.get("/server_info").json()["internal_states"][0]["num_running_reqs"]:
        assert time.perf_counter() - t0 < 1.5, "the aborted request is still running"
        time.sleep(0.02)


# ---- SGLang native -----------------------------------------------------------------------------------------
def test_generate_native(server):
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}}
    r = server.client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["output_ids"]) == 10 and isinstance(out["text"], str)
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 10}
    assert meta["completion_tokens"] == 10 and meta["spec_verify_ct"] > 0 and "spec_accept_length" in meta
    ids = server.tokenizer.encode(PROMPT)
    by_ids = server.client.post("/generate", json={"input_ids": ids, "sampling_params": body["sampling_params"]}).json()
    assert by_ids["output_ids"] == out["output_ids"]
    events = _stream(server.client, "/generate", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    assert events[-2]["text"] == out["text"] and events[-2]["output_ids"] == out["output_ids"]
    assert events[-2]["meta_info"]["finish_reason"]["type"] == "length"


# ---- info and metrics ------------------------------------------------------------------------------------------
def test_health_models_server_info(server):
    r = server.client.get("/health")
    assert r.status_code == 200 and r.text == "ok"
    models = server.client.get("/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == CONTEXT
    server.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    info = server.client.get("/server_info").json()
    assert info["speculative_algorithm"] == "NGRAM" and info["speculative_num_steps"] == 2
    assert info["max_running_requests"] == 4 and info["context_length"] == CONTEXT
    assert info["internal_states"][0]["avg_spec_accept_length"] >= 1.0


def test_metrics_counters_increase(server):
    before = server.client.get("/metrics").text
    r = server.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                                    "ignore_eos": True})
    assert r.status_code == 200
    after = server.client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    for name in ("sglang:spec_accept_length", "sglang:spec_accept_rate", "sglang:num_running_reqs",
                 "sglang:num_queue_reqs", "sglang:e2e_request_latency_seconds_count"):
        assert name in text
    assert _metric(text, "sglang:spec_accept_length") >= 1.0
    assert _metric(text, "sglang:num_requests_total") == _metric(before, "sglang:num_requests_total") + 1
    assert _metric(text, "sglang:generation_tokens_total") == _metric(before, "sglang:generation_tokens_total") + 12
    assert _metric(text, "sglang:prompt_tokens_total") > _metric(before, "sglang:prompt_tokens_total")
    assert _metric(text, "sglang:spec_verify_calls_total") > _metric(before, "sglang:spec_verify_calls_total")


# ---- bad input ----------------------------------------------------------------------------------------------------
BAD = [
    ("/v1/completions", b'{"prompt": "hi", ', 400, "body"),
    ("/v1/completions", b"[1, 2]", 400, "body"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"max_tokens": 4}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ("/generate", {"sampling_params": {"max_new_tokens": 4}}, 400, "text"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 0}}, 400, "sampling_params.max_new_tokens"),
    ("/generate", {"text": "hi", "sampling_params": {"flavour": 1}}, 400, "sampling_params.flavour"),
]


@pytest.mark.parametrize("path,body,status,field", BAD, ids=[f"{p}:{f}" for p, _, _, f in BAD])
def test_bad_input_names_the_field_and_server_keeps_serving(server, path, body, status, field):
    if isinstance(body, bytes):
        r = server.client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = server.client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == field
    assert err["message"].startswith(f"{field}: ")
    ok = server.client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_prompt_longer_than_context_is_400(server):
    long_ids = [100 + i % 500 for i in range(CONTEXT + 10)]
    r = server.client.post("/v1/completions", json={"prompt": long_ids, "max_tokens": 4})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt" and "context length" in r.json()["error"]["message"]
    r = server.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * CONTEXT}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = server.client.post("/generate", json={"input_ids": long_ids[:CONTEXT - 2], "sampling_params": {"max_new_tokens": 50}})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]


def test_engine_failure_fails_only_in_flight_and_loop_survives(server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected forward failure")

    monkeypatch.setattr(server.engine.target, "forward", broken)
    r = server.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 500
    assert "injected forward failure" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert server.runner.alive
    ok = server.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert ok.status_code == 200, ok.text
    assert server.client.get("/server_info").json()["internal_states"][0]["step_failures"] >= 1
    assert server.client.get("/health").status_code == 200


# ---- launch and CLI -----------------------------------------------------------------------------------------
def test_resolve_speculative_follows_sglang_rules():
    s = resolve_speculative("eagle3")
    assert (s.algorithm, s.num_steps, s.topk, s.num_draft_tokens) == ("EAGLE3", 2, 1, 3)
    s = resolve_speculative("NGRAM", num_draft_tokens=6)
    assert (s.num_steps, s.num_draft_tokens) == (5, 6)
    s = resolve_speculative("EAGLE", num_steps=3, topk=1, num_draft_tokens=8)  # a chain: forced to steps + 1
    assert s.num_draft_tokens == 4 and s.notes
    assert resolve_speculative("EAGLE", num_steps=3, topk=4).num_draft_tokens == 13
    with pytest.raises(LaunchError, match="--speculative-eagle-topk"):
        resolve_speculative("NGRAM", topk=2)
    with pytest.raises(LaunchError, match="--speculative-num-draft-tokens"):
        resolve_speculative("EAGLE", num_steps=2, topk=2, num_draft_tokens=9)
    with pytest.raises(LaunchError, match="--speculative-algorithm"):
        resolve_speculative("MEDUSA")


def test_eagle_engine_from_parts_is_greedy_identical_to_plain():
    from sglang_ext.core.drafters.eagle_model import EagleConfig, EagleDraftModel
    from sglang_ext.engine.engine import GenerationRequest

    model = tiny_llama(vocab_size=96, hidden_size=64, num_layers=2, seed=4)
    torch.manual_seed(0)
    draft = EagleDraftModel(EagleConfig.for_target(model.config, feature_layers=[0, 1]))
    eagle, info = build_engine_from_parts(model, None, "EAGLE", draft_model=draft, topk=2, num_steps=2,
                                          max_running_requests=2, context_length=128, eos_token_ids=())
    plain, _ = build_engine_from_parts(model, None, "NONE", max_running_requests=2, context_length=128, eos_token_ids=())
    assert info["feature_layers"] == [0, 1] and info["speculative_num_draft_tokens"] == 5
    reqs = [[5, 6, 7, 8, 5, 6], [9, 10, 11, 9, 10]]
    a = eagle.run([GenerationRequest(p, max_new_tokens=12) for p in reqs])
    b = plain.run([GenerationRequest(p, max_new_tokens=12) for p in reqs])
    assert [s.output_ids for s in a] == [s.output_ids for s in b]
    assert all(s.spec_verify_ct > 0 for s in a)


def test_draft_checkpoint_for_another_target_names_the_flag(tmp_path):
    from sglang_ext.core.drafters.eagle_model import (
        EagleConfig,
        EagleDraftModel,
        target_identity,
    )

    model = tiny_llama(vocab_size=96, hidden_size=64, num_layers=2)
    cfg = EagleConfig.for_target(model.config, [1], target_identity=target_identity("tiny-a", model.config))
    EagleDraftModel(cfg).save(tmp_path / "ckpt")
    assert load_draft_model(str(tmp_path / "ckpt"), "tiny-a", model.config).config.feature_layers == [1]
    with pytest.raises(LaunchError, match=r"--speculative-draft-model-path .*config\.json.*tiny-a"):
        load_draft_model(str(tmp_path / "ckpt"), "tiny-b", model.config)
    with pytest.raises(LaunchError, match="--speculative-draft-model-path .*no such directory"):
        load_draft_model(str(tmp_path / "missing"), "tiny-a", model.config)


@pytest.mark.parametrize("argv,flag", [
    (["--speculative-algorithm", "EAGLE"], "--speculative-draft-model-path"),
    (["--speculative-algorithm", "eagle3", "--speculative-draft-model-path", "/nonexistent/drafter"],
     "--speculative-draft-model-path"),
    (["--model-path", "no-such-model"], "--model-path"),
    (["--speculative-algorithm", "NGRAM", "--speculative-eagle-topk", "3"], "--speculative-eagle-topk"),
])
def test_generate_cli_errors_name_the_flag(capsys, argv, flag):
    assert main(["generate", "--prompt", "hi", *argv]) != 0
    assert flag in capsys.readouterr().err


def test_generate_cli_rejects_unknown_algorithm(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "hi", "--speculative-algorithm", "medusa"])
    assert exc.value.code == 2
    assert "--speculative-algorithm" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_cli_real_model_json():
    cmd = [sys.executable, "-m", "sglang_ext", "generate", "--model-path", "smollm2-135m", "--prompt",
           "Repeat exactly: one two three four, one two three four.", "--max-new-tokens", "8",
           "--speculative-algorithm", "NGRAM", "--json"]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    rec = lines[0]
    meta = rec["meta_info"]
    assert isinstance(rec["text"], str) and 1 <= meta["completion_tokens"] <= 8
    assert meta["spec_verify_ct"] > 0 and meta["spec_accept_length"] >= 1.0
    assert "speculative NGRAM" in out.stderr
