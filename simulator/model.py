r"""The discrete-event model of a speculative serving engine under continuous batching (SimPy).

Process structure (DistServe's ``simdistserve``): one arrival process walks the trace and routes each request
(:mod:`simulator.cluster`); one SimPy process per engine replica yields **one** ``env.timeout`` per iteration,
never one per token. An idle replica sleeps on an event that the next arrival succeeds.

**One iteration of a replica** (state: FIFO ``waiting``, ``prefilling``, ``running``):

1. *Prefill* (token budget ``max_prefill_tokens``, i.e. the chunk size): continue the requests being prefilled,
   then admit waiting requests in FIFO order while the batch has fewer than ``max_batch_size`` requests, budget
   is left and their whole prompt fits in the KV cache (``kv_capacity`` tokens; FCFS head-of-line: the first
   that does not fit stops admission). A request whose prefill completes emits its first token at the end of
   the iteration (TTFT) and decodes from the next one.
2. *Decode* of the running requests — with ``schedule="prefill_first"`` (SGLang's default; its speculative
   path does not mix) only in iterations without prefill work; with ``"mixed"`` (vLLM v1 / Sarathi) in every
   iteration, before the prefill chunk; ``"reference"`` is the reference engine's own iteration (below). The
   host protocol, exactly as :mod:`sglang_ext.engine.engine`:
   ``decision = policy.decide(BatchView(rids, context_lens, temperatures))``; per request
   ``k_r = min(decision.lengths[rid], max_draft_tokens, left_r − 1)`` (0 when ``decision.speculate`` is False;
   ``max_draft_tokens`` is the engine's ``--speculative-num-steps``, None: no cap; a step always commits one token
   more than it accepts); accepted counts ``a_r`` from the acceptance model
   (:mod:`simulator.acceptance`, with its synthetic KL per proposed position); then
   ``policy.observe(StepResult(...))`` at the end of the iteration, before ``policy.release`` of the requests
   that finished. ``policy.admit`` is called when a request is first admitted; a preempted request keeps its
   policy state (it is the same request) and is released once, when it finishes.
3. *KV pressure*: a decode step writes ``k_r + 1`` positions per request. If they do not fit, the newest admitted
   request (prefilling before running) is preempted and recomputed later, as vLLM does: its KV is freed, it goes
   back to the front of the queue, and its prefill becomes prompt + tokens generated so far (that recompute
   prefill emits its next token, as a vLLM recompute does). A lone request that still does not fit drafts less.

**The reference engine's iteration** (``schedule="reference"``, :meth:`sglang_ext.engine.engine.Engine.step`):
every waiting request that fits the batch (``max_batch_size``) is admitted and prefilled *whole* in this
iteration — ``prompt − 1`` tokens (the last prompt token is the first decode step's root), one forward per
request and chunk of ``max_prefill_tokens`` (the engine's ``--chunked-prefill-size``), each priced
``prefill_seconds(chunk, tokens before it)`` — and then **one decode step for every running request, the new
ones included**. The prefill emits nothing: the first output token (position 0, TTFT) comes from that decode
step, which is also the recorded step 0 of the request's acceptance, so :class:`~simulator.acceptance.
ReplayAcceptance` reads position ``gen`` = 0 there. The engine has no KV limit (``kv_capacity`` must be None).
The EAGLE drafter absorbs the target features of committed tokens lazily, at its next call: ``prompt − 1``
pairs after the prefill, ``a + 1`` after a step, every token decoded while speculation was off. A request with
more than ``EagleDrafter.catch_up_split`` pending pairs catches up alone first (``n − 1`` of them, unpadded),
then the batch absorbs what is left padded to its longest backlog. The profile's draft entries hold one pending
pair per request, so a step with drafts adds ``absorb_per_token_s · (Σ_{r: n_r > split} (n_r − 1) +
B · (max_r n'_r − 1))`` with ``n'_r`` the backlogs left after the catch-ups (reported apart, as the step's
``catch_up_seconds``, exactly as the engine does).

**Cost of an iteration** (a duck-typed cost model: ``verify_seconds(batch_size, tokens_per_request,
context_len=0)``, ``draft_seconds(batch_size, depth)``, optionally ``prefill_seconds(tokens, context_len)`` and
``train_seconds(tokens)``; ``B`` running requests, ``K = max_r k_r``, ``C̄`` their mean context — under
``schedule="reference"`` the longest committed context, ``max_r (prompt_r + gen_r) − 1``, since the reference
engine's attention reads every row of the padded batch that far)::

    decode  = draft_seconds(B, K) + verify_seconds(B, K + 1, C̄)      if K > 0   (ragged drafts pad to the max)
            = verify_seconds(B, 1, C̄)                                if K = 0   (a plain decode step)
    prefill = prefill_batch_seconds([(P_i, c_i), ...])   (each chunk P_i with its own prefix c_i: the token-linear
              part once for T = Σ P_i, attention per chunk; a cost model without it: Σ prefill_seconds(P_i, c_i),
              and without that verify_seconds(1, P_i, c_i))
    step    = decode + prefill + overhead + train slice (``trainer="shared"``)
    overhead = overhead_s + overhead_per_request_s · B + overhead_per_admit_s · A
               (B: requests in the decode step, A: requests admitted by the iteration)

``overhead`` is what a host pays per step outside the profiled forwards (scheduling, sampling, verify
bookkeeping, policy calls, Python); :mod:`simulator.validate` calibrates it against the reference engine on a
separate run. The parts are added (no overlap between a mixed batch's prefill and decode: an upper bound).

**Trainer** (``trainer``; TIDE's homogeneous vs heterogeneous mapping). Served tokens (prefill and committed
decode tokens, whose hidden states the engine exports) are collected; every ``train_round_tokens`` starts a
training round of ``W = train_seconds(train_round_tokens)`` device seconds (or ``train_round_seconds``, a round's
measured wall time on the trainer's device, e.g. from ``sim fit-learning``). ``"separate"``: the round runs on
its own device, in parallel, taking ``W`` seconds of simulated time. ``"shared"``: it runs on the serving device
as time slices — each iteration of ``s`` seconds is followed by ``s·share/(1 − share)`` seconds of training
until ``W`` is done. When a round ends, the acceptance model's drafter improves (``acceptance.improve(gain)``).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import simpy

from sglang_ext.core.costs import CATCH_UP_SPLIT
from sglang_ext.core.policies.base import BatchLengths, BatchView, lengths_in_order
from sglang_ext.core.signals import ColumnarRequests, StepColumns, StepResult
from simulator.acceptance import AcceptanceModel, ReplayAcceptance, RequestAcceptance, compiled_kernels, kl_matrix
from simulator.cluster import arrivals, make_router
from sglang_ext.formats.results import REQUEST_COLUMNS, SimResult, summarize
from simulator.ranges import ProfileRangeError, RangeGuard
from sglang_ext.formats.trace import Request, Trace, TraceError

Schedule = Literal["prefill_first", "mixed", "reference"]

#: up to this many requests per step, per-request work runs as a Python loop; above it, as array operations
#: (numpy's fixed cost per call outweighs the loop for a few requests; both give the same integers)
SMALL_BATCH = 16
TrainerMode = Literal["none", "separate", "shared"]
_NO_DEPTHS = np.zeros(0, dtype=np.int64)  # clip_depths' "one length for every request"


@dataclass(frozen=True)
class SimConfig:
    """Engine and run configuration (every field is a knob of the model in the module docstring)."""

    max_batch_size: int = 64
    max_prefill_tokens: int = 4096
    kv_capacity: int | None = None
    schedule: Schedule = "prefill_first"
    overhead_s: float = 0.0
    overhead_per_request_s: float = 0.0
    overhead_per_admit_s: float = 0.0
    absorb_per_token_s: float = 0.0
    max_draft_tokens: int | None = None
    replicas: int = 1
    router: str = "round-robin"
    trainer: TrainerMode = "none"
    train_share: float = 0.25
    train_round_tokens: int = 200_000
    train_gain: float = 0.3
    #: a training round's measured wall time on the trainer's device (None: the profile's ``train_seconds``)
    train_round_seconds: float | None = None
    temperature: float = 0.0
    synthetic_kl: bool = True
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.1
    record_steps: bool = False
    #: the model's position limit: a request with prompt + output beyond it is rejected (counted, not simulated)
    max_context_len: int | None = None
    #: a cost lookup beyond the profile's measured range is an error (:mod:`simulator.ranges`), not a counted warning
    strict_profile: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size} must be >= 1")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens={self.max_prefill_tokens} must be >= 1")
        if self.kv_capacity is not None and self.kv_capacity < 2:
            raise ValueError(f"kv_capacity={self.kv_capacity} must be >= 2 tokens (or None: unlimited)")
        if self.schedule not in ("prefill_first", "mixed", "reference"):
            raise ValueError(f"schedule={self.schedule!r} must be 'prefill_first', 'mixed' or 'reference'")
        if self.schedule == "reference" and self.kv_capacity is not None:
            raise ValueError("schedule='reference' models the reference engine, which has no KV limit: "
                             "kv_capacity must be None")
        for name in ("overhead_s", "overhead_per_request_s", "overhead_per_admit_s", "absorb_per_token_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v} must be a finite number >= 0 (seconds)")
        if self.max_draft_tokens is not None and self.max_draft_tokens < 0:
            raise ValueError(f"max_draft_tokens={self.max_draft_tokens} must be >= 0 (or None: no cap)")
        if self.replicas < 1:
            raise ValueError(f"replicas={self.replicas} must be >= 1")
        if self.max_context_len is not None and self.max_context_len < 2:
            raise ValueError(f"max_context_len={self.max_context_len} must be >= 2 tokens (or None: unlimited)")
        if self.trainer not in ("none", "separate", "shared"):
            raise ValueError(f"trainer={self.trainer!r} must be 'none', 'separate' or 'shared'")
        if not 0 < self.train_share < 1:
            raise ValueError(f"train_share={self.train_share} must be in (0, 1)")
        if self.train_round_tokens < 1 or not 0 <= self.train_gain <= 1:
            raise ValueError("train_round_tokens must be >= 1 and train_gain in [0, 1]")
        if self.train_round_seconds is not None and not (math.isfinite(self.train_round_seconds)
                                                         and self.train_round_seconds > 0):
            raise ValueError(f"train_round_seconds={self.train_round_seconds} must be > 0 seconds (or None)")
        make_router(self.router)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class SimulationError(RuntimeError):
    """A run stopped early (e.g. a bad trace line in a streaming read); ``result`` holds what was simulated."""

    def __init__(self, message: str, result: SimResult) -> None:
        super().__init__(message)
        self.result = result


class _Req:
    """A request inside a replica (plain slots: one per request, never one per token)."""

    __slots__ = ("acc", "accepted", "admitted", "arrival", "done", "first", "gen", "holds", "index", "last",
                 "need", "out", "pending", "preempt", "prompt", "replica", "rid", "spec_steps")

    @property
    def kv(self) -> int:
        """KV tokens held."""
        return self.prompt + self.gen if self.holds else 0

    def __init__(self, index: int, request: Request, acc: RequestAcceptance, replica: int) -> None:
        self.index = index
        self.rid = request.id if request.id is not None else f"r{index}"
        self.arrival = request.arrival
        self.prompt = request.prompt_tokens
        self.out = request.output_tokens
        self.last = request.prompt_tokens + request.output_tokens - 1  # context before the last output token
        self.gen = 0  # output tokens emitted
        self.need = request.prompt_tokens  # tokens the current prefill must process (prompt, or recompute)
        self.done = 0  # of ``need``, processed so far
        self.holds = False  # holds KV: then its KV is prompt + gen (admission writes need = prompt + gen, and
        # every committed token adds one to both), so the count is derived, not updated per step
        self.first = math.nan
        self.preempt = 0
        self.spec_steps = 0
        self.accepted = 0
        self.acc = acc
        self.admitted = False
        self.replica = replica
        self.pending = 0  # reference schedule: committed pairs the drafter has not absorbed yet


class _Positions(Sequence[int]):
    """The output positions (tokens emitted so far) of a step's requests, read only if the acceptance model asks
    (a parametric model never does; replay does for requests with a recording)."""

    __slots__ = ("run",)

    def __init__(self, run: list[_Req]) -> None:
        self.run = run

    def __len__(self) -> int:
        return len(self.run)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [r.gen for r in self.run[i]]
        return self.run[i].gen


class _RunningRows:
    """The running requests' per-request counters as rows of one int64 table, row ``i`` for ``running[i]``: what the
    compiled decode step (:mod:`simulator._kernels`) reads and writes instead of the request objects.

    Why: at saturation a replica clips, commits and checks ~64 requests every decode step; as Python over
    :class:`_Req` objects that is ~15 µs a step, as one compiled pass over these rows ~2 µs. While a replica keeps
    its rows, they are the truth for its running requests' ``gen``, ``spec_steps``, ``accepted`` and ``pending``
    (the objects' copies are stale); :meth:`store` writes a row back when its request leaves the running batch
    (finished or preempted), :meth:`append` reads one in when it joins.
    """

    FIELDS = ("gen", "prompt", "out", "last", "spec", "acc", "pending")
    __slots__ = ("n", "table", *FIELDS)

    def __init__(self, running: Sequence[_Req]) -> None:
        self.n = 0
        self._alloc(max(64, 2 * len(running)))
        for r in running:
            self.append(r)

    def _alloc(self, size: int) -> None:
        table = np.zeros((len(self.FIELDS), size), dtype=np.int64)
        if self.n:
            table[:, :self.n] = self.table[:, :self.n]
        self.table = table
        for i, name in enumerate(self.FIELDS):  # each field's full row, a view (what the kernels take)
            setattr(self, name, table[i])

    def append(self, r: _Req) -> None:
        if self.n == self.table.shape[1]:
            self._alloc(2 * self.n)
        self.table[:, self.n] = (r.gen, r.prompt, r.out, r.last, r.spec_steps, r.accepted, r.pending)
        self.n += 1

    def store(self, i: int, r: _Req) -> None:
        """Write row ``i``'s counters back into its request object."""
        r.gen, r.spec_steps, r.accepted, r.pending = (int(self.gen[i]), int(self.spec[i]), int(self.acc[i]),
                                                       int(self.pending[i]))

    def pop(self, r: _Req) -> None:
        """The last row leaves (its request, ``r``, was popped off the running list)."""
        self.n -= 1
        self.store(self.n, r)


class _Trainer:
    """Collects served tokens and runs training rounds on a separate device or in slices of the serving one."""

    def __init__(self, sim: Simulation) -> None:
        c = sim.config
        self.sim = sim
        self.mode = c.trainer
        self.round_tokens = c.train_round_tokens
        self.gain = c.train_gain
        self.ratio = c.train_share / (1.0 - c.train_share)
        self.collected = 0
        self.in_round = False
        self.remaining = 0.0
        self.rounds = 0
        self.round_times: list[float] = []  # simulated time at which each round's improvement took effect
        self.round_seconds = c.train_round_seconds
        if self.mode != "none" and self.round_seconds is None and not callable(getattr(sim.cost, "train_seconds", None)):
            raise ValueError(f"trainer={self.mode!r} needs a cost model with train_seconds(tokens)")

    def collect(self, tokens: int) -> None:
        self.collected += tokens
        if self.in_round or self.collected < self.round_tokens:
            return
        self.collected -= self.round_tokens
        self.in_round = True
        work = float(self.round_seconds if self.round_seconds is not None
                     else self.sim.cost.train_seconds(self.round_tokens))
        if self.mode == "separate":
            self.sim.env.process(self._separate(work))
        else:
            self.remaining = work

    def _separate(self, work: float):
        yield self.sim.env.timeout(work)
        self._done()

    def _done(self) -> None:
        self.sim.acceptance.improve(self.gain)
        self.rounds += 1
        self.round_times.append(float(self.sim.env.now))
        self.in_round = False
        self.collect(0)

    def slice(self, step_seconds: float) -> float:
        """Seconds of training to add after a serving iteration of ``step_seconds`` (shared device)."""
        if self.remaining <= 0.0:
            return 0.0
        s = min(self.remaining, self.ratio * step_seconds) if step_seconds > 0 else self.remaining
        self.remaining -= s
        if self.remaining <= 1e-12:
            self.remaining = 0.0
            self._done()
        return s


class Replica:
    """One engine: a SimPy process running one iteration (one timeout) after another (module docstring)."""

    #: step the running requests with compiled passes over their rows (True), over the objects in Python (False), or
    #: compiled from a step of more than SMALL_BATCH requests once numba is loaded (None); a replica that started
    #: compiled steps keeps them
    compiled: bool | None = None

    def __init__(self, sim: Simulation, idx: int, policy: Any) -> None:
        self.sim = sim
        self.idx = idx
        self.policy = policy
        self.env = sim.env
        c = sim.config
        self.max_bs = c.max_batch_size
        self.max_prefill = c.max_prefill_tokens
        self.kv_cap = c.kv_capacity
        self.max_context = c.max_context_len
        self.guard = sim.guard
        self.mixed = c.schedule == "mixed"
        self.reference = c.schedule == "reference"
        self.overhead = c.overhead_s
        self.overhead_per_request = c.overhead_per_request_s
        self.overhead_per_admit = c.overhead_per_admit_s
        self.absorb = c.absorb_per_token_s
        self.max_draft = c.max_draft_tokens
        self.temperature = c.temperature
        # the synthetic KL is drawn only for a policy that reads it (``needs_kl``; an unknown object: assume it
        # does). Its multipliers come from their own stream, so skipping them changes no accept/reject draw.
        self.want_kl = c.synthetic_kl and bool(getattr(policy, "needs_kl", True))
        self.waiting: deque[_Req] = deque()
        self.prefilling: list[_Req] = []
        self.running: list[_Req] = []
        self._running_version = 0  # bumped whenever ``running`` changes: the per-batch lists below are reused until
        self._batch_lists: tuple[int, list[str], list[RequestAcceptance], np.ndarray] | None = None  # (then)
        self.kv_used = 0
        self.wake: simpy.Event | None = None
        self.iterations = 0
        self.busy = {"prefill": 0.0, "draft": 0.0, "verify": 0.0, "train": 0.0, "overhead": 0.0}
        cost = sim.cost
        self.verify = cost.verify_seconds
        self.draft = cost.draft_seconds
        pre = getattr(cost, "prefill_seconds", None)
        self.prefill_cost: Callable[[int, int], float] = pre if callable(pre) else (lambda t, c: self.verify(1, t, c))
        batch = getattr(cost, "prefill_batch_seconds", None)
        # a step's prefill is priced from its chunk list: each chunk with its own prefix (module docstring)
        self.prefill_batch_cost: Callable[[list[tuple[int, int]]], float] = batch if callable(batch) else (
            lambda chunks: sum(self.prefill_cost(t, c) for t, c in chunks))
        # what the current iteration will commit when its timeout fires
        self._chunks: list[tuple[_Req, int]] = []
        self._decode: list[tuple[_Req, int, int]] = []
        self._result: StepResult | None = None
        self._reserve = 0
        self._prefilled = 0  # reference schedule: prompt tokens prefilled by the current iteration
        self._decode_tokens = 0  # tokens the current iteration's decode step commits
        self._admitted = 0  # requests admitted (first chunk scheduled) by the current iteration
        self._temps: dict[int, np.ndarray] = {}
        self._decode_B = 0  # requests in the current iteration's decode step
        self._decode_K = 0  # its depth (the deepest request's)
        #: the running requests' counters as rows for the compiled step, once numba is loaded (:class:`_RunningRows`)
        self._rows: _RunningRows | None = None
        self._decode_rows: tuple[np.ndarray, np.ndarray] | None = None  # (depths, accepted) to commit from the rows

    # router interface ------------------------------------------------------------------------------------------
    def outstanding_requests(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.running)

    def outstanding_tokens(self) -> int:
        reqs = [*self.waiting, *self.prefilling, *self.running]
        left = sum(r.need - r.done for r in reqs)
        rows = self._rows
        if rows is None:
            return left + sum(r.out - r.gen for r in reqs)
        n = rows.n  # the running requests' counters live in the rows
        return (left + sum(r.out - r.gen for r in (*self.waiting, *self.prefilling))
                + int((rows.out[:n] - rows.gen[:n]).sum()))

    def _run(self, r: _Req) -> None:
        """``r`` joins the running batch (the decode step's requests)."""
        self.running.append(r)
        self._running_version += 1
        if self._rows is not None:
            self._rows.append(r)

    def add(self, index: int, request: Request) -> None:
        need = request.prompt_tokens + request.output_tokens
        if self.max_context is not None and need > self.max_context:  # the model's limit first: no server fits it
            self.sim.reject(index, request, f"needs {need} positions > max_context_len={self.max_context}")
            return
        if self.kv_cap is not None and need > self.kv_cap:
            self.sim.reject(index, request, f"needs {need} KV tokens > kv_capacity={self.kv_cap}")
            return
        self.waiting.append(_Req(index, request, self.sim.acceptance.start(request), self.idx))
        if self.wake is not None:
            self.wake.succeed()
            self.wake = None

    # the process -----------------------------------------------------------------------------------------------
    def process(self):
        env = self.env
        while True:
            if not (self.waiting or self.prefilling or self.running):
                self.wake = env.event()
                yield self.wake
            dt = self._plan(env.now)
            yield env.timeout(dt)
            self._commit(env.now)

    # planning an iteration (at its start) ----------------------------------------------------------------------
    def _plan(self, now: float) -> float:
        self.sim.acceptance.set_time(now)
        self._chunks = []
        self._decode = []
        self._decode_B = self._decode_K = 0
        self._decode_rows = None
        self._result = None
        self._reserve = 0
        self._prefilled = 0
        self._admitted = 0
        decode_s = draft_s = prefill_s = 0.0
        if self.reference:
            prefill_s = self._plan_admit_whole()
            if self.running:
                draft_s, decode_s = self._plan_decode()
        elif self.mixed:
            if self.running:
                draft_s, decode_s = self._plan_decode()
            prefill_s = self._plan_prefill()
        else:
            prefill_s = self._plan_prefill()
            if not self._chunks and self.running:
                draft_s, decode_s = self._plan_decode()
        if not self._chunks and not self._decode_B and not self._prefilled:
            raise RuntimeError(f"replica {self.idx}: no schedulable work at t={now} "
                               f"(waiting={len(self.waiting)}, kv_used={self.kv_used}/{self.kv_cap})")
        overhead = (self.overhead + self.overhead_per_request * self._decode_B
                    + self.overhead_per_admit * self._admitted)
        step = draft_s + decode_s + prefill_s + overhead
        train_s = self.sim.trainer.slice(step) if self.sim.trainer.mode == "shared" else 0.0
        if self._result is not None:
            self._result.train_seconds = train_s
            self._result.overhead_seconds = overhead
        b = self.busy
        b["prefill"] += prefill_s
        b["draft"] += draft_s
        b["verify"] += decode_s
        b["train"] += train_s
        b["overhead"] += overhead
        self.iterations += 1
        dt = step + train_s
        if self.sim.steps is not None:
            self.sim.steps.append((now, self.idx, self._decode_B, self._decode_K,
                                   sum(c for _, c in self._chunks) + self._prefilled, dt))
        return dt

    def _plan_prefill(self) -> float:
        budget = self.max_prefill
        chunks = self._chunks
        for r in self.prefilling:
            if budget <= 0:
                break
            c = min(r.need - r.done, budget)
            chunks.append((r, c))
            budget -= c
        waiting = self.waiting
        while budget > 0 and waiting and len(self.prefilling) + len(self.running) < self.max_bs:
            r = waiting[0]
            if self.kv_cap is not None and self.kv_used + self._reserve + r.need > self.kv_cap:
                break
            waiting.popleft()
            r.holds = True  # r.need == r.prompt + r.gen
            self.kv_used += r.need
            self.prefilling.append(r)
            self._admitted += 1
            if not r.admitted:
                r.admitted = True
                self.policy.admit(r.rid)
            c = min(r.need, budget)
            chunks.append((r, c))
            budget -= c
        if not chunks:
            return 0.0
        now = self.env.now
        for r, c in chunks:
            self.guard.prefill(c, r.done, now)
        return float(self.prefill_batch_cost([(c, r.done) for r, c in chunks]))

    def _plan_admit_whole(self) -> float:
        """Reference schedule: admit what fits the batch and prefill each whole prompt (module docstring)."""
        waiting = self.waiting
        if not waiting:
            return 0.0
        chunk = self.max_prefill
        cost = self.prefill_cost
        seconds = 0.0
        while waiting and len(self.running) < self.max_bs:
            r = waiting.popleft()
            r.holds = True  # r.need == r.prompt + r.gen
            self.kv_used += r.need
            if not r.admitted:
                r.admitted = True
                self.policy.admit(r.rid)
            body = r.need - 1  # the last prompt token is the first decode step's root
            for start in range(0, body, chunk):
                self.guard.prefill(min(chunk, body - start), start, self.env.now)
                seconds += float(cost(min(chunk, body - start), start))
            self._prefilled += body
            self._admitted += 1
            r.done = r.need
            r.pending = body
            self._run(r)
        return seconds

    def _plan_decode(self) -> tuple[float, float]:
        """Ask the policy, clip its lengths, make KV room, draw every request's acceptance: one decode step.

        Why batch-shaped: at saturation this runs for 64 requests per step for hours of simulated time, so the
        per-request work is kept to one array draw of the whole batch's acceptance
        (:meth:`~simulator.acceptance.ParametricAcceptance.sample_batch`), a step result handed to the policy as
        arrays (:class:`~sglang_ext.core.signals.StepColumns`; no ``RequestStep`` objects unless a policy asks), and
        either list comprehensions over the request objects or, from the first step of more than ``SMALL_BATCH``
        requests once numba is loaded in the process (a policy with compiled steps or a long draw loads it;
        :attr:`compiled` forces either way), compiled passes over the running requests' rows
        (:class:`_RunningRows`: the depth clip here, the commit in :meth:`_commit`). The same integers both ways
        (tested). Not always compiled: loading numba costs ~0.5 s once, more than a replay whose policy needs no
        compiled step saves with it, and for a few requests per step the Python loops are faster.
        """
        run = self.running
        rows = self._rows
        if rows is None and (self.compiled if self.compiled is not None else
                             len(run) > SMALL_BATCH and "numba" in sys.modules):
            rows = self._rows = _RunningRows(run)  # compiled steps from here on
        lists = self._batch_lists
        if lists is None or lists[0] != self._running_version:  # the batch changed: its constant per-request lists
            lists = self._batch_lists = (self._running_version, [r.rid for r in run], [r.acc for r in run],
                                         None if rows is not None else
                                         np.fromiter([r.last for r in run], dtype=np.int64, count=len(run)))
        _, rids, states, lasts = lists
        n = len(run)
        if rows is None:
            ctx_arr = None
            ctxs = [r.prompt + r.gen for r in run]
        else:
            ctx_arr = rows.prompt[:n] + rows.gen[:n]
            ctxs = ctx_arr.tolist()
        temps = [self.temperature] * n
        view = BatchView(rids=rids, context_lens=ctxs, temperatures=temps)
        decision = self.policy.decide(view)
        lengths = decision.lengths
        ks_arr = None  # the depths as an int64 array too, when they were computed as one
        if not decision.speculate:
            ks, K = [0] * n, 0
            if rows is not None:
                ks_arr = np.zeros(n, dtype=np.int64)
        elif rows is not None:  # one compiled pass: the same integers as _depths
            ours = isinstance(lengths, BatchLengths) and lengths.rids is rids  # answered for this batch, in order
            uniform = lengths.uniform if ours else None
            asked = (_NO_DEPTHS if uniform is not None else lengths.as_array() if ours
                     else np.asarray(lengths_in_order(lengths, rids), dtype=np.int64))
            cap = -1 if self.max_draft is None else self.max_draft
            ks_arr, total, K = compiled_kernels().clip_depths(asked, uniform or 0, cap, rows.last, ctx_arr)
            ks = ks_arr.tolist()
        else:
            if isinstance(lengths, BatchLengths) and lengths.uniform is not None and lengths.rids is rids:
                ks, ks_arr = self._depths(run, lasts, ctxs, None, lengths.uniform)
            else:
                ks, ks_arr = self._depths(run, lasts, ctxs, lengths_in_order(lengths, rids))
            K = max(ks)
        growth = (total if rows is not None and decision.speculate else sum(ks)) + n  # KV positions the step writes
        if self.kv_cap is not None and self.kv_used + growth > self.kv_cap:
            growth = self._make_room(ks, growth)  # pops the newest requests off ``run`` (and ``ks``) in place
            n = len(run)
            rids, ctxs, states = rids[:n], ctxs[:n], states[:n]
            K = max(ks)
            ks_arr = None if rows is None else np.array(ks, dtype=np.int64)
        self._reserve = growth  # a mixed iteration admits prefills only into what the decode step leaves
        if K > 0:
            positions = _Positions(run) if rows is None else rows.gen[:n]
            accepted_arr, kl = self._draw(positions, states, ks if ks_arr is None else ks_arr)
        else:  # a plain step draws nothing (a request with k = 0 reads no random numbers)
            accepted_arr, kl = np.zeros(n, dtype=np.int64), None
        proposed = ks if ks_arr is None else ks_arr
        columns = StepColumns(rids, proposed, accepted_arr, kl, None if kl is None else proposed, ctxs,
                              self._temperatures(n), check=False)
        if rows is None:
            accepted = accepted_arr.tolist()
            self._decode.extend(zip(run, ks, accepted))
            self._decode_tokens = sum(accepted) + len(accepted)  # tokens the step commits (each accepted + 1)
        else:  # committed from the rows (their counters are the truth while running)
            self._decode_rows = (proposed, accepted_arr)
        B = self._decode_B = n
        self._decode_K = K
        ctx_sum = sum(ctxs)
        ctx_max = max(ctxs)
        self.sim.request_steps += B
        # the reference engine's attention reads every row up to the longest committed context (padded batch)
        ctx_mean = ctx_max - 1 if self.reference else round(ctx_sum / B)
        catch_up_s = 0.0
        self.guard.verify(B, K + 1, ctx_mean, self.env.now)
        if K > 0:
            self.guard.draft(B, K, self.env.now)
            draft_s = float(self.draft(B, K))
            verify_s = float(self.verify(B, K + 1, ctx_mean))
            if self.absorb:  # split catch-ups on long backlogs, then the batch's padded rest (module docstring)
                pending = [r.pending for r in run] if rows is None else rows.pending[:n].tolist()
                long_pairs = sum(p - 1 for p in pending if p > CATCH_UP_SPLIT)
                backlog = max(1 if p > CATCH_UP_SPLIT else p for p in pending)
                catch_up_s = self.absorb * long_pairs
                if backlog > 1:
                    draft_s += self.absorb * B * (backlog - 1)
                if rows is None:
                    for r in run:
                        r.pending = 0
                else:
                    rows.pending[:n] = 0
        else:
            draft_s, verify_s = 0.0, float(self.verify(B, 1, ctx_mean))
        self._result = StepResult(requests=ColumnarRequests(columns), speculated=K > 0, draft_seconds=draft_s,
                                  verify_seconds=verify_s, catch_up_seconds=catch_up_s,
                                  verify_tokens=B * (K + 1), drafter="simulated",
                                  config={"tree_budget": decision.tree_budget, "drafter": decision.drafter,
                                          **decision.info})
        return draft_s + catch_up_s, verify_s

    def _depths(self, run: list[_Req], lasts: np.ndarray, ctxs: list[int], ks: list[int] | None,
                uniform: int | None = None) -> tuple[list[int], np.ndarray | None]:
        r"""Each request's draft depth :math:`k_r = \max(0, \min(\text{lengths}[r], \text{max\_draft}, left_r))`,
        ``left_r = out_r - gen_r - 1 = (prompt_r + out_r - 1) - ctx_r`` (``lasts``: ``prompt_r + out_r - 1``), from
        the policy's lengths in batch order (``ks``) or its one length for every request (``uniform``). Array
        operations for a large batch (returned as a list and the int64 array), a Python loop for a small one (the
        same integers; no array)."""
        cap = self.max_draft
        if len(ctxs) > SMALL_BATCH:
            left = lasts - np.array(ctxs, dtype=np.int64)
            if ks is None:
                k = np.minimum(left, uniform if cap is None else min(uniform, cap))
            else:
                k = np.minimum(np.array(ks, dtype=np.int64), left)
                if cap is not None:
                    k = np.minimum(k, cap)
            k = np.maximum(k, 0)
            return k.tolist(), k
        if ks is None:
            ks = [uniform] * len(ctxs)
        out = []
        for r, k, c in zip(run, ks, ctxs):
            if cap is not None and k > cap:  # noqa: PLR1730 - plain comparisons: this runs per request per step
                k = cap
            left = r.last - c
            if k > left:  # noqa: PLR1730
                k = left
            out.append(k if k > 0 else 0)
        return out, None

    def _temperatures(self, n: int) -> np.ndarray:
        """The step's temperature per request, one shared array per batch size (a policy reading the column gets an
        array without building one per step)."""
        got = self._temps.get(n)
        if got is None:
            got = self._temps[n] = np.full(n, float(self.temperature))  # (readers must not write to it)
        return got

    def _draw(self, positions: Sequence[int], states: list[RequestAcceptance],
              ks: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """Accepted counts and KL (``[B, max k]``, row ``r`` valid up to ``k_r``; None without KL) of the step's
        requests (output ``positions``, ``states``, depths ``ks``), batched when the acceptance model can (the same
        draws)."""
        acc = self.sim.acceptance
        batch = getattr(acc, "sample_batch", None)
        if batch is not None:
            return batch(states, positions, ks, self.want_kl)
        accepted, kls = [], []
        for st, pos, k in zip(states, positions, ks):
            a, kl = acc.sample(st, pos, k, self.want_kl) if k > 0 else (0, ())
            accepted.append(a)
            kls.append(kl)
        return np.array(accepted, dtype=np.int64), kl_matrix(kls, ks) if self.want_kl else None

    def _make_room(self, ks: list[int], growth: int) -> int:
        """Preempt the newest requests until the decode step's KV writes fit (module docstring, item 3)."""
        cap = self.kv_cap
        while self.kv_used + growth > cap and self.prefilling:
            self._preempt(self.prefilling.pop())
        while self.kv_used + growth > cap and len(self.running) > 1:
            victim = self.running.pop()
            self._running_version += 1
            if self._rows is not None:
                self._rows.pop(victim)
            growth -= ks.pop() + 1
            self._preempt(victim)
        if self.kv_used + growth > cap:  # one request left: draft only what fits
            ks[0] = max(0, min(ks[0], cap - self.kv_used - 1))
            growth = ks[0] + 1
        return growth

    def _preempt(self, r: _Req) -> None:
        self.kv_used -= r.kv
        r.holds = False
        r.need = r.prompt + r.gen
        r.done = 0
        r.preempt += 1
        self.waiting.appendleft(r)

    # committing an iteration (at its end) ----------------------------------------------------------------------
    def _commit(self, now: float) -> None:
        sim = self.sim
        collected = 0
        finished: list[_Req] = []
        collected += self._prefilled
        decode = self._decode
        drop: np.ndarray | None = None  # rows of the running requests that finished (compiled step)
        if self._decode_rows is not None:  # the compiled step: commit on the rows, write back the finished ones
            ks, accepted = self._decode_rows
            rows = self._rows
            assert rows is not None
            B = len(ks)
            if self.reference:  # the reference schedule's first token comes from its first decode step
                for i in np.flatnonzero(rows.gen[:B] == 0).tolist():
                    r = self.running[i]
                    if r.first != r.first:  # NaN: no token yet
                        r.first = now
            drop, total = compiled_kernels().commit_decode(ks, accepted, rows.gen, rows.out, rows.spec, rows.acc,
                                                           rows.pending, bool(self.absorb))
            running = self.running
            for i in drop.tolist():
                r = running[i]
                rows.store(i, r)
                finished.append(r)
            self.kv_used += total
            collected += total
        elif decode:
            if self.reference:  # the reference schedule's first token comes from its first decode step
                for r, _, _ in decode:
                    if r.gen == 0 and r.first != r.first:  # NaN: no token yet
                        r.first = now
            if self._decode_tokens == len(decode):  # a plain step (or nothing accepted): one token each
                for r, k, _ in decode:
                    g = r.gen + 1
                    r.gen = g
                    if k > 0:
                        r.spec_steps += 1
                    if g >= r.out:
                        finished.append(r)
            else:
                for r, k, a in decode:
                    g = r.gen + a + 1
                    r.gen = g
                    if k > 0:
                        r.spec_steps += 1
                        r.accepted += a
                    if g >= r.out:
                        finished.append(r)
            if self.absorb:
                for r, _, a in decode:
                    r.pending += a + 1
            total = self._decode_tokens
            self.kv_used += total
            collected += total
        if self._chunks:
            completed = False
            for r, c in self._chunks:
                r.done += c
                collected += c
                if r.done >= r.need:
                    completed = True
                    r.gen += 1  # (its KV, prompt + gen, grows with it)
                    self.kv_used += 1
                    if r.first != r.first:  # NaN: first token of this request
                        r.first = now
                    if r.gen >= r.out:
                        finished.append(r)
                    else:
                        self._run(r)
            if completed:
                self.prefilling = [r for r in self.prefilling if r.done < r.need]
        if self._result is not None:
            self.policy.observe(self._result)
        if finished:
            done = {id(r) for r in finished}
            self.running = [r for r in self.running if id(r) not in done]
            self._running_version += 1
            if drop is not None and len(drop):
                rows = self._rows
                assert rows is not None
                rows.n = compiled_kernels().drop_rows(drop, rows.n, rows.table)
            for r in finished:
                self.kv_used -= r.kv
                r.holds = False
                self.policy.release(r.rid)
                sim.record(r, now)
        if sim.trainer.mode != "none":
            sim.trainer.collect(collected)


def _policies(policy: Any, n: int) -> list[Any]:
    """One policy object per replica: a factory is called per replica; an object is used by replica 0 and
    deep-copied (fresh state, same config) for the others."""
    if hasattr(policy, "decide"):
        return [policy] + [copy.deepcopy(policy) for _ in range(n - 1)]
    if callable(policy):
        return [policy(i) for i in range(n)]
    raise TypeError(f"policy must be a Policy (decide/observe) or a factory(replica) -> Policy, got {policy!r}")


def check_cost_model(cost: Any) -> None:
    missing = [m for m in ("verify_seconds", "draft_seconds") if not callable(getattr(cost, m, None))]
    if missing:
        raise TypeError(f"cost model {type(cost).__name__} lacks {', '.join(missing)} (see simulator.model)")


class Simulation:
    """A replay in progress: build, :meth:`run`, and read :meth:`result` (also after an interruption)."""

    def __init__(self, requests: Trace | Iterable[Request], cost_model: Any, policy: Any,
                 config: SimConfig = SimConfig(), seed: int = 0, acceptance: AcceptanceModel | None = None) -> None:
        check_cost_model(cost_model)
        self.config = config
        self.seed = int(seed)
        self.cost = cost_model
        self.env = simpy.Environment()
        self.acceptance = acceptance if acceptance is not None else ReplayAcceptance()
        self.acceptance.reset(self.seed)
        self.trainer = _Trainer(self)
        self.events = 0
        self.request_steps = 0  # decode steps summed over requests (the per-request work of the model)
        self.arrived = 0
        self.trace_error: TraceError | None = None
        self.error: str | None = None
        self.steps: list[tuple] | None = [] if config.record_steps else None
        self._rows: list[tuple] = []
        self.rejected: list[dict[str, Any]] = []
        source = getattr(cost_model, "source", None)
        ranges = source.get("ranges") if isinstance(source, dict) else None
        self.guard = RangeGuard(ranges, config.strict_profile,
                                f"profile {source.get('profile')}" if isinstance(source, dict) else "the profile")
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self.policies = _policies(policy, config.replicas)
        self.replicas = [Replica(self, i, p) for i, p in enumerate(self.policies)]
        reqs: Iterator[Request] = iter(requests.requests if isinstance(requests, Trace) else requests)
        self.env.process(arrivals(self.env, reqs, self.replicas, make_router(config.router), self._on_trace_error,
                                  self._on_arrival))
        for rep in self.replicas:
            self.env.process(rep.process())

    def _on_trace_error(self, e: TraceError) -> None:
        self.trace_error = e
        self.error = f"TraceError: {e}"

    def _on_arrival(self, index: int, request: Request) -> None:
        self.arrived += 1

    def reject(self, index: int, request: Request, reason: str) -> None:
        """A request that can never be served (too long for the KV pool or the model): counted, as a server
        answering 4xx would be, and kept out of the latency statistics."""
        self.rejected.append({"index": index, "id": request.id, "arrival": request.arrival,
                              "prompt_tokens": request.prompt_tokens, "output_tokens": request.output_tokens,
                              "reason": reason})

    def record(self, r: _Req, now: float) -> None:
        self._rows.append((r.index, r.replica, r.arrival, r.first, now, r.prompt, r.out, r.preempt, r.spec_steps,
                           r.accepted))

    def run(self, until: float | None = None) -> SimResult:
        """Step the event loop to the end (or ``until`` simulated seconds). On KeyboardInterrupt the partial
        result stays readable through :meth:`result` and the interrupt is re-raised."""
        env = self.env
        step = env.step
        peek = env.peek
        limit = math.inf if until is None else float(until)
        n = 0
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            while peek() <= limit:
                step()
                n += 1
        except simpy.core.EmptySchedule:
            pass
        except KeyboardInterrupt:
            self.error = "interrupted (KeyboardInterrupt)"
            raise
        except ProfileRangeError as e:  # --strict-profile: stop here; what ran so far is the partial result
            self.error = str(e)
        finally:
            self.wall_s += time.perf_counter() - t0
            self.cpu_s += time.process_time() - c0  # CPU time: the cost on one core even when others compete
            self.events += n
        if until is not None and peek() < math.inf and self.error is None:
            self.error = f"stopped at until={until} s"
        return self.result()

    def result(self) -> SimResult:
        rows = self._rows
        cols = {name: np.array([row[i] for row in rows], dtype=float if name in ("arrival", "first_token", "finish")
                               else np.int64) for i, name in enumerate(REQUEST_COLUMNS)}
        busy: dict[str, float] = {}
        for rep in self.replicas:
            for k, v in rep.busy.items():
                busy[k] = busy.get(k, 0.0) + v
        c = self.config
        summary = summarize(cols, busy, iterations=sum(r.iterations for r in self.replicas), slo_ttft_s=c.slo_ttft_s,
                            slo_tpot_s=c.slo_tpot_s, unfinished=self.arrived - len(rows) - len(self.rejected),
                            train_rounds=self.trainer.rounds, rejected=len(self.rejected),
                            beyond_profile=self.guard.report())
        if c.trainer != "none":
            summary["train_round_times"] = list(self.trainer.round_times)
        sim_s = float(self.env.now)
        perf = {"wall_s": self.wall_s, "cpu_s": self.cpu_s, "events": self.events, "sim_s": sim_s,
                "request_steps": self.request_steps,
                "events_per_s": self.events / self.wall_s if self.wall_s > 0 else 0.0,
                "realtime_factor": sim_s / self.wall_s if self.wall_s > 0 else 0.0,
                "realtime_factor_cpu": sim_s / self.cpu_s if self.cpu_s > 0 else 0.0}
        config = {"engine": c.to_json(), "seed": self.seed, "policy": _policy_json(self.policies[0]),
                  "acceptance": self.acceptance.to_json(), "cost_model": type(self.cost).__name__}
        steps = None
        if self.steps is not None:
            names = ("time", "replica", "batch_size", "depth", "prefill_tokens", "seconds")
            steps = {n: [s[i] for s in self.steps] for i, n in enumerate(names)}
        return SimResult(summary, cols, perf, config, complete=self.error is None, error=self.error, steps=steps,
                         rejected=list(self.rejected))


def _policy_json(policy: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": getattr(policy, "name", type(policy).__name__),
                           "class": f"{type(policy).__module__}.{type(policy).__qualname__}"}
    cfg = getattr(policy, "config", None)
    if isinstance(cfg, dict):
        out["params"] = {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool, type(None)))}
    return out


def simulate(trace: Trace | Iterable[Request], cost_model: Any, policy: Any, config: SimConfig = SimConfig(),
             seed: int = 0, acceptance: AcceptanceModel | None = None) -> SimResult:
    """Replay ``trace`` through the model; the same arguments and seed give the identical result.

    ``policy`` is a core policy object (or a factory ``replica -> policy`` for several replicas); ``acceptance``
    defaults to replaying recorded acceptance, parametric elsewhere. Raises :class:`SimulationError` (with the
    partial ``result``) if a lazily read trace turned out malformed part-way.
    """
    sim = Simulation(trace, cost_model, policy, config, seed, acceptance)
    result = sim.run()
    if sim.trace_error is not None:
        raise SimulationError(str(sim.trace_error), result)
    return result
