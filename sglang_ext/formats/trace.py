"""The project's workload trace: one JSON request per line, read strictly, written canonically.

A trace is what the simulator replays: when each request arrives, how long its prompt and its output are, and,
optionally, its workload category and the acceptance the engine recorded for it. Format (``traces/README.md``)::

    {"trace": {"name": "tiny_chat", "source": "...", "licence": "...", "time_unit": "s"}}   <- optional header
    {"arrival": 0.0, "prompt_tokens": 812, "output_tokens": 97, "category": "chat"}
    {"arrival": 0.4, "prompt_tokens": 130, "output_tokens": 12, "acceptance": [3, 0, 2, 3], "id": "r1"}

``acceptance[i]`` is the number of draft tokens accepted at verify step ``i`` of that request, exactly what the
engine records (``StepStats.accepted_per_request``). Arrivals are seconds, non-decreasing. The reader is strict on
purpose: a trace that silently drops or reorders requests makes every simulated number wrong, so a bad line is an
error that names ``file:line`` and the field, unless the caller asks to skip bad lines and look at what was skipped.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

OnError = Literal["raise", "skip"]

REQUIRED_FIELDS = ("arrival", "prompt_tokens", "output_tokens")
OPTIONAL_FIELDS = ("category", "acceptance", "id")
KNOWN_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
HEADER_KEY = "trace"


class TraceError(ValueError):
    """A malformed trace line or row; ``str()`` reads ``file:line: message`` so it can be pasted into an editor."""

    def __init__(self, path: str | Path, line: int | None, message: str, field: str | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Request:
    """One request of a trace. ``acceptance`` is per verify step, as the engine records it (None: not recorded)."""

    arrival: float
    prompt_tokens: int
    output_tokens: int
    category: str | None = None
    acceptance: tuple[int, ...] | None = None
    id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this request; optional fields are left out when unset, to keep files small."""
        out: dict[str, Any] = {"arrival": self.arrival, "prompt_tokens": self.prompt_tokens,
                               "output_tokens": self.output_tokens}
        if self.category is not None:
            out["category"] = self.category
        if self.acceptance is not None:
            out["acceptance"] = list(self.acceptance)
        if self.id is not None:
            out["id"] = self.id
        return out


@dataclass(frozen=True)
class TraceMeta:
    """The optional header: where a trace came from and under which licence it may be used."""

    name: str = ""
    source: str = ""
    licence: str = ""
    time_unit: str = "s"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "licence": self.licence, "time_unit": self.time_unit,
                **self.extra}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TraceMeta:
        known = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: obj[k] for k in known if k in obj}
        return cls(**kw, extra={k: v for k, v in obj.items() if k not in known})


@dataclass(frozen=True)
class LengthStats:
    mean: float
    p50: float
    p90: float
    p99: float
    max: int


@dataclass(frozen=True)
class TraceStats:
    """Summary numbers of a trace (what `sglang-ext trace stats` prints)."""

    num_requests: int
    duration_s: float
    rate: float  # requests per second = 1 / mean inter-arrival time
    interarrival_cv: float  # std / mean of inter-arrival times: 1 for Poisson, > 1 bursty
    prompt: LengthStats
    output: LengthStats
    categories: dict[str, int]
    with_acceptance: int

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _length_stats(x: np.ndarray) -> LengthStats:
    if len(x) == 0:
        return LengthStats(0.0, 0.0, 0.0, 0.0, 0)
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return LengthStats(float(x.mean()), float(p50), float(p90), float(p99), int(x.max()))


def interarrival_cv(arrivals: np.ndarray) -> float:
    """Coefficient of variation of inter-arrival gaps (NaN with fewer than 3 requests or zero mean gap)."""
    gaps = np.diff(np.asarray(arrivals, dtype=float))
    if len(gaps) < 2 or gaps.mean() <= 0:
        return math.nan
    return float(gaps.std(ddof=1) / gaps.mean())


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order plus the header. Construction checks the order; use :meth:`from_unsorted` to sort.

    ``skipped`` holds the errors of lines the reader skipped (``on_error="skip"``); it is never written out.
    """

    requests: tuple[Request, ...]
    meta: TraceMeta = field(default_factory=TraceMeta)
    skipped: tuple[TraceError, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "requests", tuple(self.requests))
        prev = -math.inf
        for i, r in enumerate(self.requests):
            if r.arrival < prev:
                raise TraceError(self.meta.name or "<trace>", None,
                                 f"request {i}: arrival={r.arrival} is before the previous arrival {prev} "
                                 "(arrivals must be non-decreasing; build with Trace.from_unsorted)", "arrival")
            prev = r.arrival

    @classmethod
    def from_unsorted(cls, requests: Iterable[Request], meta: TraceMeta | None = None) -> Trace:
        """Stable-sort by arrival (ties keep file order), as importers of raw traces need."""
        return cls(tuple(sorted(requests, key=lambda r: r.arrival)), meta or TraceMeta())

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self.requests)

    def __getitem__(self, i: int) -> Request:
        return self.requests[i]

    # ---- arrays -------------------------------------------------------------------------------------------
    @property
    def arrivals(self) -> np.ndarray:
        return np.fromiter((r.arrival for r in self.requests), dtype=float, count=len(self.requests))

    @property
    def prompt_tokens(self) -> np.ndarray:
        return np.fromiter((r.prompt_tokens for r in self.requests), dtype=np.int64, count=len(self.requests))

    @property
    def output_tokens(self) -> np.ndarray:
        return np.fromiter((r.output_tokens for r in self.requests), dtype=np.int64, count=len(self.requests))

    @property
    def duration(self) -> float:
        """Seconds from the first to the last arrival."""
        return self.requests[-1].arrival - self.requests[0].arrival if self.requests else 0.0

    # ---- views for replay ---------------------------------------------------------------------------------
    def scaled(self, time_factor: float) -> Trace:
        """Arrivals multiplied by ``time_factor``: 0.5 replays twice as fast (double the rate), 2 half as fast."""
        if not (time_factor > 0 and math.isfinite(time_factor)):
            raise ValueError(f"time_factor={time_factor} must be a finite number > 0")
        reqs = tuple(replace(r, arrival=r.arrival * time_factor) for r in self.requests)
        return replace(self, requests=reqs, skipped=())

    def head(self, n: int) -> Trace:
        """The first ``n`` requests."""
        return replace(self, requests=self.requests[:max(n, 0)], skipped=())

    def window(self, t0: float, t1: float, rebase: bool = True) -> Trace:
        """Requests with ``t0 <= arrival < t1``; with ``rebase`` their arrivals are shifted so ``t0`` becomes 0."""
        shift = t0 if rebase else 0.0
        reqs = tuple(replace(r, arrival=r.arrival - shift) for r in self.requests if t0 <= r.arrival < t1)
        return replace(self, requests=reqs, skipped=())

    def then(self, other: Trace, gap: float = 0.0) -> Trace:
        """This trace followed by ``other``, whose first request arrives ``gap`` s after this trace's last one.

        Builds workload shifts (chat, then code, then math) out of stationary pieces.
        """
        if not other.requests:
            return replace(self, skipped=())
        start = (self.requests[-1].arrival + gap if self.requests else 0.0) - other.requests[0].arrival
        moved = tuple(replace(r, arrival=round(r.arrival + start, 6)) for r in other.requests)
        return replace(self, requests=self.requests + moved, skipped=())

    # ---- summary ------------------------------------------------------------------------------------------
    def stats(self) -> TraceStats:
        arr = self.arrivals
        gaps = np.diff(arr)
        rate = float(1.0 / gaps.mean()) if len(gaps) and gaps.mean() > 0 else math.nan
        cats = Counter(r.category for r in self.requests if r.category is not None)
        return TraceStats(
            num_requests=len(self.requests),
            duration_s=self.duration,
            rate=rate,
            interarrival_cv=interarrival_cv(arr),
            prompt=_length_stats(self.prompt_tokens),
            output=_length_stats(self.output_tokens),
            categories=dict(sorted(cats.items())),
            with_acceptance=sum(r.acceptance is not None for r in self.requests),
        )


# ---- reading ------------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_request(obj: Any, path: str | Path, line: int) -> Request:
    """Validate one decoded JSON line; raises :class:`TraceError` naming the first bad field."""

    def bad(name: str, why: str) -> TraceError:
        return TraceError(path, line, f"{name}={obj.get(name)!r} {why}", name)

    if not isinstance(obj, dict):
        raise TraceError(path, line, f"expected a JSON object, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in KNOWN_FIELDS]
    if unknown:
        raise TraceError(path, line, f"unknown field {unknown[0]!r} (known: {', '.join(KNOWN_FIELDS)})", unknown[0])
    for name in REQUIRED_FIELDS:
        if name not in obj:
            raise TraceError(path, line, f"missing required field {name!r}", name)
    arrival = obj["arrival"]
    if not (isinstance(arrival, (int, float)) and not isinstance(arrival, bool)
            and math.isfinite(arrival) and arrival >= 0):
        raise bad("arrival", "must be a finite number >= 0 (seconds)")
    for name in ("prompt_tokens", "output_tokens"):
        if not (_is_int(obj[name]) and obj[name] > 0):
            raise bad(name, "must be a positive int")
    category = obj.get("category")
    if category is not None and not isinstance(category, str):
        raise bad("category", "must be a string or null")
    acceptance = obj.get("acceptance")
    if acceptance is not None:
        if not isinstance(acceptance, list) or not all(_is_int(a) and a >= 0 for a in acceptance):
            raise bad("acceptance", "must be a list of ints >= 0 (accepted draft tokens per verify step) or null")
        acceptance = tuple(acceptance)
    rid = obj.get("id")
    if rid is not None and not isinstance(rid, str):
        raise bad("id", "must be a string or null")
    return Request(float(arrival), obj["prompt_tokens"], obj["output_tokens"], category, acceptance, rid)


def _open_text(path: Path, mode: str) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8")  # type: ignore[return-value]
    return open(path, mode, encoding="utf-8")


def numbered_lines(path: Path) -> Iterator[tuple[int, str | TraceError]]:
    """``(line number, text)`` of a UTF-8 text file (``.gz`` too), decoded line by line: a line that is not UTF-8
    comes as a :class:`TraceError` naming its line instead of its text (the caller raises or skips it), so the
    good lines around it are still read."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield lineno, TraceError(path, lineno, f"not UTF-8 text (byte {e.start} of the line: {e.reason})")


class TraceReader:
    """One pass over a JSONL trace (``.gz`` too), a request at a time: :func:`read_trace` collects it, replays
    stream it (:func:`stream_trace`). After the pass, ``meta`` holds the header and ``skipped`` the bad lines
    (``on_error="skip"``); with ``"raise"`` a bad line raises :class:`TraceError` naming ``file:line`` when it is
    reached, after the earlier requests were yielded.

    An arrival earlier than the previous kept one is an error here (the format is in arrival order); importers of
    raw traces sort instead.
    """

    def __init__(self, path: str | Path, on_error: OnError = "raise") -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r} must be 'raise' or 'skip'")
        self.path = Path(path)
        self.on_error = on_error
        self.meta = TraceMeta(name=self.path.name.split(".")[0])
        self.skipped: list[TraceError] = []

    def __iter__(self) -> Iterator[Request]:
        path = self.path
        seen_content = False
        prev = -math.inf
        for lineno, text in numbered_lines(path):
            if isinstance(text, str) and not text.strip():
                continue
            try:
                if isinstance(text, TraceError):  # a line that is not UTF-8
                    raise text
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise TraceError(path, lineno, f"not valid JSON (column {e.colno}: {e.msg})") from None
                if isinstance(obj, dict) and HEADER_KEY in obj:
                    if seen_content:
                        raise TraceError(path, lineno, "a trace header is allowed only on the first line",
                                         HEADER_KEY)
                    seen_content = True
                    self.meta = self._header(obj, lineno)
                    continue
                seen_content = True
                req = parse_request(obj, path, lineno)
                if req.arrival < prev:
                    raise TraceError(path, lineno, f"arrival={req.arrival} is before the previous arrival {prev} "
                                     "(arrivals must be non-decreasing: sort the file, or import it)", "arrival")
            except TraceError as e:
                if self.on_error == "raise":
                    raise
                self.skipped.append(e)
                continue
            prev = req.arrival
            yield req

    def _header(self, obj: dict, lineno: int) -> TraceMeta:
        head = obj[HEADER_KEY]
        if not isinstance(head, dict) or len(obj) != 1:
            raise TraceError(self.path, lineno, 'header must be {"trace": {...}} and nothing else', HEADER_KEY)
        if head.get("time_unit", "s") != "s":
            raise TraceError(self.path, lineno, f"time_unit={head.get('time_unit')!r} is not supported "
                             "(arrivals are seconds: 's')", "time_unit")
        return TraceMeta.from_json(head)


def read_trace(path: str | Path, on_error: OnError = "raise") -> Trace:
    """Read a JSONL trace (``.gz`` too). ``on_error="skip"`` keeps the good lines; the bad ones are in ``.skipped``."""
    reader = TraceReader(path, on_error)
    requests = tuple(reader)
    return Trace(requests, reader.meta, tuple(reader.skipped))


def stream_trace(path: str | Path, time_scale: float = 1.0, head: int | None = None) -> Iterator[Request]:
    """The requests of a JSONL trace one line at a time (strict: a bad line raises :class:`TraceError` naming
    ``file:line`` when it is reached, after the earlier requests were yielded), arrivals multiplied by
    ``time_scale``, the first ``head`` only. What a replay consumes, so a bad line late in a long trace loses
    nothing already simulated or served."""
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise ValueError(f"--time-scale={time_scale} must be a finite number > 0")
    reader = TraceReader(path)
    reader.path.open("rb").close()  # a missing or unreadable file fails here, naming it, before anything runs
    return _stream(reader, time_scale, head)


def _stream(reader: TraceReader, time_scale: float, head: int | None) -> Iterator[Request]:
    for n, req in enumerate(reader):
        if head is not None and n >= head:
            return
        yield req if time_scale == 1.0 else replace(req, arrival=req.arrival * time_scale)


def iter_json_lines(trace: Trace, header: bool = True) -> Iterator[str]:
    """The lines of :func:`write_trace`, for streaming elsewhere."""
    if header:
        yield json.dumps({HEADER_KEY: trace.meta.to_json()}, ensure_ascii=False)
    for r in trace.requests:
        yield json.dumps(r.to_json(), ensure_ascii=False, separators=(", ", ": "))


def write_trace(path: str | Path, trace: Trace, header: bool = True) -> Path:
    """Write ``trace`` as JSONL (gzip if the name ends in ``.gz``); floats are written exactly (``repr``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open_text(path, "w") as f:
        for text in iter_json_lines(trace, header):
            f.write(text + "\n")
    return path
