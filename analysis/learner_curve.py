"""Offline learning curves of online-learner variants on one captured post-shift stream (deterministic, one core).

The question before anything goes live: starting from a drafter that has never seen the new domains, how much of
its gap to an offline oracle does each learner close, per captured token? Serves a shifted stream (default:
HumanEval then GSM8K) once on the EAGLE engine with the static drafter and captures exactly what online serving
captures (:class:`~analysis.learner_rates.CaptureOnly`); serves held-out prompts of each new domain (never in the
stream) the same way for scoring. Then, per variant, trains the captured rounds in stream order exactly as the
trainer process does (:func:`sglang_ext.online.trainer.train_round`: held-back slice, gate, commit or rollback,
replay window) and after every round scores the *deployed* drafter on each domain's held-out rows:

    E[accepted] = expected accepted drafts of a greedy k-step chain, teacher-forced (the gate's score); the
    acceptance length of that chain is 1 + E[accepted].

Gap closed = (variant − static) / (oracle − static) on the held-out score, per domain. Variants use the workload
study's syntax: ``adam``, ``adam[replay_tokens=32768,epochs=3]``, ``sgd[update=head,lr=0.03]``; every key is an
online parameter (``--online-<name>`` of ``sglang-ext serve``). Captures are cached (``--capture FILE``), so a
second run with other variants trains from the same rows::

    .venv/bin/python -m analysis.learner_curve --draft-model-path drafters/smollm2-135m-eagle-chat \\
        --oracle drafters/smollm2-135m-eagle-codemath --variants 'adam,adam[replay_tokens=32768]'
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sglang_ext.studies.workload_shift import gap_closed  # one definition for the live and the offline study

DEFAULT_STREAM = "code=humaneval:64,math=gsm8k:48"
DEFAULT_HELDOUT = "code=humaneval:24,math=gsm8k:24"


def serve_and_capture(engine, prompts: Sequence[list[int]], max_new_tokens: int, config: dict) -> list:
    """Serve ``prompts`` (continuous batching, greedy) and return every captured sample in capture order."""
    from analysis.learner_rates import CaptureOnly
    from sglang_ext.core.learning.capture import CaptureBuffer
    from sglang_ext.engine.engine import GenerationRequest

    buffer = CaptureBuffer(config["capture_bytes"], config["capture_topk"],
                           max_sample_len=config["capture_max_sample_len"])
    engine.attach_online(CaptureOnly(buffer))
    try:
        engine.run([GenerationRequest(list(p), max_new_tokens=max_new_tokens) for p in prompts])
    finally:
        engine.attach_online(None)
    return buffer.drain()


def score_domains(model, heldout: dict[str, list], config: dict) -> dict[str, float]:
    """Held-out E[accepted] of ``model`` per domain (the gate's chain score, ``gate_steps`` deep)."""
    from sglang_ext.core.learning.capture import batch_samples
    from sglang_ext.core.learning.gate import acceptance_score

    vocab = model.draft_vocab.cpu()
    return {d: acceptance_score(model, batch_samples(s, config["batch_tokens"], vocab), config["gate_steps"]).accept_len
            for d, s in heldout.items()}


def run_variant(start, rounds: Sequence[Sequence[Any]], heldout: dict[str, list], config: dict, log=print) -> dict:
    """Train ``rounds`` in order as the trainer process does; the deployed drafter is scored after every round."""
    from sglang_ext.core.learning.gate import DeployGate
    from sglang_ext.core.learning.learners import make_learner
    from sglang_ext.core.learning.replay import ReplayWindow
    from sglang_ext.online.trainer import train_round

    learner, gate, replay = make_learner(config), DeployGate(config), ReplayWindow.from_config(config)
    model, curve, tokens = start, [], 0
    cpu0 = time.process_time()
    for i, samples in enumerate(rounds):
        candidate, stats, result = train_round(model, samples, learner, gate, config, round_index=i, replay=replay)
        if result.deploy:
            model = candidate
        tokens += sum(len(s) for s in samples)
        point = {"round": i, "captured_tokens": tokens, "deploy": result.deploy, "outcome": result.outcome,
                 "gate_current": result.current_score, "gate_candidate": result.candidate_score,
                 "gate_se": result.delta_se, "trained_tokens": stats.tokens, "cpu_s": time.process_time() - cpu0,
                 "heldout": score_domains(model, heldout, config)}
        curve.append(point)
        log(f"    round {i:2d} {point['outcome']:8s} gate {result.current_score:.3f}->{result.candidate_score:.3f} "
            f"(se {result.delta_se:.3f}); held-out " + ", ".join(f"{d} {v:.3f}" for d, v in point["heldout"].items())
            + f"; {point['cpu_s']:.0f} CPU s")
    return {"curve": curve, "deployed": sum(p["deploy"] for p in curve), "cpu_s": time.process_time() - cpu0}


def summarize(results: dict, static: dict[str, float], oracle: dict[str, float] | None) -> list[dict]:
    """Per variant: final and best held-out score per domain, gap closed (final), rounds deployed, CPU s."""
    rows = []
    for name, r in results.items():
        last = r["curve"][-1]["heldout"] if r["curve"] else dict(static)
        row = {"variant": name, "deployed": r["deployed"], "rounds": len(r["curve"]), "cpu_s": r["cpu_s"]}
        for d, s in static.items():
            row[f"{d}_final"] = last[d]
            row[f"{d}_gap_closed"] = gap_closed(last[d], s, oracle.get(d) if oracle else None)
        rows.append(row)
    return rows


def label_against_defaults(cfg: dict, defaults: dict) -> str:
    """A variant's name from what differs from today's defaults, so a result recorded before a default changed
    (e.g. the replay window) is not shown under a name that now means something else."""
    diff = [f"{k}={v}" for k, v in cfg.items() if k != "learner" and k in defaults and defaults[k] != v]
    return f"online-{cfg['learner']}" + (f"[{','.join(diff)}]" if diff else "")


def learner_defaults(learner: str, shared: dict) -> dict:
    """Every online parameter of ``learner`` at today's defaults and the run's ``--set`` values."""
    from sglang_ext.core.learning.control import resolve
    from sglang_ext.online import ONLINE_PARAMS

    return resolve(ONLINE_PARAMS, {**shared, "learner": learner}, "--set")


def variant_configs(text: str, shared: dict) -> dict[str, dict]:
    """``--variants`` -> {name: resolved config}. A variant is named by what differs from the defaults (its
    ``label=`` if it has one), however it was spelled, so one configuration has one name and ``--results-from``
    reuses it instead of training it again."""
    from sglang_ext.core.learning.control import resolve
    from sglang_ext.online import ONLINE_PARAMS
    from sglang_ext.studies.workload_shift import parse_configs

    out = {}
    for spec in parse_configs("static," + text)[1:]:
        cfg = resolve(ONLINE_PARAMS, {**shared, **spec.overrides, "learner": spec.learner}, f"--variants {spec.name}")
        out[spec.name if spec.labelled else label_against_defaults(cfg, learner_defaults(spec.learner, shared))] = cfg
    return out


def markdown(meta: dict, static: dict, oracle: dict | None, rows: list[dict]) -> str:
    domains = list(static)

    def f(x, fmt=".3f"):
        return "–" if x is None else f"{x:{fmt}}"

    lines = [f"# Learner curves on a captured post-shift stream ({meta['date']})", "", f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}, {meta['threads']} torch thread(s). Stream: {meta['stream']} "
             f"({meta['captured_tokens']} captured tokens in {meta['rounds']} rounds of ≥ {meta['n_threshold']}); "
             f"held out: {meta['heldout']}. Score: held-out E[accepted] of a greedy {meta['gate_steps']}-step chain "
             "(acceptance length = 1 + it).", "",
             "| drafter / variant | rounds deployed | " + " | ".join(f"{d} E[acc] | {d} gap closed" for d in domains)
             + " | CPU s |", "|---|---:|" + "---:|---:|" * len(domains) + "---:|",
             "| static (start) | – | " + " | ".join(f"{static[d]:.3f} | 0 %" for d in domains) + " | – |"]
    if oracle:
        lines.append("| oracle (offline, new domains) | – | " + " | ".join(f"{oracle[d]:.3f} | 100 %" for d in domains)
                     + " | – |")
    for r in rows:
        lines.append(f"| {r['variant']} | {r['deployed']}/{r['rounds']} | " + " | ".join(
            f"{f(r[f'{d}_final'])} | " + ("–" if r[f"{d}_gap_closed"] is None else f"{100 * r[f'{d}_gap_closed']:.0f} %")
            for d in domains) + f" | {r['cpu_s']:.0f} |")
    lines += ["", "![held-out E[accepted] after each round](curves.png)", ""]
    return "\n".join(lines)


def plot(results: dict, static: dict, oracle: dict | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(static)
    legend_rows = (len(results) + 2 + 1) // 2  # variants, static and oracle, two per row
    height = 4 + 0.2 * legend_rows
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), height), squeeze=False)
    for ax, d in zip(axes[0], domains):
        for name, r in results.items():
            xs = [0] + [p["captured_tokens"] for p in r["curve"]]
            ys = [static[d]] + [p["heldout"][d] for p in r["curve"]]
            ax.step(xs, ys, where="post", label=name)
        ax.axhline(static[d], color="grey", ls=":", label="static")
        if oracle:
            ax.axhline(oracle[d], color="k", ls="--", label="oracle")
        ax.set_title(f"held-out {d}")
        ax.set_xlabel("captured tokens (stream order)")
        ax.set_ylabel("E[accepted], greedy chain")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)  # below: never over a curve
    fig.tight_layout(rect=(0, 0.2 * legend_rows / height, 1, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.learner_curve", description=__doc__.split("\n\n")[0])
    p.add_argument("--stream", default=DEFAULT_STREAM, metavar="NAME=SOURCE:N,...", help="the captured stream, in order")
    p.add_argument("--heldout", default=DEFAULT_HELDOUT, metavar="NAME=SOURCE:N,...",
                   help="held-out prompts per domain (drawn after the stream's, never the same prompt)")
    p.add_argument("--variants", default="adam", help="learner variants (workload-study syntax)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="an online parameter every variant shares (e.g. n_threshold=4096)")
    p.add_argument("--draft-model-path", default="drafters/smollm2-135m-eagle-chat")
    p.add_argument("--oracle", default=None, help="an offline drafter trained on the new domains (the ceiling)")
    p.add_argument("--model-path", default="smollm2-135m")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--capture", type=Path, default=None, help="cache of the captured rows (reused when it exists)")
    p.add_argument("--results-from", type=Path, action="append", default=[], metavar="RESULTS.json",
                   help="also report the variants of an earlier run on the same capture (their curves are not "
                        "trained again; e.g. to add --oracle once it exists)")
    p.add_argument("--out", "-o", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from sglang_ext.core.learning.control import resolve
    from sglang_ext.engine.launch import build_engine_from_parts, load_draft_model, load_target
    from sglang_ext.online import ONLINE_PARAMS
    from sglang_ext.studies.workload_shift import (
        _value,
        encode_stream,
        load_pools,
        parse_segments,
        select_stream,
    )

    from analysis.learner_rates import split_rounds

    torch.set_num_threads(args.threads)
    shared = {}
    for item in args.set:
        k, eq, v = item.partition("=")
        if not eq:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE")
        shared[k.strip().replace("-", "_")] = _value(v.strip())
    try:
        base = resolve(ONLINE_PARAMS, shared, "--set")
        variants = variant_configs(args.variants, shared)
        stream_segs, held_segs = parse_segments(args.stream), parse_segments(args.heldout)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    date = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(f"analysis/results/learner-curve-{date}")
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer, name, _ = load_target(args.model_path)

    def bound_drafter(path: str):
        """A drafter bound to the target's embedding and LM head (what the engine does when it loads one)."""
        d = load_draft_model(path, name, model.config).to(model.dtype)
        return d.bind_target(model.get_input_embeddings().weight, model.get_output_embeddings().weight)

    draft = bound_drafter(args.draft_model_path)
    if args.capture and args.capture.is_file():
        cached = torch.load(args.capture, weights_only=False)
        stream_samples, heldout, serve_s = cached["stream"], cached["heldout"], cached["serve_s"]
        print(f"captured rows from {args.capture}", flush=True)
    else:
        held_named = [type(s)(f"heldout-{s.name}", s.source, s.count) for s in held_segs]
        selected = select_stream(load_pools(stream_segs + held_named), stream_segs + held_named, args.seed)
        items = encode_stream(tokenizer, selected)
        context = 2 * (max(len(it.ids) for it in items) + args.max_new_tokens) + 16
        engine, _ = build_engine_from_parts(model, tokenizer, "EAGLE", num_steps=args.num_steps, topk=1,
                                            draft_model=draft, max_running_requests=args.batch,
                                            context_length=context, model_name=name)
        t = time.perf_counter()
        stream_samples = serve_and_capture(engine, [it.ids for it in items if not it.segment.startswith("heldout-")],
                                           args.max_new_tokens, base)
        heldout = {s.name: serve_and_capture(engine, [it.ids for it in items if it.segment == f"heldout-{s.name}"],
                                             args.max_new_tokens, base) for s in held_segs}
        serve_s = time.perf_counter() - t
        if args.capture:
            args.capture.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"stream": stream_samples, "heldout": heldout, "serve_s": serve_s}, args.capture)
    rounds = split_rounds(stream_samples, base["n_threshold"])
    captured = sum(len(s) for s in stream_samples)
    print(f"stream: {captured} captured tokens -> {len(rounds)} rounds; held out: "
          + ", ".join(f"{d} {sum(len(s) for s in v)} tokens" for d, v in heldout.items()), flush=True)

    start = draft
    static = score_domains(start, heldout, base)
    oracle = None
    if args.oracle:
        oracle = score_domains(bound_drafter(args.oracle), heldout, base)
    print("static " + ", ".join(f"{d} {v:.3f}" for d, v in static.items())
          + ("; oracle " + ", ".join(f"{d} {v:.3f}" for d, v in oracle.items()) if oracle else ""), flush=True)
    results = {}
    for earlier in args.results_from:
        prev = json.loads(earlier.read_text(encoding="utf-8"))
        if prev.get("meta", {}).get("captured_tokens") != captured:
            raise SystemExit(f"--results-from {earlier}: captured from another stream "
                             f"({prev.get('meta', {}).get('captured_tokens')} tokens, this run {captured})")
        for k, cfg in prev["meta"]["variants"].items():
            label = label_against_defaults(cfg, learner_defaults(cfg["learner"], shared))
            if label != k:
                print(f"  {earlier}: {k} is {label} under today's defaults", flush=True)
            results.setdefault(label, prev["results"][k])
            variants.setdefault(label, cfg)
    meta = {"date": date, "command": "python -m analysis.learner_curve " + " ".join(
                shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "machine": platform.processor() or platform.machine(), "threads": args.threads, "stream": args.stream,
            "heldout": args.heldout, "captured_tokens": captured, "rounds": len(rounds),
            "n_threshold": base["n_threshold"], "gate_steps": base["gate_steps"], "serve_s": serve_s,
            "drafter": args.draft_model_path, "oracle": args.oracle, "max_new_tokens": args.max_new_tokens,
            "batch": args.batch, "num_steps": args.num_steps, "variants": variants}

    def save() -> list[dict]:
        """results.json with every variant finished so far (a long run that stops keeps them: --results-from)."""
        rows = summarize(results, static, oracle)
        (out / "results.json").write_text(json.dumps({"meta": meta, "static": static, "oracle": oracle,
                                                      "summary": rows, "results": results}, indent=1, default=str)
                                          + "\n")
        return rows

    for vname, cfg in variants.items():
        if vname in results:
            continue
        print(f"  {vname}", flush=True)
        torch.manual_seed(cfg["seed"])
        results[vname] = run_variant(start, rounds, heldout, cfg, log=lambda m: print(m, flush=True))
        save()
    rows = save()
    (out / "results.md").write_text(markdown(meta, static, oracle, rows))
    plot(results, static, oracle, out / "curves.png")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
