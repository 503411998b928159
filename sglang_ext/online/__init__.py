"""Online drafter adaptation, the serving side: capture → TIDE Algorithm 1 → trainer process → hot swap.

One object for the engine, :class:`OnlineLearning`; every call is cheap and returns at once::

    online = OnlineLearning(drafter_model, target.embed_tokens.weight, target.lm_head.weight, handoff_dir,
                            config={...}, expect_target=identity).start()
    # prefill chunk of a request (no logits computed there: rows get hard next-token labels)
    online.capture(rid, tokens_of_chunk, out.features[0])
    # decode step, per request: committed nodes keep = [0] + path
    online.capture(rid, tokens_at_keep, out.features[b, keep], out.logits[b, keep],
                   draft_correct_for_step(len(path), drafted_next))
    # request finished or aborted
    online.finish_request(rid, accept_rate)       # spec_num_correct_drafts / spec_num_proposed_drafts, or None
    # once per engine step
    model = online.poll()
    if model is not None: drafter.swap_model(model)
    online.status()                               # logs, /metrics
    online.stop()

Parameters (``ONLINE_PARAMS``, one flag each: ``--`` + name with dashes) cover the capture buffer, Algorithm 1,
the learner, the gate and the trainer process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sglang_ext.core.drafters.checkpoint import FeatureDraftModel
from sglang_ext.core.learning import capture, control
from sglang_ext.core.learning.capture import CaptureBuffer, draft_correct_for_step
from sglang_ext.core.learning.control import SelectiveTraining, resolve
from sglang_ext.core.learning.handoff import load_version
from sglang_ext.core.policies.base import Param

from .trainer import TRAINER_PARAMS, OnlineTrainer

ONLINE_PARAMS: tuple[Param, ...] = capture.PARAMS + control.PARAMS + TRAINER_PARAMS


def flag(param: Param) -> str:
    return "--" + param.name.replace("_", "-")


class OnlineLearning:
    """Capture buffer + selective-training control + trainer supervisor, behind the engine's four calls."""

    def __init__(self, model: FeatureDraftModel, target_embed: torch.Tensor, target_lm_head: torch.Tensor,
                 handoff_dir: str | Path, config: dict[str, Any] | None = None, expect_target: dict | None = None,
                 round_delay_s: float = 0.0) -> None:
        c = self.config = resolve(ONLINE_PARAMS, config, "online learning")
        self.buffer = CaptureBuffer(c["capture_bytes"], c["capture_topk"], max_sample_len=c["capture_max_sample_len"])
        self.control = SelectiveTraining.from_config(c)
        self.handoff_dir = Path(handoff_dir)
        self.expect_target = expect_target
        self._embed, self._lm_head = target_embed, target_lm_head
        self._device, self._dtype = model.fc.weight.device, model.fc.weight.dtype
        self.trainer = OnlineTrainer(handoff_dir, target_embed, target_lm_head, initial_model=model, config=c,
                                     expect_target=expect_target, round_delay_s=round_delay_s)
        self.swaps = 0

    def start(self) -> OnlineLearning:
        self.trainer.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the trainer process and free its queues (idempotent, bounded; may be called from the server's
        shutdown while the engine thread still steps: see :meth:`OnlineTrainer.stop`)."""
        self.trainer.stop(timeout)

    @property
    def collecting(self) -> bool:
        return self.control.collecting

    # ---- per step / per request ----------------------------------------------------------------------------
    def capture(self, rid: str, tokens: torch.Tensor, features: torch.Tensor, logits: torch.Tensor | None = None,
                draft_correct: torch.Tensor | None = None) -> None:
        """Committed rows of one request (see :meth:`CaptureBuffer.add`); a no-op while collection is paused."""
        if self.control.collecting:
            self.buffer.add(rid, tokens, features, logits, draft_correct)

    def finish_request(self, rid: str, accept_rate: float | None) -> None:
        """Algorithm 1's per-request step: update the EMAs, store or drop the request's rows, maybe start a round."""
        if self.control.observe_request(accept_rate):
            self.buffer.finish(rid, accept_rate)
        else:
            self.buffer.discard(rid)
        self._maybe_submit()

    def poll(self) -> FeatureDraftModel | None:
        """A newly deployed drafter (bound to the target, on the serving device), or None. Call once per step."""
        version = self.trainer.poll()
        for r in self.trainer.take_results():
            if r["type"] == "result":
                self.control.on_round(r["outcome"])
        self._maybe_submit()
        if version is None:
            return None
        model = load_version(self.handoff_dir, version, self.expect_target).to(self._device, self._dtype)
        self.swaps += 1
        return model.bind_target(self._embed, self._lm_head).eval()

    def _maybe_submit(self) -> None:
        if not self.trainer.started or self.trainer.in_flight or not self.control.ready(self.buffer.closed_tokens) or self.buffer.num_samples < 2:
            return
        samples = self.buffer.drain(self.control.n_threshold)
        if len(samples) < 2:
            samples += self.buffer.drain(1)
        try:
            self.trainer.submit_round(samples)
        except RuntimeError:
            if self.trainer.started:
                raise
            # stopped from another thread (server shutdown) since the check above: the round is not needed

    def status(self) -> dict:
        b = self.buffer
        return {**self.trainer.status(), **self.control.state(), "swaps": self.swaps,
                "capture_bytes_used": b.bytes_used, "capture_tokens": b.num_tokens, "capture_samples": b.num_samples,
                "capture_evicted_tokens": b.evicted_tokens, "capture_dropped_tokens": b.dropped_tokens}


__all__ = ["ONLINE_PARAMS", "OnlineLearning", "OnlineTrainer", "draft_correct_for_step", "flag"]
