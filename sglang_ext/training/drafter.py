r"""Offline training of the EAGLE-style drafter from the target's own hidden states and distributions.

Per batch of token sequences the target runs once (no grad) and yields, at every position ``t``, the feature
``h_t`` (its chosen layers' outputs) and its next-token distribution ``p_t`` (final hidden state through its
LM head, restricted to the draft vocabulary and renormalised). The drafter is then unrolled ``K`` steps
("training-time test", EAGLE-3), so later draft steps are trained on the drafter's *own* states, exactly as
they are used when serving (:func:`~sglang_ext.core.drafters.eagle_ttt.ttt_forward`, in the core: the online
learners share it):

* step 1, at index ``i`` (token position ``i+1``): input ``(g = W_fc h_i, x_{i+1})``, attends causally to the
  step-1 keys ``≤ i``; output ``a^1_i`` must predict ``p_{i+1}``;
* step ``j > 1``, at index ``i``: input ``(g = a^{j-1}_{i-1}, x_{i+1})``: the state the previous draft step
  produced one position earlier, paired with the token it (ideally) drafted. It attends to step-1 keys
  ``≤ i-j+1`` (the committed context when drafting started) and to one key of each later step on its own
  diagonal (its drafted ancestors), the same set the serving cache shows it.

Loss: :math:`\sum_j w^{j-1}\,\mathrm{CE}(p_{i+1},\, q^j_i)` over valid positions (soft labels; ``w = 0.8``), whose
minimiser is ``q = p``. Reported: KL and top-1 agreement ``argmax q == argmax p`` per step.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sglang_ext.core.buckets import length_buckets
from sglang_ext.core.drafters.eagle_model import (
    EagleConfig,
    EagleDraftModel,
    target_identity,
)
from sglang_ext.core.drafters.eagle_ttt import ttt_forward
from sglang_ext.engine.target import TargetModel


@dataclass
class TrainConfig:
    feature_layers: list[int] = field(default_factory=lambda: [2, 15, 27])  # EAGLE-3: low, middle, high
    draft_vocab_size: int | None = 16384
    ttt_steps: int = 3
    step_weight: float = 0.8
    max_tokens: int = 512  # per sequence
    batch_tokens: int = 4096  # target+drafter tokens per optimiser step (sequences packed by length)
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    epochs: int = 1
    seed: int = 0
    checkpoint_every: int = 100  # optimiser steps between resumable checkpoints
    max_train_seconds: float | None = None  # shrink the plan (and its LR schedule) to fit this wall-clock budget
    max_steps: int | None = None  # cut the plan (and its LR schedule) to this many steps: equal work on a busy machine
    arch: str = "eagle"  # "eagle" (one layer per draft depth) or "specblock" (K positions per forward)
    eval_depth: int = 8  # held-out greedy chain depth reported for every architecture (accept_len@depth)
    # SpecBlock (arch "specblock"), SpecBlock §5.1 and its ablations
    block_size: int = 4
    drafter_layers: int = 2
    ttt_blocks: int = 2
    rank_start: float = 0.1  # share of the steps before the rank loss is on
    rank_weight: float = 1.0
    shift: bool = True
    inherit: bool = True
    rank_head: bool = True
    prefix_mask: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ("eagle", "specblock"):
            raise ValueError(f"arch must be 'eagle' or 'specblock', got {self.arch!r}")
        for name in ("block_size", "drafter_layers", "ttt_blocks", "ttt_steps", "eval_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def draft_vocabulary(sequences: Sequence[Sequence[int]], size: int | None, vocab_size: int,
                     always: Sequence[int] = ()) -> torch.Tensor:
    """The ``size`` most frequent token ids of the corpus (plus ``always``, e.g. EOS), sorted; all ids if ``size`` is None."""
    if size is None or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = Counter(t for s in sequences for t in s)
    keep = list(dict.fromkeys([*always, *(t for t, _ in counts.most_common(size))]))[:size]
    if len(keep) < size:  # pad with the lowest unused ids so the size is exactly as asked
        used = set(keep)
        keep += [t for t in range(vocab_size) if t not in used][: size - len(keep)]
    return torch.tensor(sorted(keep), dtype=torch.long)


def batches(sequences: Sequence[Sequence[int]], batch_tokens: int, seed: int) -> list[list[int]]:
    """Group sequence indices into batches of similar length (little padding), in a seeded random order."""
    groups = length_buckets([len(s) for s in sequences], batch_tokens)
    random.Random(seed).shuffle(groups)
    return groups


class TargetTeacher:
    """Runs the target over a padded batch and returns features and draft-vocabulary distributions (no grad)."""

    def __init__(self, target: TargetModel, draft_vocab: torch.Tensor) -> None:
        self.target = target
        self.lm_rows = target.lm_head.weight.detach()[draft_vocab.to(target.device)]
        self._cache = None

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens [B, S]`` → features ``[B, S, F]`` and log p over the draft vocabulary ``[B, S, V_d]``."""
        B, S = tokens.shape
        if self._cache is None or self._cache.num_slots < B or self._cache.max_len < S:
            self._cache = self.target.new_cache(B, S)
        self._cache.lengths.zero_()
        visible = torch.ones(S, S, dtype=torch.bool, device=self.target.device).tril().expand(B, S, S)
        out = self.target.forward(self._cache, tokens, visible, torch.arange(S).expand(B, S), hidden_only=True)
        logp = torch.log_softmax(torch.nn.functional.linear(out.hidden, self.lm_rows).float(), dim=-1)
        return out.features.float(), logp


@dataclass
class StepMetrics:
    loss: float
    kl: list[float]
    top1: list[float]
    tokens: int
    accept_len: float = 0.0  # mean leading run of greedy hits along the unrolled chain (teacher-forced context)
    rank_acc: float | None = None


def ttt_loss(model: EagleDraftModel, features: torch.Tensor, tokens: torch.Tensor, logp: torch.Tensor,
             valid: torch.Tensor, steps: int, step_weight: float) -> tuple[torch.Tensor, StepMetrics]:
    """Soft-label cross-entropy over the unrolled steps; ``valid [B, S]`` marks real (non-padding) tokens."""
    outs = ttt_forward(model, features, tokens, steps)
    L = tokens.shape[1] - 1
    target_logp = logp[:, 1:]  # p at position i+1: the distribution of the token at i+2
    p = target_logp.exp()
    total = torch.zeros((), device=tokens.device)
    kls, accs = [], []
    # predicting position i+2 needs positions i+1 and i+2 to be real tokens
    pair_valid = valid[:, 1:] & torch.cat([valid[:, 2:], torch.zeros_like(valid[:, :1])], dim=1)
    idx = torch.arange(L, device=tokens.device)
    p_arg = target_logp.argmax(-1)
    alive = pair_valid.float()
    accept = torch.zeros_like(alive)
    for j, logits in enumerate(outs, start=1):
        m = pair_valid & (idx >= j - 1).view(1, L)
        n = m.sum().clamp(min=1)
        q_logp = torch.log_softmax(logits.float(), dim=-1)
        ce = -(p * q_logp).sum(-1)
        total = total + (step_weight ** (j - 1)) * (ce * m).sum() / n
        with torch.no_grad():
            ent = -(p * target_logp).sum(-1)
            kls.append(float(((ce - ent) * m).sum() / n))
            hit = q_logp.argmax(-1) == p_arg
            accs.append(float((hit & m).sum() / n))
            # the chain started at index i drafts step j at index i + j - 1
            shifted = torch.zeros_like(alive)
            shifted[:, :L - j + 1] = (hit & pair_valid)[:, j - 1:].float()
            alive = alive * shifted
            accept = accept + alive
    starts = pair_valid.float().sum().clamp(min=1)
    return total, StepMetrics(loss=float(total.detach()), kl=kls, top1=accs, tokens=int(pair_valid.sum()),
                              accept_len=float(accept.sum() / starts))


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), S), pad_id, dtype=torch.long)
    valid = torch.zeros(len(sequences), S, dtype=torch.bool)
    for b, s in enumerate(sequences):
        tokens[b, :len(s)] = torch.tensor(list(s))
        valid[b, :len(s)] = True
    return tokens, valid


class DrafterTrainer:
    """Trains a feature drafter (``config.arch``: EAGLE-style or SpecBlock) against a target; resumable from
    ``out_dir/trainer_state``. The target's outputs come from a live :class:`TargetTeacher` or, when ``train`` is
    given a :class:`~sglang_ext.training.feature_cache.FeatureCache`, from that cache (no target forward)."""

    def __init__(self, target: TargetModel, target_name: str, config: TrainConfig, out_dir: str | Path,
                 device: str | torch.device = "cpu") -> None:
        self.target, self.config, self.out_dir = target, config, Path(out_dir)
        self.target_name = target_name
        self.device = torch.device(device)
        target.set_feature_layers(tuple(config.feature_layers))

    def new_model(self, vocab: torch.Tensor):
        c = self.config
        torch.manual_seed(c.seed)
        draft_vocab = len(vocab) if len(vocab) < self.target.vocab_size else None
        identity = target_identity(self.target_name, self.target.config)
        if c.arch == "specblock":
            from sglang_ext.core.drafters.specblock_model import SpecBlockConfig, SpecBlockDraftModel

            cfg = SpecBlockConfig.for_target(self.target.config, c.feature_layers, draft_vocab, identity,
                                             block_size=c.block_size, num_layers=c.drafter_layers, shift=c.shift,
                                             inherit=c.inherit, rank_head=c.rank_head)
            model = SpecBlockDraftModel(cfg).to(self.device)
        else:
            model = EagleDraftModel(EagleConfig.for_target(self.target.config, c.feature_layers, draft_vocab,
                                                           identity)).to(self.device)
        if draft_vocab is not None:
            model.set_draft_vocab(vocab.to(self.device))
        return model.bind_target(self.target.embed_tokens.weight, self.target.lm_head.weight)

    def loss(self, model, tokens: torch.Tensor, valid: torch.Tensor, feats: torch.Tensor, logp: torch.Tensor,
             step: int, total_steps: int, evaluating: bool = False) -> tuple[torch.Tensor, StepMetrics]:
        """The architecture's training loss on one batch (evaluation: deterministic, ``eval_depth`` deep)."""
        c = self.config
        if c.arch == "eagle":
            steps = c.eval_depth if evaluating else c.ttt_steps
            return ttt_loss(model, feats, tokens, logp, valid, steps, c.step_weight)
        from sglang_ext.core.drafters.specblock_ttt import block_loss

        K = c.block_size
        if evaluating:  # the serving chain: each next block where the previous one ends
            offsets = [K] * (max(1, -(-c.eval_depth // K)) - 1)
        else:  # SpecBlock's multi-block TTT: each later block starts U(1, K) positions later
            rng = random.Random(c.seed * 1_000_003 + step)
            offsets = [rng.randint(1, K) for _ in range(c.ttt_blocks - 1)]
        rank_on = evaluating or step >= c.rank_start * total_steps
        loss, m = block_loss(model, feats, tokens, logp, valid, offsets, c.step_weight, prefix_mask=c.prefix_mask,
                             rank_weight=c.rank_weight if rank_on else 0.0,
                             max_depth=c.eval_depth if evaluating else None)
        return loss, StepMetrics(loss=m.loss, kl=m.kl, top1=m.top1, tokens=m.tokens, accept_len=m.accept_len,
                                 rank_acc=m.rank_acc)

    def train(self, train_seqs: Sequence[Sequence[int]], heldout: Sequence[Sequence[int]] = (),
              eos_ids: Sequence[int] = (), progress: bool = True, log=print, cache=None) -> dict:
        c = self.config
        if cache is not None:  # the cache's sequences are the training set (already truncated when it was built)
            seqs = [cache.sequence(i) for i in range(len(cache))]
            order = [i for i, s in enumerate(seqs) if len(s) >= 3]
        else:
            seqs = [list(s)[: c.max_tokens] for s in train_seqs]
            order = [i for i, s in enumerate(seqs) if len(s) >= 3]
        if not order:
            raise ValueError("no training sequence has 3 or more tokens")
        kept = [seqs[i] for i in order]
        state_dir = self.out_dir / "trainer_state"
        resume = state_dir.joinpath("state.pt").is_file()
        vocab = draft_vocabulary(kept, c.draft_vocab_size, self.target.vocab_size, eos_ids)
        model = self.new_model(vocab)
        params = [p for p in model.parameters() if p.requires_grad]
        head = getattr(model, "rank_head", None)
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        clip_groups = [g for g in ([p for p in params if id(p) not in head_ids], [p for p in params if id(p) in head_ids])
                       if g]
        opt = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.95), weight_decay=c.weight_decay)
        plan = [[order[j] for j in b] for e in range(c.epochs) for b in batches(kept, c.batch_tokens, c.seed + e)]
        total_steps = min(len(plan), c.max_steps) if c.max_steps else len(plan)
        horizon = [total_steps]  # the cosine schedule's length; shrinks if a time budget cuts the plan

        def lr_factor(s: int) -> float:
            warm = min(1.0, (s + 1) / max(1, c.warmup_steps))
            return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, horizon[0]))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        start = 0
        history: list[dict] = []
        if resume:
            st = torch.load(state_dir / "state.pt", map_location=self.device, weights_only=False)
            if st["config"] != asdict(c):
                raise ValueError(f"{state_dir}: was made with a different training config; use another --out or delete it")
            model.load_state_dict(st["model"])
            model.bind_target(self.target.embed_tokens.weight, self.target.lm_head.weight)
            opt.load_state_dict(st["opt"])
            sched.load_state_dict(st["sched"])
            start, history = st["step"], st["history"]
            horizon[0] = total_steps = st.get("horizon", total_steps)
            torch.set_rng_state(st["rng"])
            log(f"resuming from step {start}/{total_steps} ({state_dir})")
        teacher = TargetTeacher(self.target, model.draft_vocab)

        def fetch(indices: list[int]):
            if cache is not None:
                return cache.batch(indices, teacher.lm_rows, device=self.device)
            tokens, valid = pad_batch([seqs[i] for i in indices])
            tokens, valid = tokens.to(self.device), valid.to(self.device)
            feats, logp = teacher(tokens)
            return tokens, valid, feats, logp

        t0 = time.perf_counter()
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn(f"[bold]train-drafter {c.arch}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not progress) as bar:
            task = bar.add_task("train", total=total_steps, completed=start, info="")
            step = start
            while step < total_steps:
                tokens, valid, feats, logp = fetch(plan[step])
                model.train()
                loss, m = self.loss(model, tokens, valid, feats, logp, step, total_steps)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for group in clip_groups:  # the rank head's loss is its own: its gradient must not shrink the drafter's
                    torch.nn.utils.clip_grad_norm_(group, c.grad_clip)
                opt.step()
                sched.step()
                history.append({"step": step + 1, "loss": m.loss, "top1": m.top1, "kl": m.kl, "tokens": m.tokens,
                                "accept_len": m.accept_len, "seconds": time.perf_counter() - t0})
                bar.update(task, advance=1, info=f"loss {m.loss:.3f} accept {m.accept_len:.2f} top1 "
                           + "/".join(f"{a:.2f}" for a in m.top1[:4]))
                step += 1
                elapsed = time.perf_counter() - t0
                if c.max_train_seconds and step - start in (20, 50) or (c.max_train_seconds and (step - start) % 100 == 0):
                    fit = step + int((c.max_train_seconds - elapsed) / (elapsed / (step - start)))
                    if fit < total_steps:
                        total_steps = horizon[0] = max(step, fit)
                        bar.update(task, total=total_steps)
                        log(f"time budget {c.max_train_seconds:.0f} s: training {total_steps} of {len(plan)} planned steps")
                if step % c.checkpoint_every == 0 and step < total_steps:
                    self._save_state(state_dir, model, opt, sched, step, history, horizon[0])
        model.eval()
        train_seconds = time.perf_counter() - t0
        report = {"arch": c.arch, "train_steps": total_steps, "planned_steps": len(plan), "train_sequences": len(kept),
                  "train_tokens": sum(map(len, kept)), "trained_tokens": sum(h["tokens"] for h in history),
                  "train_seconds": train_seconds, "feature_cache": str(cache.directory) if cache is not None else None,
                  "final_train_top1": history[-1]["top1"] if history else None}
        if heldout:
            report["heldout"] = evaluate(model, teacher, heldout, c, self.device, trainer=self)
        model.save(self.out_dir, extra={"training": {**asdict(c), **report, "target_name": self.target_name}})
        (self.out_dir / "history.json").write_text(json.dumps(history))
        if state_dir.exists():
            import shutil
            shutil.rmtree(state_dir)
        return report

    def _save_state(self, state_dir: Path, model, opt, sched, step: int, history: list, horizon: int) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / "state.pt.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                    "history": history, "rng": torch.get_rng_state(), "config": asdict(self.config),
                    "horizon": horizon}, tmp)
        tmp.replace(state_dir / "state.pt")


@torch.no_grad()
def evaluate(model, teacher: TargetTeacher, sequences: Sequence[Sequence[int]], config: TrainConfig,
             device: torch.device, trainer: DrafterTrainer | None = None) -> dict:
    """Held-out KL, top-1 agreement per draft depth and the greedy chain's mean accepted length (``accept_len``,
    ``eval_depth`` deep, teacher-forced context), for either architecture."""
    model.eval()
    seqs = [list(s)[: config.max_tokens] for s in sequences if len(s) >= 3]
    tot: dict = {"tokens": 0, "kl": [], "top1": [], "accept_len": 0.0, "rank_acc": 0.0}
    for group in batches(seqs, config.batch_tokens, 0):
        tokens, valid = pad_batch([seqs[i] for i in group])
        tokens, valid = tokens.to(device), valid.to(device)
        feats, logp = teacher(tokens)
        if trainer is not None:
            _, m = trainer.loss(model, tokens, valid, feats, logp, 0, 1, evaluating=True)
        else:
            _, m = ttt_loss(model, feats, tokens, logp, valid, config.ttt_steps, config.step_weight)
        for key in ("kl", "top1"):
            vals = getattr(m, key)
            tot[key] = [a + v * m.tokens for a, v in zip(tot[key] or [0.0] * len(vals), vals)]
        tot["accept_len"] += m.accept_len * m.tokens
        tot["rank_acc"] += (m.rank_acc or 0.0) * m.tokens
        tot["tokens"] += m.tokens
    n = max(1, tot["tokens"])
    out = {"tokens": tot["tokens"], "kl": [k / n for k in tot["kl"]], "top1": [a / n for a in tot["top1"]],
           "accept_len": tot["accept_len"] / n, "depth": config.eval_depth if trainer is not None else config.ttt_steps}
    if config.arch == "specblock" and config.rank_head:
        out["rank_acc"] = tot["rank_acc"] / n
    return out
