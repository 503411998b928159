"""Per-step cost of the reference engine, split into phases, on the real model (SmolLM2-135M, fp32, CPU).

For each configuration it runs the same prompts (greedy) through a fresh engine and prints milliseconds per
decode step split into

* ``draft``: the engine's drafting phase (drafter absorb of the last step's pairs + proposing), ``StepStats.draft_seconds``;
* ``target``: the target forward of the decode step (time inside ``TargetModel.forward``, prefill excluded);
* ``verify``: verification + commit (``StepStats.verify_seconds`` minus the target forward);
* ``other``: the rest of ``Engine.step`` (admission bookkeeping, finish/compaction), prefill excluded;

plus tokens/s over decode time, acceptance length and a digest of every output token (the same digest before and
after an optimisation means token-identical outputs). Only the public-ish hooks the engine has always had are used
(``Engine.step``, ``last_step``, ``target.forward``, ``_prefill``), so the same script measures old and new code:

    .venv/bin/python analysis/profile_step.py                      # all configurations, 11 prompts x 64 tokens
    PYTHONPATH=/path/to/old/tree .venv/bin/python analysis/profile_step.py --json old.json
    .venv/bin/python analysis/profile_step.py --configs chain2 --cprofile 25   # + top cProfile entries
    .venv/bin/python analysis/profile_step.py --repeat 3   # fastest of 3 runs per configuration (noisy machines)

Configurations: ``off``, ``chain1..3`` (EAGLE chain, topk 1), ``tree`` (topk 2, steps 3, budget 5) at batch 1,
and ``off_b8`` / ``chain2_b8`` with 8 running requests (all prompts submitted at once).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT.parent / "shared" / "data" / "prompts" / "spec_bench_subset.jsonl"
DRAFTER = Path(os.environ.get("SGLANG_EXT_CACHE", Path.home() / ".cache" / "sglang-ext")) / "drafters" / "smollm2-135m-eagle"

CONFIGS = {
    "off": dict(algo="NONE", batch=1),
    "chain1": dict(algo="EAGLE", batch=1, num_steps=1, topk=1),
    "chain2": dict(algo="EAGLE", batch=1, num_steps=2, topk=1),
    "chain3": dict(algo="EAGLE", batch=1, num_steps=3, topk=1),
    "tree": dict(algo="EAGLE", batch=1, num_steps=3, topk=2, num_draft_tokens=5),
    "off_b8": dict(algo="NONE", batch=8),
    "chain2_b8": dict(algo="EAGLE", batch=8, num_steps=2, topk=1),
}


def load_prompts(tokenizer, per_category: int, max_tokens: int) -> list[list[int]]:
    from sglang_ext.data.prompts import load_prompts as read
    from sglang_ext.models.chat import encode_chat

    by_cat: dict[str, list] = {}
    for p in read(PROMPTS):
        by_cat.setdefault(p.category, []).append(p)
    out = []
    for i in range(per_category):  # round-robin over the categories
        for cat in sorted(by_cat):
            if i < len(by_cat[cat]):
                ids = encode_chat(tokenizer, by_cat[cat][i].text)
                if len(ids) > max_tokens:
                    ids = ids[: max_tokens - 8] + ids[-8:]
                out.append(ids)
    return out


class Probe:
    """Wraps ``engine.target.forward`` and ``engine._prefill`` to time the decode forward separately."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.in_prefill = False
        self.forward_s = 0.0
        fwd = engine.target.forward
        prefill = engine._prefill

        def timed_forward(*a, **k):
            if self.in_prefill:
                return fwd(*a, **k)
            t0 = time.perf_counter()
            try:
                return fwd(*a, **k)
            finally:
                self.forward_s += time.perf_counter() - t0

        def flagged_prefill(*a, **k):
            self.in_prefill = True
            try:
                return prefill(*a, **k)
            finally:
                self.in_prefill = False

        engine.target.forward = timed_forward
        engine._prefill = flagged_prefill


def run_config(name: str, cfg: dict, model, tok, draft, prompts: list[list[int]], max_new: int, profiler=None) -> dict:
    from sglang_ext.engine.engine import GenerationRequest
    from sglang_ext.engine.launch import build_engine_from_parts

    kw = {k: v for k, v in cfg.items() if k in ("num_steps", "topk", "num_draft_tokens")}
    if cfg["algo"] == "EAGLE":
        kw["draft_model"] = draft
    engine, _ = build_engine_from_parts(model, tok, cfg["algo"], max_running_requests=cfg["batch"], context_length=2048,
                                        **kw)
    engine.run([GenerationRequest(prompts[0][:40], max_new_tokens=8)])  # warm-up
    probe = Probe(engine)
    acc = dict(steps=0, draft=0.0, target=0.0, verify=0.0, other=0.0, wall=0.0, batch_sum=0)

    def one_step():
        probe.forward_s = 0.0
        t0 = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t0
        st = engine.last_step
        if not st.batch_size:  # no decode happened (cannot occur with work pending, but keep it honest)
            return
        acc["steps"] += 1
        acc["batch_sum"] += st.batch_size
        acc["draft"] += st.draft_seconds
        acc["target"] += probe.forward_s
        acc["verify"] += st.verify_seconds - probe.forward_s
        acc["other"] += wall - st.prefill_seconds - st.draft_seconds - st.verify_seconds
        acc["wall"] += wall - st.prefill_seconds

    states = []
    if profiler is not None:
        profiler.enable()
    if cfg["batch"] == 1:
        for p in prompts:
            states.append(engine.add_request(GenerationRequest(p, max_new_tokens=max_new)))
            while engine.has_work():
                one_step()
    else:
        states = [engine.add_request(GenerationRequest(p, max_new_tokens=max_new)) for p in prompts]
        while engine.has_work():
            one_step()
    if profiler is not None:
        profiler.disable()
    outs = [s.output_ids for s in states]
    tokens = sum(len(o) for o in outs)
    verify_ct = sum(s.spec_verify_ct for s in states)
    n = max(acc["steps"], 1)
    return {
        "config": name, **cfg, "steps": acc["steps"], "mean_batch": acc["batch_sum"] / n,
        "ms_step": 1e3 * acc["wall"] / n, "draft_ms": 1e3 * acc["draft"] / n, "target_ms": 1e3 * acc["target"] / n,
        "verify_ms": 1e3 * acc["verify"] / n, "other_ms": 1e3 * acc["other"] / n,
        "tok_s": tokens / acc["wall"] if acc["wall"] else 0.0, "tokens": tokens,
        "accept_len": tokens / verify_ct if verify_ct else 1.0,
        "digest": hashlib.sha1(json.dumps(outs).encode()).hexdigest()[:12],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--per-category", type=int, default=1, help="prompts per Spec-Bench category (11 categories)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-prompt-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each configuration this many times and keep the fastest run (other processes on a 2-core "
                         "machine only ever add time, so the minimum is the least disturbed measurement)")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N", help="print the top N cProfile entries per config")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import sglang_ext
    from sglang_ext.core.drafters.eagle_model import EagleDraftModel
    from sglang_ext.models.provision import load_model

    print(f"sglang_ext from {Path(sglang_ext.__file__).parent}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    model, tok, _ = load_model("smollm2-135m")
    draft = EagleDraftModel.load(DRAFTER)
    prompts = load_prompts(tok, args.per_category, args.max_prompt_tokens)
    print(f"{len(prompts)} prompts, mean {sum(map(len, prompts)) / len(prompts):.0f} tokens, {args.max_new_tokens} new tokens, greedy")
    header = f"{'config':10s} {'batch':>5s} {'ms/step':>8s} {'draft':>7s} {'target':>7s} {'verify':>7s} {'other':>6s} {'tok/s':>7s} {'acc':>5s}  digest"
    print(header)
    rows = []
    for name in args.configs.split(","):
        prof = cProfile.Profile() if args.cprofile else None
        runs = [run_config(name, CONFIGS[name], model, tok, draft, prompts, args.max_new_tokens, prof)
                for _ in range(args.repeat)]
        row = min(runs, key=lambda r: r["ms_step"])
        row["runs_ms_step"] = [round(r["ms_step"], 2) for r in runs]
        rows.append(row)
        print(f"{name:10s} {row['mean_batch']:5.1f} {row['ms_step']:8.2f} {row['draft_ms']:7.2f} {row['target_ms']:7.2f} "
              f"{row['verify_ms']:7.2f} {row['other_ms']:6.2f} {row['tok_s']:7.1f} {row['accept_len']:5.2f}  {row['digest']}",
              flush=True)
        if prof is not None:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.cprofile)
            print(s.getvalue())
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
