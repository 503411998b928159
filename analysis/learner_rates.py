"""Learning rates of the online learners, measured on rounds captured from the real model.

Serves a stream of prompts on the EAGLE engine with the shipped SmolLM2-135M drafter and captures exactly what
online serving captures (committed positions, the target's top-k distribution; a :class:`CaptureBuffer` is the
engine's online hook, no trainer runs), then splits the capture into rounds of ``n_threshold`` tokens and, per
(learner, learning rate), trains them in order as the trainer process does (:func:`train_round`: the same
held-back slice per round, the same deploy gate, commit on deploy, rollback on refusal). Reported per
configuration: each round's gate verdict and held-out E[accepted] of the current vs the trained drafter, and the
CPU seconds of training. Why: the learners' default rates (``DEFAULT_LR``) must move the drafter within one
round, or online adaptation cannot pay::

    .venv/bin/python -m analysis.learner_rates --prompts gsm8k:24 --learners sgd,momentum,optimistic,adam \\
        --lrs sgd=0.01,0.03,0.1,0.3 --lrs momentum=0.003,0.01,0.03,0.1 --lrs optimistic=0.01,0.03,0.1,0.3 \\
        --lrs adam=3e-5,1e-4,3e-4,1e-3
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


class CaptureOnly:
    """The engine's online hook, capture half only: rows go into a bounded buffer, nothing trains or swaps."""

    def __init__(self, buffer) -> None:
        self.buffer = buffer

    def capture(self, rid, tokens, features, logits=None, draft_correct=None) -> None:
        self.buffer.add(rid, tokens, features, logits, draft_correct)

    def finish_request(self, rid: str, accept_rate: float | None) -> None:
        self.buffer.finish(rid, accept_rate)

    def poll(self):
        return None


def parse_lrs(items: Sequence[str]) -> dict[str, list[float]]:
    """``["sgd=0.01,0.1", "adam=1e-4"]`` -> ``{"sgd": [0.01, 0.1], "adam": [1e-4]}`` (errors name the flag)."""
    out: dict[str, list[float]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        try:
            rates = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            rates = []
        if not sep or not rates or any(r <= 0 for r in rates):
            raise SystemExit(f"--lrs {item!r}: expected LEARNER=RATE,RATE,... with rates > 0")
        out[name.strip()] = rates
    return out


def split_rounds(samples: Sequence[Any], n_tokens: int) -> list[list[Any]]:
    """Consecutive rounds of at least ``n_tokens`` captured tokens (as the serving side drains them)."""
    rounds, cur, size = [], [], 0
    for s in samples:
        cur.append(s)
        size += len(s.tokens)
        if size >= n_tokens and len(cur) >= 2:
            rounds.append(cur)
            cur, size = [], 0
    if len(cur) >= 2:
        rounds.append(cur)
    return rounds


def measure(current, rounds: Sequence[Sequence[Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Train ``rounds`` in order with one learner (``config``), as the trainer process does."""
    from sglang_ext.core.learning.gate import DeployGate
    from sglang_ext.core.learning.learners import make_learner
    from sglang_ext.online.trainer import train_round

    learner, gate = make_learner(config), DeployGate(config)
    model, out = current, []
    cpu0 = time.process_time()
    for i, samples in enumerate(rounds):
        candidate, stats, result = train_round(model, samples, learner, gate, config, round_index=i)
        out.append({"round": i, "tokens": sum(len(s.tokens) for s in samples), **result.as_dict(),
                    "loss_first_epoch": stats.loss_first_epoch, "loss_last_epoch": stats.loss_last_epoch})
        if result.deploy:
            model = candidate
    return {"rounds": out, "cpu_s": time.process_time() - cpu0, "deployed": sum(r["deploy"] for r in out)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.learner_rates", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default="gsm8k:24", metavar="SET:N", help="prompt set and count (default gsm8k:24)")
    p.add_argument("--learners", default="sgd,momentum,optimistic,adam")
    p.add_argument("--lrs", action="append", default=[], metavar="LEARNER=RATE,...",
                   help="rates to try per learner (default: its DEFAULT_LR x 0.3, 1, 3, 10)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=3)
    p.add_argument("--n-threshold", type=int, default=None, help="tokens per round (default: the online default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model-path", default="smollm2-135m")
    p.add_argument("--draft-model-path", default="drafters/smollm2-135m-eagle")
    p.add_argument("--out", "-o", default=None)
    args = p.parse_args(argv)

    import torch

    from sglang_ext.studies.workload_shift import Segment, encode_stream, load_pools, select_stream
    from sglang_ext.core.learning.capture import CaptureBuffer
    from sglang_ext.core.learning.control import resolve
    from sglang_ext.core.learning.learners import DEFAULT_LR, LEARNERS
    from sglang_ext.engine.engine import GenerationRequest
    from sglang_ext.engine.launch import build_engine_from_parts, load_draft_model, load_target
    from sglang_ext.online import ONLINE_PARAMS

    torch.set_num_threads(args.threads)
    source, _, count = args.prompts.partition(":")
    segments = [Segment("round", source, int(count or 24))]
    learners = [x.strip() for x in args.learners.split(",") if x.strip()]
    for name in learners:
        if name not in LEARNERS:
            raise SystemExit(f"--learners: {name!r} is not one of {LEARNERS}")
    lrs = {n: [DEFAULT_LR[n] * f for f in (0.3, 1.0, 3.0, 10.0)] for n in learners} | parse_lrs(args.lrs)
    config = resolve(ONLINE_PARAMS, {"n_threshold": args.n_threshold} if args.n_threshold else {}, "learner rates")
    out = Path(args.out or f"analysis/results/learner-rates-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer, name, _ = load_target(args.model_path)
    stream = encode_stream(tokenizer, select_stream(load_pools(segments), segments, 0))
    context = 2 * (max(len(it.ids) for it in stream) + args.max_new_tokens) + 16
    draft = load_draft_model(args.draft_model_path, name, model.config)
    engine, _ = build_engine_from_parts(model, tokenizer, "EAGLE", num_steps=args.num_steps, topk=1, draft_model=draft,
                                        max_running_requests=args.batch, context_length=context, model_name=name)
    buffer = CaptureBuffer(config["capture_bytes"], config["capture_topk"],
                           max_sample_len=config["capture_max_sample_len"])
    engine.attach_online(CaptureOnly(buffer))
    t = time.perf_counter()
    engine.run([GenerationRequest(list(it.ids), max_new_tokens=args.max_new_tokens) for it in stream])
    serve_s = time.perf_counter() - t
    samples = buffer.drain()
    rounds = split_rounds(samples, config["n_threshold"])
    print(f"served {len(stream)} {source} prompts in {serve_s:.0f} s; captured {sum(len(s.tokens) for s in samples)} "
          f"tokens in {len(samples)} samples -> {len(rounds)} rounds of >= {config['n_threshold']} tokens", flush=True)

    current = engine.drafter.model
    results = []
    for learner in learners:
        for lr in lrs[learner]:
            r = measure(current, rounds, {**config, "learner": learner, "lr": lr})
            r.update(learner=learner, lr=lr)
            results.append(r)
            verdicts = ", ".join(f"{x['outcome']} {x['current_score']:.3f}->{x['candidate_score']:.3f}" for x in r["rounds"])
            print(f"{learner:10s} lr {lr:<8.3g} {r['cpu_s']:6.1f} CPU s  {verdicts}", flush=True)
    report = {"kind": "sglang-ext.learner-rates", "command": "python -m analysis.learner_rates " +
              " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
              "machine": platform.processor() or platform.machine(), "threads": args.threads,
              "prompts": args.prompts, "serve_s": serve_s, "captured_tokens": sum(len(s.tokens) for s in samples),
              "rounds": [sum(len(s.tokens) for s in r) for r in rounds], "config": config, "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
