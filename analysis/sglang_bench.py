"""SGLang plain vs NGRAM vs EAGLE3 vs EAGLE3 + an sglang-ext policy, inside real SGLang 0.5.23 on this CPU.

SGLang control flow with PyTorch stand-in kernels (``sglang_ext.testing.sglang_cpu``): the ratios say what our
plugin's decisions do to SGLang's own speculative loop here, not how fast SGLang's kernels are.

Each round starts every configuration's server in turn (one at a time, order rotated by one each round: this
machine drifts by up to 25 % between consecutive runs), times the same greedy workload (batch 8: one request of 8
prompts; batch 1: the prompts one by one) and stops it. Ratios to plain are taken within a round and their median
is reported; every configuration's outputs are checked token for token against plain decoding of the same round.

    python analysis/sglang_bench.py --rounds 3 --out analysis/results/sglang-bench-DATE
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from sglang_ext.models.provision import fetch_model, model_dir
from sglang_ext.sglang_plugin.export import export_eagle3
from sglang_ext.testing.sglang_cpu.launcher import SGLangCPUServer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Write a haiku about the sea.", "Q: What is 17 + 25?\nA:",
    "List three primary colours:", "Once upon a time, in a small village,",
    "import numpy as np\n\n# compute the mean of an array\n", "The theory of relativity says that",
]
EAGLE3 = ["--speculative-algorithm", "EAGLE3", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
          "--speculative-num-draft-tokens", "4"]


def configs(eagle3_dir: Path, policies: list[str]) -> dict[str, list[str]]:
    out = {"plain": [],
           "NGRAM": ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "4"],
           "EAGLE3 (k=3)": [*EAGLE3, "--speculative-draft-model-path", str(eagle3_dir)]}
    for p in policies:
        out[f"EAGLE3 + {p}"] = [*EAGLE3, "--speculative-draft-model-path", str(eagle3_dir), "--speculative-policy", p]
    return out


def measure(server: SGLangCPUServer, max_new: int) -> dict:
    server.generate(PROMPTS[:2], max_new_tokens=8)  # warm-up
    row: dict = {}
    t0 = time.perf_counter()
    batch = server.generate(PROMPTS, max_new_tokens=max_new)
    t8 = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [server.generate(p, max_new_tokens=max_new) for p in PROMPTS]
    t1 = time.perf_counter() - t0
    for label, results, seconds in (("8", batch, t8), ("1", single, t1)):
        tokens = sum(len(r.output_ids) for r in results)
        accept = [r.meta_info.get("spec_accept_length") for r in results if r.meta_info.get("spec_accept_length")]
        row[label] = {"tok_s": tokens / seconds, "ids": [r.output_ids for r in results],
                      "accept_length": statistics.mean(accept) if accept else None}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--policies", default="dsde", help="comma-separated sglang-ext policies to add (EAGLE3 + each)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    fetch_model("smollm2-135m")
    target = model_dir("smollm2-135m")
    eagle3 = export_eagle3(ROOT / "drafters" / "smollm2-135m-eagle", Path(tempfile.mkdtemp()) / "eagle3",
                           target_model_dir=target)
    cfgs = configs(eagle3, [p for p in args.policies.split(",") if p])
    names = list(cfgs)
    rounds: list[dict] = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        got = {}
        for name in order:
            with SGLangCPUServer(target, *cfgs[name]) as server:
                got[name] = measure(server, args.max_new_tokens)
            print(f"round {r}: {name}: " + ", ".join(f"batch {b} {got[name][b]['tok_s']:.1f} tok/s" for b in "81"),
                  flush=True)
        rounds.append(got)
    rows = []
    for b in "81":
        for name in names:
            ratios = [rd[name][b]["tok_s"] / rd["plain"][b]["tok_s"] for rd in rounds]
            identical = sum(ids == ref for rd in rounds for ids, ref in zip(rd[name][b]["ids"], rd["plain"][b]["ids"]))
            accept = [rd[name][b]["accept_length"] for rd in rounds if rd[name][b]["accept_length"]]
            rows.append({"batch": int(b), "config": name, "args": cfgs[name],
                         "tok_s": statistics.median(rd[name][b]["tok_s"] for rd in rounds),
                         "x_plain": statistics.median(ratios), "x_plain_per_round": ratios,
                         "accept_length": statistics.mean(accept) if accept else None,
                         "identical": f"{identical}/{len(PROMPTS) * len(rounds)}"})
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python analysis/sglang_bench.py " + " ".join(argv or __import__("sys").argv[1:]),
            "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, "
                       f"{_cpu_model()}", "date": time.strftime("%Y-%m-%d %H:%M"),
            "max_new_tokens": args.max_new_tokens, "rounds": args.rounds}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# SGLang 0.5.23 with sglang-ext ({meta['date']})", "",
             "**SGLang control flow with PyTorch stand-in kernels** (not SGLang's kernel performance).", "",
             f"Command: `{meta['command']}`", "", f"Machine: {meta['machine']}; SmolLM2-135M, float32, one thread. "
             f"{len(PROMPTS)} prompts, {args.max_new_tokens} new tokens, greedy; {args.rounds} rounds, order rotated.",
             "", "| batch | configuration | tok/s (median) | × plain (paired median) | per round | accept length | "
             "identical to plain |", "|---:|---|---:|---:|---|---:|---:|"]
    for row in rows:
        acc = f"{row['accept_length']:.2f}" if row["accept_length"] else "–"
        per = " ".join(f"{x:.2f}" for x in row["x_plain_per_round"])
        lines.append(f"| {row['batch']} | {row['config']} | {row['tok_s']:.1f} | {row['x_plain']:.3f}× | {per} | "
                     f"{acc} | {row['identical']} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
