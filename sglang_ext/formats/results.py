"""What a simulated replay reports: per-request latencies, throughput, goodput under an SLO, time shares.

Definitions (the ones vLLM / DistServe use, so numbers compare):

- **TTFT** = time of the first output token − arrival. The first token is emitted by the iteration that finishes
  the request's prefill.
- **TPOT** = (finish − first token) / (output tokens − 1); 0 for a one-token output.
- **E2E** = finish − arrival.
- **Throughput** = output tokens / makespan, makespan = last finish − first arrival (of the finished requests).
- **Goodput** = requests meeting *both* SLOs (TTFT ≤ ``slo_ttft_s`` and TPOT ≤ ``slo_tpot_s``) / makespan;
  ``slo_attainment`` is their fraction.
- **Mean acceptance length** = 1 + accepted draft tokens / speculative verify steps (vLLM's AL: tokens per
  speculative step, bonus included).
- **Time shares**: seconds spent in prefill / drafting / verifying / training / fixed overhead, over the replicas'
  total busy time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: per-request columns of a result (all the same length, one entry per finished request, in finish order)
REQUEST_COLUMNS = ("index", "replica", "arrival", "first_token", "finish", "prompt_tokens", "output_tokens",
                   "preemptions", "spec_steps", "accepted")
LATENCY_COLUMNS = ("ttft", "tpot", "e2e")
PERCENTILES = (50, 90, 99)
TIME_PARTS = ("prefill", "draft", "verify", "train", "overhead")


def _pct(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {f"p{p}": math.nan for p in PERCENTILES} | {"mean": math.nan}
    vals = np.percentile(x, PERCENTILES)
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, vals)} | {"mean": float(x.mean())}


def latencies(req: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """TTFT, TPOT and E2E per request (seconds) from the request columns."""
    arrival, first, finish = req["arrival"], req["first_token"], req["finish"]
    out = req["output_tokens"]
    tpot = np.where(out > 1, (finish - first) / np.maximum(out - 1, 1), 0.0)
    return {"ttft": first - arrival, "tpot": tpot, "e2e": finish - arrival}


def summarize(req: dict[str, np.ndarray], busy: dict[str, float], *, iterations: int, slo_ttft_s: float,
              slo_tpot_s: float, unfinished: int = 0, train_rounds: int = 0, rejected: int = 0,
              beyond_profile: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary numbers of one run (module docstring has the definitions)."""
    n = len(req["arrival"])
    lat = latencies(req) if n else {"ttft": np.zeros(0), "tpot": np.zeros(0), "e2e": np.zeros(0)}
    makespan = float(req["finish"].max() - req["arrival"].min()) if n else 0.0
    out_tokens = int(req["output_tokens"].sum()) if n else 0
    ok = (lat["ttft"] <= slo_ttft_s) & (lat["tpot"] <= slo_tpot_s)
    spec_steps = int(req["spec_steps"].sum()) if n else 0
    accepted = int(req["accepted"].sum()) if n else 0
    total_busy = sum(busy.values())
    return {
        "requests": n,
        "unfinished": unfinished,
        "rejected": rejected,
        "output_tokens": out_tokens,
        "makespan_s": makespan,
        "throughput_tok_s": out_tokens / makespan if makespan > 0 else 0.0,
        "request_rate": n / makespan if makespan > 0 else 0.0,
        "goodput_req_s": int(ok.sum()) / makespan if makespan > 0 else 0.0,
        "slo_attainment": float(ok.mean()) if n else 0.0,
        "slo_ttft_s": slo_ttft_s,
        "slo_tpot_s": slo_tpot_s,
        "ttft_s": _pct(lat["ttft"]),
        "tpot_s": _pct(lat["tpot"]),
        "e2e_s": _pct(lat["e2e"]),
        "mean_acceptance_length": 1.0 + accepted / spec_steps if spec_steps else 1.0,
        "spec_steps": spec_steps,
        "accepted_tokens": accepted,
        "preemptions": int(req["preemptions"].sum()) if n else 0,
        "iterations": iterations,
        "busy_s": {k: float(busy.get(k, 0.0)) for k in TIME_PARTS},
        "time_share": {k: (float(busy.get(k, 0.0)) / total_busy if total_busy > 0 else 0.0) for k in TIME_PARTS},
        "train_rounds": train_rounds,
        "beyond_profile": dict(beyond_profile or {}),  # cost lookups beyond the profile's range (simulator.ranges)
    }


@dataclass
class SimResult:
    """One replay: ``summary`` numbers, per-request ``requests`` columns, ``perf`` of the simulator itself (wall
    time, events, events/s, × real time — not part of the simulated outcome, so left out of :meth:`outcome`),
    the ``config`` that produced it, and whether it ran to the end (``complete``; ``error`` says why not)."""

    summary: dict[str, Any]
    requests: dict[str, np.ndarray]
    perf: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    complete: bool = True
    error: str | None = None
    steps: dict[str, list] | None = None
    rejected: list[dict[str, Any]] = field(default_factory=list)  # requests that could never be served, and why

    def latencies(self) -> dict[str, np.ndarray]:
        return latencies(self.requests)

    def outcome(self) -> dict[str, Any]:
        """Everything simulated (summary and per-request columns), nothing about how fast it was simulated:
        two runs with the same seed have equal outcomes."""
        return {"summary": self.summary, "requests": {k: v.tolist() for k, v in self.requests.items()},
                "complete": self.complete, "error": self.error}

    def to_json(self, per_request: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "sglang-ext.sim-result", "version": 1, "complete": self.complete,
                               "error": self.error, "config": self.config, "summary": self.summary,
                               "perf": self.perf}
        if per_request:
            out["requests"] = {k: v.tolist() for k, v in self.requests.items()}
        if self.steps is not None:
            out["steps"] = self.steps
        if self.rejected:
            out["rejected"] = self.rejected
        return out

    def save(self, path: str | Path, per_request: bool = True) -> Path:
        """Write :meth:`to_json`: indented, except the per-request columns, one compact line each.

        Why: at tens of thousands of requests, indenting every number made writing the file a visible part of a
        whole ``sim replay`` (the indenting encoder is pure Python); the content is the same JSON.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_finite(self.to_json(per_request=False)), indent=1)  # a non-empty object: ends "\n}"
        if per_request:
            cols = ",\n".join(f"  {json.dumps(k)}: {json.dumps(_finite_column(v), separators=(',', ':'))}"
                                for k, v in self.requests.items())
            text = text[:-2] + ',\n "requests": {\n' + cols + "\n }\n}"
        path.write_text(text + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SimResult:
        reqs = {k: np.asarray(v) for k, v in obj.get("requests", {}).items()}
        return cls(obj["summary"], reqs, obj.get("perf", {}), obj.get("config", {}), obj.get("complete", True),
                   obj.get("error"), obj.get("steps"), obj.get("rejected", []))

    @classmethod
    def load(cls, path: str | Path) -> SimResult:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def _finite_column(v: np.ndarray) -> list:
    """A per-request column as a JSON-ready list: NaN and inf as None (the same as :func:`_finite`, per array)."""
    v = np.asarray(v)
    if v.dtype.kind != "f":
        return v.tolist()
    bad = ~np.isfinite(v)
    if not bad.any():
        return v.tolist()
    obj = v.astype(object)
    obj[bad] = None
    return obj.tolist()


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


_CSV_BLOCK = 8192  # rows formatted together by write_requests_csv (bounded memory for a million-request result)


def write_requests_csv(result: SimResult, path: str | Path) -> Path:
    """Per-request columns plus TTFT/TPOT/E2E as CSV."""
    path = Path(path)
    cols = dict(result.requests) | result.latencies() if len(result.requests.get("arrival", ())) else {}
    names = list(cols) or [*REQUEST_COLUMNS, *LATENCY_COLUMNS]  # the same 13 columns with no rows
    with open(path, "w", encoding="utf-8") as f:
        f.write(",".join(names) + "\n")
        if cols:  # a block of rows at a time, each column formatted at once (floats by repr: round-trip exact)
            arrays = [cols[n] for n in names]
            fmts = [repr if a.dtype.kind == "f" else str for a in arrays]
            for lo in range(0, len(arrays[0]), _CSV_BLOCK):
                text = [list(map(fmt, a[lo:lo + _CSV_BLOCK].tolist())) for fmt, a in zip(fmts, arrays)]
                f.writelines(",".join(row) + "\n" for row in zip(*text))
    return path


def print_result(result: SimResult, console: Any = None, title: str = "simulated replay") -> None:
    """A rich table of the summary and the simulator's own speed."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s = result.summary
    t = Table(title=title + ("" if result.complete else " [red](partial)[/red]"), show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("requests finished", f"{s['requests']}" + (f" (+{s['unfinished']} unfinished)" if s["unfinished"] else ""))
    t.add_row("output tokens", f"{s['output_tokens']}")
    t.add_row("makespan", f"{s['makespan_s']:.2f} s")
    t.add_row("throughput", f"{s['throughput_tok_s']:.1f} tok/s")
    t.add_row("goodput", f"{s['goodput_req_s']:.3f} req/s ({100 * s['slo_attainment']:.1f}% meet TTFT≤"
              f"{s['slo_ttft_s']:g}s, TPOT≤{s['slo_tpot_s']:g}s)")
    for name, key in (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("E2E", "e2e_s")):
        d = s[key]
        t.add_row(f"{name} p50/p90/p99", " / ".join(_ms(d[f'p{p}']) for p in PERCENTILES))
    t.add_row("mean acceptance length", f"{s['mean_acceptance_length']:.3f}")
    t.add_row("preemptions", f"{s['preemptions']}")
    share = s["time_share"]
    t.add_row("time share", "  ".join(f"{k} {100 * share[k]:.1f}%" for k in TIME_PARTS if share[k] > 0) or "-")
    if s.get("train_rounds"):
        t.add_row("training rounds", f"{s['train_rounds']}")
    t.add_row("iterations", f"{s['iterations']}")
    if s.get("rejected"):
        reasons = sorted({r["reason"].split(">")[-1].strip() for r in result.rejected})
        t.add_row("[yellow]rejected[/yellow]", f"{s['rejected']} request(s) that can never fit ({'; '.join(reasons)})")
    for name, b in (s.get("beyond_profile") or {}).items():
        t.add_row("[yellow]beyond the profile[/yellow]", f"{name}: {b['lookups']} lookup(s) up to {b['largest']:g} "
                  f"(measured up to {b['measured_max']:g}; --strict-profile makes this an error)")
    p = result.perf
    if p:
        t.add_row("simulator", f"{p.get('events', 0)} events in {p.get('wall_s', 0):.3f} s = "
                  f"{p.get('events_per_s', 0):,.0f} events/s, {p.get('realtime_factor', 0):,.0f}× real time")
    if result.error:
        t.add_row("[red]stopped by[/red]", result.error)
    console.print(t)


def _ms(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{1000 * x:.1f} ms" if x < 10 else f"{x:.2f} s"
