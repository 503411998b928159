"""Online drafter adaptation (TIDE + OnlineSpec), the pure parts: no processes, no server.

* :mod:`.capture`  — bounded host buffer of committed positions (features, top-k target distribution);
  samples → ``ttt_loss`` tensors;
* :mod:`.control`  — TIDE Algorithm 1: dual-EMA shift detection, when to collect and when to train;
* :mod:`.learners` — sgd / adam / momentum / optimistic / hedge rounds over captured batches;
* :mod:`.gate`     — deploy only if the candidate's expected acceptance length beats the current drafter's;
* :mod:`.handoff`  — atomic versioned checkpoints between the trainer and the server.

The trainer process and the serving-side facade live in :mod:`sglang_ext.online`.
"""

from .capture import (
                      CaptureBuffer,
                      CapturedSample,
                      TrainingBatch,
                      batch_samples,
                      draft_correct_for_step,
                      to_training_batch,
)
from .control import SelectiveTraining
from .gate import DeployGate, GateResult, acceptance_score, split_eval
from .handoff import latest_version, load_version, publish
from .learners import (
                      Learner,
                      RoundStats,
                      hedge_weights,
                      make_learner,
                      weighted_ttt_loss,
)

__all__ = [
    "CaptureBuffer", "CapturedSample", "DeployGate", "GateResult", "Learner", "RoundStats", "SelectiveTraining",
    "TrainingBatch", "acceptance_score", "batch_samples", "draft_correct_for_step", "hedge_weights",
    "latest_version", "load_version", "make_learner", "publish", "split_eval", "to_training_batch",
    "weighted_ttt_loss",
]
