"""Workload-shift benchmark (issue 4): static drafter vs online drafter adaptation on one shifting stream.

    .venv/bin/python -m analysis.workload_shift                         # defaults: the README run
    .venv/bin/python -m analysis.workload_shift --configs static,adam,momentum --segments chat=mt-bench:8,code=humaneval:8

The stream is a fixed, seeded sequence of chat-templated prompts: a prefix from the drafter's training family
(chat), then a shift to code (HumanEval), then to math (GSM8K). Every configuration serves the *same* stream,
greedy, with continuous batching (all requests queued at t = 0, admitted in stream order, ``--batch`` slots):

* ``static``: the shipped drafter, no online learning;
* ``online-<learner>`` (``adam``, ``momentum``, ``optimistic``, ``hedge``, ``sgd``): the same drafter with
  :class:`sglang_ext.online.OnlineLearning` attached (capture -> TIDE Algorithm 1 -> trainer process -> hot
  swap). Per-configuration overrides in brackets: ``adam[lr=3e-4,epochs=3]``; ``--online-<param>`` flags set
  the values every online configuration shares.

Side by side, in one process and one run: each configuration has its own engine (they share the target's
weights) and the engines take *interleaved steps* (round robin), so machine noise falls on every
configuration alike. Serving runs ``--serve-threads`` torch threads in every configuration. Each online
configuration's trainer is a child process with ``trainer_threads`` threads (the other core: TIDE's separate
training device). So that the trainers do not share that core among themselves, a trainer only runs while its
own configuration is stepping (SIGSTOP / SIGCONT around each step; ``--no-gate-trainers`` turns that off): every
configuration sees exactly the setting "one core serves, one core trains" that it would see running alone.
Each configuration's clock is the sum of its own step times.

Metrics (per configuration): acceptance length (committed tokens per verify step, SGLang's
``spec_accept_length``) per request and as a trailing moving window, tokens/s over the whole stream and over the
post-shift part (steps from the one that admits the first post-shift request to the end), trainer CPU seconds,
rounds deployed / refused, time to recover after each shift (see :func:`recovery`), and greedy identity (every
configuration's outputs token-identical to ``static``'s; the run exits non-zero otherwise), and over the last half
of each new segment acceptance length and tokens/s against ``static`` and, with a configuration labelled
``oracle``, the share of the static → oracle gap each one closes (:func:`add_last_half`).
Outputs in ``--out``: ``results.json``, ``results.md`` and ``acceptance.png``, and ``journal.jsonl`` (every step
and finished request as it happens, :class:`Journal`): a long run that is interrupted continues with ``--resume``
(same flags and ``--out``); ``--rejudge results.json`` recomputes the derived tables of a finished run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_SEGMENTS = "chat=mt-bench:20,code=humaneval:40,math=gsm8k:40"
DEFAULT_CONFIGS = "static,adam,momentum,optimistic"
LEARNER_NAMES = ("sgd", "adam", "momentum", "optimistic", "hedge")


# ---- the stream ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    name: str  # "chat", "code", "math"
    source: str  # prompt set name (``sglang-ext data list``) or a JSONL path
    count: int


@dataclass
class StreamItem:
    index: int
    segment: str
    source: str
    prompt_id: str
    ids: list[int]


def parse_segments(text: str) -> list[Segment]:
    """``"chat=mt-bench:20,code=humaneval:40"`` -> segments in stream order (names must be distinct)."""
    out: list[Segment] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, rest = part.partition("=")
        source, colon, count = rest.rpartition(":")
        if not (eq and colon and name and source) or not count.isdigit() or int(count) < 1:
            raise ValueError(f"--segments: {part!r} is not NAME=SOURCE:COUNT (COUNT >= 1)")
        out.append(Segment(name.strip(), source.strip(), int(count)))
    if not out:
        raise ValueError("--segments: no segment given")
    if len({s.name for s in out}) != len(out):
        raise ValueError(f"--segments: segment names must be distinct, got {[s.name for s in out]}")
    return out


def select_stream(pools: dict[str, Sequence[tuple[str, str]]], segments: Sequence[Segment], seed: int
                  ) -> list[tuple[str, str, str, str]]:
    """``(segment, source, prompt_id, text)`` in stream order: each segment takes ``count`` prompts of its source,
    drawn without replacement by a seeded shuffle of the source's pool (a source used twice never repeats)."""
    order: dict[str, list[tuple[str, str]]] = {}
    out = []
    for seg in segments:
        if seg.source not in pools:
            raise KeyError(f"segment {seg.name}: no prompts loaded for source {seg.source!r}")
        if seg.source not in order:
            pool = list(pools[seg.source])
            random.Random(f"{seed}:{seg.source}").shuffle(pool)
            order[seg.source] = pool
        pool = order[seg.source]
        if len(pool) < seg.count:
            raise ValueError(f"segment {seg.name}: {seg.source} has {len(pool)} unused prompts, {seg.count} asked")
        take, order[seg.source] = pool[:seg.count], pool[seg.count:]
        out += [(seg.name, seg.source, pid, text) for pid, text in take]
    return out


def load_pools(segments: Sequence[Segment]) -> dict[str, list[tuple[str, str]]]:
    """``source -> [(prompt_id, text)]`` from the packaged prompt sets (or JSONL paths), de-duplicated by text."""
    from sglang_ext.data.packaged_prompts import fetch_prompt_set
    from sglang_ext.data.prompts import load_prompts

    pools: dict[str, list[tuple[str, str]]] = {}
    for seg in segments:
        if seg.source in pools:
            continue
        path = seg.source if Path(seg.source).is_file() else fetch_prompt_set(seg.source)
        seen: set[str] = set()
        pool = []
        for p in load_prompts(path):
            if p.text not in seen:
                seen.add(p.text)
                pool.append((p.id, p.text))
        pools[seg.source] = pool
    return pools


def encode_stream(tokenizer, selected: Sequence[tuple[str, str, str, str]], max_prompt_tokens: int = 512
                  ) -> list[StreamItem]:
    """Chat-template each prompt (long ones keep their head and the chat suffix, as ``sglang-ext bench`` does)."""
    from sglang_ext.models.chat import encode_chat

    out = []
    for i, (seg, source, pid, text) in enumerate(selected):
        ids = encode_chat(tokenizer, text)
        if len(ids) > max_prompt_tokens:
            ids = ids[: max_prompt_tokens - 8] + ids[-8:]
        out.append(StreamItem(i, seg, source, pid, ids))
    return out


def segment_starts(stream: Sequence[StreamItem]) -> dict[str, int]:
    """First stream index of each segment, in stream order."""
    starts: dict[str, int] = {}
    for it in stream:
        starts.setdefault(it.segment, it.index)
    return starts


# ---- configurations -------------------------------------------------------------------------------------------
@dataclass
class ConfigSpec:
    name: str  # "static", "online-adam", "online-adam[lr=0.0003]", or its ``label``
    learner: str | None  # None: static
    overrides: dict[str, Any] = field(default_factory=dict)  # per-configuration ONLINE_PARAMS values
    drafter: str | None = None  # this configuration's starting drafter (None: --draft-model-path)
    labelled: bool = False  # ``name`` is the user's ``label=``, not built from the overrides

    @property
    def online(self) -> bool:
        return self.learner is not None


SPEC_KEYS = ("drafter", "label")
"""Keys any configuration takes in brackets besides learner parameters: ``drafter=PATH`` (its own starting
drafter, e.g. an offline oracle trained on the new domains) and ``label=NAME`` (its name in the tables)."""


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_configs(text: str) -> list[ConfigSpec]:
    """``"static,adam,momentum[lr=0.02],hedge"`` (``online-`` prefixes allowed) -> specs; names are unique."""
    parts, depth, cur = [], 0, ""
    for ch in text:  # split on commas outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out: list[ConfigSpec] = []
    for raw in filter(None, (p.strip() for p in parts)):
        base, _, rest = raw.partition("[")
        base = base.strip().removeprefix("online-")
        overrides: dict[str, Any] = {}
        if rest:
            if not rest.endswith("]"):
                raise ValueError(f"--configs: {raw!r}: unbalanced brackets")
            for kv in filter(None, (x.strip() for x in rest[:-1].split(","))):
                k, eq, v = kv.partition("=")
                if not eq:
                    raise ValueError(f"--configs: {raw!r}: {kv!r} is not NAME=VALUE")
                overrides[k.strip().replace("-", "_")] = _value(v.strip())
        drafter, label = overrides.pop("drafter", None), overrides.pop("label", None)
        for key, value in (("drafter", drafter), ("label", label)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"--configs: {raw!r}: {key} must be a non-empty string")
        suffix_items = {**overrides, **({"drafter": drafter} if drafter else {})}
        suffix = "[" + ",".join(f"{k}={v}" for k, v in suffix_items.items()) + "]" if suffix_items else ""
        if base == "static":
            if overrides:
                raise ValueError(f"--configs: {raw!r}: static takes only {' and '.join(SPEC_KEYS)}, "
                                 f"not {', '.join(overrides)}")
            out.append(ConfigSpec(label or f"static{suffix}", None, drafter=drafter, labelled=label is not None))
        elif base in LEARNER_NAMES:
            out.append(ConfigSpec(label or f"online-{base}{suffix}", base, overrides, drafter=drafter,
                                  labelled=label is not None))
        else:
            raise ValueError(f"--configs: {raw!r}: not static or one of {', '.join(LEARNER_NAMES)}")
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"--configs: duplicate configurations {names}")
    if not out or out[0].online:
        raise ValueError("--configs: the first configuration must be static (every ratio and identity check uses it)")
    return out


# ---- one configuration's run ------------------------------------------------------------------------------
@dataclass
class StepRecord:
    clock: float  # the configuration's serving clock at the end of the step (s)
    seconds: float
    tokens: int  # tokens committed in the step
    admitted: list[int]  # stream indices admitted (prefilled) in the step


@dataclass
class FinishedRequest:
    """A request's result as the journal keeps it (the fields :func:`summarize` reads from an engine state)."""

    rid: str
    output_ids: list[int]
    spec_verify_ct: int
    drafter_versions: set


class Journal:
    """Append-only JSON lines of everything a run records, flushed per line, so an interrupted run loses at most
    the requests in flight (``--resume`` takes the rest back).

    Line kinds (``t``): ``header`` (what must match to resume: stream, configurations, serving settings),
    ``step`` (one configuration step: ``clock``, ``seconds``, committed ``tokens``, ``admitted`` stream indices),
    ``finish`` (a request: stream index ``i``, ``out`` token ids, ``verify`` steps, drafter ``versions``, ``clock``),
    ``swap`` and ``round`` (online configurations: a hot swap; a training round as the trainer reported it), and
    ``resume`` (where a resumed run picked up). ``c`` names the configuration.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_file():  # a torn last record (the process died mid-write) is cut before appending
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    @staticmethod
    def read(path: str | Path) -> list[dict]:
        """The records of ``path``; a torn last line (the process died mid-write) is dropped, any other bad line
        is an error naming it."""
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        out = []
        for n, line in enumerate(lines, 1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                if n == len(lines):
                    break
                raise ValueError(f"{path}:{n}: not a journal record ({e.msg})") from None
        return out


def journal_header(args: argparse.Namespace, specs: Sequence[ConfigSpec], shared: dict, stream: Sequence[StreamItem]
                   ) -> dict:
    """What a resumed run must share with the journal it continues."""
    import hashlib

    digest = hashlib.sha256(json.dumps([it.ids for it in stream]).encode()).hexdigest()[:16]
    keys = ("segments", "configs", "seed", "max_new_tokens", "max_prompt_tokens", "batch", "num_steps", "model_path",
            "draft_model_path")
    return {"t": "header", **{k: getattr(args, k) for k in keys}, "online_shared": shared,
            "configs_parsed": [s.name for s in specs], "stream_sha256": digest}


def check_resumable(records: Sequence[dict], header: dict, path: Path) -> dict[str, list[dict]]:
    """The journal's records per configuration, after checking that its header matches this run's ``header``."""
    if not records or records[0].get("t") != "header":
        raise ValueError(f"{path}:1: no journal header: not a workload-shift journal")
    old = records[0]
    diff = [k for k in header if k != "t" and old.get(k) != header[k]]
    if diff:
        raise ValueError(f"{path}: --resume with different settings: "
                         + "; ".join(f"{k}: journal {old.get(k)!r}, now {header[k]!r}" for k in diff))
    per: dict[str, list[dict]] = {name: [] for name in header["configs_parsed"]}
    for n, rec in enumerate(records[1:], 2):
        if rec.get("t") in ("resume", "header"):
            continue
        if rec.get("c") not in per:
            raise ValueError(f"{path}:{n}: configuration {rec.get('c')!r} is not in this run")
        per[rec["c"]].append(rec)
    return per


class ConfigRun:
    """One configuration: its engine, its online learner (or None) and what it recorded, step by step."""

    def __init__(self, spec: ConfigSpec, engine, online=None, trainer_nice: int | None = None) -> None:
        self.spec, self.engine, self.online = spec, engine, online
        self.trainer_nice = trainer_nice
        self._niced_pid: int | None = None
        self.clock = 0.0
        self.steps: list[StepRecord] = []
        self.states: list = []
        self.index_of: dict[str, int] = {}
        self.admit_clock: dict[int, float] = {}
        self.finish_clock: dict[int, float] = {}
        self.finish_order: list[int] = []
        self.swaps: list[dict] = []  # drafter hot swaps: when, and after how many finished requests
        self.rounds: list[dict] = []  # each completed training round, as the trainer reported it
        self.cpu_at_start = 0.0
        self._seen: set[str] = set()
        self.journal: Journal | None = None
        self.restored: dict[int, FinishedRequest] = {}  # requests finished before a resume, by stream index
        self.prior_online = {"rounds": 0, "deployed": 0, "rejected": 0, "swaps": 0, "trainer_cpu_seconds": 0.0}
        self.resumes: list[dict] = []

    def submit(self, stream: Sequence[StreamItem], max_new_tokens: int) -> None:
        """Queue the stream in order; requests restored from a journal keep their recorded result instead."""
        from sglang_ext.engine.engine import GenerationRequest

        for it in stream:
            rid = f"s{it.index:04d}"
            self.index_of[rid] = it.index
            if it.index in self.restored:
                self.states.append(self.restored[it.index])
                continue
            self.states.append(self.engine.add_request(GenerationRequest(list(it.ids), max_new_tokens=max_new_tokens,
                                                                         rid=rid)))

    def restore(self, records: Sequence[dict]) -> None:
        """Take back this configuration's journal (:class:`Journal` records, in order) before :meth:`submit`.

        Finished requests keep their outputs and clocks; the clock goes on from the last recorded step (time spent
        on requests that were in flight at the interruption stays counted: they run again from their start).
        """
        for rec in records:
            kind = rec["t"]
            if kind == "step":
                self.clock = rec["clock"]
                self.steps.append(StepRecord(rec["clock"], rec["seconds"], rec["tokens"], list(rec["admitted"])))
                for i in rec["admitted"]:
                    self.admit_clock.setdefault(i, rec["clock"] - rec["seconds"])
            elif kind == "finish":
                i = rec["i"]
                self.restored[i] = FinishedRequest(f"s{i:04d}", list(rec["out"]), rec["verify"], set(rec["versions"]))
                self.finish_clock[i] = rec["clock"]
                self.finish_order.append(i)
            elif kind == "swap":
                self.swaps.append({k: v for k, v in rec.items() if k not in ("t", "c")})
            elif kind == "round":
                r = {k: v for k, v in rec.items() if k not in ("t", "c")}
                self.rounds.append(r)
        if self.rounds:
            outcomes = [r.get("outcome") for r in self.rounds]
            self.prior_online = {"rounds": len(self.rounds), "deployed": outcomes.count("deploy"),
                                 "rejected": len(outcomes) - outcomes.count("deploy"), "swaps": len(self.swaps),
                                 "trainer_cpu_seconds": float(self.rounds[-1].get("trainer_cpu_seconds", 0.0))}
        self.resumes.append({"clock": self.clock, "finished": len(self.finish_order)})

    @property
    def done(self) -> bool:
        return not self.engine.has_work()

    @property
    def trainer_pid(self) -> int | None:
        pid = self.online.trainer.pid if self.online is not None else None
        if pid is not None and self.trainer_nice is not None and pid != self._niced_pid:  # a restart: a new pid
            try:
                os.setpriority(os.PRIO_PROCESS, pid, self.trainer_nice)
                self._niced_pid = pid
            except (ProcessLookupError, PermissionError):
                pass
        return pid

    def step(self) -> None:
        e = self.engine
        tok0, swaps0 = e.totals["tokens"], getattr(self.online, "swaps", 0)
        rounds0 = self.online.trainer.stats["rounds"] if self.online is not None else 0
        t0 = time.perf_counter()
        finished = e.step()
        dt = time.perf_counter() - t0
        start = self.clock
        self.clock += dt
        admitted = []
        for s in e.running + finished:
            if s.rid not in self._seen:
                self._seen.add(s.rid)
                i = self.index_of[s.rid]
                admitted.append(i)
                self.admit_clock[i] = start
        for s in finished:
            i = self.index_of[s.rid]
            self.finish_clock[i] = self.clock
            self.finish_order.append(i)
        self.steps.append(StepRecord(self.clock, dt, e.totals["tokens"] - tok0, sorted(admitted)))
        j = self.journal
        if j is not None:
            name = self.spec.name
            j.write({"t": "step", "c": name, "clock": self.clock, "seconds": dt, "tokens": self.steps[-1].tokens,
                     "admitted": self.steps[-1].admitted})
            for s in finished:
                j.write({"t": "finish", "c": name, "i": self.index_of[s.rid], "clock": self.clock,
                         "out": list(s.output_ids), "verify": s.spec_verify_ct,
                         "versions": sorted(v for v in s.drafter_versions if v is not None)})
        if self.online is not None:
            if self.online.swaps != swaps0:
                self.swaps.append({"clock": self.clock, "finished": len(self.finish_order),
                                   "version": getattr(e.drafter, "version", None)})
                if j is not None:
                    j.write({"t": "swap", "c": self.spec.name, **self.swaps[-1]})
            st = self.online.trainer.stats
            if st["rounds"] != rounds0 and st["last_round"] is not None:
                r = dict(st["last_round"])
                r.update(clock=self.clock, finished=len(self.finish_order),
                         trainer_cpu_seconds=self.prior_online["trainer_cpu_seconds"] + self.trainer_cpu())
                self.rounds.append(r)
                if j is not None:
                    j.write({"t": "round", "c": self.spec.name, **r})

    def trainer_cpu(self) -> float:
        return self.online.status()["trainer_cpu_seconds"] - self.cpu_at_start if self.online is not None else 0.0


def wait_trainer_ready(online, timeout: float = 120.0) -> float:
    """Block until the trainer child has finished starting (its CPU time stops growing); returns that CPU time."""
    end = time.monotonic() + timeout
    last = -1.0
    while time.monotonic() < end:
        online.trainer.poll()
        cpu = online.trainer.trainer_cpu_seconds()
        if cpu > 0.3 and cpu - last < 0.02:
            return cpu
        last = cpu
        time.sleep(1.0)
    raise RuntimeError(f"online trainer (pid {online.trainer.pid}) did not settle within {timeout:.0f} s")


class TrainerGate:
    """Lets a configuration's trainer run only while that configuration steps (SIGSTOP / SIGCONT).

    A watchdog thread resumes every trainer if the serving loop makes no progress for ``stall_s`` seconds (a
    stopped child must never be able to block the parent), and counts how often it had to.
    """

    def __init__(self, runs: Sequence[ConfigRun], enabled: bool = True, stall_s: float = 30.0) -> None:
        self.runs, self.enabled, self.stall_s = list(runs), enabled, stall_s
        self.beat = time.monotonic()
        self.rescues = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _kill(pid: int | None, sig: int) -> None:
        if pid:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def pause_all(self) -> None:
        if self.enabled:
            for r in self.runs:
                self._kill(r.trainer_pid, signal.SIGSTOP)

    def resume_all(self) -> None:
        for r in self.runs:
            self._kill(r.trainer_pid, signal.SIGCONT)

    def step(self, run: ConfigRun) -> None:
        with self._lock:
            self.beat = time.monotonic()
        if self.enabled:
            self._kill(run.trainer_pid, signal.SIGCONT)
        try:
            run.step()
        finally:
            if self.enabled:
                self._kill(run.trainer_pid, signal.SIGSTOP)  # the pid after the step (a restart spawns a new one)
            with self._lock:
                self.beat = time.monotonic()

    def __enter__(self) -> TrainerGate:  # noqa: PYI034
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        self.pause_all()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.resume_all()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                stalled = time.monotonic() - self.beat > self.stall_s
            if stalled:
                self.rescues += 1
                self.resume_all()
                with self._lock:
                    self.beat = time.monotonic()


def run_interleaved(runs: Sequence[ConfigRun], gate_trainers: bool = True, log: Callable[[str], None] = print,
                    progress_every: int = 10) -> TrainerGate:
    """Round-robin one step per unfinished configuration until every stream is served."""
    gate = TrainerGate(runs, enabled=gate_trainers)
    next_report = progress_every
    with gate:
        while not all(r.done for r in runs):
            for r in runs:
                if not r.done:
                    gate.step(r)
                    if r.done:
                        gate._kill(r.trainer_pid, signal.SIGSTOP) if gate.enabled else None
            n = min(len(r.finish_order) for r in runs)
            if n >= next_report:
                next_report += progress_every
                log("  " + "  ".join(f"{r.spec.name}: {len(r.finish_order)} done {r.clock:6.1f}s"
                                     + (f" v{r.online.trainer.stats['deployed']}d/{r.online.trainer.stats['rejected']}r"
                                        if r.online is not None else "") for r in runs))
    return gate


# ---- metrics -----------------------------------------------------------------------------------------------
def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over at most ``window`` values (shorter at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def pooled_accept(tokens: Sequence[int], verifies: Sequence[int]) -> float | None:
    v = sum(verifies)
    return sum(tokens) / v if v else None


def recovery(acc: Sequence[float], clock: Sequence[float], start: int, stop: int, window: int, frac: float = 0.9,
             level: float | None = None) -> dict:
    """Time to recover after a shift at stream index ``start`` (segment ``[start, stop)``).

    ``acc[i]``: request ``i``'s acceptance length; ``clock[i]``: the configuration's serving clock when it finished.
    The moving acceptance at ``i`` is the mean over the last ``window`` requests *of this segment* (fewer at its
    start). ``plateau``: the mean acceptance of the segment's last quarter (at least ``window`` requests).
    Recovered at the first ``i`` whose moving acceptance reaches ``frac`` x ``level`` (default: the plateau);
    reported as requests after the shift (``i - start + 1``) and seconds from the segment's first admission
    clock (``clock_start``) to request ``i``'s finish, or None if never.
    """
    seg = list(acc[start:stop])
    if not seg:
        return {"plateau": None, "level": None, "requests": None, "seconds": None, "index": None}
    tail = max(window, len(seg) // 4)
    plateau = sum(seg[-tail:]) / len(seg[-tail:])
    target = frac * (plateau if level is None else level)
    mov = moving_average(seg, window)
    hit = next((j for j, m in enumerate(mov) if m >= target), None)
    out = {"plateau": plateau, "level": target, "requests": None, "seconds": None, "index": None,
           "moving_first": mov[0]}
    if hit is not None:
        out.update(requests=hit + 1, index=start + hit)
        out["finish_clock"] = clock[start + hit]
    return out


def window_throughput(steps: Sequence[StepRecord], first: int, stop: int | None = None) -> dict:
    """Tokens/s over the steps from the one that admits stream index ``first`` up to (not including) the one that
    admits ``stop`` (None: to the end). Every token committed in those steps counts, whichever request it is."""
    def admit_step(i: int) -> int | None:
        return next((k for k, s in enumerate(steps) if any(a >= i for a in s.admitted)), None)

    a = admit_step(first)
    b = admit_step(stop) if stop is not None else None
    if a is None:
        return {"tokens": 0, "seconds": 0.0, "tokens_per_s": None, "clock_start": None}
    sel = steps[a:b]
    toks, secs = sum(s.tokens for s in sel), sum(s.seconds for s in sel)
    return {"tokens": toks, "seconds": secs, "tokens_per_s": toks / secs if secs else None,
            "clock_start": steps[a].clock - steps[a].seconds}


def gap_closed(value: float | None, static: float | None, oracle: float | None) -> float | None:
    """How much of the static → oracle gap ``value`` closes: :math:`(v - s) / (o - s)` (None if the oracle is not
    better than static: there is no gap to close)."""
    if value is None or static is None or oracle is None or oracle <= static:
        return None
    return (value - static) / (oracle - static)


def request_span_throughput(tokens: Sequence[int], admit: Sequence[float | None], finish: Sequence[float],
                            a: int, b: int) -> dict:
    """Tokens/s of requests ``[a, b)``: their output tokens over the span of the configuration's clock from the
    first one's admission to the last one's finish (batched neighbours overlap the span at both ends alike in every
    configuration, so ratios between configurations compare like with like)."""
    starts = [x for x in admit[a:b] if x is not None]
    ends = [x for x in finish[a:b] if x is not None and x == x]
    toks = sum(tokens[a:b])
    secs = (max(ends) - min(starts)) if starts and ends else 0.0
    return {"tokens": toks, "seconds": secs, "tokens_per_s": toks / secs if secs > 0 else None}


def add_last_half(summary: dict, oracle_label: str = "oracle") -> dict:
    """Each new segment's second half (by stream index) per configuration, from the per-request records alone (so
    a finished run's ``results.json`` can be judged again): pooled acceptance length, :func:`request_span_throughput`,
    their ratios to the first configuration and, with a configuration labelled ``oracle_label``, the share of the
    static → oracle gap in acceptance length each other configuration closes (:func:`gap_closed`)."""
    names = list(summary["segments"])
    cfgs = summary["configs"]
    for c in cfgs.values():
        pr = c["per_request"]
        c["last_half"] = {}
        for s in names[1:]:
            a, b = summary["segments"][s]["start"], summary["segments"][s]["stop"]
            half = a + (b - a) // 2
            c["last_half"][s] = {"start": half, "stop": b,
                                 "accept_length": pooled_accept(pr["tokens"][half:b], pr["verify_steps"][half:b]),
                                 **request_span_throughput(pr["tokens"], pr["admit_clock"], pr["finish_clock"], half, b)}
    base = next(iter(cfgs.values()))
    oracle = cfgs.get(oracle_label)
    for name, c in cfgs.items():
        rat = c.setdefault("ratios_vs_static", {})
        c.pop("gap_closed", None)
        for s in names[1:]:
            mine, ref_h = c["last_half"][s], base["last_half"][s]
            rat[f"{s}_last_half_tokens_per_s"] = _ratio(mine["tokens_per_s"], ref_h["tokens_per_s"])
            rat[f"{s}_last_half_accept_length"] = _ratio(mine["accept_length"], ref_h["accept_length"])
            if oracle is not None and name != oracle_label and c is not base:
                c.setdefault("gap_closed", {})[s] = gap_closed(mine["accept_length"], ref_h["accept_length"],
                                                               oracle["last_half"][s]["accept_length"])
    summary["oracle"] = oracle_label if oracle is not None else None
    return summary


def summarize(runs: Sequence[ConfigRun], stream: Sequence[StreamItem], window: int = 5, recover_frac: float = 0.9,
              oracle_label: str = "oracle") -> dict:
    """Per-configuration metrics, ratios to ``static`` and the greedy-identity check (see the module docstring).

    ``last_half``: each new segment's second half, where a learner that adapts should have caught up
    (:func:`add_last_half`)."""
    n = len(stream)
    starts = segment_starts(stream)
    names = list(starts)
    bounds = {s: (starts[s], starts[names[k + 1]] if k + 1 < len(names) else n) for k, s in enumerate(names)}
    post = starts[names[1]] if len(names) > 1 else 0
    ref = runs[0]
    ref_out = [s.output_ids for s in ref.states]
    out: dict[str, Any] = {"segments": {s: {"start": a, "stop": b} for s, (a, b) in bounds.items()},
                           "post_shift_start": post, "window": window, "recover_frac": recover_frac, "configs": {}}
    for r in runs:
        st = r.states
        toks = [len(s.output_ids) for s in st]
        ver = [s.spec_verify_ct for s in st]
        acc = [t / v if v else 0.0 for t, v in zip(toks, ver)]
        clock = [r.finish_clock.get(i, float("nan")) for i in range(n)]
        identical = [s.output_ids == o for s, o in zip(st, ref_out)]
        c: dict[str, Any] = {
            "requests": n, "tokens": sum(toks), "seconds": r.clock,
            "tokens_per_s": sum(toks) / r.clock if r.clock else None,
            "accept_length": pooled_accept(toks, ver),
            "identical_to_static": sum(identical), "not_identical": [i for i, ok in enumerate(identical) if not ok],
            "per_request": {"accept_length": acc, "tokens": toks, "verify_steps": ver, "finish_clock": clock,
                            "admit_clock": [r.admit_clock.get(i) for i in range(n)],
                            "drafter_versions": [sorted(s.drafter_versions) for s in st]},
            "moving_accept_length": moving_average(acc, window),
            "segments": {}, "recovery": {},
        }
        for s, (a, b) in bounds.items():
            w = window_throughput(r.steps, a, b if b < n else None)
            c["segments"][s] = {"accept_length": pooled_accept(toks[a:b], ver[a:b]), **w}
        wp = window_throughput(r.steps, post)
        c["post_shift"] = {"accept_length": pooled_accept(toks[post:], ver[post:]), **wp}
        pre_name = names[0]
        pre_level = c["segments"][pre_name]["accept_length"]
        for k, s in enumerate(names[1:], start=1):
            a, b = bounds[s]
            rec = recovery(acc, clock, a, b, window, recover_frac)
            rec_pre = recovery(acc, clock, a, b, window, recover_frac, level=pre_level)
            t0 = c["segments"][s]["clock_start"]
            for x in (rec, rec_pre):
                x["seconds"] = x.pop("finish_clock", None)
                if x["seconds"] is not None and t0 is not None:
                    x["seconds"] -= t0
            c["recovery"][s] = {"to_plateau": rec, "to_pre_shift_level": rec_pre}
        if r.resumes:
            c["resumes"] = r.resumes
        if r.online is not None:
            stt = r.online.status()
            prior = r.prior_online  # counts from before a --resume (the trainer process is new since)
            c["online"] = {"config": {k: v for k, v in r.online.config.items()},
                           "trainer_cpu_seconds": prior["trainer_cpu_seconds"] + r.trainer_cpu(),
                           "trainer_cpu_at_start": r.cpu_at_start,
                           **{k: stt[k] for k in ("rounds_submitted", "rounds", "deployed", "rejected", "errors",
                                                  "restarts", "dropped_rounds", "swaps", "version",
                                                  "capture_evicted_tokens", "capture_dropped_tokens", "collecting")},
                           "outcomes": [e.kind for e in r.online.control.events],
                           "events": [asdict(e) for e in r.online.control.events],
                           "rounds_log": r.rounds, "swaps_log": r.swaps}
            for k, p in (("rounds_submitted", "rounds"), ("rounds", "rounds"), ("deployed", "deployed"),
                         ("rejected", "rejected"), ("swaps", "swaps")):
                c["online"][k] += prior[p]
        out["configs"][r.spec.name] = c
    base = out["configs"][ref.spec.name]
    for c in out["configs"].values():
        c["ratios_vs_static"] = {
            "tokens_per_s": _ratio(c["tokens_per_s"], base["tokens_per_s"]),
            "accept_length": _ratio(c["accept_length"], base["accept_length"]),
            "post_shift_tokens_per_s": _ratio(c["post_shift"]["tokens_per_s"], base["post_shift"]["tokens_per_s"]),
            "post_shift_accept_length": _ratio(c["post_shift"]["accept_length"], base["post_shift"]["accept_length"]),
            **{f"{s}_tokens_per_s": _ratio(c["segments"][s]["tokens_per_s"], base["segments"][s]["tokens_per_s"])
               for s in names},
            **{f"{s}_accept_length": _ratio(c["segments"][s]["accept_length"], base["segments"][s]["accept_length"])
               for s in names},
        }
    add_last_half(out, oracle_label)
    out["greedy_identity"] = all(not c["not_identical"] for c in out["configs"].values())
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ---- reporting ---------------------------------------------------------------------------------------------
def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_acceptance(summary: dict, out: str | Path, title: str = "") -> Path:
    """Top: acceptance length per request (dots) and its moving window (lines) vs stream index, shifts marked,
    drafter deployments as ticks. Bottom: the same moving acceptance vs each configuration's serving clock."""
    plt = _mpl()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 7.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    w = summary["window"]
    for k, (name, c) in enumerate(summary["configs"].items()):
        col = colors[k % len(colors)]
        acc = c["per_request"]["accept_length"]
        x = list(range(len(acc)))
        ax.scatter(x, acc, s=6, color=col, alpha=0.3)
        ax.plot(x, c["moving_accept_length"], color=col, lw=1.8, label=f"{name} (post-shift "
                f"{c['post_shift']['accept_length']:.2f})")
        fin = c["per_request"]["finish_clock"]
        pts = sorted((t, m) for t, m in zip(fin, c["moving_accept_length"]) if not math.isnan(t))
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], color=col, lw=1.5, label=name)
        for sw in (c.get("online") or {}).get("swaps_log", []):
            ax.axvline(sw["finished"], ymin=0, ymax=0.04, color=col, lw=1.5)
            ax2.axvline(sw["clock"], ymin=0, ymax=0.04, color=col, lw=1.5)
        for seg, b in summary["segments"].items():
            t0 = c["segments"][seg]["clock_start"]
            if b["start"] > 0 and t0 is not None:
                ax2.axvline(t0, color=col, ls=":", lw=0.8)
    for seg, b in summary["segments"].items():
        if b["start"] > 0:
            ax.axvline(b["start"] - 0.5, color="k", ls="--", lw=1)
        ax.text((b["start"] + b["stop"]) / 2, 1.0, seg, transform=ax.get_xaxis_transform(), ha="center", va="bottom")
    ax.set_xlabel("request (stream order)")
    ax.set_ylabel(f"acceptance length (moving {w})")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    ax2.set_xlabel("serving clock of each configuration (s); dotted: its shift points; ticks: drafter deployments")
    ax2.set_ylabel(f"acceptance length (moving {w})")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _f(x: float | None, fmt: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{fmt}}{suffix}"


def _rec(r: dict) -> str:
    if r["requests"] is None:
        return "never"
    return f"{r['requests']} req / {_f(r['seconds'], '.0f')} s"


def last_half_markdown(summary: dict) -> list[str]:
    """The target's table: each new segment's last half, acceptance length and tokens/s (× static), gap closed."""
    cfgs = summary["configs"]
    segs = list(summary["segments"])[1:]
    if not segs:
        return []
    oracle = summary.get("oracle")
    head = "| configuration | " + " | ".join(f"{s}: accept len (× static) | {s}: tok/s (× static)" for s in segs)
    head += (" | " + " | ".join(f"{s}: gap to {oracle} closed" for s in segs) if oracle else "") + " |"
    lines = ["Last half of each new segment (" + ", ".join(
        f"{s} {cfgs[next(iter(cfgs))]['last_half'][s]['start']}–{cfgs[next(iter(cfgs))]['last_half'][s]['stop'] - 1}"
        for s in segs) + "):", "", head, "|---|" + "---:|" * (2 * len(segs) + (len(segs) if oracle else 0))]
    for name, c in cfgs.items():
        rat = c["ratios_vs_static"]
        cells = []
        for s in segs:
            h = c["last_half"][s]
            cells += [f"{_f(h['accept_length'])} ({_f(rat[f'{s}_last_half_accept_length'], '.3f', '×')})",
                      f"{_f(h['tokens_per_s'], '.1f')} ({_f(rat[f'{s}_last_half_tokens_per_s'], '.3f', '×')})"]
        if oracle:
            cells += [_f(c.get("gap_closed", {}).get(s), ".0%") if name != oracle else "–" for s in segs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def results_markdown(summary: dict, meta: dict) -> str:
    cfgs = summary["configs"]
    segs = list(summary["segments"])
    post_names = "+".join(segs[1:])
    lines = [f"# Workload shift: static drafter vs online adaptation ({meta.get('date', '')})", "",
             f"Command: `{meta['command']}`", "",
             "Stream: " + ", ".join(f"{s} {b['start']}–{b['stop'] - 1}" for s, b in summary["segments"].items()) + f" "
             f"({meta['stream_sources']}), greedy, max_new_tokens {meta['max_new_tokens']}, continuous batching "
             f"(batch {meta['batch']}, all queued at t=0, admitted in stream order), EAGLE chain k={meta['num_steps']}.",
             f"Machine: {meta['machine']}. Serving: {meta['serve_threads']} torch thread(s) in every configuration; "
             f"each trainer: {meta['trainer_threads']} thread(s) in its own process, "
             + ("running only while its own configuration steps (SIGSTOP/SIGCONT gating: one core serves, one trains, "
                "as if each configuration ran alone)" if meta["gate_trainers"] else "running freely")
             + (f", at niceness {meta['trainer_nice']}" if meta.get("trainer_nice", -1) >= 0 else "")
             + "; configurations interleaved step by step in one process. Clock = each configuration's own step time.",
             f"Online settings shared: `{json.dumps(meta['online_shared'])}`.", ""]
    lines += [("| configuration | tok/s all | tok/s post-shift | × static post | accept len all | accept len post-shift | "
               "× static post | " + " | ".join(f"accept {s}" for s in segs) + " | trainer CPU s | rounds dep/ref (subm.) | "
               + " | ".join(f"recover {s}" for s in segs[1:]) + " | identical |"),
              "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(segs) + "---:|---:|" + "---:|" * (len(segs) - 1)
              + "---:|"]
    for name, c in cfgs.items():
        rat = c["ratios_vs_static"]
        on = c.get("online")
        rounds = f"{on['deployed']}/{on['rejected']} ({on['rounds_submitted']})" if on else "–"
        rec = " | ".join(_rec(c["recovery"][s]["to_plateau"]) for s in segs[1:])
        lines.append(
            f"| {name} | {_f(c['tokens_per_s'], '.1f')} | {_f(c['post_shift']['tokens_per_s'], '.1f')} | "
            f"{_f(rat['post_shift_tokens_per_s'], '.3f', '×')} | {_f(c['accept_length'])} | "
            f"{_f(c['post_shift']['accept_length'])} | {_f(rat['post_shift_accept_length'], '.3f', '×')} | "
            + " | ".join(_f(c["segments"][s]["accept_length"]) for s in segs)
            + f" | {_f(on['trainer_cpu_seconds'], '.0f') if on else '–'} | {rounds} | {rec} | "
            f"{c['identical_to_static']}/{c['requests']} |")
    lines += ["", (f"Post-shift = {post_names} (stream index ≥ {summary['post_shift_start']}); its tokens/s counts every "
                   "token committed from the step that admits the first post-shift request to the end. Acceptance "
                   "length = committed tokens per verify step, pooled over the requests. Recovery: requests after the "
                   "shift (and seconds of that configuration's clock) until the moving acceptance (window "
                   f"{summary['window']}, this segment's requests only) first reaches {summary['recover_frac']:.0%} of "
                   "the segment's final plateau (mean of its last quarter)."), ""]
    lines += last_half_markdown(summary)
    lines += ["Per segment (tokens/s, × static):", "",
              ("| configuration | " + " | ".join(f"{s} tok/s" for s in segs) + " | "
               + " | ".join(f"recover {s} to {summary['recover_frac']:.0%} of {segs[0]} level" for s in segs[1:]) + " |"),
              "|---|" + "---:|" * len(segs) + "---:|" * (len(segs) - 1)]
    for name, c in cfgs.items():
        rat = c["ratios_vs_static"]
        lines.append(f"| {name} | " + " | ".join(
            f"{_f(c['segments'][s]['tokens_per_s'], '.1f')} ({_f(rat[f'{s}_tokens_per_s'], '.2f', '×')})" for s in segs)
            + " | " + " | ".join(_rec(c["recovery"][s]["to_pre_shift_level"]) for s in segs[1:]) + " |")
    lines += ["", ("Greedy identity (every output token-identical to static's): "
                   f"{'yes' if summary['greedy_identity'] else 'NO'}."), "", "![acceptance over the stream](acceptance.png)", ""]
    return "\n".join(lines)


# ---- assembling the real run ---------------------------------------------------------------------------------

def build_runs(specs: Sequence[ConfigSpec], make_engine: Callable[[str | None], Any], shared: dict[str, Any],
               handoff_root: Path, warmup: Callable[[Any], None] | None = None, log: Callable[[str], None] = print,
               trainer_nice: int | None = None) -> list[ConfigRun]:
    """An engine per configuration (``make_engine(spec.drafter)``; warmed up *before* online learning is attached,
    so warm-up is not captured), then :class:`OnlineLearning` for the online ones; waits for every trainer to finish
    starting, then gives it niceness ``trainer_nice`` (None: unchanged)."""
    from sglang_ext.online import OnlineLearning

    runs = []
    for spec in specs:
        engine = make_engine(spec.drafter)
        if warmup is not None:
            warmup(engine)
        online = None
        if spec.online:
            model = engine.drafter.model
            cfg = {**shared, **spec.overrides, "learner": spec.learner}
            online = OnlineLearning(model, engine.target.embed_tokens.weight, engine.target.lm_head.weight,
                                    handoff_dir_of(handoff_root, spec),
                                    cfg, expect_target=model.config.target)
            engine.attach_online(online.start())
        runs.append(ConfigRun(spec, engine, online, trainer_nice))
    for r in runs:
        if r.online is not None:
            r.cpu_at_start = wait_trainer_ready(r.online)
            log(f"  trainer of {r.spec.name} ready (pid {r.trainer_pid}, {r.cpu_at_start:.1f} CPU s to start"
                + (f", nice {trainer_nice})" if trainer_nice is not None else ")"))
    return runs


def handoff_dir_of(root: Path, spec: ConfigSpec) -> Path:
    return root / spec.name.replace("[", "_").replace("]", "").replace(",", "_")


def resumed_spec(spec: ConfigSpec, handoff_root: Path) -> ConfigSpec:
    """An online configuration resumes from the newest drafter it deployed (its learner's optimiser state, capture
    and replay window start empty); a static one is unchanged."""
    from sglang_ext.core.learning.handoff import latest_version, version_dir

    if not spec.online:
        return spec
    d = handoff_dir_of(handoff_root, spec)
    v = latest_version(d)
    return spec if v is None else replace(spec, drafter=str(version_dir(d, v)))


def stop_runs(runs: Sequence[ConfigRun]) -> None:
    for r in runs:
        if r.online is not None:
            try:
                os.kill(r.trainer_pid, signal.SIGCONT) if r.trainer_pid else None
            except ProcessLookupError:
                pass
            r.online.stop()


def _parser() -> argparse.ArgumentParser:
    from sglang_ext.online import ONLINE_PARAMS

    p = argparse.ArgumentParser(prog="python -m analysis.workload_shift", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--segments", default=DEFAULT_SEGMENTS, metavar="NAME=SOURCE:N,...",
                   help=f"the stream, in order (default {DEFAULT_SEGMENTS}); SOURCE: a prompt set "
                        "(`sglang-ext data list`) or a JSONL path")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, metavar="LIST",
                   help=f"configurations, static first (default {DEFAULT_CONFIGS}); learners: {', '.join(LEARNER_NAMES)}; "
                        "per-configuration overrides in brackets, e.g. adam[lr=3e-4,epochs=3]; any configuration "
                        "takes drafter=PATH (its own starting drafter) and label=NAME, e.g. "
                        "static[drafter=drafters/oracle,label=oracle]")
    p.add_argument("--seed", type=int, default=0, help="stream selection seed (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="continuous-batching slots (default 4)")
    p.add_argument("--num-steps", type=int, default=3, help="EAGLE chain draft depth (default 3 = TIDE's gamma)")
    p.add_argument("--model-path", default="smollm2-135m")
    p.add_argument("--draft-model-path", default="drafters/smollm2-135m-eagle")
    p.add_argument("--serve-threads", type=int, default=1, help="torch threads of the serving process (default 1)")
    p.add_argument("--no-gate-trainers", dest="gate_trainers", action="store_false",
                   help="let every trainer run all the time (they then share the trainer core)")
    p.add_argument("--trainer-nice", type=int, default=19, metavar="N",
                   help="niceness of the trainer processes (default 19: training takes idle CPU only, so it does not "
                        "slow serving on a shared 2-core machine; -1: leave unchanged)")
    p.add_argument("--window", type=int, default=5, help="moving-window length in requests (default 5)")
    p.add_argument("--recover-frac", type=float, default=0.9)
    p.add_argument("--out", "-o", default=None, help="output directory (default analysis/results/workload-shift-DATE)")
    p.add_argument("--rejudge", type=Path, default=None, metavar="RESULTS.json",
                   help="recompute the derived tables (last halves, gap closed) of a finished run's results.json and "
                        "rewrite its results.md; serves nothing")
    p.add_argument("--oracle-label", default="oracle", help="the configuration the gap-closed column measures against")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its journal.jsonl (same settings required): "
                        "finished requests are kept, online configurations restart from their last deployed drafter")
    g = p.add_argument_group("online learning, shared by every online configuration (defaults: ONLINE_PARAMS)")
    for prm in ONLINE_PARAMS:
        if prm.name == "learner":
            continue
        kind = {"int": int, "float": float}.get(prm.kind, str)
        extra = {"choices": list(prm.choices)} if prm.kind == "choice" else {"metavar": prm.name.upper()}
        g.add_argument("--online-" + prm.name.replace("_", "-"), dest="online_" + prm.name, type=kind, default=None,
                       help=prm.flag_help, **extra)
    return p


def rejudge(path: Path, oracle_label: str = "oracle") -> dict:
    """A finished run's ``results.json`` with its derived tables recomputed (written back beside ``results.md``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        meta = data.pop("meta")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}: not a workload-shift results.json ({e})") from None
    summary = add_last_half(data, oracle_label)
    path.write_text(json.dumps({"meta": meta, **summary}, indent=1, default=str))
    (path.parent / "results.md").write_text(results_markdown(summary, meta))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """The study; bad input (a segment, a configuration, a journal that does not match) is one line on stderr and
    exit code 2, not a traceback."""
    args = _parser().parse_args(argv)
    try:
        return _main(args, argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    if args.rejudge is not None:
        rejudge(args.rejudge, args.oracle_label)
        print((args.rejudge.parent / "results.md").read_text())
        return 0
    import torch

    from sglang_ext.online import ONLINE_PARAMS

    torch.set_num_threads(args.serve_threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    segments = parse_segments(args.segments)
    specs = parse_configs(args.configs)
    shared = {prm.name: getattr(args, "online_" + prm.name) for prm in ONLINE_PARAMS
              if getattr(args, "online_" + prm.name, None) is not None}
    date = time.strftime("%Y%m%d-%H%M%S")
    if args.resume and not args.out:
        raise ValueError("--resume needs --out DIR (the interrupted run's directory)")
    out = Path(args.out or f"analysis/results/workload-shift-{date}")
    journal_path = out / "journal.jsonl"
    if args.resume and not journal_path.is_file():
        raise ValueError(f"--resume: {journal_path} does not exist")
    if not args.resume and journal_path.is_file():
        raise ValueError(f"{journal_path} exists: pass --resume to continue that run, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    command = ".venv/bin/python -m analysis.workload_shift " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                                 else sys.argv[1:]))

    from sglang_ext.engine.engine import GenerationRequest
    from sglang_ext.engine.launch import (
        build_engine_from_parts,
        load_draft_model,
        load_target,
    )

    model, tokenizer, name, _ = load_target(args.model_path)
    stream = encode_stream(tokenizer, select_stream(load_pools(segments), segments, args.seed), args.max_prompt_tokens)
    # twice the longest request: the EAGLE drafter absorbs a newly prefilled prompt padded against the longest
    # cache in the batch (StepLayout's kv_len = max(lengths) + max(pending)), so a context of just
    # prompt + max_new_tokens can overflow its cache under continuous batching
    context = 2 * (max(len(it.ids) for it in stream) + args.max_new_tokens) + 16
    print(f"stream: {len(stream)} requests ({', '.join(f'{s.name} {s.count} from {s.source}' for s in segments)}), "
          f"prompt tokens {sum(len(i.ids) for i in stream)}; configs: {', '.join(s.name for s in specs)}", flush=True)

    def make_engine(drafter: str | None = None):
        draft = load_draft_model(drafter or args.draft_model_path, name, model.config)
        engine, _ = build_engine_from_parts(model, tokenizer, "EAGLE", num_steps=args.num_steps, topk=1,
                                            draft_model=draft, max_running_requests=args.batch,
                                            context_length=context, model_name=name)
        return engine

    def warmup(engine) -> None:
        engine.run([GenerationRequest(list(stream[0].ids), max_new_tokens=8)])
        engine.totals.update(tokens=0, draft_s=0.0, verify_s=0.0, prefill_s=0.0, steps=0)

    # online configurations publish into out/handoff (kept until the run completes: a resume starts from there)
    handoff = out / "handoff"
    header = journal_header(args, specs, shared, stream)
    previous: dict[str, list[dict]] = {}
    if args.resume:
        previous = check_resumable(Journal.read(journal_path), header, journal_path)
    start_specs = [resumed_spec(s, handoff) for s in specs] if args.resume else specs
    journal = Journal(journal_path)
    journal.write(header if not args.resume else {"t": "resume", "date": date})
    runs: list[ConfigRun] = []
    t_start = time.perf_counter()
    try:
        runs = build_runs(start_specs, make_engine, shared, handoff, warmup,
                          trainer_nice=None if args.trainer_nice < 0 else args.trainer_nice)
        for r in runs:
            if args.resume:
                r.restore(previous[r.spec.name])
                if r.engine.drafter is not None:
                    r.engine.drafter.version = r.prior_online["swaps"]
                print(f"  {r.spec.name}: resumed with {len(r.restored)} requests finished, clock {r.clock:.1f} s"
                      + (f", {r.prior_online['deployed']} rounds deployed" if r.online is not None else ""), flush=True)
            r.journal = journal
            r.submit(stream, args.max_new_tokens)
        print("serving (interleaved step by step)", flush=True)
        gate = run_interleaved(runs, gate_trainers=args.gate_trainers, log=lambda m: print(m, flush=True))
        summary = summarize(runs, stream, args.window, args.recover_frac, args.oracle_label)
    finally:
        stop_runs(runs)
        journal.close()
    shutil.rmtree(handoff, ignore_errors=True)
    wall = time.perf_counter() - t_start
    meta = {"date": date, "command": command, "max_new_tokens": args.max_new_tokens, "batch": args.batch,
            "num_steps": args.num_steps, "serve_threads": args.serve_threads,
            "trainer_threads": shared.get("trainer_threads", 1), "gate_trainers": args.gate_trainers,
            "gate_rescues": gate.rescues, "online_shared": shared, "trainer_nice": args.trainer_nice, "wall_seconds": wall, "seed": args.seed,
            "stream_sources": ", ".join(f"{s.name}: {s.source}" for s in segments),
            "stream": [{"index": it.index, "segment": it.segment, "source": it.source, "prompt_id": it.prompt_id,
                        "prompt_tokens": len(it.ids)} for it in stream],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}",
            "model": name, "drafter": args.draft_model_path, "configs": [asdict(s) for s in specs],
            "drafters": {s.name: s.drafter or args.draft_model_path for s in specs}}
    (out / "results.json").write_text(json.dumps({"meta": meta, **summary}, indent=1, default=str))
    (out / "results.md").write_text(results_markdown(summary, meta))
    plot_acceptance(summary, out / "acceptance.png",
                    title=f"{name} + EAGLE chain k={args.num_steps}, batch {args.batch}, greedy; "
                          f"{' -> '.join(s.name for s in segments)}")
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, acceptance.png ({wall:.0f} s wall)")
    if not summary["greedy_identity"]:
        bad = {n: c["not_identical"] for n, c in summary["configs"].items() if c["not_identical"]}
        print(f"GREEDY IDENTITY FAILED: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
