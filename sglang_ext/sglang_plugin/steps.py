r"""A core policy behind SGLang's adaptive-speculation seam (``AdaptiveSpecPolicy``): the translation, nothing else.

SGLang 0.5.23's ``AdaptiveController`` asks its policy two things per decode step (``adaptive_runtime_state.py``)::

    steps = policy.get_steps_for_batch(batch_size)                   # before drafting: which runtime state
    policy.on_verify_complete(num_correct_drafts_per_req, batch_size) # after verify, accept counts already on CPU

and switches between pre-built runtime states, one per ``candidate_steps`` entry (0 = a one-node tree, i.e. a
plain decode step). :class:`CorePolicySteps` answers them with a policy from :mod:`sglang_ext.core.policies`:

* before the step, the host hook tells it the batch's request ids (:meth:`begin_batch`); it asks the core policy
  ``decide(BatchView(rids, context_lens))`` and reduces the per-request lengths to SGLang's one length per batch
  with :func:`~sglang_ext.core.policies.batch_length` (DSDE's batch cap), clipped to ``--speculative-num-steps``;
* after verify, it builds the core's :class:`~sglang_ext.core.signals.StepResult` from the accept counts SGLang
  already copied to the CPU (no extra device sync) and the step's measured seconds, and calls ``observe``.

Every decision is the core policy's; this class holds no rule of its own. Each step can be appended to a JSONL
decision log (``--speculative-policy-log``) from which :func:`replay_decisions` re-runs a fresh core policy on the
same accept counts and seconds: the check that the policy decides inside SGLang exactly as in the core.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from sglang_ext.core.policies import BatchView, Policy, batch_length
from sglang_ext.core.signals import RequestStep, StepResult

log = logging.getLogger("sglang_ext.sglang_plugin")


@dataclass
class PendingStep:
    """A decided step waiting for its verify result (FIFO: under overlap scheduling results come a step late)."""

    rids: list[str]
    context_lens: list[int]
    steps: int
    info: dict
    started: float
    draft_seconds: float = 0.0


@dataclass
class StepCounters:
    decisions: int = 0
    speculative: int = 0
    plain: int = 0
    mismatched: int = 0
    last_steps: int = 0
    steps_histogram: dict[int, int] = field(default_factory=dict)


def step_result(rids: Sequence[str], steps: int, accepted: Sequence[int], draft_seconds: float,
                verify_seconds: float, context_lens: Sequence[int] = ()) -> StepResult:
    """The core's StepResult of one SGLang verify: every request proposed ``steps`` drafts, accepted its count."""
    ctx = list(context_lens) or [0] * len(rids)
    requests = [RequestStep(rid=r, proposed=steps, accepted=min(max(int(a), 0), steps), context_len=c)
                for r, a, c in zip(rids, accepted, ctx)]
    return StepResult(requests=requests, speculated=steps > 0, draft_seconds=draft_seconds,
                      verify_seconds=verify_seconds, verify_tokens=len(rids) * (steps + 1), drafter="sglang")


class CorePolicySteps:
    """``AdaptiveSpecPolicy`` over a core policy (see the module docstring). Not thread-safe (one scheduler)."""

    def __init__(self, policy: Policy, max_steps: int, log_path: str | Path | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps}: must be >= 1")
        self.policy = policy
        self.max_steps = int(max_steps)
        self.clock = clock
        self._cuda_graph_bs: list[int] | None = None
        self._batch: tuple[list[str], list[int]] | None = None
        self._pending: deque[PendingStep] = deque()
        self._live: set[str] = set()
        self.counters = StepCounters()
        self._log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115 (closed in close())

    # ---- AdaptiveSpecPolicy -----------------------------------------------------------------------------
    @property
    def candidate_steps(self) -> list[int]:
        return list(range(0, self.max_steps + 1))

    def set_cuda_graph_bs(self, cuda_graph_bs: list[int] | None) -> None:
        self._cuda_graph_bs = list(cuda_graph_bs) if cuda_graph_bs else None

    def cuda_graph_bs_for_step(self, step: int) -> list[int] | None:
        return self._cuda_graph_bs

    def get_steps_for_batch(self, batch_size: int) -> int:
        rids, ctx = self._batch if self._batch and len(self._batch[0]) == batch_size else (
            [f"slot-{i}" for i in range(batch_size)], [0] * batch_size)
        self._batch = None
        for rid in rids:
            if rid not in self._live:
                self._live.add(rid)
                self.policy.admit(rid)
        decision = self.policy.decide(BatchView(rids=rids, context_lens=ctx))
        steps = batch_length(decision, self.max_steps)
        info = {k: v for k, v in decision.info.items() if isinstance(v, (int, float, str, bool, type(None)))}
        self._pending.append(PendingStep(list(rids), list(ctx), steps, info, self.clock()))
        c = self.counters
        c.decisions += 1
        c.speculative += steps > 0
        c.plain += steps == 0
        c.steps_histogram[steps] = c.steps_histogram.get(steps, 0) + 1
        if steps != c.last_steps:
            log.debug("sglang-ext %s: batch %d -> %d draft step(s)", self.policy.name, batch_size, steps)
        c.last_steps = steps
        return steps

    def on_verify_complete(self, num_correct_drafts_per_req: list[int], batch_size: int = 0) -> int | None:
        if not self._pending:
            return None
        step = self._pending.popleft()
        if len(num_correct_drafts_per_req) != len(step.rids):
            self.counters.mismatched += 1
            log.warning("sglang-ext: verify result for %d request(s), decided for %d; step not observed",
                        len(num_correct_drafts_per_req), len(step.rids))
            return None
        total = max(self.clock() - step.started, 0.0)
        draft = min(step.draft_seconds, total)
        result = step_result(step.rids, step.steps, num_correct_drafts_per_req, draft, total - draft, step.context_lens)
        self.policy.observe(result)
        if self._log is not None:
            self._log.write(json.dumps({"rids": step.rids, "context_lens": step.context_lens, "steps": step.steps,
                                        "accepted": [int(a) for a in num_correct_drafts_per_req],
                                        "draft_seconds": draft, "verify_seconds": total - draft,
                                        "info": step.info}) + "\n")
        return None  # the next step's runtime state is chosen by get_steps_for_batch

    # ---- host hooks ---------------------------------------------------------------------------------------
    def begin_batch(self, rids: Sequence[str], context_lens: Sequence[int] = ()) -> None:
        """The request ids (and contexts) of the decode batch about to ask :meth:`get_steps_for_batch`."""
        self._batch = (list(rids), list(context_lens) or [0] * len(rids))

    def add_draft_seconds(self, seconds: float) -> None:
        """Time the draft stage of the newest pending step took (the rest of the step is verification)."""
        if self._pending:
            self._pending[-1].draft_seconds += seconds

    def finish(self, rid: str) -> None:
        """A request left: the policy drops its state (bounded memory)."""
        if rid in self._live:
            self._live.discard(rid)
            self.policy.release(rid)
            if self._log is not None:
                self._log.write(json.dumps({"finish": rid}) + "\n")

    def status(self) -> dict[str, Any]:
        c = self.counters
        return {"policy": self.policy.name, "decisions": c.decisions, "speculative_steps": c.speculative,
                "plain_steps": c.plain, "last_steps": c.last_steps, "mismatched": c.mismatched,
                "steps_histogram": dict(sorted(c.steps_histogram.items())), "live_requests": len(self._live)}

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def replay_decisions(policy: Policy, records: Sequence[dict], max_steps: int) -> list[int]:
    """The steps a fresh core ``policy`` decides on a decision log's batches, fed the logged accept counts and
    seconds in the same order (equal to the logged ``steps`` iff SGLang ran the core policy unchanged)."""
    out: list[int] = []
    live: set[str] = set()
    for rec in records:
        if "finish" in rec:
            if rec["finish"] in live:
                live.discard(rec["finish"])
                policy.release(rec["finish"])
            continue
        for rid in rec["rids"]:
            if rid not in live:
                live.add(rid)
                policy.admit(rid)
        steps = batch_length(policy.decide(BatchView(rids=rec["rids"], context_lens=rec["context_lens"])), max_steps)
        out.append(steps)
        policy.observe(step_result(rec["rids"], rec["steps"], rec["accepted"], rec["draft_seconds"],
                                   rec["verify_seconds"], rec["context_lens"]))
    return out


def read_decision_log(path: str | Path) -> list[dict]:
    """The records of a ``--speculative-policy-log`` file; a bad line names the file and line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    return out


__all__ = ["CorePolicySteps", "PendingStep", "read_decision_log", "replay_decisions", "step_result"]
