"""`sglang-ext trace ...`: import public traces, fit them, generate synthetic ones, print their statistics."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

FORMATS = ("jsonl", "azure", "vidur", "mooncake", "burstgpt")


def register(sub) -> None:
    """Add the ``trace`` subcommand group to an argparse subparsers object."""
    p = sub.add_parser("trace", help="workload traces: import, fit, generate, stats (format: traces/README.md)")
    tsub = p.add_subparsers(dest="trace_cmd", required=True)

    imp = tsub.add_parser("import", help="convert a public trace (azure, vidur, mooncake, burstgpt) to JSONL")
    imp.add_argument("format", choices=FORMATS[1:])
    imp.add_argument("file", type=Path)
    imp.add_argument("-o", "--out", type=Path, required=True, help="output .jsonl (or .jsonl.gz)")
    imp.add_argument("--category", default=None, help="category to stamp on every request (e.g. code)")
    imp.add_argument("--skip-bad", action="store_true", help="skip malformed rows (reported) instead of failing")
    imp.add_argument("--seed", type=int, default=0, help="mooncake: seed of the in-bin arrival jitter")
    imp.add_argument("--jitter-s", type=float, default=None, help="mooncake: jitter width in s (default 3, 0 = off)")
    imp.set_defaults(func=cmd_import)

    fit = tsub.add_parser("fit", help="fit arrivals (Gamma renewal), lengths and category mix to a trace")
    fit.add_argument("file", type=Path)
    fit.add_argument("-o", "--out", type=Path, required=True, help="fit JSON")
    fit.add_argument("--format", choices=FORMATS, default="jsonl", help="format of FILE (default: our JSONL)")
    fit.set_defaults(func=cmd_fit)

    gen = tsub.add_parser("generate", help="a synthetic trace from a fit (deterministic per seed)")
    gen.add_argument("--fit", required=True, help="fit JSON from `trace fit`, or a preset: chat, code, math")
    gen.add_argument("--num-requests", type=int, required=True)
    gen.add_argument("--rate", type=float, default=None, help="requests/s (default: the fitted rate)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--name", default=None, help="trace name in the header")
    gen.add_argument("-o", "--out", type=Path, required=True)
    gen.set_defaults(func=cmd_generate)

    st = tsub.add_parser("stats", help="rate, burstiness (inter-arrival CV), length percentiles, categories")
    st.add_argument("file", type=Path)
    st.add_argument("--format", choices=FORMATS, default="jsonl", help="format of FILE (default: our JSONL)")
    st.set_defaults(func=cmd_stats)


def _load(fmt: str, path: Path, skip_bad: bool = False, **kw):
    from simulator.importers import import_trace

    return import_trace(fmt, path, on_error="skip" if skip_bad else "raise", **kw)


def _report_skipped(console: Console, trace) -> None:
    if trace.skipped:
        console.print(f"[yellow]skipped {len(trace.skipped)} malformed line(s):[/yellow]")
        for e in trace.skipped[:10]:
            console.print(f"  {e}", markup=False, highlight=False)
        if len(trace.skipped) > 10:
            console.print(f"  ... and {len(trace.skipped) - 10} more")


def _summary(trace) -> str:
    s = trace.stats()
    return f"{s.num_requests} requests over {s.duration_s:.1f} s ({s.rate:.3g} req/s, inter-arrival CV {s.interarrival_cv:.3g})"


def _guard(func):
    """Turn expected input errors into a one-line message and exit code 1, not a traceback."""

    def run(args) -> int:
        from sglang_ext.formats.trace import TraceError

        try:
            return func(args)
        except (TraceError, ValueError, OSError) as e:
            Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
            return 1

    run.__name__ = func.__name__
    return run


@_guard
def cmd_import(args) -> int:
    from sglang_ext.formats.trace import write_trace

    console = Console(soft_wrap=True)
    kw = {"category": args.category}
    if args.format == "mooncake":
        kw["seed"] = args.seed
        if args.jitter_s is not None:
            kw["jitter_s"] = args.jitter_s
    trace = _load(args.format, args.file, args.skip_bad, **kw)
    write_trace(args.out, trace)
    _report_skipped(console, trace)
    console.print(f"{args.out}: {_summary(trace)}", markup=False, highlight=False)
    return 0


@_guard
def cmd_fit(args) -> int:
    from simulator.generator import fit_trace

    trace = _load(args.format, args.file)
    fit = fit_trace(trace)
    fit.save(args.out)
    Console(soft_wrap=True).print(f"{args.out}: rate {fit.rate:.4g} req/s, inter-arrival CV {fit.interarrival_cv:.3g} "
                    f"(Gamma shape {fit.gamma_shape:.3g}), median prompt {fit.prompt.median:.0f} / output "
                    f"{fit.output.median:.0f} tokens, length rho {fit.length_rho:.2f}", markup=False, highlight=False)
    return 0


@_guard
def cmd_generate(args) -> int:
    from simulator.generator import PRESETS, TraceFit, generate
    from sglang_ext.formats.trace import write_trace

    if args.fit in PRESETS and not Path(args.fit).is_file():  # a directory named like a preset is not a fit
        fit = PRESETS[args.fit]
    else:
        fit = TraceFit.load(args.fit)
    trace = generate(fit, args.num_requests, rate=args.rate, seed=args.seed, name=args.name)
    write_trace(args.out, trace)
    Console(soft_wrap=True).print(f"{args.out}: {_summary(trace)}", markup=False, highlight=False)
    return 0


def stats_table(trace) -> Group:
    """Rich tables of :meth:`Trace.stats`: the arrival process, then the length percentiles."""
    s = trace.stats()
    m = trace.meta
    table = Table(title=f"trace {m.name or '?'}" + (f" ({m.licence})" if m.licence else ""))
    table.add_column("statistic")
    table.add_column("value", justify="right")

    def num(x: float, fmt: str = ".4g") -> str:
        return "n/a" if math.isnan(x) else format(x, fmt)

    table.add_row("requests", str(s.num_requests))
    table.add_row("duration (s)", num(s.duration_s, ".1f"))
    table.add_row("rate (req/s)", num(s.rate))
    cv_note = "" if math.isnan(s.interarrival_cv) else (
        " (bursty)" if s.interarrival_cv > 1.2 else " (~Poisson)" if s.interarrival_cv > 0.8 else " (regular)")
    table.add_row("inter-arrival CV", num(s.interarrival_cv, ".3g") + cv_note)
    if s.categories:
        table.add_row("categories", ", ".join(f"{c} {n}" for c, n in s.categories.items()))
    table.add_row("with acceptance record", str(s.with_acceptance))
    if m.source:
        table.add_row("source", m.source)

    lengths = Table(title="lengths (tokens)")
    for col in ("", "mean", "p50", "p90", "p99", "max"):
        lengths.add_column(col, justify="right" if col else "left")
    for label, ls in (("prompt", s.prompt), ("output", s.output)):
        lengths.add_row(label, f"{ls.mean:.0f}", f"{ls.p50:.0f}", f"{ls.p90:.0f}", f"{ls.p99:.0f}", str(ls.max))
    return Group(table, lengths)


@_guard
def cmd_stats(args) -> int:
    console = Console(soft_wrap=True)
    trace = _load(args.format, args.file)
    console.print(stats_table(trace))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m simulator.trace_cli trace stats FILE``) without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="trace")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
