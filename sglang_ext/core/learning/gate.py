r"""Deploy only if better (TIDE §2.1/Algorithm 1): score drafters on a held-back slice of the round.

Score: the expected greedy acceptance length of a ``k``-step chain, from the unrolled drafter
(``ttt_forward``) teacher-forced along the captured sequence. For a chain rooted after index ``c`` (step 1 reads
``(h_c, x_{c+1})``), step ``j`` is the prediction at index ``c + j - 1`` and is right when its top-1 equals the
target's top-1 at row ``c + j``:

.. math:: E[\text{accepted}] = \frac{1}{|C|}\sum_{c \in C}\ \sum_{j=1}^{k}\ \prod_{i \le j} 1\bigl[\arg\max q^i_{c+i-1} = \arg\max p_{c+i}\bigr]

over the chains ``C`` whose ``k`` target rows all carry a label and were captured while decoding (prefill rows
are prompt text: serving never drafts there, and scoring them let drafters that memorise a repeated chat
template pass the gate while drafting worse on generated text; measured in analysis/results/workload-shift-*). Teacher forcing feeds the committed tokens as
the drafted ones; that is exact for greedy traffic (the committed token *is* the target's argmax, so a
correct prefix drafted exactly these tokens) and an approximation for sampled traffic. Also reported: top-1
agreement per step over every labelled position.

Decision (Algorithm 1 compares the new model's ᾱ_eval with the served model's ᾱ_train; here both models are
scored on the same held-back chains, so the comparison is paired): with per-chain differences
:math:`d_c = A^{cand}_c - A^{cur}_c`, mean :math:`\bar d` and standard error :math:`s`,

* ``deploy``  if :math:`\bar d > \text{margin}` and :math:`\bar d > z\,s`;
* ``plateau`` if :math:`\bar d < 0` (the trained model is worse: Algorithm 1 pauses collection);
* ``neutral`` otherwise (better, but not clearly).

Defaults: ``margin = 0.02`` accepted tokens per step (≈1% of a typical 2-token acceptance length: below that a
swap is not worth the drafter-cache mismatch it causes) and ``z = 1.0`` (chains within a request are
correlated, so the standard error is optimistic; 1.0 rather than 1.64 keeps real gains from being refused on a
small slice while a poisoned round, far below zero, is always refused).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sglang_ext.core.drafters.checkpoint import FeatureDraftModel
from sglang_ext.core.drafters.eagle_ttt import ttt_forward
from sglang_ext.core.drafters.specblock_model import SpecBlockDraftModel
from sglang_ext.core.drafters.specblock_ttt import block_ttt_forward
from sglang_ext.core.policies.base import Param

from .capture import CapturedSample, TrainingBatch
from .control import resolve

PARAMS: tuple[Param, ...] = (
    Param("gate_margin", 0.02, -10.0, 10.0, doc="deploy only if E[accepted] improves by more than this (tokens/step)"),
    Param("gate_z", 1.0, 0.0, 10.0, doc="... and by more than z standard errors of the paired difference"),
    Param("gate_steps", 3, 1, 8, kind="int", doc="chain length k of the acceptance score (TIDE: gamma = 3)"),
    Param("eval_fraction", 0.2, 0.01, 0.9, doc="share of a round's samples held back for the gate"),
    Param("gate_se", "chain", kind="choice", choices=("chain", "request"),
          doc="standard error of the paired difference: over chains as if independent, or clustered by request "
              "(chains of one request are correlated; with gate_z = 1.645 a one-sided 95 % test)"),
)


@dataclass
class GateScore:
    accept_len: float  # E[accepted] per chain, in tokens (0..k)
    top1: list[float]  # per step
    chains: int
    per_chain: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0))
    #: [chains] long: the captured sample (request slice) each chain lies in, for a clustered standard error
    groups: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0, dtype=torch.long))


@dataclass
class GateResult:
    deploy: bool
    current_score: float
    candidate_score: float
    margin: float
    outcome: str = "neutral"  # "deploy", "plateau", "neutral"
    delta_se: float = 0.0
    chains: int = 0
    current_top1: list[float] = field(default_factory=list)
    candidate_top1: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"deploy": self.deploy, "outcome": self.outcome, "current_score": self.current_score,
                "candidate_score": self.candidate_score, "margin": self.margin, "delta_se": self.delta_se,
                "chains": self.chains, "current_top1": self.current_top1, "candidate_top1": self.candidate_top1}


def _chain_hits(model, b: TrainingBatch, steps: int, vocab: torch.Tensor, tgt: torch.Tensor, ok: torch.Tensor
                ) -> list[torch.Tensor]:
    """``hits[e][:, c]``: depth ``e + 1`` of the chain rooted at pair index ``c`` drafts the target's top-1 (row
    ``c + 1 + e``), for ``c = 0 .. L - 1`` (columns past the end are False). EAGLE-style: step ``e + 1`` of the
    unrolled drafter at index ``c + e``; SpecBlock: block slots along the serving chain (each next block where the
    previous one ends), fed the target's greedy tokens (teacher forcing, as for the EAGLE-style drafter)."""
    B, S = b.tokens.shape
    L = S - 1
    dev = b.tokens.device
    hits = []
    if isinstance(model, SpecBlockDraftModel):
        K = model.config.block_size
        offsets = [K] * (-(-steps // K) - 1)
        outs = block_ttt_forward(model, b.features, b.tokens, b.target_top1.clamp(min=0), offsets)
        for e in range(steps):
            out = outs[e // K]
            pred = vocab[model.logits(out.states[:, e % K]).float().argmax(-1)]  # [B, L] at root index c
            row = torch.zeros(B, L, dtype=torch.bool, device=dev)
            n = L - e
            if n > 0:
                row[:, :n] = (pred[:, :n] == tgt[:, e:e + n]) & ok[:, e:e + n]
            hits.append(row)
        return hits
    for e, logits in enumerate(ttt_forward(model, b.features, b.tokens, steps)):
        h = (vocab[logits.float().argmax(-1)] == tgt) & ok  # at index i = c + e
        row = torch.zeros(B, L, dtype=torch.bool, device=dev)
        row[:, :L - e] = h[:, e:]
        hits.append(row)
    return hits


@torch.no_grad()
def acceptance_score(model, batches: Sequence[TrainingBatch], steps: int = 3) -> GateScore:
    """Expected greedy chain acceptance length and per-step top-1 (see the module docstring); either architecture."""
    was_training = model.training
    model.eval()
    dev, dt = model.fc.weight.device, model.fc.weight.dtype
    vocab = model.draft_vocab.to(dev)
    per_chain: list[torch.Tensor] = []
    groups: list[torch.Tensor] = []
    row0 = 0
    hits_sum = [0.0] * steps
    hits_n = [0.0] * steps
    for batch in batches:
        b = batch.to(dev, dt)
        B, S = b.tokens.shape
        L = S - 1
        row0 += B
        if L < 1:
            continue
        tgt = b.target_top1[:, 1:]  # index i's target: row i + 1
        ok = (tgt >= 0) & b.valid[:, 1:] & b.valid[:, :-1]
        # chains are scored where serving drafts: target rows captured while decoding (never prompt text)
        gen = b.generated[:, 1:] if b.generated is not None else torch.ones_like(ok)
        hit = _chain_hits(model, b, steps, vocab, tgt, ok)
        for e in range(steps):
            n = L - e
            if n > 0:
                hits_sum[e] += float(hit[e][:, :n].sum())
                hits_n[e] += float(ok[:, e:].sum())
        # chain rooted after index c: depth e + 1 reads target row c + 1 + e, c = 0 .. L - steps
        C = L - steps + 1
        if C <= 0:
            continue
        run = torch.ones(B, C, dtype=torch.bool, device=dev)
        acc = torch.zeros(B, C, device=dev)
        full = torch.ones(B, C, dtype=torch.bool, device=dev)
        for e in range(steps):
            run = run & hit[e][:, :C]
            acc += run.float()
            sl = slice(e, e + C)
            full &= ok[:, sl] & gen[:, sl]
        per_chain.append(acc[full].cpu())
        rows = torch.arange(row0 - B, row0, device=dev).view(B, 1).expand(B, C)
        groups.append(rows[full].cpu())
    model.train(was_training)
    chains = torch.cat(per_chain) if per_chain else torch.zeros(0)
    return GateScore(accept_len=float(chains.mean()) if chains.numel() else 0.0,
                     top1=[s / n if n else 0.0 for s, n in zip(hits_sum, hits_n)], chains=int(chains.numel()),
                     per_chain=chains, groups=torch.cat(groups) if groups else torch.zeros(0, dtype=torch.long))


def paired_standard_error(d: torch.Tensor, groups: torch.Tensor | None = None) -> float:
    r"""Standard error of the mean of paired differences ``d``; clustered by ``groups`` when given.

    Independent: :math:`s/\sqrt{n}`. Clustered (the sandwich estimator with the small-sample factor):

    .. math:: \widehat{SE}^2 = \frac{G}{G-1}\,\frac{1}{n^2}\sum_g \Bigl(\sum_{c \in g} (d_c - \bar d)\Bigr)^2

    over ``G`` groups; chains of one request share its text, so they are not independent and the plain
    estimate is too small. Infinite when fewer than two chains (or groups) are there to estimate it.
    """
    n = int(d.numel())
    if groups is None:
        return float(d.std(unbiased=True) / n ** 0.5) if n > 1 else float("inf")
    ids, inverse = torch.unique(groups, return_inverse=True)
    G = int(ids.numel())
    if G < 2:
        return float("inf")
    sums = torch.zeros(G, dtype=torch.float64).index_add_(0, inverse, (d - d.mean()).double())
    return float((G / (G - 1) * (sums ** 2).sum()) ** 0.5 / n)


def split_eval(samples: Sequence[CapturedSample], fraction: float, seed: int = 0
               ) -> tuple[list[CapturedSample], list[CapturedSample]]:
    """Hold back ``fraction`` of the samples (at least one, at most all but one), seeded; returns (train, eval)."""
    n = len(samples)
    if n < 2:
        raise ValueError(f"need at least 2 samples to hold one back, got {n}")
    k = min(n - 1, max(1, round(fraction * n)))
    held = set(random.Random(seed).sample(range(n), k))
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


class DeployGate:
    """``decide(current, candidate, eval_batches)``: paired acceptance-length comparison with a margin."""

    def __init__(self, config: dict[str, Any] | None = None, **overrides: Any) -> None:
        c = self.config = resolve(PARAMS, {**(config or {}), **overrides}, "deploy gate")
        self.margin, self.z, self.steps = c["gate_margin"], c["gate_z"], c["gate_steps"]
        self.clustered = c["gate_se"] == "request"

    def decide(self, current: FeatureDraftModel, candidate: FeatureDraftModel,
               eval_batches: Sequence[TrainingBatch]) -> GateResult:
        cur = acceptance_score(current, eval_batches, self.steps)
        cand = acceptance_score(candidate, eval_batches, self.steps)
        n = cur.chains
        if n == 0:  # nothing to judge on: keep the current drafter
            return GateResult(False, 0.0, 0.0, self.margin, "neutral", 0.0, 0, cur.top1, cand.top1)
        d = cand.per_chain - cur.per_chain
        mean = float(d.mean())
        se = paired_standard_error(d, cur.groups if self.clustered else None)
        deploy = mean > self.margin and mean >= self.z * se  # the margin decides ties (a negative one: tests)
        outcome = "deploy" if deploy else ("plateau" if mean < 0 else "neutral")
        return GateResult(deploy, cur.accept_len, cand.accept_len, self.margin, outcome, se, n, cur.top1, cand.top1)


__all__ = ["PARAMS", "DeployGate", "GateResult", "GateScore", "acceptance_score", "paired_standard_error", "split_eval"]
