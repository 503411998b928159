"""HTTP front end: OpenAI ``/v1/completions`` and ``/v1/chat/completions``, SGLang's ``/generate``,
``/server_info`` and Prometheus ``/metrics``, over one reference :class:`~sglang_ext.engine.engine.Engine`.

Why one engine thread: the engine is single-threaded by design (one ``step()`` = one batched forward), so
:class:`EngineRunner` owns it in a single background thread. HTTP handlers never touch the engine's state;
they validate a request (read-only), hand it to a thread-safe submission queue, and receive events
(``tokens`` / ``done`` / ``error``) on an asyncio queue through ``loop.call_soon_threadsafe``. An exception
inside ``engine.step()`` fails only the requests that were in that step; the loop logs it and keeps serving.

Responses carry SGLang's per-request ``meta_info`` (``spec_verify_ct``, ``spec_accept_length`` ...), at the top
level and per choice, and in the last stream chunk, so scripts written against SGLang find the same fields.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from sglang_ext.core.processing import SamplingParams
from sglang_ext.engine.engine import (
    Engine,
    GenerationRequest,
    RequestError,
    RequestState,
)

log = logging.getLogger("sglang_ext.server")

# ---- events from the engine thread ------------------------------------------------------------------------


@dataclass
class Finished:
    """What a finished request hands back (a snapshot taken in the engine thread)."""

    text: str
    output_ids: list[int]
    meta_info: dict
    finish_reason: dict | None


Event = tuple  # ("tokens", list[int]) | ("done", Finished) | ("error", status, message)
Sink = Callable[[Event], None]


# ---- metrics ------------------------------------------------------------------------------------------------
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, float("inf"))


class ServerMetrics:
    """SGLang's Prometheus names (``sglang:...``) in a registry of our own, so several servers can share a process."""

    def __init__(self, model_name: str, window: int = 40) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def gauge(name: str, doc: str):
            return Gauge(name, doc, labels, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str):
            return Counter(name, doc, labels, registry=self.registry).labels(model_name)

        def hist(name: str, doc: str):
            return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=self.registry).labels(model_name)

        self.spec_accept_length = gauge("sglang:spec_accept_length",
                                        f"Tokens committed per verify (accepted drafts + 1), last {window} steps")
        self.spec_accept_rate = gauge("sglang:spec_accept_rate", f"Accepted / proposed draft tokens, last {window} steps")
        self.spec_num_steps = gauge("sglang:spec_num_steps", "Configured draft depth")
        self.spec_num_draft_tokens = gauge("sglang:spec_num_draft_tokens", "Configured tree node budget incl. the root")
        self.spec_verify_calls = counter("sglang:spec_verify_calls_total",
                                         "Per-request verify steps (the sum of meta_info spec_verify_ct)")
        self.prompt_tokens = counter("sglang:prompt_tokens_total", "Prompt tokens of finished requests")
        self.generation_tokens = counter("sglang:generation_tokens_total", "Generated tokens of finished requests")
        self.num_requests = counter("sglang:num_requests_total", "Finished requests")
        self.num_running = gauge("sglang:num_running_reqs", "Requests in the running batch")
        self.num_queue = gauge("sglang:num_queue_reqs", "Requests waiting for a batch slot")
        self.e2e_latency = hist("sglang:e2e_request_latency_seconds", "Arrival to finish, per request")
        self.ttft = hist("sglang:time_to_first_token_seconds", "Arrival to first token, per request")
        self.window: deque[tuple[int, int, int]] = deque(maxlen=window)  # per step: (verifies, accepted, proposed)
        # online adaptation (ours; no SGLang equivalent): the trainer's health and what it deployed
        self.online = {key: gauge(f"sglang_ext:online_{key}", doc) for key, doc in (
            ("version", "Drafter version being served (1 = the initial drafter)"),
            ("alive", "1 while the trainer process is running"),
            ("restarts", "Trainer process restarts after a crash or kill"),
            ("rounds", "Training rounds finished"),
            ("deployed", "Rounds the deploy gate accepted"),
            ("rejected", "Rounds the deploy gate refused"),
            ("dropped_rounds", "Rounds lost with a dead trainer process"),
            ("trainer_cpu_seconds", "CPU seconds used by the trainer process"),
            ("collecting", "1 while TIDE's selective training collects samples"),
            ("capture_bytes_used", "Bytes held by the capture buffer (never above its budget)"),
        )}

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---- the engine thread ----------------------------------------------------------------------------------------
class EngineRunner:
    """Owns the engine in one background thread; other threads only submit, abort and read counters."""

    def __init__(self, engine: Engine, tokenizer=None, *, model_name: str = "model", info: dict | None = None,
                 random_seed: int | None = None, idle_wait: float = 0.5) -> None:
        self.engine = engine
        self.tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
        self.model_name = model_name
        self.info = dict(info or {})
        self.random_seed = random_seed if random_seed is not None else self.info.get("random_seed")
        self.idle_wait = idle_wait
        self.metrics = ServerMetrics(model_name)
        self.metrics.spec_num_steps.set(engine.config.num_steps if engine.speculative else 0)
        self.metrics.spec_num_draft_tokens.set(engine.max_tree_nodes if engine.speculative else 0)
        self._submissions: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sinks: dict[str, Sink] = {}
        self._seed_index = itertools.count()
        self._thread: threading.Thread | None = None
        self.started_at = time.time()
        self.verify_total = 0
        self.accepted_total = 0
        self.proposed_total = 0
        self.step_failures = 0
        self.last_error: str | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> EngineRunner:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sglang-ext-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop (and the online trainer process, if any); requests still in flight get a 503."""
        online = getattr(self.engine, "online", None)
        if online is not None:
            online.stop()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while True:
            try:
                item = self._submissions.get_nowait()
            except queue.Empty:
                break
            if item[0] == "add":
                self._sinks.setdefault(item[1].rid, item[2])
        for rid in list(self._sinks):
            _deliver(self._sinks.pop(rid), ("error", 503, "server shutting down"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    # ---- called from other threads -------------------------------------------------------------------------------
    def validate(self, req: GenerationRequest) -> None:
        """The engine's checks (read-only), so a bad request gets its 400 before anything is queued."""
        self.engine.validate(req)

    def submit(self, req: GenerationRequest, sink: Sink) -> str:
        """Queue ``req``; ``sink`` receives its events, from the engine thread. Returns the request id."""
        if not self.alive:
            raise RuntimeError("the engine loop is not running")
        if req.rid is None:
            req.rid = uuid.uuid4().hex
        if req.seed is None and self.random_seed is not None:
            req.seed = int(self.random_seed) + next(self._seed_index)
        self._submissions.put(("add", req, sink))
        self._wake.set()
        return req.rid

    def abort(self, rid: str) -> None:
        self._submissions.put(("abort", rid))
        self._wake.set()

    def queue_depth(self) -> int:
        return len(self.engine.waiting) + self._submissions.qsize()

    def avg_spec_accept_length(self) -> float:
        return (self.verify_total + self.accepted_total) / self.verify_total if self.verify_total else 0.0

    def server_info(self) -> dict[str, Any]:
        from sglang_ext import __version__

        state: dict[str, Any] = {
            "num_running_reqs": len(self.engine.running), "num_queue_reqs": self.queue_depth(),
            "engine_steps": self.engine.totals["steps"], "generated_tokens": self.engine.totals["tokens"],
            "step_failures": self.step_failures, "last_error": self.last_error,
        }
        if self.engine.speculative:
            state.update(avg_spec_accept_length=self.avg_spec_accept_length(),
                         avg_spec_accept_rate=self.accepted_total / self.proposed_total if self.proposed_total else 0.0,
                         spec_verify_calls=self.verify_total)
        return {**self.info, "served_model_name": self.model_name, "version": f"sglang-ext {__version__}",
                "uptime_s": round(time.time() - self.started_at, 3), "internal_states": [state]}

    # ---- the loop (engine thread only) ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain()
                if not self.engine.has_work():
                    self.refresh_gauges()
                    self._wake.wait(self.idle_wait)
                    self._wake.clear()
                    continue
                try:
                    self.engine.step()
                except Exception as e:  # noqa: BLE001 (logged in _fail_in_flight; the loop must survive)
                    self._fail_in_flight(e)
                else:
                    self._observe_step()
                self.refresh_gauges()
            except Exception:  # bookkeeping bug: log, keep the loop alive
                log.exception("engine loop error")
                time.sleep(0.05)

    def _drain(self) -> None:
        while True:
            try:
                item = self._submissions.get_nowait()
            except queue.Empty:
                return
            if item[0] == "abort":
                try:
                    self.engine.abort(item[1])
                except Exception:
                    log.exception("abort of %s failed", item[1])
                continue
            _, req, sink = item
            self._sinks[req.rid] = sink
            try:
                self.engine.add_request(req, on_tokens=self._on_tokens)
            except RequestError as e:
                self._sinks.pop(req.rid, None)
                _deliver(sink, ("error", 400, str(e)))
            except Exception as e:
                self._sinks.pop(req.rid, None)
                log.exception("add_request failed")
                _deliver(sink, ("error", 500, f"{type(e).__name__}: {e}"))

    def _on_tokens(self, state: RequestState, new_tokens: list[int]) -> None:
        sink = self._sinks.get(state.rid)
        if sink is None:
            return
        if new_tokens:
            _deliver(sink, ("tokens", list(new_tokens)))
        if state.finished:
            self._sinks.pop(state.rid, None)
            meta = state.meta_info()
            self._record_finished(meta)
            _deliver(sink, ("done", Finished(text=state.text or "", output_ids=list(state.output_ids),
                                             meta_info=meta, finish_reason=state.finish_reason)))

    def _fail_in_flight(self, error: Exception) -> None:
        """Fail the requests of the failed step (the running batch) with a 500; waiting ones keep waiting."""
        victims = list(self.engine.running)
        message = f"engine step failed: {type(error).__name__}: {error}"
        self.step_failures += 1
        self.last_error = message
        log.error("%s; failing %d in-flight request(s): %s", message, len(victims), [s.rid for s in victims],
                  exc_info=error)
        for s in victims:
            sink = self._sinks.pop(s.rid, None)
            if sink is not None:
                _deliver(sink, ("error", 500, message))
        broken = False
        for s in victims:
            try:
                self.engine.abort(s.rid)
            except Exception:
                log.exception("abort after a failed step failed for %s", s.rid)
                broken = True
        if broken or any(s in self.engine.running for s in victims):
            self._hard_reset(victims)

    def _hard_reset(self, victims: list[RequestState]) -> None:
        """Last resort when abort itself fails: drop the victims and clear every slot (no live request keeps K/V)."""
        eng = self.engine
        for s in victims:
            s.finished = True
        eng.running = [s for s in eng.running if not s.finished]
        for s in eng.running:  # should not happen (every running request is a victim): fail them too
            sink = self._sinks.pop(s.rid, None)
            if sink is not None:
                _deliver(sink, ("error", 500, self.last_error or "engine reset"))
        eng.running = []
        for slot in range(eng.config.max_batch_size):
            eng.cache.reset(slot)
            if eng.drafter is not None:
                try:
                    eng.drafter.release(slot)
                except Exception:
                    log.exception("drafter release of slot %d failed", slot)

    def _observe_step(self) -> None:
        st = self.engine.last_step
        if not self.engine.speculative or not st.accepted_per_request:
            return
        verifies = len(st.accepted_per_request)
        accepted = sum(st.accepted_per_request)
        proposed = sum(n - 1 for n in st.nodes_per_request)
        self.verify_total += verifies
        self.accepted_total += accepted
        self.proposed_total += proposed
        m = self.metrics
        m.spec_verify_calls.inc(verifies)
        m.window.append((verifies, accepted, proposed))
        v = sum(w[0] for w in m.window)
        a = sum(w[1] for w in m.window)
        p = sum(w[2] for w in m.window)
        m.spec_accept_length.set((v + a) / v if v else 0.0)
        m.spec_accept_rate.set(a / p if p else 0.0)

    def _record_finished(self, meta: dict) -> None:
        m = self.metrics
        m.num_requests.inc()
        m.prompt_tokens.inc(meta.get("prompt_tokens", 0))
        m.generation_tokens.inc(meta.get("completion_tokens", 0))
        if meta.get("e2e_latency") is not None:
            m.e2e_latency.observe(meta["e2e_latency"])
        if meta.get("ttft") is not None:
            m.ttft.observe(meta["ttft"])

    def refresh_gauges(self) -> None:
        self.metrics.num_running.set(len(self.engine.running))
        self.metrics.num_queue.set(self.queue_depth())
        online = getattr(self.engine, "online", None)
        if online is not None:
            status = online.status()
            for key, g in self.metrics.online.items():
                value = status.get(key)
                if value is not None:
                    g.set(float(value))


def _deliver(sink: Sink, event: Event) -> None:
    try:
        sink(event)
    except Exception:  # a broken consumer must never break the engine loop
        log.exception("event delivery failed")


# ---- request parsing --------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error response in OpenAI's shape; ``param`` names the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        return _error_response(self.status, self.message, self.param, self.type, self.code)


def _error_response(status: int, message: str, param: str | None = None, type_: str | None = None,
                    code: str | int | None = None) -> JSONResponse:
    err = {"message": message, "type": type_ or ("invalid_request_error" if status < 500 else "server_error"),
           "param": param, "code": code if code is not None else status}
    return JSONResponse({"object": "error", "error": err}, status_code=status)


_MISSING = object()


class _Fields:
    """Typed access to a JSON object's fields; each error names the field (with ``prefix``, e.g. ``sampling_params.``)."""

    def __init__(self, obj: dict, prefix: str = "") -> None:
        self.obj, self.prefix = obj, prefix

    def fail(self, name: str, message: str) -> ApiError:
        return ApiError(400, f"{self.prefix}{name}: {message}", f"{self.prefix}{name}")

    def get(self, name: str):
        value = self.obj.get(name, _MISSING)
        return _MISSING if value is None else value

    def int(self, name: str, default: int | None, minimum: int | None = None) -> int | None:
        v = self.get(name)
        if v is _MISSING:
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(name, f"expected an integer, got {json.dumps(v)}")
        if minimum is not None and v < minimum:
            raise self.fail(name, f"must be >= {minimum}, got {v}")
        return v

    def float(self, name: str, default: float, minimum: float | None = None) -> float:
        v = self.get(name)
        if v is _MISSING:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(name, f"expected a number, got {json.dumps(v)}")
        if minimum is not None and v < minimum:
            raise self.fail(name, f"must be >= {minimum}, got {v}")
        return float(v)

    def bool(self, name: str, default: bool) -> bool:
        v = self.get(name)
        if v is _MISSING:
            return default
        if not isinstance(v, bool):
            raise self.fail(name, f"expected true or false, got {json.dumps(v)}")
        return v

    def stop(self, name: str) -> list[str]:
        v = self.get(name)
        if v is _MISSING:
            return []
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise self.fail(name, "expected a non-empty string or a list of non-empty strings")
        return list(items)

    def int_list(self, name: str) -> list[int]:
        v = self.get(name)
        if v is _MISSING:
            return []
        if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            raise self.fail(name, "expected a list of integers")
        return list(v)

    def unsupported(self, name: str, neutral: tuple = (None, False, 0, 0.0, "", [], {})) -> None:
        v = self.obj.get(name)
        if v not in neutral:
            raise self.fail(name, f"not supported by this server (got {json.dumps(v)})")


def _sampling(f: _Fields, temperature_default: float = 1.0) -> SamplingParams:
    temperature = f.float("temperature", temperature_default, minimum=0.0)
    top_p = f.float("top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise f.fail("top_p", f"must be in (0, 1], got {top_p}")
    top_k = f.int("top_k", -1)
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k if top_k and top_k > 0 else -1)


def _max_new(requested: int | None, default: int, prompt_len: int, context: int) -> int:
    """An explicit limit is kept (the engine rejects it if too long); a default is clamped to the room left."""
    if requested is not None:
        return requested
    return max(1, min(default, context - prompt_len))


def _encode(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise ApiError(400, "prompt: this server has no tokenizer; send token ids", "prompt")
    return [int(t) for t in tokenizer.encode(text)]


def _chat_ids(tokenizer, messages: object) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of {role, content} objects", "messages")
    conv = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where}: expected an object with role and content", where)
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"{where}.role: expected system, user, assistant or tool, got {json.dumps(role)}",
                           f"{where}.role")
        if content is None:
            content = ""
        elif isinstance(content, list):  # OpenAI content parts: text only
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"{where}.content[{j}]: only text parts are supported", f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise ApiError(400, f"{where}.content: expected a string or a list of text parts", f"{where}.content")
        conv.append({"role": "system" if role == "developer" else role, "content": content})
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "messages: the served model's tokenizer has no chat template; use /v1/completions",
                       "messages")
    try:
        enc = tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_dict=True)
    except Exception as e:  # jinja raises TemplateError for conversations the template refuses
        raise ApiError(400, f"messages: the chat template refused this conversation ({e})", "messages") from e
    ids = enc["input_ids"]
    if ids and not isinstance(ids[0], int):
        ids = ids[0]
    return [int(t) for t in ids]


def _completion_prompt(tokenizer, body: dict) -> list[int]:
    p = body.get("prompt")
    if p is None:
        raise ApiError(400, "prompt: required (a string or a list of token ids)", "prompt")
    if isinstance(p, str):
        return _encode(tokenizer, p)
    if isinstance(p, list):
        if p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return list(p)
        if len(p) == 1 and isinstance(p[0], str):
            return _encode(tokenizer, p[0])
        if len(p) == 1 and isinstance(p[0], list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p[0]):
            return list(p[0])
        if len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
            raise ApiError(400, f"prompt: batches of {len(p)} prompts are not supported; send one request per prompt",
                           "prompt")
    raise ApiError(400, "prompt: expected a string, a list of token ids, or a one-element list of either", "prompt")


def _check_model(body: dict, runner: EngineRunner) -> None:
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise ApiError(400, "model: expected a string", "model")
    if model not in _served_names(runner):
        raise ApiError(404, f"model: the model `{model}` does not exist; this server serves `{runner.model_name}`",
                       "model", type_="invalid_request_error", code="model_not_found")


def _served_names(runner: EngineRunner) -> set[str]:
    return {runner.model_name, str(runner.info.get("model_path") or runner.model_name), "default"}


@dataclass
class _OpenAIOptions:
    stream: bool
    include_usage: bool


def _openai_request(body: dict, runner: EngineRunner, prompt_ids: list[int], default_max: int,
                    chat: bool) -> tuple[GenerationRequest, _OpenAIOptions]:
    f = _Fields(body)
    n = f.int("n", 1)
    if n != 1:
        raise f.fail("n", f"only n=1 is supported, got {n}")
    best_of = f.int("best_of", 1)
    if best_of != 1:
        raise f.fail("best_of", f"only best_of=1 is supported, got {best_of}")
    for name in ("logprobs", "top_logprobs", "echo", "frequency_penalty", "presence_penalty", "logit_bias", "tools",
                 "suffix"):
        f.unsupported(name)
    rf = body.get("response_format")
    if rf not in (None, {"type": "text"}):
        raise f.fail("response_format", "only {\"type\": \"text\"} is supported")
    max_tokens = f.int("max_tokens", None, minimum=1)
    if chat and max_tokens is None:
        max_tokens = f.int("max_completion_tokens", None, minimum=1)
    sampling = _sampling(f)
    stream = f.bool("stream", False)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise f.fail("stream_options", "expected an object")
    include_usage = _Fields(so or {}, "stream_options.").bool("include_usage", False)
    req = GenerationRequest(
        prompt_ids=prompt_ids,
        max_new_tokens=_max_new(max_tokens, default_max, len(prompt_ids), runner.engine.context_length),
        sampling=sampling, stop=f.stop("stop"), stop_token_ids=f.int_list("stop_token_ids"),
        ignore_eos=f.bool("ignore_eos", False), seed=f.int("seed", None),
    )
    return req, _OpenAIOptions(stream=stream, include_usage=include_usage)


def _validate(runner: EngineRunner, req: GenerationRequest, names: dict[str, str]) -> None:
    """The engine's checks, with its field names (``prompt``, ``max_new_tokens``) renamed to this endpoint's."""
    try:
        runner.validate(req)
    except RequestError as e:
        raise _request_error(e, names) from e


def _request_error(e: Exception, names: dict[str, str], status: int = 400) -> ApiError:
    text = str(e)
    field, sep, rest = text.partition(": ")
    if sep and " " not in field:
        param = names.get(field, field)
        return ApiError(status, f"{param}: {rest}", param)
    return ApiError(status, text)


# ---- streaming text ------------------------------------------------------------------------------------------
class _StreamText:
    """Incremental detokenisation that never takes back text: holds back an unfinished UTF-8 character and any
    tail that could still become a stop string, and truncates at a complete stop string (the engine drops it)."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = ""

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = len(text)
        while cut > 0 and text[cut - 1] == "\ufffd":
            cut -= 1
        for s in self.stop:
            pos = text.find(s)
            if pos >= 0:
                cut = min(cut, pos)
            for k in range(min(len(s) - 1, cut), 0, -1):  # a tail that is a prefix of a stop string
                if text[cut - k:cut] == s[:k]:
                    cut -= k
                    break
        return self._emit(text[:cut])

    def finish(self, final_text: str) -> str:
        if not final_text.startswith(self.sent):
            log.warning("streamed text is not a prefix of the final text; sending no tail")
            return ""
        return self._emit(final_text)

    def _emit(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta


class _Handle:
    """One submitted request as seen from the event loop: an asyncio queue fed by the engine thread."""

    def __init__(self, runner: EngineRunner, req: GenerationRequest) -> None:
        self.runner = runner
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.done = False
        try:
            self.rid = runner.submit(req, self._deliver)
        except RuntimeError as e:
            raise ApiError(503, f"server: {e}", type_="server_error") from e

    def _deliver(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    async def events(self) -> AsyncIterator[Event]:
        while not self.done:
            event = await self.queue.get()
            if event[0] in ("done", "error"):
                self.done = True
            yield event

    async def result(self) -> Finished:
        async for event in self.events():
            if event[0] == "done":
                return event[1]
            if event[0] == "error":
                raise ApiError(event[1], event[2])
        raise ApiError(500, "request ended without a result")

    def abort_if_running(self) -> None:
        if not self.done:
            self.runner.abort(self.rid)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _openai_finish(reason: dict | None) -> str | None:
    if not reason:
        return None
    return {"stop": "stop", "length": "length"}.get(reason.get("type"), reason.get("type"))


def _usage(meta: dict) -> dict:
    p, c = meta.get("prompt_tokens", 0), meta.get("completion_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# ---- the app ---------------------------------------------------------------------------------------------------
def create_app(runner: EngineRunner) -> FastAPI:
    """The FastAPI app; it starts ``runner`` on startup if it is not running and stops it on shutdown."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        owned = runner._thread is None
        runner.start()
        yield
        if owned:
            runner.stop()

    app = FastAPI(title="sglang-ext reference server", lifespan=lifespan)
    app.state.runner = runner
    tok = runner.tokenizer

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return _error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return _error_response(500, f"{type(exc).__name__}: {exc}")

    async def json_body(request: Request) -> dict:
        raw = await request.body()
        if not raw.strip():
            raise ApiError(400, "body: empty request body; expected a JSON object", "body")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            detail = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            raise ApiError(400, f"body: invalid JSON ({detail})", "body") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"body: expected a JSON object, got {type(body).__name__}", "body")
        return body

    def need_tokenizer() -> None:
        if tok is None:
            raise ApiError(400, "prompt: this server has no tokenizer; send token ids", "prompt")

    # ---- OpenAI ---------------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        _check_model(body, runner)
        ids = _completion_prompt(tok, body)
        req, opts = _openai_request(body, runner, ids, default_max=16, chat=False)
        _validate(runner, req, {"prompt": "prompt", "max_new_tokens": "max_tokens"})
        handle = _Handle(runner, req)
        meta = {"id": f"cmpl-{handle.rid}", "created": int(time.time()), "model": runner.model_name}
        if opts.stream:
            return StreamingResponse(_stream_openai(handle, req, opts, meta, chat=False), media_type="text/event-stream")
        fin = await handle.result()
        choice = {"index": 0, "text": fin.text, "logprobs": None, "finish_reason": _openai_finish(fin.finish_reason),
                  "matched_stop": (fin.finish_reason or {}).get("matched"), "meta_info": fin.meta_info}
        return {**meta, "object": "text_completion", "choices": [choice], "usage": _usage(fin.meta_info),
                "meta_info": fin.meta_info}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        _check_model(body, runner)
        need_tokenizer()
        ids = _chat_ids(tok, body.get("messages"))
        req, opts = _openai_request(body, runner, ids, default_max=128, chat=True)
        _validate(runner, req, {"prompt": "messages", "max_new_tokens": "max_tokens"})
        handle = _Handle(runner, req)
        meta = {"id": f"chatcmpl-{handle.rid}", "created": int(time.time()), "model": runner.model_name}
        if opts.stream:
            return StreamingResponse(_stream_openai(handle, req, opts, meta, chat=True), media_type="text/event-stream")
        fin = await handle.result()
        choice = {"index": 0, "message": {"role": "assistant", "content": fin.text},
                  "finish_reason": _openai_finish(fin.finish_reason),
                  "matched_stop": (fin.finish_reason or {}).get("matched"), "meta_info": fin.meta_info}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": _usage(fin.meta_info),
                "meta_info": fin.meta_info}

    async def _stream_openai(handle: _Handle, req: GenerationRequest, opts: _OpenAIOptions, meta: dict,
                             chat: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None = None, **extra) -> dict:
            if chat:
                d = {} if delta is None else {"content": delta}
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            if "matched_stop" in extra:
                choice["matched_stop"] = extra.pop("matched_stop")
            return {**meta, "object": obj, "choices": [choice], **extra}

        text = _StreamText(tok, req.stop)
        try:
            if chat:
                first = chunk(None)
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield _sse(first)
            async for event in handle.events():
                if event[0] == "tokens":
                    delta = text.add(event[1])
                    if delta:
                        yield _sse(chunk(delta))
                elif event[0] == "done":
                    fin: Finished = event[1]
                    tail = text.finish(fin.text)
                    if tail:
                        yield _sse(chunk(tail))
                    yield _sse(chunk(None, _openai_finish(fin.finish_reason), usage=_usage(fin.meta_info),
                                     meta_info=fin.meta_info, matched_stop=(fin.finish_reason or {}).get("matched")))
                    if opts.include_usage:
                        yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(fin.meta_info)})
                else:
                    _, status, message = event
                    yield _sse({"object": "error", "error": {"message": message, "type": "server_error"
                                if status >= 500 else "invalid_request_error", "param": None, "code": status}})
            yield _sse("[DONE]")
        finally:
            handle.abort_if_running()  # the client went away mid-stream

    # ---- SGLang native ----------------------------------------------------------------------------------------
    @app.post("/generate")
    async def generate(request: Request):
        body = await json_body(request)
        has_text, has_ids = body.get("text") is not None, body.get("input_ids") is not None
        if has_text == has_ids:
            raise ApiError(400, "text: give exactly one of text or input_ids", "text")
        if has_text:
            text = body["text"]
            if isinstance(text, list) and len(text) == 1:
                text = text[0]
            if not isinstance(text, str):
                raise ApiError(400, "text: expected a string (batches are not supported; send one request each)", "text")
            need_tokenizer()
            ids = _encode(tok, text)
        else:
            raw = body["input_ids"]
            if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], list):
                raw = raw[0]
            if not (isinstance(raw, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in raw)):
                raise ApiError(400, "input_ids: expected a list of integers (one prompt per request)", "input_ids")
            ids = list(raw)
        f = _Fields(body)
        for name in ("return_logprob", "image_data", "lora_path"):
            f.unsupported(name)
        sp = body.get("sampling_params") or {}
        if not isinstance(sp, dict):
            raise ApiError(400, "sampling_params: expected an object", "sampling_params")
        sf = _Fields(sp, "sampling_params.")
        known = {"max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "ignore_eos", "seed",
                 "sampling_seed"}
        neutral: dict[str, tuple] = {
            "n": (None, 1), "repetition_penalty": (None, 1, 1.0), "frequency_penalty": (None, 0, 0.0),
            "presence_penalty": (None, 0, 0.0), "min_new_tokens": (None, 0), "min_p": (None, 0, 0.0),
            "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
            "no_stop_trim": (None, False), "json_schema": (None,), "regex": (None,), "ebnf": (None,),
        }
        for key in sp:
            if key in neutral:
                sf.unsupported(key, neutral[key])
            elif key not in known:
                raise sf.fail(key, "unknown sampling parameter")
        seed = sf.int("sampling_seed", None)
        req = GenerationRequest(
            prompt_ids=ids,
            max_new_tokens=_max_new(sf.int("max_new_tokens", None, minimum=1), 128, len(ids), runner.engine.context_length),
            sampling=_sampling(sf), stop=sf.stop("stop"), stop_token_ids=sf.int_list("stop_token_ids"),
            ignore_eos=sf.bool("ignore_eos", False), seed=sf.int("seed", seed),
            rid=body.get("rid") if isinstance(body.get("rid"), str) else None,
        )
        if req.stop:
            need_tokenizer()
        _validate(runner, req, {"prompt": "text" if has_text else "input_ids",
                                "max_new_tokens": "sampling_params.max_new_tokens"})
        if req.rid is not None and req.rid in runner._sinks:
            raise ApiError(400, f"rid: request id {req.rid!r} is already in flight", "rid")
        stream = f.bool("stream", False)
        handle = _Handle(runner, req)
        if stream:
            return StreamingResponse(_stream_native(handle, req), media_type="text/event-stream")
        fin = await handle.result()
        return {"text": fin.text, "output_ids": fin.output_ids, "meta_info": {**fin.meta_info, "cached_tokens": 0}}

    async def _stream_native(handle: _Handle, req: GenerationRequest) -> AsyncIterator[str]:
        text = _StreamText(tok, req.stop) if tok is not None else None
        ids: list[int] = []
        try:
            async for event in handle.events():
                if event[0] == "tokens":
                    ids.extend(event[1])
                    if text is not None:
                        text.add(event[1])
                    yield _sse({"text": text.sent if text else "", "output_ids": list(ids),
                                "meta_info": {"id": handle.rid, "finish_reason": None,
                                              "prompt_tokens": len(req.prompt_ids), "completion_tokens": len(ids)}})
                elif event[0] == "done":
                    fin: Finished = event[1]
                    yield _sse({"text": fin.text, "output_ids": fin.output_ids,
                                "meta_info": {**fin.meta_info, "cached_tokens": 0}})
                else:
                    _, status, message = event
                    yield _sse({"object": "error", "error": {"message": message, "type": "server_error"
                                if status >= 500 else "invalid_request_error", "param": None, "code": status}})
            yield _sse("[DONE]")
        finally:
            handle.abort_if_running()

    # ---- info ----------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not runner.alive:
            return PlainTextResponse("engine loop not running", status_code=503)
        return PlainTextResponse("ok")

    @app.get("/v1/models")
    async def models():
        card = {"id": runner.model_name, "object": "model", "created": int(runner.started_at), "owned_by": "sglang-ext",
                "root": runner.model_name, "max_model_len": runner.engine.context_length}
        return {"object": "list", "data": [card]}

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": runner.info.get("model_path", runner.model_name), "tokenizer_path":
                runner.info.get("model_path", runner.model_name), "is_generation": True}

    @app.get("/server_info")
    async def server_info():
        return runner.server_info()

    @app.get("/get_server_info")  # SGLang's deprecated alias
    async def get_server_info():
        return runner.server_info()

    @app.get("/metrics")
    async def metrics():
        runner.refresh_gauges()
        return Response(runner.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


__all__ = ["ApiError", "EngineRunner", "Finished", "ServerMetrics", "create_app"]
