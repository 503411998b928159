r"""``sglang-ext sim validate``: the simulator against the real reference engine, on the same trace.

For every (load level, engine configuration) the same time-scaled trace is replayed twice:

1. on the **real engine** (:func:`sglang_ext.engine.replay.replay`: in-process, wall clock, real prompts, outputs
   forced to the trace's lengths), which records each request's per-step acceptance (and, for DSDE, the KL of
   every proposed position);
2. in the **simulator** (:func:`simulator.model.simulate`, ``schedule="reference"``: the engine's own iteration)
   with the cost model fitted to a profile measured on this machine plus a calibrated per-step overhead, and the
   *recorded* acceptance replayed by output position (:class:`~simulator.acceptance.ReplayAcceptance`).

Then it prints the relative errors ``(simulated − measured) / measured`` of throughput (target ±5 %), p50 and
p90 end-to-end latency (±10 %), and of TTFT, TPOT and acceptance length (shown, not judged), and writes them
as JSON.

**Configurations**: ``off`` (plain decoding), ``static`` (EAGLE chain, ``--num-steps`` drafts every step) and
``dsde`` (EAGLE with the DSDE policy, depth capped by ``--dsde-num-steps``). **Loads**: fractions of the
capacity the profile predicts for plain decoding (``--loads light=0.5,queue=1.3``: one light, where requests never
wait for a batch slot, one where they queue); the same time scale serves all three configurations.

**Threads.** The engine runs with the profile's torch thread count (``meta.hardware.torch_threads``; ``--threads``
overrides it). On a 2-core machine shared with other jobs, one thread is the robust choice: with two, a neighbour
on either core stalls every parallel region (forwards 10-25x slower were measured), with one it costs 10-30 %.

**The step model: profile + calibrated overhead (on a separate run).** The profile prices the target's forwards
(verify, prefill) and the drafter's chain, measured on this machine. What it cannot know is calibrated per
configuration (``--calibrate config``; ``row``: right before every validation run, at its arrival rate) on a
*separate* replay of the same configuration — other requests of the source trace (the ones after the validation
head), other prompts, its own arrivals — never on the run that is judged (:func:`fit_calibration`):

- the **overhead** an engine step pays outside the profiled calls: the policy's calls, tensor building, the
  argmax and the greedy walk, KV commits, the drafter's ``observe``, DSDE's KL over the full vocabulary,
  finishing and compacting requests, the replay driver's own work — measured directly (step time minus the time
  inside the forwards and the drafter call) and fitted as ``overhead_s + overhead_per_request_s·B +
  overhead_per_admit_s·A``; plus the drafter's **catch-up** on a new prompt (it absorbs the prompt's features at
  its first call, each long backlog alone: ``absorb_per_token_s·Σ_r (backlog_r − 1)``, see
  :mod:`simulator.model`), which the profile's one-pair draft entries do not contain;
- optionally (``--calibrate-speed``) the **speed** of the machine then relative to when it was profiled (measured
  forward time / profiled forward time, for prefill, verify and draft): a shared machine runs the same forward
  10-25 % slower while a neighbour is busy. Off by default: on a machine whose load changes by the minute a
  15-second calibration's speed is noisier than the profile's median over minutes of interleaved samples.
  ``--calibrate-speed pooled`` takes the factors of every calibration so far instead (all configurations: the
  speed is the machine's, not the configuration's), a sample that grows with the validation. On a 2-core VM the
  forwards' speed was measured to wander by ±15 % between 10-second windows of one run, with no process of the
  VM busy (the host's memory bandwidth is shared): no calibration can predict that; a longer sample predicts
  its mean better.

Each row also reports the errors of the bare profile (no overhead), to show what the calibration contributes, and,
as a diagnostic that never decides the verdict, the speed the forwards actually ran at during the judged run
(``run speed``: measured / profiled verify and prefill time) with the errors the simulator would have had knowing
it (``errors_oracle_speed``): what is left once the machine's own speed drift is taken out.

**Re-judging** (``--rejudge DIR``): every engine run is saved (trace with acceptance, per-step timings, KL
signals, measured result), so a recorded validation can be judged again without the engine, with another
profile, cost-model structure or speed mode: calibrations are re-fitted from their saved steps, the simulator
runs again; flags that change the recorded runs themselves must match (they are checked).

**A shared machine.** Before every calibration the command waits (``--wait-idle``) for other processes to go
quiet, measures what they used during each run, and marks rows where they used more than ``--idle-cores`` as
disturbed: there the machine changed speed under the run, which no model of the engine can predict.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from sglang_ext.formats.trace import Request, Trace, TraceMeta, read_trace
from simulator.fidelity_summary import TAU_TARGET, aggregate, rankings, rotated

DEFAULT_TRACE = Path(__file__).resolve().parents[1] / "traces" / "tiny_chat.jsonl"
DEFAULT_PROFILE = Path(__file__).resolve().parents[1] / "traces" / "profiles" / "cpu-2core-smollm2-135m.json"
CONFIGS = ("off", "static", "dsde", "tide-control")
#: the ranking set of the issue: off, the chain at depths 1..3 and both adaptive policies
RANKING_CONFIGS = "off,k1,k2,k3,dsde,tide-control"
#: the issue's targets: throughput within 5 %, p50 / p90 end-to-end latency within 10 %
TOLERANCES = {"throughput": 0.05, "e2e_p50": 0.10, "e2e_p90": 0.10}
#: (name, path into a SimResult summary, judged)
METRICS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("throughput", ("throughput_tok_s",), True),
    ("e2e_p50", ("e2e_s", "p50"), True),
    ("e2e_p90", ("e2e_s", "p90"), True),
    ("ttft_p50", ("ttft_s", "p50"), False),
    ("ttft_p90", ("ttft_s", "p90"), False),
    ("tpot_p50", ("tpot_s", "p50"), False),
    ("accept_len", ("mean_acceptance_length",), False),
)
#: a calibrated speed factor further than this from 1 means the profile does not describe the machine as it is now
SPEED_WARN = 0.15
OVERHEAD_TERMS = ("overhead_s", "overhead_per_request_s", "overhead_per_admit_s", "absorb_per_token_s")


# ---- configurations ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    """One engine configuration, as the engine builds it and as the simulator mirrors it."""

    name: str
    algorithm: str = "NONE"
    num_steps: int = 0
    policy: str | None = None
    policy_params: dict = field(default_factory=dict)

    @property
    def speculative(self) -> bool:
        return self.algorithm != "NONE" and self.num_steps > 0

    def engine_policy(self):
        from sglang_ext.core.policies import make_policy

        return make_policy(self.policy, **self.policy_params) if self.policy else None

    def sim_policy(self):
        """The engine's policy; without one the engine drafts ``num_steps`` every step (static k)."""
        from sglang_ext.core.policies import make_policy

        if self.policy:
            return make_policy(self.policy, **self.policy_params)
        return make_policy("static", k=self.num_steps if self.speculative else 0)

    def describe(self) -> str:
        if not self.speculative:
            return "speculation off"
        pol = f", policy {self.policy}" if self.policy else ""
        return f"{self.algorithm} chain k≤{self.num_steps}{pol}" if self.policy else f"{self.algorithm} chain k={self.num_steps}"


def make_configs(names: Sequence[str], num_steps: int = 2, dsde_num_steps: int = 2) -> list[RunConfig]:
    """``off``; ``static`` (EAGLE chain, ``num_steps`` drafts every step); ``kN`` (the chain at depth N);
    ``dsde`` and ``tide-control`` (the policy, depth capped at ``dsde_num_steps``; tide-control learns its costs
    online on both sides, as it does when served)."""
    out = []
    for n in names:
        if n == "off":
            out.append(RunConfig("off"))
        elif n == "static":
            out.append(RunConfig("static", "EAGLE", num_steps))
        elif len(n) > 1 and n[0] == "k" and n[1:].isdigit() and int(n[1:]) >= 1:
            out.append(RunConfig(n, "EAGLE", int(n[1:])))
        elif n == "dsde":
            out.append(RunConfig("dsde", "EAGLE", dsde_num_steps, "dsde"))
        elif n == "tide-control":
            out.append(RunConfig("tide-control", "EAGLE", dsde_num_steps, "tide-control",
                                 {"gamma": dsde_num_steps}))
        else:
            raise ValueError(f"--configs: unknown configuration {n!r}; choose from {', '.join(CONFIGS)} or kN "
                             "(the EAGLE chain at depth N)")
    if len({c.name for c in out}) != len(out):
        raise ValueError(f"--configs {','.join(names)}: a configuration is named twice")
    return out


# ---- traces ------------------------------------------------------------------------------------------------------
def derive_trace(trace: Trace, *, start: int = 0, count: int | None = None, prompt_scale: float = 1.0,
                 output_scale: float = 1.0, max_prompt_tokens: int | None = None,
                 max_output_tokens: int | None = None, min_prompt_tokens: int = 2, prefix: str = "r") -> Trace:
    """Requests ``start .. start + count`` of ``trace``, rebased to arrive from 0, lengths scaled and clipped (a CPU
    engine serves a 135M model slowly: the validation keeps the trace's shape at a size that runs in minutes).

    Prompts get at least ``min_prompt_tokens`` (an EAGLE drafter needs one prompt pair to draft from); ids are
    ``prefix<i>``; recorded acceptance is dropped (it belongs to another run)."""
    reqs = trace.requests[start:None if count is None else start + count]
    if not reqs:
        raise ValueError(f"trace {trace.meta.name or '?'}: no requests in [{start}, {start + (count or 0)})")
    t0 = reqs[0].arrival
    out = []
    for i, r in enumerate(reqs):
        p = max(min_prompt_tokens, round(r.prompt_tokens * prompt_scale))
        o = max(1, round(r.output_tokens * output_scale))
        if max_prompt_tokens is not None:
            p = min(p, max_prompt_tokens)
        if max_output_tokens is not None:
            o = min(o, max_output_tokens)
        out.append(Request(round(r.arrival - t0, 6), p, o, r.category, None, f"{prefix}{i}"))
    meta = TraceMeta(name=f"{trace.meta.name or 'trace'}-{prefix}", source=f"derived from {trace.meta.name}: requests "
                     f"{start}..{start + len(out) - 1}, prompt x{prompt_scale} (max {max_prompt_tokens}), output "
                     f"x{output_scale} (max {max_output_tokens})", licence=trace.meta.licence)
    return Trace(tuple(out), meta)


def time_scale_for(trace: Trace, rate: float) -> float:
    """The arrival multiplier that gives ``trace`` a mean rate of ``rate`` requests/s."""
    if len(trace) < 2 or trace.duration <= 0:
        return 1.0
    natural = (len(trace) - 1) / trace.duration
    return natural / rate


# ---- the overhead model --------------------------------------------------------------------------------------------
def profiled_parts(step: Any, cost: Any, chunk: int) -> tuple[float, float, float]:
    """What the cost model says an engine step's profiled parts take: (prefill, draft, verify) seconds.

    Prefill: each admitted prompt's ``prompt − 1`` tokens in ``chunk``-token forwards; draft: one chain of the
    step's deepest draft for the batch; verify: one forward of ``K + 1`` nodes per request at the longest context.
    """
    pre = 0.0
    for p in step.admitted:
        body = p - 1
        for s in range(0, body, chunk):
            pre += cost.prefill_seconds(min(chunk, body - s), s)
    K = max(step.depths, default=0)
    B = step.batch_size
    draft = cost.draft_seconds(B, K) if (K > 0 and B > 0) else 0.0
    verify = cost.verify_seconds(B, K + 1, step.context_max) if B > 0 else 0.0
    return pre, draft, verify


def overhead_features(step: Any, speculative: bool) -> list[float]:
    """The regressors of :data:`OVERHEAD_TERMS` for one step (see :func:`fit_calibration`)."""
    B = step.batch_size
    K = max(step.depths, default=0)
    absorb = B * max(step.backlog_max - 1, 0) if (speculative and K > 0) else 0.0
    return [1.0 if B > 0 else 0.0, float(B), float(len(step.admitted)), float(absorb)]


def _trimmed(y: np.ndarray, trim: float) -> np.ndarray:
    """Mask of the values not more than ``trim`` robust standard deviations above the median."""
    med = float(np.median(y))
    mad = float(np.median(np.abs(y - med))) or 1e-5
    return y <= med + trim * 1.4826 * mad


def _ratio_trim(measured: np.ndarray, predicted: np.ndarray, trim: float) -> np.ndarray:
    """Mask of the steps whose measured / predicted ratio is not far above the median ratio (a neighbour's burst)."""
    ok = predicted > 0
    r = np.where(ok, measured / np.where(ok, predicted, 1.0), 0.0)
    return ok & _trimmed(r, trim)


def fit_calibration(steps: Sequence[Any], cost: Any, chunk: int, speculative: bool, trim: float = 6.0) -> dict[str, Any]:
    """Overhead coefficients (:data:`OVERHEAD_TERMS`, all >= 0) and speed factors from a calibration run's steps.

    Each fit drops the steps far above the rest first (more than ``trim`` robust standard deviations above the
    median: moments when another process took the CPU):

    - **outside the forwards** (``overhead_s``, ``overhead_per_request_s``, ``overhead_per_admit_s``; non-negative
      least squares): each step's cycle (wall time plus the driver's work up to the next step) minus the time
      measured *inside* the target's forwards and the drafter's call, against ``[1, B, A]``;
    - **speed** of the profiled parts on the machine as it is now: ``prefill`` and ``verify`` = measured forward
      time / the profile's prediction for the same forwards (ratio of sums); ``draft`` and ``absorb_per_token_s``
      from the drafter's calls, ``measured ≈ draft·profile + absorb·B·(backlog − 1)`` (both >= 0), the second
      term being the drafter's catch-up on new prompts that the profile's one-pair draft entries lack.

    A speed factor of 1.1 says the forwards run 10 % slower than when the profile was measured (a busier
    machine); the simulator then scales the profile by it (:class:`CalibratedCost`).
    """
    from scipy.optimize import lsq_linear

    rows = [s for s in steps if s.batch_size > 0]
    if len(rows) < 8:
        raise ValueError(f"calibration: {len(rows)} engine steps are too few to calibrate (need 8): "
                         "raise --calibration-requests or --max-output-tokens")
    X = np.array([overhead_features(s, speculative) for s in rows])
    coef = np.zeros(len(OVERHEAD_TERMS))
    y = np.array([s.outside for s in rows])
    used = _trimmed(y, trim)
    cols = [j for j in range(3) if X[used, j].any()]
    coef[cols] = lsq_linear(X[used][:, cols], y[used], bounds=(0.0, np.inf)).x
    parts = np.array([profiled_parts(s, cost, chunk) for s in rows])  # prefill, draft, verify
    speed = {"prefill": 1.0, "verify": 1.0, "draft": 1.0}
    basis = {"prefill": 0.0, "verify": 0.0, "draft": 0.0}  # profiled seconds each factor was measured over
    pre_m = np.array([s.prefill_forward_s for s in rows])
    ver_m = np.array([s.verify_forward_s for s in rows])
    has_pre = parts[:, 0] > 0
    if has_pre.sum() >= 2:
        k = _ratio_trim(pre_m[has_pre], parts[has_pre, 0], trim)
        speed["prefill"] = float(pre_m[has_pre][k].sum() / parts[has_pre, 0][k].sum())
        basis["prefill"] = float(parts[has_pre, 0][k].sum())
    k = _ratio_trim(ver_m, parts[:, 2], trim)
    speed["verify"] = float(ver_m[k].sum() / parts[k, 2].sum())
    basis["verify"] = float(parts[k, 2].sum())
    drafted = parts[:, 1] > 0
    if speculative and drafted.sum() >= 4:
        dm = np.array([s.draft_call_s for s in rows])[drafted]
        k = _ratio_trim(dm, parts[drafted, 1], trim)
        A = np.column_stack([parts[drafted, 1], X[drafted, 3]])[k]
        sol = lsq_linear(A, dm[k], bounds=(0.0, np.inf)).x if A[:, 1].any() else \
            np.array([dm[k].sum() / A[:, 0].sum(), 0.0])
        speed["draft"], coef[3] = float(sol[0]), float(sol[1])
        basis["draft"] = float(A[:, 0].sum())
    cycle = np.array([s.cycle for s in rows])
    base = parts.sum(axis=1)
    pred = parts @ np.array([speed["prefill"], speed["draft"], speed["verify"]]) + X @ coef
    plain = base + X @ coef
    keep = _ratio_trim(cycle, pred, trim)
    measured_fwd = pre_m + ver_m
    return {
        "coefficients": {name: float(c) for name, c in zip(OVERHEAD_TERMS, coef)},
        "speed": speed, "speed_basis_s": basis,
        "steps": len(rows), "trimmed": int((~used).sum()),
        "outside_share": float(y.sum() / cycle.sum()) if cycle.sum() > 0 else math.nan,
        # the profile against the forwards measured in this run (prefill + verify): how it fits the machine now
        "forward_rel_error": float(((parts[:, 0] + parts[:, 2]).sum() - measured_fwd.sum()) / measured_fwd.sum())
        if measured_fwd.sum() > 0 else math.nan,
        # the calibrated step model and the bare profile against this run's total time (in-sample)
        "total_rel_error_in_sample": float((pred[keep].sum() - cycle[keep].sum()) / cycle[keep].sum()),
        "total_rel_error_overhead_only": float((plain[keep].sum() - cycle[keep].sum()) / cycle[keep].sum()),
        "total_rel_error_profile_only": float((base[keep].sum() - cycle[keep].sum()) / cycle[keep].sum()),
    }


def measure_catch_up(draft_model: Any, vocab_size: int, batch_sizes: Sequence[int] = (1, 4, 8),
                     backlogs: Sequence[int] = (1, 64, 192, 384), repeats: int = 3, context: int = 256,
                     seed: int = 0) -> dict[str, Any]:
    """The EAGLE drafter's catch-up cost, measured like a profile entry: one depth-1 draft call for ``B`` requests
    that each hold ``P`` pending pairs (after a prefill: the prompt's), on random features (values do not change the
    cost). Fits ``seconds ≈ a + b·B + absorb·B·(P − 1)`` (non-negative least squares) and returns ``absorb`` (s per
    pending pair; with equal backlogs the drafter's split catch-up and a padded absorb process the same pairs)
    with the medians it was fitted to. Deterministic work, a few seconds: steadier than a slope read
    off the ten-odd admissions of a calibration run."""
    import statistics

    import torch
    from scipy.optimize import lsq_linear

    from sglang_ext.core.drafters.base import DraftRequest
    from sglang_ext.core.drafters.eagle import EagleDrafter

    B_max, P_max = max(batch_sizes), max(backlogs)
    drafter = EagleDrafter(draft_model, num_slots=B_max, max_len=context + P_max + 8)
    gen = torch.Generator().manual_seed(seed)
    w = draft_model.fc.weight
    feats = torch.randn(P_max, draft_model.config.feature_dim, generator=gen).to(device=w.device, dtype=w.dtype)
    toks = torch.randint(2, vocab_size, (P_max,), generator=gen).tolist()
    rows = []
    with torch.inference_mode():
        for B in batch_sizes:
            for P in backlogs:
                reqs = [DraftRequest(slot=b, tokens=[toks[0]], num_steps=1) for b in range(B)]
                times = []
                for rep_i in range(repeats + 1):
                    drafter.cache.lengths[:B] = context
                    for b in range(B):
                        drafter.pending[b] = ([], [])
                        drafter.observe(b, feats[:P], toks[:P])
                    t = time.perf_counter()
                    drafter.draft(reqs)
                    if rep_i:  # the first call is a warm-up
                        times.append(time.perf_counter() - t)
                rows.append((B, P, statistics.median(times)))
    X = np.array([[1.0, B, B * (P - 1)] for B, P, _ in rows])
    y = np.array([t for *_, t in rows])
    coef = lsq_linear(X / y[:, None], np.ones(len(y)), bounds=(0.0, np.inf)).x  # relative least squares
    return {"absorb_per_token_s": float(coef[2]), "call_s": float(coef[0]), "per_request_s": float(coef[1]),
            "points": [{"batch_size": B, "backlog": P, "seconds": t} for B, P, t in rows]}


class CalibratedCost:
    """A cost model with its prefill / verify / draft prices scaled by calibrated speed factors."""

    def __init__(self, cost: Any, speed: dict[str, float] | None = None) -> None:
        self.cost = cost
        self.speed = {"prefill": 1.0, "verify": 1.0, "draft": 1.0, **(speed or {})}
        self.source = getattr(cost, "source", {})

    def verify_seconds(self, batch_size: int, tokens_per_request: int, context_len: int = 0) -> float:
        return self.speed["verify"] * self.cost.verify_seconds(batch_size, tokens_per_request, context_len)

    def prefill_seconds(self, tokens: int, context_len: int = 0) -> float:
        return self.speed["prefill"] * self.cost.prefill_seconds(tokens, context_len)

    def draft_seconds(self, batch_size: int, depth: int) -> float:
        return self.speed["draft"] * self.cost.draft_seconds(batch_size, depth)

    def train_seconds(self, tokens: int) -> float:
        return self.cost.train_seconds(tokens)


def sim_config(overhead: dict[str, float] | None, *, max_batch_size: int, chunk: int, num_steps: int | None,
               slo_ttft_s: float = 2.0, slo_tpot_s: float = 0.1, record_steps: bool = False):
    from simulator.model import SimConfig

    o = overhead or {}
    return SimConfig(max_batch_size=max_batch_size, max_prefill_tokens=chunk, schedule="reference",
                     max_draft_tokens=num_steps, overhead_s=o.get("overhead_s", 0.0),
                     overhead_per_request_s=o.get("overhead_per_request_s", 0.0),
                     overhead_per_admit_s=o.get("overhead_per_admit_s", 0.0),
                     absorb_per_token_s=o.get("absorb_per_token_s", 0.0), slo_ttft_s=slo_ttft_s,
                     slo_tpot_s=slo_tpot_s, record_steps=record_steps)


def estimate_capacity(trace: Trace, cost: Any, config, policy_factory: Callable[[], Any], acceptance=None) -> float:
    """Requests/s the simulated engine sustains on ``trace``'s requests: all of them at once, count / makespan."""
    from simulator.acceptance import ParametricAcceptance
    from simulator.model import simulate

    burst = Trace(tuple(replace(r, arrival=0.0) for r in trace.requests), trace.meta)
    res = simulate(burst, cost, policy_factory(), config, acceptance=acceptance or ParametricAcceptance())
    return res.summary["requests"] / res.summary["makespan_s"] if res.summary["makespan_s"] > 0 else math.inf


# ---- comparing -----------------------------------------------------------------------------------------------------
def _get(summary: dict, path: tuple[str, ...]) -> float:
    v: Any = summary
    for k in path:
        v = v.get(k) if isinstance(v, dict) else None
    return float(v) if isinstance(v, (int, float)) and v is not None else math.nan


def relative_error(sim: float, real: float) -> float:
    """``(sim − real) / real``; NaN when either is missing or the measurement is 0."""
    if not (math.isfinite(sim) and math.isfinite(real)) or real == 0:
        return math.nan
    return (sim - real) / real


def compare(real: dict, sim: dict, tolerances: dict[str, float] = TOLERANCES) -> dict[str, dict[str, Any]]:
    """Per metric of :data:`METRICS`: measured, simulated, relative error and (judged metrics) pass/fail."""
    out = {}
    for name, path, judged in METRICS:
        r, s = _get(real, path), _get(sim, path)
        err = relative_error(s, r)
        tol = tolerances.get(name) if judged else None
        out[name] = {"real": r, "sim": s, "rel_error": err, "tolerance": tol,
                     "pass": (bool(abs(err) <= tol) if math.isfinite(err) else False) if tol is not None else None}
    return out


def row_passes(errors: dict[str, dict[str, Any]]) -> bool:
    return all(e["pass"] for e in errors.values() if e["pass"] is not None)


def print_table(rows: list[dict], console: Any = None, title: str = "simulator vs reference engine") -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=title)
    for col in ("load", "config", "req/s", "tok/s real", "throughput", "E2E p50", "E2E p90", "TTFT p50", "TTFT p90",
                "TPOT p50", "AL real/sim", "bare profile thr/p50/p90", "others' CPU", "run speed", "verdict"):
        t.add_column(col, justify="right" if col not in ("load", "config", "verdict") else "left")

    def cell(e: dict) -> str:
        err = e["rel_error"]
        if not math.isfinite(err):
            return "-"
        txt = f"{100 * err:+.1f}%"
        if e["pass"] is None:
            return txt
        return f"[green]{txt}[/green]" if e["pass"] else f"[red]{txt}[/red]"

    for row in rows:
        e = row["errors"]
        al = e["accept_len"]
        others = row.get("others_cpu_cores", math.nan)
        disturbed = row.get("disturbed", False)
        verdict = "[green]pass[/green]" if row["pass"] else "[red]FAIL[/red]"
        if disturbed:
            verdict += " [yellow](disturbed)[/yellow]"
        bare = row.get("errors_profile_only") or e
        raw = "/".join(f"{100 * bare[m]['rel_error']:+.0f}" if math.isfinite(bare[m]["rel_error"]) else "-"
                       for m in ("throughput", "e2e_p50", "e2e_p90")) + "%"
        sp = row.get("speed_during_run") or {}
        speed = f"x{sp['verify']:.2f}/x{sp['prefill']:.2f}" if sp else "-"
        t.add_row(row["load"], row["config"], f"{row['rate']:.2f}", f"{e['throughput']['real']:.1f}",
                  cell(e["throughput"]), cell(e["e2e_p50"]), cell(e["e2e_p90"]), cell(e["ttft_p50"]),
                  cell(e["ttft_p90"]), cell(e["tpot_p50"]), f"{al['real']:.2f}/{al['sim']:.2f}", raw,
                  "-" if not math.isfinite(others) else f"{others:.2f}", speed, verdict)
    console.print(t)


# ---- the command ---------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", type=Path, default=DEFAULT_PROFILE,
                   help=f"a profile measured on this machine (default {DEFAULT_PROFILE.name})")
    g = p.add_argument_group("workload")
    g.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help=f"source JSONL trace (default {DEFAULT_TRACE.name})")
    g.add_argument("--head", type=int, default=40, help="validation requests: the first N of the trace (default 40)")
    g.add_argument("--calibration-requests", type=int, default=10,
                   help="requests per calibration run, taken after the validation head (wrapping around; default 10)")
    g.add_argument("--prompt-scale", type=float, default=0.5, help="multiply prompt lengths (default 0.5)")
    g.add_argument("--output-scale", type=float, default=0.25, help="multiply output lengths (default 0.25)")
    g.add_argument("--max-prompt-tokens", type=int, default=512)
    g.add_argument("--max-output-tokens", type=int, default=48)
    g.add_argument("--loads", default="light=0.5,queue=1.3",
                   help="NAME=FRACTION,...: arrival rates as fractions of the profile's capacity for plain decoding")
    g.add_argument("--prompts", type=Path, default=None, help="prompt texts (default: Spec-Bench subset in ../shared/data)")
    g.add_argument("--prompt-seed", type=int, default=0)
    e = p.add_argument_group("engine")
    e.add_argument("--model-path", default="smollm2-135m")
    e.add_argument("--speculative-draft-model-path", default=str(Path(__file__).resolve().parents[1] / "drafters"
                                                                  / "smollm2-135m-eagle"))
    e.add_argument("--configs", default="off,static,dsde",
                   help="comma-separated: off, static (depth --num-steps), kN (the chain at depth N), dsde, "
                        f"tide-control (both capped at --dsde-num-steps); a ranking set: {RANKING_CONFIGS}")
    e.add_argument("--num-steps", type=int, default=2, help="static: EAGLE chain depth (default 2)")
    e.add_argument("--dsde-num-steps", type=int, default=2,
                   help="dsde, tide-control: depth cap (--speculative-num-steps; default 2)")
    e.add_argument("--max-running-requests", type=int, default=8)
    e.add_argument("--chunked-prefill-size", type=int, default=512)
    e.add_argument("--context-length", type=int, default=None,
                   help="engine context length (default: the longest request plus 16, at least 1024)")
    e.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the profile's meta.hardware.torch_threads, else torch's choice)")
    m = p.add_argument_group("measurement")
    m.add_argument("--calibrate", choices=("config", "row", "none"), default="config",
                   help="config: one calibration run per configuration at the start (other requests, other prompts); "
                        "row: one right before every validation run; none: the bare profile")
    m.add_argument("--calibrate-speed", nargs="?", const="run", default=None, choices=("run", "pooled"),
                   help="also scale the profile by measured speed factors: 'run' (the flag alone) those of the "
                        "row's own calibration run; 'pooled' those of every calibration so far (all "
                        "configurations: the machine's speed is shared), steadier where it drifts by the minute")
    m.add_argument("--wait-idle", type=float, default=120.0,
                   help="before each real run, wait up to this many seconds for other processes to go quiet")
    m.add_argument("--idle-cores", type=float, default=None,
                   help="'quiet': other processes use at most this many CPU cores; above it a row is 'disturbed' "
                        "(default: the cores the engine's threads leave free, plus 0.25)")
    m.add_argument("--warmup", type=int, default=2, help="untimed warm-up requests per engine")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--repeats", type=int, default=1,
                   help="engine runs of every (load, configuration) row, in rotated order; with more than one the "
                        "simulator is judged against the engine's medians, their spread reported, and the "
                        "configurations' order compared per load (Kendall tau; default 1)")
    p.add_argument("--out", type=Path, required=True, help="directory for validate.json and one replay per run")
    p.add_argument("--rejudge", type=Path, default=None, metavar="DIR",
                   help="no engine: judge the runs a previous `sim validate --out DIR` recorded again, with this "
                        "--profile (calibrations re-fitted from their saved steps); give that run's other flags")


def _parse_loads(text: str) -> list[tuple[str, float]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, frac = item.partition("=")
        try:
            f = float(frac)
        except ValueError:
            f = math.nan
        if not sep or not name or not (f > 0 and math.isfinite(f)):
            raise ValueError(f"--loads {item!r}: expected NAME=FRACTION with FRACTION > 0")
        out.append((name.strip(), f))
    if not out:
        raise ValueError("--loads: give at least one NAME=FRACTION")
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _write_json(path: Path, obj: Any) -> None:
    from sglang_ext.formats.results import _finite

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(obj), indent=1, default=_json_default) + "\n", encoding="utf-8")
    tmp.replace(path)


_SUMMARY_KEYS = ("throughput_tok_s", "makespan_s", "e2e_s", "ttft_s", "tpot_s", "mean_acceptance_length", "iterations")


@dataclass
class RecordedRun:
    """What judging one engine run needs, live or as ``sim validate`` saved it (``--rejudge``: no engine).

    ``recorded``: the finished requests with their acceptance; ``kl``: request id → KL per output position;
    ``steps``: the engine's :class:`~sglang_ext.engine.replay.StepRecord` s; ``summary``: the measured result.
    """

    recorded: Trace
    kl: dict[str, list] | None
    steps: list
    summary: dict
    others_cpu_cores: float = math.nan
    complete: bool = True
    error: str | None = None

    @classmethod
    def from_replay(cls, run: Any) -> RecordedRun:
        from sglang_ext.formats.steps import kl_positions_from_steps

        kl = {rid: kl_positions_from_steps(steps) for rid, steps in run.kl_records().items()} or None
        return cls(run.trace(finished_only=True), kl, list(run.steps), run.result().summary, run.others_cpu_cores,
                   run.complete, run.error)

    @classmethod
    def load(cls, directory: Path) -> RecordedRun:
        """A run saved by ``sim validate`` (``trace.jsonl``, ``steps.jsonl`` or ``steps.jsonl.gz``, ``result.json``,
        ``signals.jsonl``)."""
        from sglang_ext.engine.replay import load_signals, load_steps
        from sglang_ext.formats.results import SimResult

        d = Path(directory)
        if not (d / "result.json").is_file():
            raise ValueError(f"{d}: no result.json (was this run complete? partial runs cannot be re-judged)")
        result = SimResult.load(d / "result.json")
        path = d / "steps.jsonl"
        if not path.is_file() and path.with_suffix(".jsonl.gz").is_file():  # a stored result, compressed
            path = path.with_suffix(".jsonl.gz")
        steps = load_steps(path)
        kl = load_signals(d / "signals.jsonl") if (d / "signals.jsonl").is_file() else None
        perf = result.perf or {}
        return cls(read_trace(d / "trace.jsonl"), kl, steps, result.summary,
                   float(perf.get("others_cpu_cores", math.nan)), result.complete, result.error)


class Validation:
    """The state of one ``sim validate`` (so an interruption still writes what was measured)."""

    def __init__(self, args: argparse.Namespace, log: Callable[[str], None]) -> None:
        from sglang_ext.core.costs import CostModel, load_profile

        self.args = args
        self.log = log
        self.out = Path(args.out)
        # inputs first (errors name the file and line) — nothing loads before they are known good
        source = read_trace(args.trace)
        self.profile = load_profile(args.profile)
        self.cost = CostModel.fit(args.profile)
        self.loads = _parse_loads(args.loads)
        self.configs = make_configs([c.strip() for c in args.configs.split(",") if c.strip()], args.num_steps,
                                    args.dsde_num_steps)
        if not self.configs:
            raise ValueError("--configs: name at least one configuration")
        if args.head < 2:
            raise ValueError(f"--head {args.head}: need at least 2 requests")
        if args.repeats < 1:
            raise ValueError(f"--repeats {args.repeats}: need at least 1")
        self.scale = {"prompt_scale": args.prompt_scale, "output_scale": args.output_scale,
                      "max_prompt_tokens": args.max_prompt_tokens, "max_output_tokens": args.max_output_tokens}
        self.trace = derive_trace(source, count=args.head, prefix="r", **self.scale)
        # calibration requests: the ones after the validation head (then wrapping around), never the head itself
        # unless the source is too short; each calibration run takes the next window
        rest = source.requests[args.head:] or source.requests
        self.calib_pool = [Request(r.arrival, r.prompt_tokens, r.output_tokens, r.category) for r in rest]
        self.calib_count = 0
        if args.calibrate != "none" and args.calibration_requests < 2:
            raise ValueError(f"--calibration-requests {args.calibration_requests}: need at least 2 (or --calibrate none)")
        longest = max(r.prompt_tokens + r.output_tokens for r in derive_trace(source, prefix="x", **self.scale))
        self.context_length = args.context_length or max(1024, longest + 16)
        if longest > self.context_length:
            raise ValueError(f"--context-length {args.context_length}: requests reach {longest} tokens; raise it or "
                             "lower --max-prompt-tokens / --max-output-tokens")
        self.calibrations: dict[str, dict] = {}
        #: part -> [measured-equivalent seconds, profiled seconds] summed over every calibration so far
        self.speed_pool: dict[str, list[float]] = {}
        self.catch_up: dict[str, Any] | None = None
        self.rows: list[dict] = []
        self.report: dict[str, Any] = {
            "kind": "sglang-ext.sim-validate", "version": 1, "complete": False,
            "profile": str(args.profile), "cost_model": self.cost.fit_report(), "calibrate": args.calibrate,
            "calibrate_speed": args.calibrate_speed,
            "trace": {"source": str(args.trace), "head": args.head, **self.scale},
            "tolerances": TOLERANCES, "configs": {c.name: c.describe() for c in self.configs},
            "repeats": args.repeats, "ranking_tau_target": TAU_TARGET,
        }
        self.engine_parts = None

    # -- engine ------------------------------------------------------------------------------------------------
    def load_model(self) -> None:
        import os

        import torch

        from sglang_ext.engine.launch import load_draft_model, load_target
        from sglang_ext.engine.replay import PromptSource, load_texts

        a = self.args
        hw = self.profile["meta"].get("hardware")
        threads = a.threads or (hw.get("torch_threads") if isinstance(hw, dict) else None)
        if threads:
            torch.set_num_threads(int(threads))
        self.threads = torch.get_num_threads()
        self.idle_cores = a.idle_cores if a.idle_cores is not None else \
            max(0.0, (os.cpu_count() or self.threads) - self.threads) + 0.25
        self.texts = load_texts(a.prompts)
        model, tokenizer, name, _ = load_target(a.model_path)
        draft = None
        if any(c.speculative for c in self.configs):
            draft = load_draft_model(a.speculative_draft_model_path, name, model.config)
        self.engine_parts = (model, tokenizer, name, draft)
        self.prompts = PromptSource(self.texts, tokenizer, seed=a.prompt_seed)
        self.report["engine"] = {"model": name, "threads": self.threads, "idle_cores": self.idle_cores,
                                 "max_running_requests": a.max_running_requests,
                                 "chunked_prefill_size": a.chunked_prefill_size, "context_length": self.context_length}

    def build_engine(self, cfg: RunConfig):
        from sglang_ext.engine.launch import build_engine_from_parts

        model, tokenizer, name, draft = self.engine_parts
        a = self.args
        engine, _ = build_engine_from_parts(
            model, tokenizer, cfg.algorithm, num_steps=cfg.num_steps if cfg.speculative else None,
            draft_model=draft if cfg.speculative else None, max_running_requests=a.max_running_requests,
            context_length=self.context_length, prefill_chunk=a.chunked_prefill_size, model_name=name,
            policy=cfg.engine_policy())
        return engine

    def run_real(self, cfg: RunConfig, trace: Trace, prompts, tag: str, wait: bool = True):
        from sglang_ext.engine.replay import replay, wait_for_quiet

        engine = self.build_engine(cfg)
        before = wait_for_quiet(self.args.wait_idle, self.idle_cores, log=self.log) \
            if (wait and self.args.wait_idle > 0) else math.nan
        t = time.perf_counter()
        run = replay(engine, trace.requests, prompts, warmup=self.args.warmup)
        run.info.update(config=cfg.name, tag=tag, others_cpu_before=before)
        run.save(self.out / tag, name=tag)
        self.log(f"{tag}: {len(run.steps)} engine steps in {time.perf_counter() - t:.1f} s; other processes used "
                 f"{run.others_cpu_cores:.2f} CPU cores")
        del engine
        gc.collect()
        return run

    def sim_config(self, cfg: RunConfig, coefficients: dict[str, float] | None = None, record_steps: bool = False):
        a = self.args
        return sim_config(coefficients, max_batch_size=a.max_running_requests, chunk=a.chunked_prefill_size,
                          num_steps=cfg.num_steps if cfg.speculative else 0, record_steps=record_steps)

    def simulate(self, cfg: RunConfig, rec: RecordedRun, calibration: dict | None, speed: dict | None = None) -> Any:
        from simulator.acceptance import ReplayAcceptance
        from simulator.model import simulate

        if speed is None and calibration and self.args.calibrate_speed:
            speed = calibration["speed_pooled" if self.args.calibrate_speed == "pooled" else "speed"]
        cost = CalibratedCost(self.cost, speed) if speed else self.cost
        coefs = calibration["coefficients"] if calibration else None
        return simulate(rec.recorded, cost, cfg.sim_policy(), self.sim_config(cfg, coefs), seed=self.args.seed,
                        acceptance=ReplayAcceptance(kl=rec.kl))

    # -- calibration -------------------------------------------------------------------------------------------
    def calibration_trace(self, rate: float | None = None) -> Trace:
        """The next window of calibration requests, at ``rate`` (req/s; ``--calibrate row``: the row's own, so the
        calibration sees the batch sizes and prefill mix of the run it calibrates) or, by default, at the rate the
        bare profile says the engine sustains."""
        n = self.args.calibration_requests
        pool = self.calib_pool
        start = (self.calib_count * n) % len(pool)
        picked = [pool[(start + i) % len(pool)] for i in range(min(n, len(pool)))]
        t0 = picked[0].arrival
        picked = [replace(r, arrival=r.arrival - t0 if r.arrival >= t0 else r.arrival) for r in picked]
        src = Trace.from_unsorted(picked, TraceMeta(name="calibration"))
        trace = derive_trace(src, prefix=f"c{self.calib_count}-", **self.scale)
        off = RunConfig("off")
        if rate is None:
            rate = estimate_capacity(trace, self.cost, self.sim_config(off), off.sim_policy)
        return trace.scaled(time_scale_for(trace, rate))

    def calibrate(self, cfg: RunConfig, tag: str, rate: float | None = None) -> dict | None:
        """A calibration run of ``cfg`` on its own requests and prompts; returns :func:`fit_calibration`'s fit."""
        from sglang_ext.engine.replay import PromptSource

        if self.args.calibrate == "none":
            return None
        trace = self.calibration_trace(rate)
        prompts = PromptSource(self.texts, self.engine_parts[1], seed=self.args.prompt_seed + 7919 * (1 + self.calib_count))
        self.calib_count += 1
        run = self.run_real(cfg, trace, prompts, tag)
        if not run.complete:
            raise KeyboardInterrupt if "interrupted" in (run.error or "") else RuntimeError(run.error)
        return self.calibration_from_steps(cfg, run.steps, run.others_cpu_cores, len(trace), tag)

    def calibration_from_steps(self, cfg: RunConfig, steps: Sequence[Any], others_cpu_cores: float, requests: int,
                               tag: str) -> dict:
        """:func:`fit_calibration` on a calibration run's steps, with the measured catch-up, logged and kept."""
        fit = fit_calibration(steps, self.cost, self.args.chunked_prefill_size, cfg.speculative)
        fit["others_cpu_cores"] = others_cpu_cores
        for part, basis in fit["speed_basis_s"].items():  # every calibration so far, all configurations
            pool = self.speed_pool.setdefault(part, [0.0, 0.0])
            pool[0] += fit["speed"][part] * basis
            pool[1] += basis
        fit["speed_pooled"] = {part: (m / b if b > 0 else 1.0) for part, (m, b) in self.speed_pool.items()}
        if cfg.speculative and self.catch_up is not None:
            # the drafter's catch-up from its own measurement (steadier than the run's slope, kept in the report)
            fit["absorb_from_run_s"] = fit["coefficients"]["absorb_per_token_s"]
            fit["coefficients"]["absorb_per_token_s"] = self.catch_up["absorb_per_token_s"]
        fit["requests"] = requests
        c, sp = fit["coefficients"], fit["speed"]
        self.log(f"  calibrated {cfg.name}: measured/profiled speed prefill x{sp['prefill']:.3f}, verify "
                 f"x{sp['verify']:.3f}, draft x{sp['draft']:.3f}{'' if self.args.calibrate_speed else ' (not applied)'};"
                 f" overhead {1e3 * c['overhead_s']:.2f} ms/step + {1e3 * c['overhead_per_request_s']:.2f}"
                 f" ms/request + {1e3 * c['overhead_per_admit_s']:.2f} ms/admission, drafter catch-up "
                 f"{1e6 * c['absorb_per_token_s']:.1f} us/pair ({100 * fit['outside_share']:.1f}% of the step time is "
                 f"outside the forwards); in-sample step time: profile + overhead "
                 f"{100 * fit['total_rel_error_overhead_only']:+.1f}%, with speed factors "
                 f"{100 * fit['total_rel_error_in_sample']:+.1f}%, bare profile {100 * fit['total_rel_error_profile_only']:+.1f}%")
        off_by = {k: v for k, v in sp.items() if abs(v - 1.0) > SPEED_WARN}
        if off_by and not self.args.calibrate_speed:
            fit["warning"] = ("the profile disagrees with the engine measured now (" + ", ".join(
                f"{k} x{v:.2f}" for k, v in off_by.items()) + "): re-measure it (sglang-ext profile) under the "
                "conditions of the validation, or pass --calibrate-speed")
            self.log(f"  [yellow]warning:[/yellow] {fit['warning']}")
        self.calibrations[tag] = fit
        self.report["calibrations"] = self.calibrations
        return fit

    # -- the validation ------------------------------------------------------------------------------------------
    def measure_catch_up(self) -> None:
        draft = self.engine_parts[3]
        if draft is None or self.args.calibrate == "none":
            return
        import copy

        model = copy.deepcopy(draft).to(self.engine_parts[0].dtype)  # a copy: the engine binds the original
        from sglang_ext.engine.target import TargetModel

        target = TargetModel(self.engine_parts[0])
        model.bind_target(target.embed_tokens.weight, target.lm_head.weight)
        self.catch_up = measure_catch_up(model, target.vocab_size)
        self.report["catch_up"] = self.catch_up
        self.log(f"drafter catch-up (measured): {1e6 * self.catch_up['absorb_per_token_s']:.1f} us per pending "
                 "pair")

    def run(self, console: Any) -> bool:
        from simulator.acceptance import ParametricAcceptance

        self.measure_catch_up()

        off = RunConfig("off")
        cap = estimate_capacity(self.trace, self.cost, self.sim_config(off), off.sim_policy, ParametricAcceptance())
        self.report["capacity_req_s"] = cap
        self.report["loads"] = {}
        per_config = {}
        if self.args.calibrate == "config":
            for cfg in self.configs:
                per_config[cfg.name] = self.calibrate(cfg, f"calibration-{cfg.name}")
                self.save()
        plan = []
        for load, frac in self.loads:
            rate = frac * cap
            scale = time_scale_for(self.trace, rate)
            self.report["loads"][load] = {"fraction": frac, "rate_req_s": rate, "time_scale": scale}
            plan += [(load, rate, scale, cfg) for cfg in self.configs]
        repeats = self.args.repeats
        for rep in range(repeats):
            for position, (load, rate, scale, cfg) in enumerate(rotated(plan, rep, repeats)):
                tag = f"{load}-{cfg.name}" + (f"-r{rep}" if repeats > 1 else "")
                calib = per_config.get(cfg.name) if self.args.calibrate == "config" else \
                    self.calibrate(cfg, f"calibration-{tag}", rate)
                # no second wait: the calibration just ran, the validation run follows it at once
                run = self.run_real(cfg, self.trace.scaled(scale), self.prompts, tag, wait=calib is None)
                self.judge(cfg, load, rate, scale, tag, RecordedRun.from_replay(run), calib, console,
                           repeat=rep, position=position)
                if not run.complete:
                    raise KeyboardInterrupt if "interrupted" in (run.error or "") else RuntimeError(run.error)
        self.save()
        return self.report["pass"]

    def judge(self, cfg: RunConfig, load: str, rate: float, scale: float, tag: str, rec: RecordedRun,
              calib: dict | None, console: Any, repeat: int = 0, position: int | None = None) -> dict:
        """Simulate one measured run (calibrated, bare profile, and at the run's own speed) and keep its row."""
        real = rec.summary
        sim = self.simulate(cfg, rec, calib)
        sim.save(self.out / tag / "sim.json")
        bare = self.simulate(cfg, rec, None) if calib is not None else sim
        # diagnostic only, never the verdict: how fast the forwards ran during the judged run itself, and
        # the errors had the simulator known that speed (what is left beyond the machine's speed drift)
        during = fit_calibration(rec.steps, self.cost, self.args.chunked_prefill_size, cfg.speculative)["speed"] \
            if len(rec.steps) >= 8 else None
        oracle = self.simulate(cfg, rec, calib, speed=during) if during else None
        errors = compare(real, sim.summary)
        disturbed = bool(rec.others_cpu_cores > self.idle_cores)
        row = {"load": load, "config": cfg.name, "describe": cfg.describe(), "tag": tag, "repeat": repeat,
               "position": position, "rate": rate, "time_scale": scale,
               "requests": real["requests"], "complete": rec.complete, "error": rec.error,
               "others_cpu_cores": rec.others_cpu_cores, "disturbed": disturbed, "errors": errors,
               "pass": row_passes(errors) and rec.complete,
               "calibration": None if calib is None else {"speed": calib["speed"],
                                                          "coefficients": calib["coefficients"],
                                                          "others_cpu_cores": calib["others_cpu_cores"]},
               "errors_profile_only": compare(real, bare.summary),
               "speed_during_run": during,
               "errors_oracle_speed": compare(real, oracle.summary) if oracle else None,
               "real": {k: real[k] for k in _SUMMARY_KEYS},
               "sim": {k: sim.summary[k] for k in _SUMMARY_KEYS}}
        self.rows.append(row)
        self.save()
        print_table(self.rows[-1:], console, title=f"{tag} ({cfg.describe()}, {rate:.2f} req/s)")
        return row

    def rejudge(self, source: Path, console: Any) -> bool:
        """Judge the engine runs a previous ``sim validate`` saved in ``source`` again, with this profile (and
        these ``--calibrate-speed`` / simulator settings): the calibrations are re-fitted from their saved steps,
        nothing runs on the engine. Compares cost models or profiles on the very same measurements."""
        src = Path(source)
        try:
            old = json.loads((src / "validate.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--rejudge {src}: cannot read validate.json ({e})") from e
        missing = [c.name for c in self.configs if c.name not in old.get("configs", {})]
        if missing:
            raise ValueError(f"--rejudge {src}: configuration(s) {', '.join(missing)} were not recorded there "
                             f"(--configs; recorded: {', '.join(old.get('configs', {}))})")
        if old.get("calibrate") != self.args.calibrate:
            raise ValueError(f"--calibrate {self.args.calibrate}: {src} was recorded with --calibrate "
                             f"{old.get('calibrate')}")
        eng = old.get("engine", {})
        for flag, key in (("--max-running-requests", "max_running_requests"),
                          ("--chunked-prefill-size", "chunked_prefill_size")):
            if key in eng and eng[key] != getattr(self.args, key):
                raise ValueError(f"{flag} {getattr(self.args, key)}: {src} was recorded with {flag} {eng[key]}")
        self.catch_up = old.get("catch_up")
        self.report.update(rejudged_from=str(src), capacity_req_s=old.get("capacity_req_s"), loads=old.get("loads", {}),
                           engine=old.get("engine", {}), repeats=old.get("repeats", 1))
        self.threads = self.report["engine"].get("threads")
        self.idle_cores = self.report["engine"].get("idle_cores", math.inf)
        by_name = {c.name: c for c in self.configs}
        for r in old.get("rows", []):
            cfg = by_name.get(r["config"])
            if cfg is None:
                continue
            tag = r.get("tag") or f"{r['load']}-{cfg.name}"
            calib = None
            if self.args.calibrate != "none":
                ctag = f"calibration-{tag}" if self.args.calibrate == "row" else f"calibration-{cfg.name}"
                if ctag not in self.calibrations:  # config mode: one calibration serves several rows
                    crec = RecordedRun.load(src / ctag)
                    self.calibration_from_steps(cfg, crec.steps, crec.others_cpu_cores, len(crec.recorded), ctag)
                calib = self.calibrations[ctag]
            self.judge(cfg, r["load"], r["rate"], r["time_scale"], tag, RecordedRun.load(src / tag), calib, console,
                       repeat=r.get("repeat", 0), position=r.get("position"))
        self.save()
        return self.report["pass"]

    def save(self) -> Path:
        """validate.json, rewritten after every row: with one repeat a row passes on its own errors; with several
        the verdict is the medians' (:func:`~simulator.fidelity_summary.aggregate`) and the rankings'."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.report["rows"] = self.rows
        self.report["pass_undisturbed"] = all(r["pass"] for r in self.rows if not r.get("disturbed"))
        if self.report.get("repeats", 1) > 1:
            medians = aggregate(self.rows, METRICS, TOLERANCES)
            ranks = rankings(medians)
            self.report["medians"], self.report["ranking"] = medians, ranks
            self.report["pass"] = bool(medians) and all(m["pass"] for m in medians) and \
                all(r["pass"] for per_load in ranks.values() for r in per_load.values())
        else:
            self.report["pass"] = bool(self.rows) and all(r["pass"] for r in self.rows)
        path = self.out / "validate.json"
        _write_json(path, self.report)
        return path


def cmd_validate(args: argparse.Namespace) -> int:
    from rich.console import Console

    console, err = Console(), Console(stderr=True)
    if not console.is_terminal:  # a log file: room for the whole table
        console = Console(width=200)
    v = Validation(args, lambda m: console.print(m, highlight=False))
    v.out.mkdir(parents=True, exist_ok=True)
    from sglang_ext.formats.trace import write_trace

    write_trace(v.out / "trace.jsonl", v.trace)
    if not args.rejudge:
        v.load_model()
    try:
        ok = v.rejudge(args.rejudge, console) if args.rejudge else v.run(console)
    except KeyboardInterrupt:
        v.report["error"] = "interrupted (KeyboardInterrupt)"
        path = v.save()
        err.print(f"[yellow]interrupted: {len(v.rows)} row(s) written to {path}[/yellow]")
        return 130
    except (RuntimeError, ValueError) as e:
        v.report["error"] = str(e)
        path = v.save()
        err.print(f"[red]error:[/red] {e}; {len(v.rows)} row(s) written to {path}", highlight=False)
        return 1
    v.report["complete"] = True
    path = v.save()
    print_table(v.rows, console, title=f"simulator vs reference engine ({v.report['engine']['model']}, "
                                         f"{v.threads} thread(s); throughput ±5%, E2E p50/p90 ±10%)")
    if v.report.get("repeats", 1) > 1:
        from simulator.fidelity_summary import print_medians, print_rankings

        print_medians(v.report["medians"], console, f"on the medians of {v.report['repeats']} engine runs per row "
                                                    "(throughput ±5%, E2E p50/p90 ±10%)")
        print_rankings(v.report["ranking"], console, f"ranking per load (Kendall τ_b ≥ {TAU_TARGET})")
    console.print(f"wrote {path}")
    return 0 if ok else 2
