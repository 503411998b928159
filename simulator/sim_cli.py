"""`sglang-ext sim ...`: replay a trace through the simulated engine, sweep a grid, tune a policy's parameters, and
validate the simulator against the real reference engine (``sim validate``, :mod:`simulator.validate`).

``replay`` reads a JSONL trace lazily, one line per arrival, so a malformed line part-way stops the arrivals,
lets the requests already in the system finish, and writes ``partial.json`` (the error names ``file:line``);
Ctrl-C writes ``partial.json`` too. Other formats are imported whole first (:mod:`simulator.importers`).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from sglang_ext.formats.trace import Trace, TraceError, stream_trace

FORMATS = ("jsonl", "azure", "vidur", "mooncake", "burstgpt")


def register(sub) -> None:
    """Add the ``sim`` subcommand group to an argparse subparsers object."""
    p = sub.add_parser("sim", help="discrete-event simulator: replay a trace, sweep a grid, tune a policy")
    ssub = p.add_subparsers(dest="sim_cmd", required=True)

    rep = ssub.add_parser("replay", help="replay a trace through the simulated engine with a policy")
    _common(rep)
    rep.add_argument("--out", type=Path, required=True, help="directory for result.json, requests.csv")
    rep.add_argument("--record-steps", action="store_true", help="also write every iteration (time, B, k, ...)")
    rep.add_argument("--workers", type=_positive("--workers", int), default=1,
                     help="split the replicas over this many processes (round-robin routing, no shared trainer; "
                          "each worker has its own random streams: simulator.parallel)")
    rep.add_argument("--compare-static", action="store_true",
                     help="with --trainer: also replay without the trainer (same seed) and report, per arrival "
                          "window, acceptance and TPOT of both and when adaptation pays (adaptation.json)")
    rep.add_argument("--window", type=_positive("--window"), default=None,
                     help="--compare-static window in s (default: a twentieth of the trace)")
    rep.set_defaults(func=_guard(cmd_replay))

    sw = ssub.add_parser("sweep", help="simulate a grid of policy params / engine settings / loads in parallel")
    _common(sw)
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="a grid axis: a policy parameter, an engine setting (max_batch_size, kv_capacity, ...), "
                         "time_scale (load) or seed; repeat for more axes")
    sw.add_argument("--jobs", type=int, default=0, help="worker processes (default: all cores)")
    sw.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT|local",
                    help="run the points on a Ray cluster instead of local processes (extra 'cluster'; same results)")
    sw.add_argument("--out", type=Path, required=True, help="directory for sweep.csv and sweep.json")
    sw.set_defaults(func=_guard(cmd_sweep))

    tu = ssub.add_parser("tune", help="optimise a policy's tunables for an objective; write a policy config")
    _common(tu)
    tu.add_argument("--objective", default="goodput",
                    choices=["goodput", "throughput", "throughput-p90-tpot", "latency"])
    tu.add_argument("--params", default=None, help="comma-separated parameters to search (default: all tunables)")
    tu.add_argument("--maxiter", type=int, default=10, help="differential-evolution generations")
    tu.add_argument("--popsize", type=int, default=8, help="population per searched parameter")
    tu.add_argument("--jobs", type=int, default=1, help="worker processes")
    tu.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT|local",
                    help="evaluate each generation on a Ray cluster instead of local processes (extra 'cluster')")
    tu.add_argument("--out", type=Path, required=True, help="policy config JSON to write (+ .tune.json report)")
    g = tu.add_argument_group("the serving flags the result will be deployed with (recorded in the config; a launch "
                              "with other values is refused)")
    g.add_argument("--speculative-num-steps", type=_positive("--speculative-num-steps", int), default=None,
                   help="depth parameters are searched up to this many steps (SGLang caps draft steps there)")
    g.add_argument("--speculative-eagle-topk", type=_positive("--speculative-eagle-topk", int), default=None)
    g.add_argument("--max-running-requests", type=_positive("--max-running-requests", int), default=None,
                   help="the server's batch limit (sets --max-batch-size)")
    tu.set_defaults(func=_guard(cmd_tune))

    from simulator import validate

    va = ssub.add_parser("validate", help="replay a trace on the real reference engine and in the simulator; "
                         "print the errors (throughput ±5%%, p50/p90 E2E ±10%%)",
                         description=validate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    validate.add_arguments(va)
    va.set_defaults(func=_guard(validate.cmd_validate))

    fl = ssub.add_parser("fit-learning", help="fit a measured online-learning curve (analysis.learner_curve) into "
                         "the simulator's training model; print the replay flags and the fit error")
    fl.add_argument("--curve", type=Path, required=True, help="results.json of python -m analysis.learner_curve")
    fl.add_argument("--variant", required=True, help="the learner variant's name in that file")
    fl.add_argument("--domain", required=True, help="the held-out domain to fit (e.g. code)")
    fl.add_argument("--decay", type=float, default=1.0, help="the acceptance model's per-position decay")
    fl.add_argument("--first-round", type=int, default=0,
                    help="fit from this round on (where the domain's traffic starts in a multi-domain stream)")
    fl.add_argument("--out", type=Path, default=None, help="also write the fit as JSON here")
    fl.set_defaults(func=_guard(cmd_fit_learning))


def cmd_fit_learning(args) -> int:
    from simulator.learning_fit import as_dict, fit_from_results

    fit = fit_from_results(args.curve, args.variant, args.domain, args.decay, args.first_round)
    console = Console()
    console.print(f"{escape(args.variant)} on {escape(args.domain)}: gain {fit.gain:.4f} per {fit.round_tokens}-token round, ceiling "
                  f"alpha {fit.ceiling:.4f} (start {fit.alpha_start:.4f}); fit error in acceptance length: mean "
                  f"{fit.mean_abs_error_accept_len:.4f}, max {fit.max_abs_error_accept_len:.4f} over {fit.rounds} rounds"
                  + (f"; {fit.round_seconds:.0f} trainer CPU s per round" if fit.round_seconds else ""))
    console.print(f"sglang-ext sim replay ... {fit.flags()}", highlight=False, soft_wrap=True)
    if args.out:
        args.out.write_text(json.dumps(as_dict(fit), indent=1) + "\n")
    return 0


def _positive(flag: str, kind=float):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected a {kind.__name__}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: must be a finite number > 0")
        return v
    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", type=Path, required=True)
    p.add_argument("--format", choices=FORMATS, default="jsonl")
    cost = p.add_mutually_exclusive_group(required=True)
    cost.add_argument("--profile", type=Path, help="a measured profile (sglang-ext profile), fitted on load")
    cost.add_argument("--cost-model", type=Path, help="a fitted cost model JSON (CostModel.save)")
    p.add_argument("--policy", default="static", help="registry name (static, dsde, tide-control, ...)")
    p.add_argument("--policy-config", type=Path, default=None, help="a policy config file (sim tune writes one)")
    p.add_argument("--policy-param", action="append", default=[], metavar="K=V", help="override a policy param")
    p.add_argument("--policy-costs", choices=["given", "learned"], default="given",
                   help="give cost-aware policies the cost model (given) or let them learn costs online")
    p.add_argument("--acceptance", default=None,
                   help="acceptance model: JSON file, or spec alpha=0.7,conc=20,decay=0.95,drift=0:1;600:0.6 "
                        "(CATEGORY.alpha=...; prefix replay: to replay recorded acceptance first). "
                        "Default: replay recorded acceptance, parametric defaults elsewhere")
    p.add_argument("--time-scale", type=_positive("--time-scale"), default=1.0,
                   help="multiply arrivals (0.5 = twice the rate)")
    p.add_argument("--head", type=int, default=None, help="only the first N requests")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--router", default="round-robin", choices=["round-robin", "least-loaded", "least-tokens"])
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-prefill-tokens", type=int, default=4096, help="prefill tokens per iteration (chunk)")
    p.add_argument("--kv-capacity", type=int, default=None, help="KV cache size in tokens (default: unlimited); "
                   "a request larger than it is rejected (counted in the results)")
    p.add_argument("--max-context-len", type=_positive("--max-context-len", int), default=None,
                   help="the model's position limit: longer requests are rejected (default: the profile's model's "
                        "max_position_embeddings, when it records one)")
    p.add_argument("--strict-profile", action="store_true",
                   help="a cost lookup beyond the profile's measured range (batch, context, prefill chunk, depth) is "
                        "an error; by default it is counted and reported")
    p.add_argument("--schedule", choices=["prefill_first", "mixed"], default="prefill_first")
    p.add_argument("--overhead", type=float, default=0.0, help="fixed seconds per iteration (scheduler, CPU)")
    p.add_argument("--trainer", choices=["none", "separate", "shared"], default="none")
    p.add_argument("--train-share", type=float, default=0.25)
    p.add_argument("--train-round-tokens", type=int, default=200_000)
    p.add_argument("--train-gain", type=float, default=0.3)
    p.add_argument("--train-round-seconds", type=_positive("--train-round-seconds"), default=None,
                   help="a training round's measured wall time on the trainer's device (default: the profile's "
                        "train_seconds of --train-round-tokens); sim fit-learning prints the measured one")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT SLO in s (goodput)")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="TPOT SLO in s (goodput)")
    p.add_argument("--seed", type=int, default=0)


def _guard(func):
    """Expected input errors → one line naming the file (and line) and exit code 1, not a traceback."""

    def run(args) -> int:
        from sglang_ext.core.costs import ProfileError

        try:
            return func(args)
        except (TraceError, ProfileError, ValueError, OSError) as e:
            Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False)
            return 1

    return run


# ---- inputs ------------------------------------------------------------------------------------------------------
def load_trace(args) -> Trace:
    """The whole trace (sweep, tune), scaled and cut as asked; an empty one is an error naming the file."""
    from simulator.importers import import_trace

    trace = import_trace(args.format, args.trace)
    if not len(trace):
        raise TraceError(args.trace, None, "no requests in this trace")
    if args.head is not None:
        trace = trace.head(args.head)
    if args.time_scale != 1.0:
        trace = trace.scaled(args.time_scale)
    return trace


def load_cost_model(args) -> Any:
    try:
        from sglang_ext.core.costs import CostModel
    except ImportError as e:  # pragma: no cover - the costs module ships with the package
        raise ValueError(f"--profile/--cost-model need sglang_ext.core.costs ({e}); use the Python API "
                         "(simulator.model.simulate) with your own cost object") from None
    if args.profile is not None:
        from sglang_ext.cache import cache_root

        return CostModel.fit_cached(args.profile, cache_root() / "cost-fits")
    return CostModel.load(args.cost_model)


def sim_config(args, cost: Any = None, **extra: Any):
    from simulator.model import SimConfig

    max_ctx = args.max_context_len
    if max_ctx is None and isinstance(getattr(cost, "source", None), dict):
        max_ctx = cost.source.get("max_positions")
    return SimConfig(max_context_len=max_ctx, strict_profile=args.strict_profile,max_batch_size=args.max_batch_size, max_prefill_tokens=args.max_prefill_tokens,
                     kv_capacity=args.kv_capacity, schedule=args.schedule, overhead_s=args.overhead,
                     replicas=args.replicas, router=args.router, trainer=args.trainer, train_share=args.train_share,
                     train_round_tokens=args.train_round_tokens, train_gain=args.train_gain,
                     train_round_seconds=args.train_round_seconds, temperature=args.temperature, slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot, **extra)


def _kv_pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _policy_name(args) -> str:
    if args.policy_config is not None:
        d = json.loads(Path(args.policy_config).read_text())
        if isinstance(d, dict) and isinstance(d.get("policy"), str):
            return d["policy"]
    return args.policy


def _policy_params(args) -> dict[str, Any]:
    from simulator.tune import coerce_params

    raw = _kv_pairs(args.policy_param, "--policy-param")
    return coerce_params(_policy_name(args), raw) if raw else {}


# ---- commands ----------------------------------------------------------------------------------------------------
def cmd_replay(args) -> int:
    from simulator.acceptance import parse_acceptance
    from sglang_ext.formats.results import write_requests_csv
    from simulator.model import Simulation
    from simulator.tune import build_policy

    console = Console()
    cost = load_cost_model(args)
    policy = build_policy(args.policy, _policy_params(args), cost, args.policy_config,
                          give_costs=args.policy_costs == "given")
    acceptance = parse_acceptance(args.acceptance)
    config = sim_config(args, cost, record_steps=args.record_steps)
    out = Path(args.out)
    if args.workers > 1:
        from simulator.parallel import check_partitionable, simulate_partitioned

        check_partitionable(config, args.workers)
        out.mkdir(parents=True, exist_ok=True)
        result = simulate_partitioned(
            load_trace(args), cost, lambda r: build_policy(args.policy, _policy_params(args), cost, args.policy_config,
                                                           give_costs=args.policy_costs == "given"),
            config, args.seed, lambda: parse_acceptance(args.acceptance), args.workers)
        return _finish_replay(args, result, out, console, policy)
    if args.compare_static:
        return _compare_static(args, cost, config, out, console)
    requests = stream_trace(args.trace, args.time_scale, args.head) if args.format == "jsonl" else load_trace(args)
    out.mkdir(parents=True, exist_ok=True)
    sim = Simulation(requests, cost, policy, config, args.seed, acceptance)
    try:
        result = sim.run()
    except KeyboardInterrupt:
        result = sim.result()
        path = result.save(out / "partial.json")
        write_requests_csv(result, out / "requests.partial.csv")
        console.print(f"[yellow]interrupted at t={sim.env.now:.1f} s: partial results in {path} and "
                      f"{out / 'requests.partial.csv'}[/yellow]")
        return 130
    if result.complete and sim.arrived == 0:
        raise TraceError(args.trace, None, "no requests in this trace (nothing to replay)")
    return _finish_replay(args, result, out, console, policy)


def _compare_static(args, cost, config, out: Path, console) -> int:
    """``--compare-static``: the replay with its trainer and the same replay without one; when adaptation pays."""
    from dataclasses import replace

    from rich.table import Table

    from simulator.acceptance import parse_acceptance
    from simulator.adaptation import adaptation_pays
    from simulator.model import simulate
    from simulator.tune import build_policy

    if config.trainer == "none":
        raise ValueError("--compare-static compares a trainer against none: give --trainer separate|shared")
    trace = load_trace(args)
    runs = {}
    for name, cfg in (("static", replace(config, trainer="none")), ("trained", config)):
        policy = build_policy(args.policy, _policy_params(args), cost, args.policy_config,
                              give_costs=args.policy_costs == "given")
        runs[name] = simulate(trace, cost, policy, cfg, seed=args.seed, acceptance=parse_acceptance(args.acceptance))
        if not runs[name].complete:
            raise ValueError(f"the {name} replay stopped: {runs[name].error}")
    window = args.window or max(trace.duration / 20, 1e-6)
    report = adaptation_pays(runs["static"], runs["trained"], window)
    out.mkdir(parents=True, exist_ok=True)
    for name, res in runs.items():
        res.save(out / f"result-{name}.json")
    (out / "adaptation.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    t = Table(title=f"adaptation on {args.trace.name}: trainer {config.trainer}, window {window:.1f} s")
    for col in ("window from (s)", "requests", "accept len static", "accept len trained", "TPOT static (ms)",
                "TPOT trained (ms)", "TPOT speed-up"):
        t.add_column(col, justify="right")
    f = lambda x, fmt: "–" if x is None else format(x, fmt)  # noqa: E731
    for w in report["windows"]:
        s_, r_ = w["static"], w["trained"]
        t.add_row(f"{w['start_s']:.0f}", str(s_["requests"]), f(s_["accept_length"], ".2f"), f(r_["accept_length"], ".2f"),
                  f(s_["tpot_s"] and 1e3 * s_["tpot_s"], ".1f"), f(r_["tpot_s"] and 1e3 * r_["tpot_s"], ".1f"),
                  f(w["tpot_speedup"], ".3f"))
    console.print(t)
    rounds = report["train_round_times_s"]
    console.print(f"rounds landed at {', '.join(f'{x:.0f}' for x in rounds[:12])}{' …' if len(rounds) > 12 else ''} s; "
                  f"adaptation pays after {f(report['pays_after_s'], '.0f')} s; second-half TPOT speed-up "
                  f"{f(report['speedup_second_half'], '.3f')}×")
    console.print(f"wrote {out / 'adaptation.json'}, result-static.json, result-trained.json")
    return 0


def _finish_replay(args, result, out: Path, console, policy) -> int:
    from sglang_ext.formats.results import print_result, write_requests_csv

    if not result.complete:
        path = result.save(out / "partial.json")
        write_requests_csv(result, out / "requests.partial.csv")
        print_result(result, console, f"replay of {args.trace.name}")
        Console(stderr=True).print(f"[red]error:[/red] {result.error}\npartial results ({result.summary['requests']} "
                                   f"requests) written to {path}", highlight=False)
        return 1
    result.save(out / "result.json")
    write_requests_csv(result, out / "requests.csv")
    print_result(result, console, f"replay of {args.trace.name} with {getattr(policy, 'name', args.policy)}")
    console.print(f"wrote {out / 'result.json'} and {out / 'requests.csv'}")
    return 0


def _parse_grid(items: list[str], policy: str) -> dict[str, list[Any]]:
    from simulator.model import SimConfig
    from simulator.tune import coerce_params

    config_keys = {f for f in SimConfig.__dataclass_fields__}
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--grid {item!r} is not KEY=V1,V2,...")
        key, vals = (s.strip() for s in item.split("=", 1))
        texts = [v.strip() for v in vals.split(",") if v.strip()]
        if not texts:
            raise ValueError(f"--grid {key}: no values")
        if key in config_keys or key in ("time_scale", "seed"):
            grid[key] = [_number(v) for v in texts]
        else:
            grid[key] = [coerce_params(policy, {key: v})[key] for v in texts]
    if not grid:
        raise ValueError("give at least one --grid KEY=V1,V2,...")
    return grid


def _number(text: str) -> Any:
    if text.lower() in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def cmd_sweep(args) -> int:
    from rich.table import Table

    from simulator.acceptance import parse_acceptance
    from simulator.tune import default_jobs, sweep, write_sweep

    if args.policy_config is not None:
        raise ValueError("sim sweep takes --policy and --policy-param (a grid over a config file is not supported)")
    console = Console()
    cost = load_cost_model(args)
    trace = load_trace(args)
    grid = _parse_grid(args.grid, args.policy)
    rows = sweep(trace, cost, args.policy, grid, base_params=_policy_params(args), config=sim_config(args, cost),
                 acceptance=parse_acceptance(args.acceptance), seed=args.seed, jobs=args.jobs or default_jobs(),
                 give_costs=args.policy_costs == "given", progress=True, ray_address=args.ray_address)
    csv_path, json_path = write_sweep(rows, args.out)
    t = Table(title=f"sweep of {args.policy} on {args.trace.name}")
    for k in grid:
        t.add_column(k)
    for k in ("tok/s", "goodput req/s", "SLO %", "TPOT p90", "AL"):
        t.add_column(k, justify="right")
    for r in rows:
        s = r.summary
        t.add_row(*(str(r.grid[k]) for k in grid), f"{s['throughput_tok_s']:.1f}", f"{s['goodput_req_s']:.3f}",
                  f"{100 * s['slo_attainment']:.1f}", f"{1000 * s['tpot_s']['p90']:.1f} ms",
                  f"{s['mean_acceptance_length']:.2f}")
    console.print(t)
    console.print(f"wrote {csv_path} and {json_path}")
    return 0


def cmd_tune(args) -> int:
    from simulator.acceptance import parse_acceptance
    from sglang_ext.formats.results import _finite
    from simulator.tune import save_tuned, tune

    console = Console()
    if args.policy_config is not None:
        raise ValueError("sim tune takes --policy (it writes the config); pass fixed values with --policy-param")
    cost = load_cost_model(args)
    trace = load_trace(args)
    names = [n.strip() for n in args.params.split(",") if n.strip()] if args.params else None
    deploy = {"speculative_num_steps": args.speculative_num_steps, "speculative_eagle_topk": args.speculative_eagle_topk,
              "max_running_requests": args.max_running_requests}
    if args.max_running_requests is not None:
        args.max_batch_size = args.max_running_requests
    extra = {"max_draft_tokens": args.speculative_num_steps} if args.speculative_num_steps else {}
    if args.speculative_num_steps is None:
        console.print("[yellow]no --speculative-num-steps: depth parameters are searched over the policy's own bounds; "
                      "give the serving flags so the result fits the server it is deployed on[/yellow]")
    res = tune(trace, cost, args.policy, objective=args.objective, params=names, fixed=_policy_params(args),
               config=sim_config(args, cost, **extra), acceptance=parse_acceptance(args.acceptance), seed=args.seed,
               maxiter=args.maxiter, popsize=args.popsize, jobs=args.jobs, give_costs=args.policy_costs == "given",
               progress=True, deploy=deploy, ray_address=args.ray_address)
    path = save_tuned(res, args.out, cost)
    report = Path(str(args.out) + ".tune.json") if not str(args.out).endswith(".json") else \
        Path(str(args.out)[:-5] + ".tune.json")
    report.write_text(json.dumps(_finite({"policy": res.policy, "objective": res.objective, "best": res.best_params,
                                          "score": res.best_score, "default_score": res.default_score,
                                          "evaluations": res.evaluations, "history": res.history}), indent=1) + "\n")
    console.print(f"best {res.policy} {res.best_params}: {res.objective} = {res.best_score:.4g} "
                  f"(defaults: {res.default_score:.4g}; {res.evaluations} simulations)")
    console.print(f"wrote {path} (load with --speculative-policy-config / --policy-config) and {report}")
    return 0
