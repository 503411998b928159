"""What a hostile or merely demanding client of ``sglang-ext serve`` hits: body limits, tokenising off the event
loop, a shutdown deadline, OpenAI's error schema, unknown fields, logprobs and ``n > 1``.

Real uvicorn servers in threads around tiny random Llamas with the real SmolLM2 tokenizer: one with speculation off
and one with an EAGLE drafter (chain of 3), on the *same* weights, so speculation on and off can be compared over
HTTP; the slow module ``test_server_real.py`` repeats the checks that need the real model.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import require_model
from sglang_ext.engine.launch import build_engine_from_parts
from sglang_ext.engine.target import TargetModel
from sglang_ext.models.provision import model_dir
from sglang_ext.models.tiny import tiny_llama
from sglang_ext.server.app import EngineRunner, ServerOptions, create_app
from sglang_ext.server.graceful import GracefulServer
from sglang_ext.testing.http import serve_in_thread, sse_events
from test_engine import random_eagle

MODEL = "tiny"
CONTEXT = 512
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the"
LIMIT = 64 * 1024


def _tiny():
    return tiny_llama(vocab_size=49152, hidden_size=64, num_layers=2, seed=0)


def _runner(tok, algorithm: str = "NONE", context: int = CONTEXT) -> EngineRunner:
    model = _tiny()
    kw = {}
    if algorithm == "EAGLE":
        kw = {"num_steps": 3, "draft_model": random_eagle(TargetModel(model, feature_layers=(0, 1)))}
    engine, info = build_engine_from_parts(model, tok, algorithm, max_running_requests=4, context_length=context,
                                           model_name=MODEL, **kw)
    return EngineRunner(engine, tok, model_name=MODEL, info=info)


@pytest.fixture(scope="module")
def tok():
    require_model("smollm2-135m", "tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir("smollm2-135m"))


@pytest.fixture(scope="module")
def servers(tok):
    """``plain`` (speculation off), ``spec`` (EAGLE chain), and ``strict``: the plain runner behind an app with
    ``--reject-unknown-fields``. Every app has a 64 KiB body limit."""
    plain, spec = _runner(tok), _runner(tok, "EAGLE")
    plain.start(), spec.start()
    limit = ServerOptions(max_request_bytes=LIMIT)
    strict = ServerOptions(max_request_bytes=LIMIT, reject_unknown_fields=True)
    with serve_in_thread(create_app(plain, limit)) as p, serve_in_thread(create_app(spec, limit)) as s, \
            serve_in_thread(create_app(plain, strict)) as st:
        yield SimpleNamespace(plain=p.client, spec=s.client, strict=st.client, plain_runner=plain, spec_runner=spec,
                              tok=tok)
    plain.stop(), spec.stop()


def _post_stream(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        return sse_events(r)


# ---- body size and the event loop -------------------------------------------------------------------------------
def test_body_over_the_limit_is_413_before_it_is_read(servers):
    big = {"prompt": "word " * (LIMIT // 4), "max_tokens": 2}
    r = servers.plain.post("/v1/completions", json=big)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["param"] == "body" and err["code"] == "request_too_large" and "--max-request-bytes" in err["message"]

    def chunks():  # no Content-Length: the limit is enforced while streaming the body in
        yield b'{"prompt": "'
        for _ in range(LIMIT // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    r = servers.plain.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    ok = servers.plain.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}),
    ("/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 2}}),
])
def test_tokenising_runs_off_the_event_loop(servers, monkeypatch, path, body):
    """While a prompt is being tokenised (held here until /health has answered), the loop serves /health: a
    tokeniser on the loop would block /health until the hold times out, and the request would fail."""
    tok = servers.tok
    release, held = threading.Event(), threading.Event()
    threads = []
    for name in ("encode", "apply_chat_template"):
        real = getattr(tok, name)

        def holding(*args, _real=real, **kwargs):
            threads.append(threading.current_thread().name)
            held.set()
            assert release.wait(20), "never released: /health did not answer while tokenising"
            return _real(*args, **kwargs)

        monkeypatch.setattr(tok, name, holding)
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=servers.plain.post(path, json=body)))
    worker.start()
    assert held.wait(20)
    health = servers.plain.get("/health", timeout=10)
    release.set()
    worker.join(30)
    assert health.status_code == 200 and health.text == "ok"
    assert result["r"].status_code == 200, result["r"].text
    assert threads and all(not name.startswith("MainThread") and "uvicorn" not in name for name in threads)


# ---- shutdown ----------------------------------------------------------------------------------------------------
def test_shutdown_deadline_aborts_streams_with_an_error_chunk(tok):
    """SIGTERM (delivered as uvicorn receives it) during a long stream: after ``--shutdown-timeout`` the stream
    gets an error chunk (``server_shutting_down``) and ``[DONE]``, a non-stream request in flight gets a 503, new
    requests are refused, and the server exits; a short request finishes normally within the deadline."""
    runner = _runner(tok)
    forward = runner.engine.target.forward

    def slow(*args, **kwargs):  # ~10 s per 200 tokens, so nothing long finishes on its own during the test
        time.sleep(0.05)
        return forward(*args, **kwargs)

    runner.engine.target.forward = slow
    deadline = 1.0
    with serve_in_thread(create_app(runner), lambda config: GracefulServer(config, runner, deadline)) as srv:
        events, statuses = [], {}

        def stream():
            with srv.client.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 400,
                                                                    "ignore_eos": True, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])

        def long_non_stream():
            statuses["long"] = srv.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 400,
                                                                        "ignore_eos": True})

        def short():
            statuses["short"] = srv.client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5,
                                                                         "ignore_eos": True})

        workers = [threading.Thread(target=f) for f in (stream, long_non_stream)]
        for w in workers:
            w.start()
        t0 = time.time()
        while len(events) < 2:
            assert time.time() - t0 < 30, "the stream did not start"
            time.sleep(0.02)
        t_signal = time.monotonic()
        srv.server.handle_exit(signal.SIGTERM, None)
        assert runner.shutting_down
        workers.append(threading.Thread(target=short))
        workers[-1].start()
        for w in workers:
            w.join(30)
        srv.thread.join(30)
        elapsed = time.monotonic() - t_signal
    assert not srv.thread.is_alive(), "uvicorn did not exit"
    assert elapsed < 15  # the 400-token requests would take about 20 s
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "server_shutting_down" and "deadline" in err["message"]
    long = statuses["long"]
    assert long.status_code == 503 and long.json()["error"]["code"] == "server_shutting_down"
    # a request sent after the signal is refused (503), or the listening socket is already closed
    if "short" in statuses:
        assert statuses["short"].status_code == 503
    runner.stop()


def test_requests_in_flight_finish_within_the_deadline(tok):
    runner = _runner(tok)
    with serve_in_thread(create_app(runner), lambda config: GracefulServer(config, runner, 30.0)) as srv:
        out = {}
        worker = threading.Thread(target=lambda: out.update(r=srv.client.post(
            "/v1/completions", json={"prompt": PROMPT, "max_tokens": 40, "ignore_eos": True, "temperature": 0})))
        forward = runner.engine.target.forward
        started = threading.Event()

        def slow(*args, **kwargs):
            started.set()
            time.sleep(0.02)
            return forward(*args, **kwargs)

        runner.engine.target.forward = slow
        worker.start()
        assert started.wait(20)
        srv.server.handle_exit(signal.SIGTERM, None)
        worker.join(30)
        srv.thread.join(30)
    assert out["r"].status_code == 200 and out["r"].json()["usage"]["completion_tokens"] == 40
    runner.stop()


# ---- errors ------------------------------------------------------------------------------------------------------
ERRORS = [
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": CONTEXT}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": list(range(100, 100 + CONTEXT + 5)), "max_tokens": 1}, 400, "prompt",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": CONTEXT}, 400,
     "max_tokens", "context_length_exceeded"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": CONTEXT}}, 400,
     "sampling_params.max_new_tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs", None),
    ("/v1/completions", {"prompt": "hi", "n": 2, "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, 400, "n", None),
    ("/generate", {"text": "hi", "return_logprob": True, "logprob_start_len": 0}, 400, "logprob_start_len",
     "unsupported_parameter"),
    ("/generate", {"text": "hi", "sampling_params": {"flavour": 1}}, 400, "sampling_params.flavour",
     "unknown_parameter"),
    ("/v1/completions", b"{not json", 400, "body", None),
]


@pytest.mark.parametrize("path,body,status,param,code", ERRORS, ids=[f"{e[0]}:{e[3]}" for e in ERRORS])
def test_errors_follow_the_openai_schema(servers, path, body, status, param, code):
    if isinstance(body, bytes):
        r = servers.plain.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = servers.plain.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"].startswith(f"{param}: ")
    assert err["code"] == code  # a string or null, never the HTTP status
    assert err["type"] == "invalid_request_error"


def test_every_error_code_is_a_string_or_null(servers):
    for r in (servers.plain.get("/no/such/route"), servers.plain.post("/v1/completions", json={"prompt": "hi",
                                                                                               "model": "x"}),
              servers.plain.post("/v1/completions", json={"prompt": "hi", "temperature": -1})):
        code = r.json()["error"]["code"]
        assert code is None or isinstance(code, str), r.text
    assert servers.plain.get("/no/such/route").json()["error"]["code"] == "not_found"


def test_unknown_fields_are_listed_in_a_header_or_rejected(servers):
    body = {"prompt": PROMPT, "max_token": 3, "temperature": 0}  # a typo of max_tokens
    r = servers.plain.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["x-ignored-fields"] == "max_token"
    assert "x-ignored-fields" not in servers.plain.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1,
                                                                                 "user": "me"}).headers
    r = servers.strict.post("/v1/completions", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "max_token" and err["code"] == "unknown_parameter" and "'max_tokens'" in err["message"]
    r = servers.strict.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "temprature": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temprature"
    r = servers.strict.post("/generate", json={"text": "hi", "sampling_param": {}})
    assert r.status_code == 400 and "'sampling_params'" in r.json()["error"]["message"]


# ---- logprobs ----------------------------------------------------------------------------------------------------
def _teacher_forced(prompt_ids: list[int], output_ids: list[int], temperature: float) -> torch.Tensor:
    """The target's log-probabilities at every output position from one plain forward of the tiny model over prompt
    + output (SGLang's convention: ``log_softmax(logits / T)``, ``T = 1`` when greedy)."""
    model = _tiny()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + output_ids])).logits[0].float()
    rows = logits[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(output_ids)]
    return torch.log_softmax(rows / (temperature if temperature > 0 else 1.0), dim=-1)


def test_completion_logprobs_equal_with_speculation_on_and_off(servers):
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "logprobs": 3}
    on, off = (c.post("/v1/completions", json=body).json()["choices"][0] for c in (servers.spec, servers.plain))
    assert on["text"] == off["text"]
    assert on["meta_info"]["spec_verify_ct"] > 0  # the drafter proposed (acceptance: tests/test_engine_logprobs.py)
    lp_on, lp_off = on["logprobs"], off["logprobs"]
    assert lp_on["tokens"] == lp_off["tokens"] and len(lp_on["tokens"]) == 16
    assert lp_on["token_logprobs"] == pytest.approx(lp_off["token_logprobs"], abs=1e-4)
    for a, b in zip(lp_on["top_logprobs"], lp_off["top_logprobs"]):
        assert set(a) == set(b) and 3 <= len(a) <= 4
    assert lp_on["text_offset"][0] == 0 and "".join(lp_on["tokens"]) == on["text"]
    ids = servers.tok.encode(PROMPT)
    out_ids = [int(t) for t in servers.tok(on["text"], add_special_tokens=False)["input_ids"]]
    ref = _teacher_forced(ids, out_ids, 0.0)
    if len(out_ids) == 16:  # the text re-tokenises to the same ids (usual for this model's BPE)
        expected = ref[torch.arange(16), torch.tensor(out_ids)].tolist()
        assert lp_on["token_logprobs"] == pytest.approx(expected, abs=1e-4)


def test_sampled_logprobs_come_from_the_target(servers):
    """Sampled with a seed on the speculative server: every emitted token's logprob equals the target's
    temperature-scaled log-probability at that position (the drafter's distribution never leaks in)."""
    body = {"input_ids": servers.tok.encode(PROMPT), "return_logprob": True, "top_logprobs_num": 2,
            "return_text_in_logprobs": True,
            "sampling_params": {"max_new_tokens": 12, "temperature": 0.8, "top_k": 20, "seed": 3, "ignore_eos": True}}
    out = servers.spec.post("/generate", json=body).json()
    meta = out["meta_info"]
    entries = meta["output_token_logprobs"]
    assert [e[1] for e in entries] == out["output_ids"] and all(isinstance(e[2], str) for e in entries)
    ref = _teacher_forced(body["input_ids"], out["output_ids"], 0.8)
    expected = ref[torch.arange(12), torch.tensor(out["output_ids"])].tolist()
    assert [e[0] for e in entries] == pytest.approx(expected, abs=1e-4)
    tops = meta["output_top_logprobs"]
    assert len(tops) == 12 and all(len(t) == 2 for t in tops)
    best = ref.topk(2, dim=-1)
    assert [[e[1] for e in t] for t in tops] == best.indices.tolist()
    assert meta["input_token_logprobs"] == []


def test_chat_logprobs_stream_equals_non_stream(servers):
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 10, "temperature": 0,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    whole = servers.spec.post("/v1/chat/completions", json=body).json()["choices"][0]
    content = whole["logprobs"]["content"]
    assert len(content) == 10 and all(len(c["top_logprobs"]) == 2 for c in content)
    assert all(isinstance(c["bytes"], list) for c in content)
    events = _post_stream(servers.spec, "/v1/chat/completions", {**body, "stream": True})
    streamed = [c for e in events[:-1] for ch in e["choices"] if ch.get("logprobs") for c in ch["logprobs"]["content"]]
    assert [c["token"] for c in streamed] == [c["token"] for c in content]
    assert [c["logprob"] for c in streamed] == pytest.approx([c["logprob"] for c in content], abs=1e-6)
    plain = servers.plain.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in plain] == [c["token"] for c in content]
    assert [c["logprob"] for c in plain] == pytest.approx([c["logprob"] for c in content], abs=1e-4)


def test_no_logprobs_unless_asked(servers):
    r = servers.spec.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}).json()
    assert r["choices"][0]["logprobs"] is None
    g = servers.spec.post("/generate", json={"text": PROMPT, "sampling_params": {"max_new_tokens": 4}}).json()
    assert "output_token_logprobs" not in g["meta_info"]


# ---- n > 1 -------------------------------------------------------------------------------------------------------
def test_n_choices_have_per_choice_seeds(servers):
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": 11, "ignore_eos": True}
    for client in (servers.spec, servers.plain):
        many = client.post("/v1/completions", json={**body, "n": 3}).json()
        assert [c["index"] for c in many["choices"]] == [0, 1, 2]
        alone = [client.post("/v1/completions", json={**body, "seed": 11 + i}).json()["choices"][0]["text"]
                 for i in range(3)]
        assert [c["text"] for c in many["choices"]] == alone
        assert len(set(alone)) > 1  # different seeds, different samples
        assert many["usage"]["prompt_tokens"] == len(servers.tok.encode(PROMPT))
        assert many["usage"]["completion_tokens"] == 30


def test_n_greedy_choices_equal_speculation_off(servers):
    body = {"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "n": 2}
    on = servers.spec.post("/v1/chat/completions", json=body).json()["choices"]
    off = servers.plain.post("/v1/chat/completions", json={**body, "n": 1}).json()["choices"][0]
    assert [c["message"]["content"] for c in on] == [off["message"]["content"]] * 2


def test_n_choices_stream_and_generate(servers):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 5, "ignore_eos": True, "n": 2}
    whole = servers.spec.post("/v1/completions", json=body).json()
    events = _post_stream(servers.spec, "/v1/completions", {**body, "stream": True,
                                                            "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 16
    texts = ["", ""]
    finishes = [None, None]
    for e in events[:-2]:
        for ch in e["choices"]:
            texts[ch["index"]] += ch["text"]
            finishes[ch["index"]] = ch["finish_reason"] or finishes[ch["index"]]
    assert texts == [c["text"] for c in whole["choices"]] and finishes == ["length", "length"]
    gen = servers.spec.post("/generate", json={"text": PROMPT, "sampling_params": {
        "max_new_tokens": 8, "temperature": 1.0, "seed": 5, "ignore_eos": True, "n": 2}}).json()
    assert isinstance(gen, list) and [g["index"] for g in gen] == [0, 1]
    assert gen[0]["output_ids"] != gen[1]["output_ids"]
