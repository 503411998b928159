"""``sglang-ext train-drafter``: train a static feature drafter (EAGLE-style or SpecBlock) on a real conversation corpus."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--feature-layers: expected comma-separated integers, got {text!r}") from e


def _domains(text: str) -> tuple[str, ...]:
    from sglang_ext.data.domains import parse_domains

    try:
        return parse_domains(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def register(sub) -> None:
    p = sub.add_parser("train-drafter", help="train a feature drafter (EAGLE-style or SpecBlock) from the target's hidden states (offline)")
    p.add_argument("--model", default="smollm2-135m", help="target: a registered model name (see `models list`)")
    p.add_argument("--corpus", default="sharegpt", help="conversation corpus: a fetched set name or a JSONL file with `messages`")
    p.add_argument("--max-sequences", type=int, default=4000, help="conversations to train on")
    p.add_argument("--exclude-domains", type=_domains, default=(), metavar="LIST",
                   help="drop conversations of these domains (comma-separated: code, math, chat; rules in "
                        "sglang_ext/data/domains.py), e.g. code,math for a drafter that has never seen them")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per training sequence (chat template applied)")
    p.add_argument("--heldout-fraction", type=float, default=0.02)
    p.add_argument("--self-generate", type=int, default=0, metavar="N",
                   help="also train on the target's own greedy answers to N corpus prompts (self-distillation)")
    p.add_argument("--gen-tokens", type=int, default=256, help="max new tokens per self-generated answer")
    p.add_argument("--feature-layers", type=_layers, default=None, help="target layers to feed the drafter (default: low,mid,high)")
    p.add_argument("--draft-vocab-size", type=int, default=16384, help="reduced draft vocabulary (0 = full)")
    p.add_argument("--ttt-steps", type=int, default=3, help="draft steps unrolled in training (training-time test)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50, help="linear LR warm-up before the cosine decay")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="checkpoint directory (default: cache/drafters/<model>-eagle)")
    p.add_argument("--export-sequences", type=Path, default=None, metavar="FILE.npz",
                   help="only tokenise the corpus (train/held-out sequences and self-generation prompts) into FILE and exit")
    p.add_argument("--sequences", type=Path, default=None, metavar="FILE.npz",
                   help="train on sequences exported by --export-sequences instead of tokenising --corpus")
    p.add_argument("--gen-batch", type=int, default=8, help="batch size for self-generation")
    p.add_argument("--max-train-seconds", type=float, default=None,
                   help="fit training into this many seconds (the plan and its LR schedule shrink to fit)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="train at most this many steps (the LR schedule shrinks to fit): equal work for comparisons on "
                        "a machine whose speed varies")
    p.add_argument("--arch", choices=("eagle", "specblock"), default="eagle",
                   help="eagle: one layer per draft depth (EAGLE-3 style); specblock: K positions per forward (SpecBlock)")
    p.add_argument("--feature-cache", type=Path, default=None, metavar="DIR",
                   help="run the target once over the training sequences and keep its features in DIR (reused by later "
                        "runs on the same sequences, of either --arch); training then reads the cache")
    p.add_argument("--feature-cache-max-gb", type=float, default=8.0, help="byte budget of --feature-cache")
    p.add_argument("--cache-only", action="store_true", help="build --feature-cache and exit")
    g = p.add_argument_group("SpecBlock (--arch specblock)")
    g.add_argument("--block-size", type=int, default=4, help="K: draft positions per forward")
    g.add_argument("--drafter-layers", type=int, default=2, help="decoder layers of the block drafter")
    g.add_argument("--ttt-blocks", type=int, default=2, help="blocks unrolled in training (later blocks start U(1, K) later)")
    g.add_argument("--rank-start", type=float, default=0.1, metavar="FRACTION",
                   help="share of training steps before the rank-head loss is switched on")
    g.add_argument("--no-shift", action="store_true", help="ablation: no layer-wise shift")
    g.add_argument("--no-inherit", action="store_true", help="ablation: later blocks conditioned on the root's target feature")
    g.add_argument("--no-rank-head", action="store_true", help="ablation: no rank head (fixed branching, no give-up)")
    g.add_argument("--no-prefix-mask", action="store_true", help="ablation: train every slot, not only valid prefixes")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_drafter)


def default_drafter_dir(model: str, arch: str = "eagle") -> Path:
    from sglang_ext.models.provision import cache_root

    return cache_root() / "drafters" / f"{model}-{arch}"


def self_generate(model, prompts: list[list[int]], gen_tokens: int, pad_id: int, batch: int, progress: bool = True) -> list[list[int]]:
    """The target's own greedy answers to ``prompts`` (self-distillation data), as full token sequences.

    Batched HF ``generate`` with left padding: this is data generation, not serving, so the padding's tiny
    numerical effect on greedy choices does not matter.
    """
    import torch
    from rich.progress import track

    from sglang_ext.models.batching import left_pad

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: dict[int, list[int]] = {}
    groups = [order[i:i + batch] for i in range(0, len(order), batch)]
    for group in track(groups, description="self-generate", disable=not progress):
        ids, mask = left_pad([prompts[i] for i in group], pad_id)
        width = ids.shape[1]
        with torch.inference_mode():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=gen_tokens,
                                 do_sample=False, pad_token_id=pad_id)
        for r, i in enumerate(group):
            answer = gen[r, width:].tolist()
            if pad_id in answer:  # finished: keep the EOS (pad == eos here), drop the padding after it
                answer = answer[: answer.index(pad_id) + 1]
            out[i] = prompts[i] + answer
    return [out[i] for i in range(len(prompts))]


def save_sequences(path: Path, **groups: list[list[int]]) -> None:
    """Token sequences as flat uint32 arrays + offsets (``.npz``): small enough to carry to another machine."""
    import numpy as np

    arrays = {}
    for name, seqs in groups.items():
        arrays[f"{name}_tokens"] = np.array([t for s in seqs for t in s], dtype=np.uint32)
        arrays[f"{name}_offsets"] = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def load_sequences(path: Path) -> dict[str, list[list[int]]]:
    import numpy as np

    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a sequences file from --export-sequences ({e})") from e
    out = {}
    for key in data.files:
        if key.endswith("_tokens"):
            name = key[: -len("_tokens")]
            toks, offs = data[key].tolist(), data[f"{name}_offsets"].tolist()
            out[name] = [toks[offs[i]:offs[i + 1]] for i in range(len(offs) - 1)]
    return out


def cmd_train_drafter(args) -> int:
    from rich.console import Console

    from sglang_ext.data.corpus import chat_token_sequences, load_conversations, split_holdout
    from sglang_ext.engine.target import TargetModel
    from sglang_ext.models.provision import load_model
    from sglang_ext.training.drafter import DrafterTrainer, TrainConfig

    console, err = Console(), Console(stderr=True)
    try:
        model, tokenizer, _ = load_model(args.model, device=args.device)
    except (KeyError, ValueError) as e:
        err.print(f"[red]error:[/red] --model {args.model!r}: {e}")
        return 2
    n = model.config.num_hidden_layers
    layers = args.feature_layers or [min(2, n - 1), n // 2, max(0, n - 3)]
    try:
        target = TargetModel(model, feature_layers=tuple(layers), name=args.model)
    except ValueError as e:
        err.print(f"[red]error:[/red] --feature-layers: {e}")
        return 2
    eos = [t for t in {tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)} if isinstance(t, int)]
    t0 = time.perf_counter()
    domain_counts: dict[str, int] = {}
    if args.sequences and args.exclude_domains:
        err.print("[red]error:[/red] --exclude-domains filters --corpus conversations; a --sequences file is already "
                  "tokenised (filter when exporting it: --corpus ... --exclude-domains ... --export-sequences FILE)")
        return 2
    if args.sequences:
        try:
            groups = load_sequences(args.sequences)
        except ValueError as e:
            err.print(f"[red]error:[/red] --sequences: {e}")
            return 2
        train, heldout, gen_prompts = groups.get("train", []), groups.get("heldout", []), groups.get("prompts", [])
    else:
        try:
            conversations = load_conversations(args.corpus)
        except (OSError, ValueError) as e:
            err.print(f"[red]error:[/red] --corpus {args.corpus}: {e}")
            return 2
        if args.exclude_domains:
            from sglang_ext.data.domains import filter_conversations

            conversations, domain_counts = filter_conversations(conversations, args.exclude_domains)
            console.print(f"--exclude-domains {','.join(args.exclude_domains)}: kept {len(conversations)} of "
                          f"{sum(domain_counts.values())} conversations (" +
                          ", ".join(f"{d} {n}" for d, n in domain_counts.items()) + ")")
        seqs = chat_token_sequences(tokenizer, conversations, max_tokens=args.max_tokens, max_sequences=args.max_sequences,
                                    seed=args.seed)
        train, heldout = split_holdout(seqs, args.heldout_fraction, seed=args.seed)
        # self-generation prompts: first user turns of conversations not used above (the corpus is shuffled by seed)
        from sglang_ext.models.chat import encode_chat

        gen_prompts = [encode_chat(tokenizer, c[0]["content"])[:args.max_tokens // 2]
                       for c in conversations[-max(args.self_generate, 1):]] if args.self_generate else []
    if args.export_sequences and not args.sequences:  # tokenise only (the self-generation prompts are kept)
        save_sequences(args.export_sequences, train=train, heldout=heldout, prompts=gen_prompts)
        console.print(f"wrote {len(train)} train / {len(heldout)} held-out sequences and {len(gen_prompts)} prompts "
                      f"to {args.export_sequences}")
        return 0
    if args.self_generate:
        prompts = gen_prompts[: args.self_generate]
        console.print(f"self-generating answers to {len(prompts)} prompts ...")
        pad = eos[0] if eos else 0
        train = train + self_generate(model, prompts, args.gen_tokens, pad, args.gen_batch, progress=not args.no_progress)
        if args.export_sequences:  # --sequences IN --self-generate N --export-sequences OUT: keep the generated data
            save_sequences(args.export_sequences, train=train, heldout=heldout, prompts=[])
            console.print(f"wrote {len(train)} train sequences (self-generated included) to {args.export_sequences}")
            return 0
    console.print(f"{len(train)} training / {len(heldout)} held-out sequences "
                  f"({sum(map(len, train))} tokens) prepared in {time.perf_counter() - t0:.0f} s")
    cache = None
    if args.feature_cache:
        from sglang_ext.training.feature_cache import FeatureCache, FeatureCacheError

        try:
            cache = FeatureCache.build(target, train, args.feature_cache, target_name=args.model,
                                       max_bytes=int(args.feature_cache_max_gb * 2**30), batch_tokens=args.batch_tokens,
                                       progress=not args.no_progress, log=console.print)
        except (FeatureCacheError, ValueError) as e:
            err.print(f"[red]error:[/red] --feature-cache: {e}")
            return 2
        if args.cache_only:
            console.print(f"feature cache ready: {args.feature_cache} ({len(cache)} sequences)")
            return 0
    elif args.cache_only:
        err.print("[red]error:[/red] --cache-only needs --feature-cache DIR")
        return 2
    cfg = TrainConfig(feature_layers=layers, draft_vocab_size=args.draft_vocab_size or None, ttt_steps=args.ttt_steps,
                      max_tokens=args.max_tokens, batch_tokens=args.batch_tokens, lr=args.lr, epochs=args.epochs,
                      seed=args.seed, max_train_seconds=args.max_train_seconds, max_steps=args.max_steps, arch=args.arch,
                      warmup_steps=args.warmup_steps,
                      block_size=args.block_size, drafter_layers=args.drafter_layers, ttt_blocks=args.ttt_blocks,
                      rank_start=args.rank_start, shift=not args.no_shift, inherit=not args.no_inherit,
                      rank_head=not args.no_rank_head, prefix_mask=not args.no_prefix_mask)
    out = args.out or default_drafter_dir(args.model, args.arch)
    import torch

    torch.manual_seed(args.seed)
    report = DrafterTrainer(target, args.model, cfg, out, device=args.device).train(
        train, heldout, eos_ids=eos, progress=not args.no_progress, log=console.print, cache=cache)
    report["corpus"] = args.corpus
    report["exclude_domains"] = list(args.exclude_domains)
    if domain_counts:
        report["corpus_domains"] = domain_counts
    report["self_generated"] = args.self_generate
    (Path(out) / "report.json").write_text(json.dumps(report, indent=2))
    console.print_json(json.dumps(report))
    console.print(f"drafter saved to {out}")
    return 0

