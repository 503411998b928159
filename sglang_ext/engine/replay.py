r"""``sglang-ext replay``: drive the reference engine with a workload trace and record what it did.

The engine runs in-process (no HTTP), exactly as ``sglang-ext serve`` builds it (the same SGLang-named flags). A
wall clock replays the trace: request ``i`` is *submitted* when ``arrival_i`` seconds (times ``--time-scale``)
have passed, at the first step boundary after that moment (as a server's queue hands requests to the engine),
and its latency is measured from ``arrival_i``, not from the step boundary. The engine steps back to back
while it has work and sleeps until the next arrival when it has none.

Prompts are real text cut or extended to the trace's ``prompt_tokens`` (:class:`PromptSource`: seeded, each
request's prompt depends only on the seed and its index); outputs are forced to ``output_tokens`` (greedy,
``ignore_eos``), so the engine does exactly the work the trace describes.

Outputs (``--out DIR``):

- ``trace.jsonl``: the replayed trace (arrivals as replayed, ids ``r<i>``) with each request's ``acceptance``
  filled in: the accepted draft tokens of every verify step (``RequestState.accept_record``). This is how
  acceptance is recorded for the simulator (:class:`simulator.acceptance.ReplayAcceptance`).
- ``result.json``: what was measured, in the schema of the simulator's :class:`sglang_ext.formats.results.SimResult`
  (summary: throughput, TTFT/TPOT/E2E p50/p90/p99, mean acceptance length; per-request columns), so
  ``sglang-ext sim validate`` compares the two field by field.
- ``steps.jsonl``: one line per engine step (start, seconds, batch, admitted prompts, per-request draft depth
  and accepted count, the engine's own prefill / draft / verify timers, the drafter's largest backlog, and the
  time spent inside the target's forwards (prefill and verify) and the drafter's call, timed around those calls:
  the rest of a step is what a profile of the forwards does not see).
- ``signals.jsonl``: per request, the KL(p‖q) the engine measured at every proposed position (only when the
  policy asks the drafter for q, e.g. DSDE); the trace format has no field for it.

A malformed trace line stops the arrivals; the requests already submitted run to the end and everything is written
as ``*.partial`` files with the error naming ``file:line``. Ctrl-C does the same.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: default prompt text: Spec-Bench's subset beside the project (``../shared/data``), else the mt-bench prompt set
DEFAULT_PROMPTS = Path(__file__).resolve().parents[3] / "shared" / "data" / "prompts" / "spec_bench_subset.jsonl"


class ReplayError(ValueError):
    """A replay that cannot start (bad prompt file, a request the engine refuses); the message names the input."""


# ---- prompts ------------------------------------------------------------------------------------------------------
class PromptSource:
    """Prompt token ids of an exact length, from real text (seeded) or, without a tokenizer, random ids.

    With a tokenizer: the user message is made of prompt texts (a seeded start in the list, then the following
    ones, joined by blank lines) tokenised once each, wrapped in the tokenizer's chat template (its prefix and
    its generation-prompt suffix, found by tokenising two probe messages) and cut to length, so every prompt ends
    with the assistant's turn as a served chat request does. A length below the template's own size gets the
    plain text tokens. Without a tokenizer (tiny random models in tests): seeded random ids in ``[2, vocab)``.
    """

    def __init__(self, texts: Sequence[str] = (), tokenizer: Any = None, vocab_size: int | None = None,
                 seed: int = 0, chat: bool = True) -> None:
        self.seed = int(seed)
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.prefix: list[int] = []
        self.suffix: list[int] = []
        self.pieces: list[list[int]] = []
        if tokenizer is not None:
            if not texts:
                raise ReplayError("prompts: no prompt texts to build requests from")
            sep = [int(t) for t in tokenizer.encode("\n\n", add_special_tokens=False)]
            self.pieces = [[int(t) for t in tokenizer.encode(t, add_special_tokens=False)] + sep for t in texts]
            self.pieces = [p for p in self.pieces if len(p) > len(sep)]
            if not self.pieces:
                raise ReplayError("prompts: every prompt text tokenises to nothing")
            if chat and getattr(tokenizer, "chat_template", None):
                self.prefix, self.suffix = _chat_frame(tokenizer)
        elif not vocab_size or vocab_size < 3:
            raise ReplayError("PromptSource needs a tokenizer and texts, or a vocab_size >= 3 for random ids")

    def make(self, index: int, n: int) -> list[int]:
        """The prompt of request ``index``: exactly ``n`` token ids."""
        if n < 1:
            raise ReplayError(f"request {index}: prompt_tokens={n} must be >= 1")
        rng = random.Random(self.seed * 1_000_003 + index)
        if self.tokenizer is None:
            return [rng.randrange(2, self.vocab_size) for _ in range(n)]
        frame = len(self.prefix) + len(self.suffix)
        body_len = n - frame if n > frame else n
        body: list[int] = []
        i = rng.randrange(len(self.pieces))
        while len(body) < body_len:
            body.extend(self.pieces[i % len(self.pieces)])
            i += 1
        body = body[:body_len]
        return self.prefix + body + self.suffix if n > frame else body


def _chat_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix) token ids the chat template puts around a user message: the common prefix and suffix of
    probe conversations whose messages differ in their first and last characters."""
    from sglang_ext.models.chat import encode_chat

    probes = [encode_chat(tokenizer, t) for t in ("alpha", "Beta gamma delta?", "3 zeta, eta!")]
    lp = min(len(p) for p in probes)
    ls = lp
    for a in probes[1:]:
        b = probes[0]
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        lp = min(lp, n)
        n = 0
        while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
            n += 1
        ls = min(ls, n)
    first = probes[0]
    ls = min(ls, len(first) - lp)
    return first[:lp], first[len(first) - ls:] if ls else []


def load_texts(path: str | Path | None) -> list[str]:
    """Prompt texts from a JSONL prompt file (Spec-Bench/MT-Bench ``turns`` or ``prompt``); default
    :data:`DEFAULT_PROMPTS`, else the mt-bench prompt set if it is cached."""
    from sglang_ext.data.prompts import PromptFileError, load_prompts

    if path is None:
        path = DEFAULT_PROMPTS
        if not path.is_file():
            from sglang_ext.data import prompt_set_path

            path = prompt_set_path("mt-bench")
            if not path.is_file():
                raise ReplayError(f"no default prompt file ({DEFAULT_PROMPTS} or the mt-bench set): pass --prompts")
    try:
        return [p.text for p in load_prompts(path)]
    except PromptFileError as e:
        raise ReplayError(f"--prompts: {e}") from None


# ---- records ------------------------------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    """One replayed request: trace fields, measured times (s from the replay's start) and its recording."""

    index: int
    id: str
    arrival: float
    prompt_tokens: int
    output_tokens: int
    category: str | None = None
    first_token: float = math.nan
    finish: float = math.nan
    emitted: int = 0
    verify_steps: int = 0  # the engine's spec_verify_ct
    acceptance: list[int] | None = None
    kl: list[list[float]] | None = None  # per verify step: KL at each proposed position
    output_ids: list[int] | None = None  # what the engine emitted (greedy runs of two configs must agree)

    @property
    def done(self) -> bool:
        return self.finish == self.finish


@dataclass
class StepRecord:
    """One engine step: wall time, what it ran, and the engine's own timers."""

    start: float
    seconds: float
    batch_size: int
    admitted: list[int]  # prompt lengths admitted (prefilled) by this step
    depths: list[int]  # draft depth per request in the decode step (0: none)
    accepted: list[int]
    context_max: int
    context_mean: float
    backlog_max: int  # the drafter's largest pending-pair count when it was called (0: not called)
    prefill_s: float
    draft_s: float
    verify_s: float
    prefill_forward_s: float = 0.0  # inside TargetModel.forward for prefill chunks
    verify_forward_s: float = 0.0  # inside TargetModel.forward for the verify (decode) forward
    draft_call_s: float = 0.0  # inside the drafter's draft()
    gap: float = 0.0  # driver time from this step's end to the next step's start (submissions, bookkeeping)
    idle_after: bool = False  # the engine ran out of work after this step (the driver slept)

    @property
    def cycle(self) -> float:
        """Seconds this step held the engine, the driver's work before the next step included."""
        return self.seconds + self.gap

    @property
    def outside(self) -> float:
        """Seconds of the cycle outside the target's forwards and the drafter's call (bookkeeping, Python)."""
        return self.cycle - self.prefill_forward_s - self.verify_forward_s - self.draft_call_s

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 7) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class ReplayRun:
    """Everything one replay measured; :meth:`result` is the :class:`SimResult`-schema summary."""

    requests: list[RequestRecord] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    #: CPU cores other processes used during the run, on average (a shared machine disturbs the timings)
    others_cpu_cores: float = math.nan
    complete: bool = True
    error: str | None = None
    wall_s: float = 0.0
    speculative: bool = False

    def trace(self, name: str = "replay", finished_only: bool = False):
        """The replayed requests as a trace, ``acceptance`` filled in for speculative runs."""
        from sglang_ext.formats.trace import Request, Trace, TraceMeta

        reqs = [Request(r.arrival, r.prompt_tokens, r.output_tokens, r.category,
                        tuple(r.acceptance) if (self.speculative and r.acceptance is not None and r.done) else None,
                        r.id)
                for r in self.requests if r.done or not finished_only]
        meta = TraceMeta(name=name, source="sglang-ext replay: " + json.dumps(self.info.get("engine", {}),
                                                                             sort_keys=True, default=str),
                         licence=self.info.get("licence", ""))
        return Trace(tuple(reqs), meta)

    def kl_records(self) -> dict[str, list[tuple[int, list[float]]]]:
        """Request id → ``[(accepted, kl per proposed position), ...]`` per verify step (requests with KL only)."""
        out = {}
        for r in self.requests:
            if r.kl and any(r.kl) and r.acceptance is not None and len(r.kl) == len(r.acceptance):
                out[r.id] = [(a, kl) for a, kl in zip(r.acceptance, r.kl)]
        return out

    def result(self):
        """The measured run as a :class:`sglang_ext.formats.results.SimResult` (finished requests, in finish order)."""
        import numpy as np

        from sglang_ext.formats.results import REQUEST_COLUMNS, SimResult, summarize

        done = sorted((r for r in self.requests if r.done), key=lambda r: (r.finish, r.index))
        rows = []
        for r in done:
            acc = r.acceptance or []
            spec = len(acc) if self.speculative else 0
            rows.append((r.index, 0, r.arrival, r.first_token, r.finish, r.prompt_tokens, r.output_tokens, 0, spec,
                         sum(acc) if self.speculative else 0))
        cols = {name: np.array([row[i] for row in rows], dtype=float if name in ("arrival", "first_token", "finish")
                               else np.int64) for i, name in enumerate(REQUEST_COLUMNS)}
        busy = {"prefill": sum(s.prefill_s for s in self.steps), "draft": sum(s.draft_s for s in self.steps),
                "verify": sum(s.verify_s for s in self.steps)}
        busy["overhead"] = max(0.0, sum(s.seconds for s in self.steps) - sum(busy.values()))
        submitted = sum(1 for r in self.requests)
        summary = summarize(cols, busy, iterations=len(self.steps), slo_ttft_s=self.info.get("slo_ttft_s", 2.0),
                            slo_tpot_s=self.info.get("slo_tpot_s", 0.1), unfinished=submitted - len(rows))
        end = max((s.start + s.seconds for s in self.steps), default=0.0)
        perf = {"wall_s": self.wall_s, "sim_s": end, "events": len(self.steps), "measured": True,
                "others_cpu_cores": self.others_cpu_cores}
        return SimResult(summary, cols, perf, {"replay": self.info}, complete=self.complete, error=self.error)

    def save(self, out: str | Path, name: str = "replay") -> dict[str, Path]:
        """Write trace / result / steps / signals into ``out`` (``*.partial.*`` names for an incomplete run)."""
        from sglang_ext.formats.trace import write_trace

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tag = "" if self.complete else ".partial"
        paths = {"trace": write_trace(out / f"trace{tag}.jsonl", self.trace(name, finished_only=not self.complete)),
                 "result": self.result().save(out / f"result{tag}.json")}
        steps = out / f"steps{tag}.jsonl"
        steps.write_text("".join(json.dumps(s.to_json()) + "\n" for s in self.steps), encoding="utf-8")
        paths["steps"] = steps
        kl = self.kl_records()
        if kl:
            sig = out / f"signals{tag}.jsonl"
            sig.write_text("".join(json.dumps({"id": rid, "steps": [[a, [round(float(v), 6) for v in k]] for a, k in s]})
                                   + "\n" for rid, s in kl.items()), encoding="utf-8")
            paths["signals"] = sig
        return paths


def load_steps(path: str | Path) -> list[StepRecord]:
    """``steps.jsonl`` (or a stored ``steps.jsonl.gz``) → the :class:`StepRecord` s :meth:`ReplayRun.save` wrote."""
    path = Path(path)
    steps: list[StepRecord] = []
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    steps.append(StepRecord(**json.loads(line)))
                except (json.JSONDecodeError, TypeError) as e:
                    raise ReplayError(f"{path}:{lineno}: not a step record ({e})") from e
    return steps


def load_signals(path: str | Path) -> dict[str, list[float | None]]:
    """``signals.jsonl`` → request id → KL per output position (for :class:`~simulator.acceptance.ReplayAcceptance`)."""
    from sglang_ext.formats.steps import kl_positions_from_steps

    path = Path(path)
    out: dict[str, list[float | None]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                out[str(obj["id"])] = kl_positions_from_steps([(int(a), [float(v) for v in kl]) for a, kl in obj["steps"]])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ReplayError(f"{path}:{lineno}: bad signals line ({e})") from None
    return out


# ---- the machine -----------------------------------------------------------------------------------------------------
class CpuMeter:
    """CPU time used by *other* processes (Linux ``/proc``): busy jiffies of the machine minus this process's.

    ``cores()`` is the average number of cores they kept busy since the last ``start()``; NaN where ``/proc``
    is not readable. A shared machine's other jobs slow the engine down; this says by how much they could have.
    """

    def __init__(self) -> None:
        import os

        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._t0: tuple[float, int, int] | None = None

    @staticmethod
    def _snap() -> tuple[float, int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat", encoding="ascii") as f:
                s = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        return time.monotonic(), sum(v[:8]) - v[3] - v[4], int(s[11]) + int(s[12])

    def start(self) -> None:
        self._t0 = self._snap()

    def cores(self) -> float:
        now = self._snap()
        if self._t0 is None or now is None or now[0] <= self._t0[0]:
            return math.nan
        others = (now[1] - self._t0[1]) - (now[2] - self._t0[2])
        return max(0.0, others / self.hz / (now[0] - self._t0[0]))


def wait_for_quiet(max_wait_s: float, idle_cores: float = 0.25, window_s: float = 3.0,
                   log: Callable[[str], None] | None = None) -> float:
    """Wait (at most ``max_wait_s``) until other processes use at most ``idle_cores`` over ``window_s``; returns
    their last measured use (NaN without ``/proc``)."""
    meter = CpuMeter()
    t_end = time.monotonic() + max(0.0, max_wait_s)
    said = False
    while True:
        meter.start()
        time.sleep(window_s)
        used = meter.cores()
        if math.isnan(used) or used <= idle_cores or time.monotonic() >= t_end:
            return used
        if log is not None and not said:
            log(f"other processes use {used:.2f} CPU cores: waiting up to {max_wait_s:.0f} s for a quiet machine")
            said = True


# ---- the driver ---------------------------------------------------------------------------------------------------
def _backlog(engine, rids: list[str]) -> dict[str, int]:
    """Pending (not yet absorbed) pairs of the EAGLE drafter per running request, before the step's draft."""
    drafter = engine.drafter
    pend = getattr(drafter, "pending", None)
    if pend is None:
        return {}
    return {s.rid: len(pend.get(s.slot, ((), ()))[1]) for s in engine.running if s.rid in rids}


class _Timers:
    """Wall time inside the engine's target forwards (prefill vs verify) and drafter calls, per step: the bound
    methods are wrapped on the instances (the engine calls ``self.target.forward`` / ``self.drafter.draft``)."""

    def __init__(self, engine, clock: Callable[[], float]) -> None:
        self.prefill = self.verify = self.draft = 0.0
        target = engine.target
        fwd = target.forward

        def forward(*args, **kw):
            t = clock()
            try:
                return fwd(*args, **kw)
            finally:
                if kw.get("logits_for") is not None:  # the engine's prefill asks for no logits
                    self.prefill += clock() - t
                else:
                    self.verify += clock() - t

        target.forward = forward
        drafter = engine.drafter
        if drafter is not None and hasattr(drafter, "draft"):
            dr = drafter.draft

            def draft(*args, **kw):
                t = clock()
                try:
                    return dr(*args, **kw)
                finally:
                    self.draft += clock() - t

            drafter.draft = draft

    def take(self) -> tuple[float, float, float]:
        out = (self.prefill, self.verify, self.draft)
        self.prefill = self.verify = self.draft = 0.0
        return out


def warm_up(engine, prompts: PromptSource, count: int = 2, prompt_tokens: int = 64, output_tokens: int = 8) -> None:
    """A few untimed requests (first-call allocations, caches) before the clock starts."""
    from sglang_ext.core.processing import SamplingParams

    from .engine import GenerationRequest

    for i in range(count):
        ids = prompts.make(10_000_000 + i, min(prompt_tokens, engine.context_length - output_tokens - 1))
        engine.add_request(GenerationRequest(ids, max_new_tokens=output_tokens, sampling=SamplingParams(temperature=0.0),
                                             ignore_eos=True, rid=f"warmup-{i}"))
    while engine.has_work():
        engine.step()


def replay(engine, requests: Iterable, prompts: PromptSource, *, warmup: int = 2,
           progress: Callable[[int, int], None] | None = None, clock: Callable[[], float] = time.perf_counter,
           sleep: Callable[[float], None] = time.sleep) -> ReplayRun:
    """Replay ``requests`` (:class:`sglang_ext.formats.trace.Request`, arrivals in seconds, already time-scaled; read
    lazily, so a :class:`~sglang_ext.formats.trace.TraceError` part-way stops the arrivals) on ``engine`` by wall clock.

    Returns the :class:`ReplayRun` — also after a bad trace line (the requests already submitted are run to the
    end), Ctrl-C or an engine error (the run stops at once; the engine may be mid-step and should be discarded);
    then ``complete`` is False and ``error`` says why.
    """
    from sglang_ext.core.processing import SamplingParams
    from sglang_ext.formats.trace import TraceError

    from .engine import GenerationRequest, RequestError

    if warmup:
        warm_up(engine, prompts, warmup)
    timers = getattr(engine, "_replay_timers", None)
    if timers is None:
        timers = engine._replay_timers = _Timers(engine, clock)
    run = ReplayRun(speculative=bool(engine.speculative))
    run.info["speculative_policy"] = getattr(engine.policy, "name", None)
    it: Iterator = iter(requests)
    states: dict[str, tuple[RequestRecord, Any]] = {}
    nxt = None
    exhausted = False

    def pull():
        nonlocal nxt, exhausted
        if exhausted:
            nxt = None
            return
        try:
            nxt = next(it)
        except StopIteration:
            nxt, exhausted = None, True
        except TraceError as e:
            nxt, exhausted = None, True
            run.complete, run.error = False, f"TraceError: {e}"

    gc.collect()
    pull()
    index = 0
    meter = CpuMeter()
    meter.start()
    t0 = clock()
    slept = False
    try:
        while nxt is not None or engine.has_work():
            now = clock() - t0
            while nxt is not None and nxt.arrival <= now:
                rec = RequestRecord(index, nxt.id or f"r{index}", float(nxt.arrival), nxt.prompt_tokens,
                                    nxt.output_tokens, nxt.category)
                req = GenerationRequest(prompts.make(index, nxt.prompt_tokens), max_new_tokens=nxt.output_tokens,
                                        sampling=SamplingParams(temperature=0.0), ignore_eos=True, rid=rec.id)
                try:
                    state = engine.add_request(req)
                except RequestError as e:
                    raise ReplayError(f"request {index} ({rec.id}): {e}") from None
                state.t_arrival = t0 + rec.arrival
                states[rec.id] = (rec, state)
                run.requests.append(rec)
                index += 1
                pull()
            if not engine.has_work():
                if nxt is not None:
                    if run.steps:
                        run.steps[-1].idle_after = True
                    slept = True
                    sleep(max(0.0, nxt.arrival - (clock() - t0)))
                continue
            if run.steps and not slept:
                last = run.steps[-1]
                last.gap = max(0.0, clock() - t0 - last.start - last.seconds)
            slept = False
            timers.take()
            _one_step(engine, run, states, t0, clock)
            run.steps[-1].prefill_forward_s, run.steps[-1].verify_forward_s, run.steps[-1].draft_call_s = timers.take()
            if progress is not None:
                progress(sum(r.done for r in run.requests), index)
    except KeyboardInterrupt:
        run.complete, run.error = False, "interrupted (KeyboardInterrupt)"
    except ReplayError:
        raise
    except Exception as e:  # noqa: BLE001 - the engine failed mid-run: keep what was measured, say why
        run.complete, run.error = False, f"engine error after {len(run.steps)} steps: {type(e).__name__}: {e}"
    finally:
        run.wall_s = clock() - t0
        run.others_cpu_cores = meter.cores()
    return run


def _one_step(engine, run: ReplayRun, states: dict, t0: float, clock: Callable[[], float]) -> None:
    prev_running = [s.rid for s in engine.running]
    waiting = [s for s in engine.waiting]
    free = engine.config.max_batch_size - len(prev_running)
    admitted = waiting[:max(free, 0)]
    batch_rids = prev_running + [s.rid for s in admitted]
    before = _backlog(engine, prev_running)
    last = engine.last_result
    start = clock()
    engine.step()
    end = clock()
    stats = engine.last_step
    depths = [n - 1 for n in stats.nodes_per_request]
    spec = any(depths)
    backlog = 0
    if spec and engine.drafter is not None:
        counts = [before.get(rid, 0) for rid in prev_running] + [len(s.request.prompt_ids) - 1 for s in admitted]
        backlog = max(counts, default=0)
    ctx = [len(states[rid][1].request.prompt_ids) + len(states[rid][1].output_ids) - (a + 1) - 1
           for rid, a in zip(batch_rids, stats.accepted_per_request) if rid in states]
    run.steps.append(StepRecord(start - t0, end - start, stats.batch_size, [len(s.request.prompt_ids) for s in admitted],
                                depths, list(stats.accepted_per_request), max(ctx, default=0),
                                sum(ctx) / len(ctx) if ctx else 0.0, backlog, stats.prefill_seconds,
                                stats.draft_seconds, stats.verify_seconds))
    result = engine.last_result if engine.last_result is not last else None
    kl_by_rid = {r.rid: list(r.kl) for r in result.requests} if result is not None else {}
    for rid in batch_rids:
        pair = states.get(rid)
        if pair is None:
            continue
        rec, state = pair
        if rec.first_token != rec.first_token and state.t_first_token is not None:
            rec.first_token = state.t_first_token - t0
        if rid in kl_by_rid:  # every verify step, empty where nothing was proposed, so steps stay aligned
            if rec.kl is None:
                rec.kl = []
            rec.kl.append([float(v) for v in kl_by_rid[rid]])
        if state.finished and not rec.done:
            rec.finish = state.t_finish - t0
            rec.emitted = len(state.output_ids)
            rec.verify_steps = state.spec_verify_ct
            rec.acceptance = list(state.accept_record)
            rec.output_ids = list(state.output_ids)
            if rec.kl is not None and len(rec.kl) != len(rec.acceptance):
                rec.kl = None  # steps and KL records out of step: positions would shift, keep none


# ---- command line -------------------------------------------------------------------------------------------------
def register(sub) -> None:
    from .launch import add_engine_args

    p = sub.add_parser("replay", help="drive the reference engine with a trace; record acceptance and latencies",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("trace")
    g.add_argument("--trace", type=Path, required=True, help="JSONL trace (traces/README.md; .gz too)")
    g.add_argument("--time-scale", type=float, default=1.0, help="multiply arrivals (0.5 = twice the rate)")
    g.add_argument("--head", type=int, default=None, help="only the first N requests")
    g.add_argument("--prompts", type=Path, default=None,
                   help=f"prompt texts (JSONL, Spec-Bench turns or prompt); default {DEFAULT_PROMPTS}")
    g.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt texts chosen per request")
    g.add_argument("--warmup", type=int, default=2, help="untimed warm-up requests before the clock starts")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--out", type=Path, required=True, help="directory for trace.jsonl, result.json, steps.jsonl")
    add_engine_args(p)
    p.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sglang_ext.formats.results import print_result
    from sglang_ext.formats.trace import TraceError, stream_trace

    from .launch import LaunchError, build_engine

    console, err = Console(), Console(stderr=True)
    try:
        texts = load_texts(args.prompts)
        # the first line is read before the model loads: a trace that is bad from the start costs nothing
        first = list(stream_trace(args.trace, args.time_scale, 1))
        if not first:
            raise ReplayError(f"{args.trace}: no requests")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        engine, tokenizer, info = build_engine(args)
    except (ReplayError, LaunchError, TraceError, OSError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        return 1
    prompts = PromptSource(texts, tokenizer, engine.target.vocab_size, seed=args.prompt_seed)
    run = replay(engine, stream_trace(args.trace, args.time_scale, args.head), prompts, warmup=args.warmup)
    run.info.update(engine={k: v for k, v in info.items() if k not in ("notes",)}, trace=str(args.trace),
                    time_scale=args.time_scale, head=args.head, prompt_seed=args.prompt_seed)
    paths = run.save(args.out, name=args.trace.name.split(".")[0])
    shown = run.result()
    shown.perf = {}  # the simulator's own speed row means nothing for a measured run
    print_result(shown, console, f"measured replay of {args.trace.name}")
    if run.others_cpu_cores == run.others_cpu_cores:
        console.print(f"other processes used {run.others_cpu_cores:.2f} CPU cores during the replay")
    if not run.complete:
        err.print(f"[red]error:[/red] {run.error}\npartial results ({sum(r.done for r in run.requests)} requests) "
                  f"written to {args.out}", highlight=False)
        return 130 if run.error and "interrupted" in run.error else 1
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


__all__ = ["DEFAULT_PROMPTS", "CpuMeter", "PromptSource", "ReplayError", "ReplayRun", "RequestRecord", "StepRecord", "cmd_replay",
           "load_signals", "load_texts", "register", "replay", "wait_for_quiet", "warm_up"]
