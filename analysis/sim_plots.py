"""Plots of simulator outputs: latency CDFs of one or more replays, and a sweep's throughput/goodput vs a parameter.

    .venv/bin/python -m analysis.sim_plots out/result.json [out2/result.json ...] -o latency.png
    .venv/bin/python -m analysis.sim_plots out/sweep.json --x k -o sweep.png

A ``result.json`` (``sim replay``) gives TTFT / TPOT / E2E CDFs, one line per file; a ``sweep.json``
(``sim sweep``) gives throughput and goodput against the grid axis ``--x`` (one line per value of the other axes).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(results: dict[str, Any], out: str | Path) -> Path:
    """TTFT, TPOT and E2E empirical CDFs, one line per labelled :class:`~sglang_ext.formats.results.SimResult`."""
    plt = _mpl()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for label, res in results.items():
        lat = res.latencies()
        for ax, key in zip(axes, ("ttft", "tpot", "e2e")):
            x = np.sort(lat[key])
            if len(x):
                ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=label)
    for ax, name in zip(axes, ("TTFT (s)", "TPOT (s)", "E2E latency (s)")):
        ax.set_xlabel(name)
        ax.set_xscale("log")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_sweep(rows: Sequence[dict[str, Any]], x: str, out: str | Path) -> Path:
    """Throughput and goodput vs grid axis ``x``; rows are ``{"grid", "summary"}`` (``sweep.json``)."""
    plt = _mpl()
    if not rows or x not in rows[0]["grid"]:
        raise ValueError(f"sweep has no grid axis {x!r}; axes: {list(rows[0]['grid']) if rows else []}")
    series: dict[str, list[tuple[Any, dict]]] = defaultdict(list)
    for r in rows:
        rest = ", ".join(f"{k}={v}" for k, v in r["grid"].items() if k != x) or "all"
        series[rest].append((r["grid"][x], r["summary"]))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, pts in series.items():
        pts.sort(key=lambda p: (p[0] is None, p[0]))
        xs = [p[0] for p in pts]
        a1.plot(xs, [p[1]["throughput_tok_s"] for p in pts], marker="o", label=label)
        a2.plot(xs, [p[1]["goodput_req_s"] for p in pts], marker="o", label=label)
    a1.set_ylabel("throughput (output tok/s)")
    a2.set_ylabel("goodput (req/s meeting SLOs)")
    for ax in (a1, a2):
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    from sglang_ext.formats.results import SimResult

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="result.json files, or one sweep.json")
    ap.add_argument("--x", default=None, help="sweep: the grid axis on the x axis (default: the first)")
    ap.add_argument("-o", "--out", type=Path, default=None, help="PNG to write (default beside the first file)")
    args = ap.parse_args(argv)
    first = json.loads(args.files[0].read_text())
    if first.get("kind") == "sglang-ext.sim-sweep":
        rows = first["rows"]
        x = args.x or (next(iter(rows[0]["grid"])) if rows else "")
        out = plot_sweep(rows, x, args.out or args.files[0].with_suffix(".png"))
    else:
        results = {f"{p.parent.name}/{p.stem}": SimResult.load(p) for p in args.files}
        out = plot_latency_cdfs(results, args.out or args.files[0].with_name("latency_cdf.png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
