"""``sglang-ext serve`` as a user runs it: the real SmolLM2-135M with the shipped EAGLE drafter, in its own process,
over real HTTP. Logprobs against a plain Hugging Face forward of the same model, the KV report at start-up, and
SIGTERM in the middle of a long stream (the ``--shutdown-timeout`` deadline, a clean exit)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from conftest import require_model
from sglang_ext.testing.http import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DRAFTER = REPO / "drafters" / "smollm2-135m-eagle"
SHUTDOWN_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    require_model("smollm2-135m")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    cmd = [sys.executable, "-m", "sglang_ext", "serve", "--model-path", "smollm2-135m", "--port", str(port),
           "--speculative-algorithm", "EAGLE", "--speculative-draft-model-path", str(DRAFTER),
           "--speculative-num-steps", "3", "--max-running-requests", "2", "--context-length", "1024",
           "--shutdown-timeout", str(SHUTDOWN_TIMEOUT), "--log-level", "warning"]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    deadline = time.time() + 240
    while True:
        assert proc.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
        assert time.time() < deadline, "the server did not become healthy"
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    yield proc, client, log
    client.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def test_logprobs_are_the_target_models(real_server):
    """Greedy chat with logprobs through the speculative server: every logprob equals the plain HF model's
    log-softmax at that position, and the top alternatives are its top tokens."""
    _, client, _ = real_server
    body = {"messages": [{"role": "user", "content": "Write a Python function that adds two numbers."}],
            "max_tokens": 24, "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 3}
    out = client.post("/v1/chat/completions", json=body).json()
    choice = out["choices"][0]
    assert out["meta_info"]["spec_accept_length"] > 1.2  # the drafter really speculated
    content = choice["logprobs"]["content"]
    assert len(content) == 24
    from sglang_ext.engine.launch import load_target
    from sglang_ext.models.chat import encode_chat

    model, tok, _, _ = load_target("smollm2-135m")
    prompt = encode_chat(tok, body["messages"][0]["content"])
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24)[0]
        out_ids = greedy[len(prompt):].tolist()
        logits = model(greedy.unsqueeze(0)).logits[0, len(prompt) - 1:-1].float()
    ref = torch.log_softmax(logits, dim=-1)
    assert choice["message"]["content"] == tok.decode(out_ids, skip_special_tokens=True)
    expected = ref[torch.arange(24), torch.tensor(out_ids)].tolist()
    assert [c["logprob"] for c in content] == pytest.approx(expected, abs=2e-3)
    for c, row in zip(content, ref):
        top = row.topk(3)
        if float(top.values[1] - top.values[2]) > 1e-3 and float(top.values[0] - top.values[1]) > 1e-3:
            assert [t["token"] for t in c["top_logprobs"]] == [tok.decode([i]) for i in top.indices.tolist()]


def test_sigterm_mid_stream_meets_the_deadline(real_server):
    proc, client, log = real_server
    events: list[str] = []

    def stream():
        with client.stream("POST", "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 900,
                                                            "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])

    worker = threading.Thread(target=stream)
    worker.start()
    t0 = time.time()
    while len(events) < 3:
        assert time.time() - t0 < 60, "the stream did not start"
        time.sleep(0.05)
    t_signal = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    worker.join(60)
    rc = proc.wait(60)
    exited = time.monotonic() - t_signal
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "server_shutting_down"
    assert rc == 0
    assert exited < SHUTDOWN_TIMEOUT + 20  # 900 tokens would take minutes here
    text = log.read_text()
    assert "leaked semaphore" not in text and "Traceback" not in text, text[-3000:]
