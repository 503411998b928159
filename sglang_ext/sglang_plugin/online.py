"""Online drafter adaptation inside SGLang: the reference engine's :class:`~sglang_ext.online.OnlineLearning`, fed
from SGLang's verify step and deploying through SGLang's draft weight-update path.

Per decode step (EAGLE3, chains: ``--speculative-eagle-topk 1``), after ``EAGLEWorkerV2.verify``:

* request ``b``'s tree occupies rows ``b·n .. b·n + n − 1`` of the verify batch (``n`` = draft tokens), node 0
  being the last committed token; the committed nodes are ``0 .. accept_len_b − 1``;
* for those rows the buffer gets the input token (``verify_input.draft_token``), the target's auxiliary hidden
  states (``logits_output.hidden_states``: EAGLE3's concatenated layers, the drafter's features) and the target's
  next-token logits, plus whether the draft was right after each row — exactly what the reference engine
  captures, so the same trainer, gate and hand-off run unchanged.

Between steps (``forward_batch_generation``), a newly deployed version is converted to SGLang's EAGLE3 names
(:data:`.export.WEIGHT_MAP`) and loaded by each draft model runner's ``update_weights_from_tensor``, the path
SGLang's ``/update_weights_from_tensor`` with ``selector="draft"`` uses. The trainer runs in its own process
(:class:`~sglang_ext.online.OnlineTrainer`): it is restarted if it dies, and serving never waits for it.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .export import WEIGHT_MAP, import_eagle3
from .launch_flags import PluginConfig

log = logging.getLogger("sglang_ext.sglang_plugin")


def sglang_draft_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """Our drafter's trainable weights under SGLang's EAGLE3 checkpoint names (LM head and d2t never change:
    the LM head rows are the target's, frozen, and the draft vocabulary is fixed)."""
    state = model.state_dict()
    return [(WEIGHT_MAP[k], state[k].detach().to(torch.float32).contiguous()) for k in WEIGHT_MAP]


@contextmanager
def plain_tensor_pickling():
    """Undo SGLang's CUDA-only tensor-pickling patch while (re)spawning the trainer.

    ``update_weights_from_tensor`` installs ``sglang.srt.utils.patch_torch.monkey_patch_torch_reductions``, whose
    reducer rewrites argument 6 of every pickled tensor as a CUDA device uuid; for the CPU shared-memory tensors
    the trainer receives (the target's embedding and LM head) that tuple is shorter, and spawning raised
    ``IndexError`` inside the scheduler. The original reducer is restored for the duration of the call only.
    """
    from torch.multiprocessing import reductions

    original = getattr(reductions, "_reduce_tensor_original", None)
    if original is None or reductions.reduce_tensor is original:
        yield
        return
    patched = reductions.reduce_tensor
    reductions.reduce_tensor = original
    reductions.init_reductions()
    try:
        yield
    finally:
        reductions.reduce_tensor = patched
        reductions.init_reductions()


def _target_weights(worker: Any) -> tuple[torch.Tensor, torch.Tensor]:
    model = worker.target_worker.model_runner.model
    embed = model.model.embed_tokens.weight
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    return embed.detach(), (head if head is not None else embed).detach()


class OnlineBridge:
    #: written into the hand-off directory (at most once a second): the trainer's pid, versions, rounds
    STATUS_FILE = "sglang-ext-status.json"

    def __init__(self, worker: Any, online, num_steps: int) -> None:
        self.worker = worker
        self._status_written = 0.0
        self.online = online
        self.num_steps = num_steps
        self.serving_version = 1
        self.deploy_errors = 0
        self._proposed: dict[str, int] = {}
        self._correct: dict[str, int] = {}

    @staticmethod
    def start(worker: Any, config: PluginConfig, server_args: Any) -> OnlineBridge:
        from sglang_ext.core.drafters.eagle_model import EagleDraftModel
        from sglang_ext.online import OnlineLearning

        if getattr(worker, "topk", 1) != 1:
            raise RuntimeError("sglang-ext --online-learning: needs --speculative-eagle-topk 1 (chains)")
        draft_dir = Path(getattr(server_args, "speculative_draft_model_path", "") or "")
        cfg = draft_dir / "config.json"
        if not cfg.is_file() or '"sglang_ext"' not in cfg.read_text():
            raise RuntimeError(f"sglang-ext --online-learning: {draft_dir} is not a drafter exported by "
                               "`sglang-ext export-drafter` (its config.json has no sglang_ext block)")
        ours = Path(tempfile.mkdtemp(prefix="sglang-ext-drafter-")) / "drafter"
        import_eagle3(draft_dir, ours)
        model = EagleDraftModel.load(ours).float().eval()
        embed, head = _target_weights(worker)
        embed, head = embed.float().cpu()[: model.config.vocab_size], head.float().cpu()[: model.config.vocab_size]
        model.bind_target(embed, head)
        handoff = config.online_handoff_dir or tempfile.mkdtemp(prefix="sglang-ext-online-")
        online = OnlineLearning(model, embed, head, handoff, config.online or {},
                                expect_target=model.config.target).start()
        log.info("sglang-ext: online learning on (hand-off %s, trainer pid %s)", handoff, online.trainer.pid)
        return OnlineBridge(worker, online, int(getattr(worker, "speculative_num_steps", 0)))

    # ---- per step -----------------------------------------------------------------------------------------------
    def capture(self, batch: Any, verify_input: Any, result: Any) -> None:
        """The committed rows of one verify (see the module docstring)."""
        hidden = getattr(result.logits_output, "hidden_states", None)
        if hidden is None or result.accept_lens is None:
            return
        reqs = batch.reqs
        bs = len(reqs)
        if bs == 0 or hidden.shape[0] % bs:
            return
        n = hidden.shape[0] // bs
        tokens = verify_input.draft_token.view(bs, n).cpu()
        logits = result.logits_output.next_token_logits.view(bs, n, -1)
        feats = hidden.view(bs, n, -1)
        lens = result.accept_lens.cpu().tolist()
        steps = n - 1
        for b, req in enumerate(reqs):
            a = int(lens[b]) - 1  # accepted drafts; rows 0..a are committed
            if a < 0:
                continue
            correct = torch.ones(a + 1, dtype=torch.int8)
            correct[-1] = 0 if a < steps else -1  # a draft after row a existed (and was wrong) iff a < steps
            self.online.capture(req.rid, tokens[b, : a + 1], feats[b, : a + 1].float().cpu(),
                                logits[b, : a + 1].float().cpu(), correct)
            self._proposed[req.rid] = self._proposed.get(req.rid, 0) + steps
            self._correct[req.rid] = self._correct.get(req.rid, 0) + a

    def finish(self, rid: str) -> None:
        proposed = self._proposed.pop(rid, 0)
        correct = self._correct.pop(rid, 0)
        self.online.finish_request(rid, correct / proposed if proposed else None)

    def between_steps(self) -> None:
        """Deploy a newly published drafter version through SGLang's draft weight-update path."""
        with plain_tensor_pickling():  # poll() restarts a dead trainer process
            model = self.online.poll()
        if time.monotonic() - self._status_written >= 1.0:
            self._write_status()
        if model is None:
            return
        tensors = sglang_draft_tensors(model)
        try:
            for _role, runner in self.worker.weight_update_runners():
                updater = getattr(runner, "update_weights_from_tensor", None) or runner.weight_updater.update_weights_from_tensor
                ok, message = updater(tensors)
                if not ok:
                    raise RuntimeError(message)
        except Exception as e:  # noqa: BLE001  (a failed swap keeps the serving drafter; serving goes on)
            self.deploy_errors += 1
            log.warning("sglang-ext: drafter update failed, keeping version %d: %s", self.serving_version, e)
            return
        self.serving_version = self.online.trainer.status().get("version") or self.serving_version + 1
        log.info("sglang-ext: deployed drafter version %d", self.serving_version)
        self._write_status()

    def _write_status(self) -> None:
        self._status_written = time.monotonic()
        path = Path(self.online.handoff_dir) / self.STATUS_FILE
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.status(), default=str))
            tmp.replace(path)
        except OSError as e:
            log.debug("sglang-ext: status file %s not written: %s", path, e)

    def status(self) -> dict:
        s = self.online.status()
        return {**s, "serving_version": self.serving_version, "deploy_errors": self.deploy_errors}

    def stop(self) -> None:
        self.online.stop()


__all__ = ["OnlineBridge", "sglang_draft_tensors"]
