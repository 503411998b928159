r"""SGLang 0.5.23's ``--speculative-adaptive`` rule, re-implemented so it runs in every host and the simulator.

Source of truth: ``sglang/srt/speculative/adaptive_spec_params.py`` (``AdaptiveStepSlot``,
``AdaptiveSpeculativeParams``) at 0.5.23; the reference summary is sglang-0.5.23.md §4.1. The rule, per
batch-size slot:

.. code-block:: text

    slots: {bs: {candidate_steps, up_hysteresis, down_hysteresis, ceiling_coeff}}    (default table below)
    route(b) = the slot with the largest key ≤ pad(b) (the smallest slot if none);  pad(b) = the next
               CUDA-graph batch size ≥ b when ``cuda_graph_bs`` is given
    init:  steps = initial_steps if it is a candidate, else the middle candidate;  ema = steps − 1
    after each verify of a batch routed to the slot (accepted drafts a_r per request):
        if steps > 0:  ema ← (1 − λ)·ema + λ·mean_r(a_r)                 λ = ema_alpha (0.2)
        count += 1;  recompute only when count > warmup (10) and (count − warmup) % update_interval (5) == 0
    recompute:
        steps == 0 → probe the next candidate up (ema reset to target − 1 if it was negative)
        else, down first: while idx > 0 and ema ≤ drop(prev) + down_hysteresis: idx −= 1
                 drop(prev) = 0.5 if prev == 0 else prev − 0.5
             if it did not move down, up: while idx < last and ema > steps[idx] − 0.5 + up_hysteresis: idx += 1
        ceiling_coeff > 0 and target ≤ old steps: lower target to ≤ max(1, ceil(ema·ceiling_coeff))

i.e. "draft one more than the smoothed accepted length", with EMA smoothing, an update interval and hysteresis
against oscillation; candidate 0 (plain decoding) is how SGLang turns speculation off at large batch sizes.
Every request in a step drafts the slot's current steps (a batch-level policy).
"""

from __future__ import annotations

import bisect
import copy
import math

from ..signals import StepResult
from .base import BatchLengths, BatchView, Decision, Param, Policy

#: SGLang 0.5.23's DEFAULT_ADAPTIVE_CONFIG
DEFAULT_SLOTS: dict[str, dict] = {
    "1": {"candidate_steps": [1, 3, 5, 7], "up_hysteresis": 0.0, "down_hysteresis": -0.25, "ceiling_coeff": 0},
    "8": {"candidate_steps": [0, 1, 3], "up_hysteresis": 0.0, "down_hysteresis": 0.0, "ceiling_coeff": 0},
    "32": {"candidate_steps": [0, 1], "up_hysteresis": 0.0, "down_hysteresis": 0.0, "ceiling_coeff": 0},
    "64": {"candidate_steps": [0], "up_hysteresis": 0.0, "down_hysteresis": 0.0, "ceiling_coeff": 0},
}


class StepSlot:
    """One batch-size slot: candidate steps, the EMA of accepted drafts, and the current steps."""

    def __init__(self, initial_steps: int, candidates: list[int], ema_alpha: float, update_interval: int,
                 warmup: int, up_hysteresis: float = 0.0, down_hysteresis: float = -0.25,
                 ceiling_coeff: float = 0.0) -> None:
        self.candidates = sorted(set(candidates))
        self.ema_alpha, self.update_interval, self.warmup = ema_alpha, update_interval, warmup
        self.up, self.down, self.ceiling_coeff = up_hysteresis, down_hysteresis, ceiling_coeff
        self.steps = initial_steps if initial_steps in self.candidates else self.candidates[len(self.candidates) // 2]
        self.ema = float(self.steps - 1)  # neutral start: "accepting one fewer than we draft"
        self.count = 0

    def update(self, accepted: list[int]) -> bool:
        """Feed one verify; True when the steps changed."""
        if not accepted:
            return False
        if self.steps > 0:
            self.ema = (1 - self.ema_alpha) * self.ema + self.ema_alpha * (sum(accepted) / len(accepted))
        self.count += 1
        if self.count <= self.warmup or (self.count - self.warmup) % self.update_interval != 0:
            return False
        return self._recompute()

    def _recompute(self) -> bool:
        old = self.steps
        idx = self.candidates.index(old)
        if old == 0:  # speculation was off: probe the smallest positive step (no acceptance seen meanwhile)
            idx = min(idx + 1, len(self.candidates) - 1)
            target = self.candidates[idx]
            if target > 0 and self.ema < 0:
                self.ema = float(target - 1)
            return self._apply(target)
        start = idx
        while idx > 0:
            prev = self.candidates[idx - 1]
            drop = (0.5 if prev == 0 else prev - 0.5) + self.down
            if self.ema <= drop:
                idx -= 1
            else:
                break
        if idx == start:
            while idx < len(self.candidates) - 1 and self.ema > self.candidates[idx] - 0.5 + self.up:
                idx += 1
        target = self.candidates[idx]
        if self.ceiling_coeff > 0:  # caps only downward moves: never blocks a step up
            ceiling = max(1, math.ceil(self.ema * self.ceiling_coeff))
            if ceiling < target <= old:
                while idx > 0 and self.candidates[idx] > ceiling:
                    idx -= 1
                target = self.candidates[idx]
        return self._apply(target)

    def _apply(self, target: int) -> bool:
        changed = target != self.steps
        self.steps = target
        return changed

    def state_dict(self) -> dict:
        return {"steps": self.steps, "ema": self.ema, "count": self.count}

    def load(self, s: dict) -> None:
        self.steps, self.ema, self.count = int(s["steps"]), float(s["ema"]), int(s["count"])


def _check_slots(slots: dict) -> dict[int, dict]:
    if not isinstance(slots, dict):
        raise ValueError(f"slots={slots!r} is not an object {{batch size: {{candidate_steps: [...]}}}}")
    out = {}
    for key, entry in slots.items():
        if not str(key).isdigit():
            raise ValueError(f"slots: key {key!r} is not a batch size")
        steps = entry.get("candidate_steps") if isinstance(entry, dict) else None
        if not isinstance(steps, list) or not steps or not all(isinstance(s, int) and s >= 0 for s in steps):
            raise ValueError(f"slots.{key}.candidate_steps={steps!r} is not a non-empty list of ints >= 0")
        out[int(key)] = entry
    if not out:
        raise ValueError("slots: needs at least one batch-size slot")
    return out


class SGLangAdaptivePolicy(Policy):
    """SGLang's EMA step adaptation per batch-size slot (module docstring has the rule)."""

    name = "sglang-adaptive"
    params = (
        Param("initial_steps", 3, 0, 64, "int", doc="starting steps (the middle candidate if not a candidate)",
              depth=True),
        Param("ema_alpha", 0.2, 0.01, 1.0, doc="λ: EMA weight of a new batch mean of accepted drafts"),
        Param("update_interval", 5, 1, 1000, "int", doc="batches between recomputations"),
        Param("warmup", 10, 0, 10000, "int", doc="batches before the first recomputation"),
        Param("slots", DEFAULT_SLOTS, kind="json",
              doc="{batch size: {candidate_steps, up_hysteresis, down_hysteresis, ceiling_coeff}}"),
        Param("cuda_graph_bs", None, kind="json", doc="CUDA-graph batch sizes (routing pads up to them); None: no pad"),
    )

    def __init__(self, **overrides) -> None:
        super().__init__(**overrides)
        c = self.config
        c["slots"] = copy.deepcopy(c["slots"])  # never share (or mutate) the module default
        table = _check_slots(c["slots"])
        cg = c["cuda_graph_bs"]
        if cg is not None and (not isinstance(cg, list) or not all(isinstance(v, int) and v > 0 for v in cg)):
            raise ValueError(f"{self.name}: cuda_graph_bs={cg!r} is not a list of positive ints")
        self._cuda_graph_bs = sorted(cg) if cg else None
        self._bs = sorted(table)
        self.slots = {
            bs: StepSlot(c["initial_steps"], e["candidate_steps"], c["ema_alpha"], c["update_interval"], c["warmup"],
                         e.get("up_hysteresis", 0.0), e.get("down_hysteresis", -0.25), e.get("ceiling_coeff", 0))
            for bs, e in table.items()
        }

    def route(self, batch_size: int) -> int:
        """The slot key for a batch size: pad to a CUDA-graph size, then the largest slot ≤ it."""
        b = batch_size
        if self._cuda_graph_bs is not None:
            i = bisect.bisect_left(self._cuda_graph_bs, b)
            b = self._cuda_graph_bs[i] if i < len(self._cuda_graph_bs) else b
        i = bisect.bisect_right(self._bs, b) - 1
        return self._bs[max(0, i)]

    def decide(self, batch: BatchView) -> Decision:
        key = self.route(batch.batch_size)
        k = self.slots[key].steps
        return Decision(speculate=k > 0, lengths=BatchLengths(batch.rids, uniform=k), info={"slot": key})

    def observe(self, result: StepResult) -> None:
        if result.batch_size == 0:
            return
        self.slots[self.route(result.batch_size)].update(result.columns.accepted.tolist())

    def state_dict(self) -> dict:
        return {"slots": {str(bs): s.state_dict() for bs, s in self.slots.items()}}

    def load_state_dict(self, state: dict) -> None:
        for bs, s in state.get("slots", {}).items():
            if int(bs) in self.slots:
                self.slots[int(bs)].load(s)
