"""The engine thread behind the HTTP server: :class:`EngineRunner` owns one reference
:class:`~sglang_ext.engine.engine.Engine` in a single background thread, and :class:`ServerMetrics` its
Prometheus gauges (SGLang's names).

Why one engine thread: the engine is single-threaded by design (one ``step()`` = one batched forward). HTTP
handlers never touch the engine's state; they validate a request (read-only), hand it to a thread-safe
submission queue, and receive events (``tokens`` / ``done`` / ``error``) through a sink the runner calls from
its thread. An exception inside ``engine.step()`` fails only the requests that were in that step; the loop logs
it and keeps serving.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sglang_ext.engine.engine import Engine, GenerationRequest, RequestError, RequestState

log = logging.getLogger("sglang_ext.server")

# ---- events from the engine thread ------------------------------------------------------------------------


@dataclass
class Finished:
    """What a finished request hands back (a snapshot taken in the engine thread)."""

    text: str
    output_ids: list[int]
    meta_info: dict
    finish_reason: dict | None
    #: per output token, when the request asked for logprobs (``GenerationRequest.logprobs`` / ``top_logprobs``)
    token_logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


#: ("tokens", ids, logprobs | None, top_logprobs | None) | ("done", Finished) | ("error", status, message, code)
Event = tuple
Sink = Callable[[Event], None]

#: the message and OpenAI error code of requests cut off by a shutdown
SHUTDOWN_CODE = "server_shutting_down"


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
        self.shutting_down = False
        self._shutdown_timer: threading.Timer | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> EngineRunner:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sglang-ext-engine", daemon=True)
            self._thread.start()
        return self

    def begin_shutdown(self, deadline: float) -> None:
        """A shutdown was requested (SIGTERM/SIGINT): refuse new requests, let in-flight ones finish for
        ``deadline`` seconds, then abort them with a 503 (``server_shutting_down``; a stream gets an error chunk
        and ``[DONE]``), so a long generation cannot hold the shutdown hostage."""
        if self.shutting_down:
            return
        self.shutting_down = True
        message = f"server shutting down: request aborted after the {deadline:g} s graceful-shutdown deadline"
        log.info("shutting down: %d request(s) in flight get %g s to finish", len(self._sinks), deadline)
        self._shutdown_timer = threading.Timer(max(0.0, deadline), self.abort_all, args=(message,))
        self._shutdown_timer.daemon = True
        self._shutdown_timer.start()

    def abort_all(self, message: str, status: int = 503, code: str = SHUTDOWN_CODE) -> None:
        """Fail every request in flight or queued with ``status`` (runs in the engine thread)."""
        self._submissions.put(("abort_all", message, status, code))
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop (and the online trainer process, if any); requests still in flight get a 503."""
        if self._shutdown_timer is not None:
            self._shutdown_timer.cancel()
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
            _deliver(self._sinks.pop(rid), ("error", 503, "server shutting down", SHUTDOWN_CODE))

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
        if self.shutting_down:
            raise RuntimeError("shutting down; not accepting new requests")
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
            if item[0] == "abort_all":
                self._abort_all_now(*item[1:])
                continue
            _, req, sink = item
            self._sinks[req.rid] = sink
            try:
                self.engine.add_request(req, on_tokens=self._on_tokens)
            except RequestError as e:
                self._sinks.pop(req.rid, None)
                _deliver(sink, ("error", 400, str(e), None))
            except Exception as e:
                self._sinks.pop(req.rid, None)
                log.exception("add_request failed")
                _deliver(sink, ("error", 500, f"{type(e).__name__}: {e}", None))

    def _abort_all_now(self, message: str, status: int, code: str | None) -> None:
        for rid, sink in list(self._sinks.items()):
            self._sinks.pop(rid, None)
            _deliver(sink, ("error", status, message, code))
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("abort of %s failed", rid)

    def _on_tokens(self, state: RequestState, new_tokens: list[int]) -> None:
        sink = self._sinks.get(state.rid)
        if sink is None:
            return
        req = state.request
        wants, tops_wanted = req.logprobs or req.top_logprobs > 0, req.top_logprobs > 0
        if new_tokens:
            n = len(new_tokens)
            lps = list(state.output_token_logprobs[-n:]) if wants else None
            tops = list(state.output_top_logprobs[-n:]) if tops_wanted else None
            _deliver(sink, ("tokens", list(new_tokens), lps, tops))
        if state.finished:
            self._sinks.pop(state.rid, None)
            meta = state.meta_info()
            self._record_finished(meta)
            _deliver(sink, ("done", Finished(
                text=state.text or "", output_ids=list(state.output_ids), meta_info=meta,
                finish_reason=state.finish_reason,
                token_logprobs=list(state.output_token_logprobs) if wants else None,
                top_logprobs=list(state.output_top_logprobs) if tops_wanted else None)))

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
                _deliver(sink, ("error", 500, message, None))
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
                _deliver(sink, ("error", 500, self.last_error or "engine reset", None))
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


__all__ = ["EngineRunner", "Finished", "SHUTDOWN_CODE", "ServerMetrics"]
