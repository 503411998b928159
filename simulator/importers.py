"""Importers from public trace formats into :class:`~sglang_ext.formats.trace.Trace` (arrivals in s from the first request).

| format     | file                                   | columns used                                                    |
|------------|----------------------------------------|-----------------------------------------------------------------|
| ``azure``  | Azure LLM inference 2023/2024 CSV      | ``TIMESTAMP`` (datetime), ``ContextTokens``, ``GeneratedTokens`` |
| ``vidur``  | Vidur ``trace_replay`` CSV             | ``arrived_at`` (s), ``num_prefill_tokens``, ``num_decode_tokens`` |
| ``mooncake`` | Mooncake FAST'25 JSONL               | ``timestamp`` (ms), ``input_length``, ``output_length``         |
| ``burstgpt`` | BurstGPT CSV (v1 or v2)              | ``Timestamp`` (s), ``Request tokens``, ``Response tokens``      |

Choices, each forced by the data:

- Rows are stable-sorted by arrival, then shifted so the first arrival is 0 (raw traces are not guaranteed sorted).
- Mooncake timestamps are quantised to 3 s bins (~10 requests share one value). Replaying them as-is would send each
  bin as one burst, so every request gets a seeded uniform offset in ``[0, jitter_s)`` inside its bin
  (``jitter_s=0`` keeps the bins). The same seed gives the same trace.
- BurstGPT logs failed requests with ``Response tokens == 0``; those rows are dropped (counted in the header's
  ``dropped_failed``), as BurstGPT's own ``BurstGPT_without_fails`` files do.
- Any other malformed row (missing column, non-integer or non-positive token count, bad timestamp) raises
  :class:`TraceError` naming ``file:line`` and the column, unless ``on_error="skip"``.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from sglang_ext.formats.trace import OnError, Request, Trace, TraceError, TraceMeta, numbered_lines

_TS = re.compile(r"^\s*(\d{4}-\d{2}-\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?\s*(Z|[+-]\d{2}:?\d{2})?\s*$")


def parse_datetime_seconds(text: str) -> float:
    """Seconds since the epoch of an Azure timestamp such as ``2023-11-16 18:17:03.9799600`` or ``...+00:00``.

    Azure writes 7 fractional digits, which :func:`datetime.fromisoformat` does not take on every Python version,
    so the fraction is parsed apart. Naive timestamps are taken as UTC (only differences matter).
    """
    m = _TS.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a datetime like 2023-11-16 18:17:03.9799600")
    date, hh, mm, ss, frac, tz = m.groups()
    dt = datetime.fromisoformat(f"{date}T{hh}:{mm}:{ss}").replace(tzinfo=timezone.utc)
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        dt -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return dt.timestamp() + (float("0." + frac) if frac else 0.0)


def _to_int(value: Any) -> int:
    """An integer token count from ``"12"``, ``"12.0"`` or ``12`` (Vidur writes floats); anything else raises."""
    if isinstance(value, bool):
        raise TypeError("a bool is not a token count")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        return int(value)
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        f = float(text)
        if not f.is_integer():
            raise
        return int(f)


class _Rows:
    """Shared row handling: field conversion with file:line errors, skip-or-raise, sort and rebase."""

    def __init__(self, path: Path, on_error: OnError) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r} must be 'raise' or 'skip'")
        self.path, self.on_error = path, on_error
        self.raw: list[tuple[float, int, int]] = []
        self.skipped: list[TraceError] = []

    def error(self, line: int, message: str, column: str | None = None) -> None:
        err = TraceError(self.path, line, message, column)
        if self.on_error == "raise":
            raise err
        self.skipped.append(err)

    def positive_int(self, row: dict, column: str, line: int, allow_zero: bool = False) -> int:
        value = row.get(column)
        try:
            n = _to_int(value)
        except (TypeError, ValueError):
            raise TraceError(self.path, line, f"{column}={value!r} must be an int", column) from None
        if n < 0 or (n == 0 and not allow_zero):
            raise TraceError(self.path, line, f"{column}={value!r} must be a positive int", column)
        return n

    def seconds(self, row: dict, column: str, line: int, scale: float = 1.0) -> float:
        value = row.get(column)
        try:
            t = float(value) * scale  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise TraceError(self.path, line, f"{column}={value!r} must be a number", column) from None
        if not math.isfinite(t):
            raise TraceError(self.path, line, f"{column}={value!r} must be finite", column)
        return t

    def trace(self, meta: TraceMeta, category: str | None, jitter: np.ndarray | None = None) -> Trace:
        """Sort by time, shift the first arrival to 0, add ``jitter`` (per raw row) and round to microseconds."""
        if not self.raw:
            return Trace((), meta, tuple(self.skipped))
        t = np.array([r[0] for r in self.raw], dtype=float)
        t -= t.min()
        if jitter is not None:
            t += jitter
        order = np.argsort(t, kind="stable")
        t0 = t[order[0]]
        reqs = [Request(round(float(t[i] - t0), 6), self.raw[i][1], self.raw[i][2], category) for i in order]
        return Trace(tuple(reqs), meta, tuple(self.skipped))


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(line number, row) pairs; checks the header names the required columns (exact spelling)."""
    def texts() -> Iterator[str]:
        for _, text in numbered_lines(path):
            if isinstance(text, TraceError):  # not UTF-8: named by line (a CSV row cannot be skipped safely)
                raise text
            yield text

    reader = csv.DictReader(texts())
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise TraceError(path, 1, f"missing column(s) {', '.join(map(repr, missing))}; header is {header}",
                         missing[0])
    reader.fieldnames = header
    for row in reader:
        yield reader.line_num, row


def _meta(path: Path, fmt: str, licence: str, **extra: Any) -> TraceMeta:
    return TraceMeta(name=path.name.split(".")[0], source=f"{fmt} import of {path.name}", licence=licence, extra=extra)


def _check_row(row: dict, line: int, path: Path) -> None:
    if None in row:
        raise TraceError(path, line, f"more values than columns: extra {row[None]!r}")
    empty = [k for k, v in row.items() if v is None]
    if empty:
        raise TraceError(path, line, f"row ends early: no value for {empty[0]!r}", empty[0])


def import_azure(path: str | Path, *, category: str | None = None, on_error: OnError = "raise",
                 licence: str = "CC-BY-4.0 (Azure/AzurePublicDataset; cite Patel et al., Splitwise, ISCA 2024)") -> Trace:
    """Azure LLM inference trace CSV: ``TIMESTAMP,ContextTokens,GeneratedTokens`` (timestamps to 0.1 us)."""
    path = Path(path)
    rows = _Rows(path, on_error)
    for line, row in _csv_rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
        try:
            _check_row(row, line, path)
            try:
                t = parse_datetime_seconds(row["TIMESTAMP"])
            except ValueError as e:
                raise TraceError(path, line, f"TIMESTAMP: {e}", "TIMESTAMP") from None
            rows.raw.append((t, rows.positive_int(row, "ContextTokens", line),
                             rows.positive_int(row, "GeneratedTokens", line)))
        except TraceError as e:
            rows.error(e.line or line, e.message, e.field)
    return rows.trace(_meta(path, "azure", licence), category)


def import_vidur(path: str | Path, *, category: str | None = None, on_error: OnError = "raise",
                 licence: str = "") -> Trace:
    """Vidur ``trace_replay`` CSV: ``arrived_at`` (s), ``num_prefill_tokens``, ``num_decode_tokens``; extra columns
    are ignored. Length-only Vidur files (no ``arrived_at``) are refused: fit them and generate arrivals instead."""
    path = Path(path)
    rows = _Rows(path, on_error)
    for line, row in _csv_rows(path, ("arrived_at", "num_prefill_tokens", "num_decode_tokens")):
        try:
            _check_row(row, line, path)
            t = rows.seconds(row, "arrived_at", line)
            if t < 0:
                raise TraceError(path, line, f"arrived_at={row['arrived_at']!r} must be >= 0", "arrived_at")
            rows.raw.append((t, rows.positive_int(row, "num_prefill_tokens", line),
                             rows.positive_int(row, "num_decode_tokens", line)))
        except TraceError as e:
            rows.error(e.line or line, e.message, e.field)
    return rows.trace(_meta(path, "vidur", licence), category)


MOONCAKE_BIN_S = 3.0


def import_mooncake(path: str | Path, *, category: str | None = None, on_error: OnError = "raise",
                    jitter_s: float = MOONCAKE_BIN_S, seed: int = 0,
                    licence: str = "Apache-2.0 (kvcache-ai/Mooncake)") -> Trace:
    """Mooncake JSONL: ``timestamp`` (ms), ``input_length``, ``output_length`` (``hash_ids`` ignored).

    Each arrival gets a seeded uniform offset in ``[0, jitter_s)``: the published timestamps are 3 s bins.
    """
    if not (jitter_s >= 0 and math.isfinite(jitter_s)):
        raise ValueError(f"jitter_s={jitter_s} must be a finite number >= 0")
    path = Path(path)
    rows = _Rows(path, on_error)
    for line, text in numbered_lines(path):
        if isinstance(text, str) and not text.strip():
            continue
        try:
            if isinstance(text, TraceError):
                raise text
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise TraceError(path, line, f"not valid JSON (column {e.colno}: {e.msg})") from None
            if not isinstance(row, dict):
                raise TraceError(path, line, f"expected a JSON object, got {type(row).__name__}")
            for col in ("timestamp", "input_length", "output_length"):
                if col not in row:
                    raise TraceError(path, line, f"missing field {col!r}", col)
            t = rows.seconds(row, "timestamp", line, scale=1e-3)
            rows.raw.append((t, rows.positive_int(row, "input_length", line),
                             rows.positive_int(row, "output_length", line)))
        except TraceError as e:
            rows.error(e.line or line, e.message, e.field)
    # only binned timestamps are spread over their bin: a trace whose arrivals are not all on bin boundaries (Mooncake's
    # own synthetic traces) keeps them as they are
    binned = bool(rows.raw) and jitter_s > 0 and all(
        abs(t / jitter_s - round(t / jitter_s)) < 1e-9 for t, _, _ in rows.raw)
    jitter = np.random.default_rng(seed).uniform(0.0, jitter_s, size=len(rows.raw)) if binned else None
    meta = _meta(path, "mooncake", licence, jitter_s=jitter_s if binned else 0.0, jitter_seed=seed,
                 binned=binned)
    return rows.trace(meta, category, jitter)


BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")


def import_burstgpt(path: str | Path, *, category: str | None = None, on_error: OnError = "raise",
                    licence: str = "CC-BY-4.0 (HPMLL/BurstGPT)") -> Trace:
    """BurstGPT CSV (v1 with ``Session ID``/``Elapsed time``, or v2 without): ``Timestamp`` (s), ``Request tokens``,
    ``Response tokens``. Failed requests (``Response tokens`` = 0) are dropped and counted."""
    path = Path(path)
    rows = _Rows(path, on_error)
    dropped = 0
    for line, row in _csv_rows(path, BURSTGPT_COLUMNS):
        try:
            _check_row(row, line, path)
            t = rows.seconds(row, "Timestamp", line)
            response = rows.positive_int(row, "Response tokens", line, allow_zero=True)
            if response == 0:  # a failed request: nothing was generated, so nothing to replay
                dropped += 1
                continue
            rows.raw.append((t, rows.positive_int(row, "Request tokens", line), response))
        except TraceError as e:
            rows.error(e.line or line, e.message, e.field)
    return rows.trace(_meta(path, "burstgpt", licence, dropped_failed=dropped), category)


IMPORTERS: dict[str, Callable[..., Trace]] = {
    "azure": import_azure,
    "vidur": import_vidur,
    "mooncake": import_mooncake,
    "burstgpt": import_burstgpt,
}


def import_trace(fmt: str, path: str | Path, **kwargs: Any) -> Trace:
    """Dispatch on ``fmt`` (one of :data:`IMPORTERS`, or ``jsonl`` for the project's own format)."""
    if fmt == "jsonl":
        from sglang_ext.formats.trace import read_trace

        return read_trace(path, on_error=kwargs.get("on_error", "raise"))
    try:
        importer = IMPORTERS[fmt]
    except KeyError:
        raise ValueError(f"unknown trace format {fmt!r}; known: jsonl, {', '.join(IMPORTERS)}") from None
    return importer(path, **kwargs)
