r"""Online learners for the drafter (OnlineSpec §3.2; TIDE's plain fine-tune; OSD's wrong-position weighting).

Every learner has one call, ``learner.round(model, batches) -> (new_model, RoundStats)``: it trains a *fresh*
copy of ``model`` (the deployed drafter is never touched) on one round of captured batches and returns it.
Trainable: every drafter parameter (fc, norms, the decoder layer); the target's embedding and LM head are bound
buffers, frozen by construction. Parameters train in float32 (a bf16 drafter is cast back on output; the
float32 master is kept, so small updates are not rounded away round after round).

The per-step loss is :func:`weighted_ttt_loss`: EAGLE-3's unrolled soft cross-entropy to the target
distribution (exactly ``ttt_loss`` when every row weighs 1) with row ``s`` weighted by ``label_weight[s]`` (OSD:
rows where the draft was wrong weigh ``wrong_weight``):

.. math:: \mathcal L = \sum_{j=1}^{K} w^{j-1}\,\frac{\sum_i \omega_{i+1}\,\mathrm{CE}(p_{i+1}, q^j_i)}{\sum_i \omega_{i+1}}

Learners, by name:

* ``sgd`` — plain online SGD, :math:`w \leftarrow w - \eta g`, no state across rounds.
* ``adam`` — plain online fine-tuning (TIDE retrains the current draft each round): Adam, fresh each round.
* ``momentum`` — momentum-persistent SGD (OnlineSpec's *code* for Opt-Hydra): :math:`v \leftarrow \mu v + g,\
  w \leftarrow w - \eta v`, with :math:`v` kept across rounds.
* ``optimistic`` — the optimistic update (OnlineSpec Eq. 3, standard form), hint = the previous gradient:

  .. math:: \hat w_{t+1} = \hat w_t - \eta\, g_t,\qquad w_{t+1} = \hat w_{t+1} - \eta\, h_{t+1},\qquad h_{t+1} = g_t

  where :math:`g_t = \nabla f_t(w_t)` is taken at the *played* point; :math:`\hat w, h` persist across rounds.
* ``hedge`` — an ensemble of ``K >= 3`` Adam experts on a learning-rate grid (``lr · 2^{i - ⌊(K-1)/2⌋}``),
  deployed as the parameter-weighted average :math:`\sum_i p_i w_i`, with either rule:

  - ``cumulative`` (paper): experts are persistent online learners;
    :math:`p_i \propto \exp(-\eta_h L_i)`, :math:`L_i = \sum_{s \le t} f_s(w^i_s)` their losses on each round
    *before* training on it;
  - ``last-chunk`` (official code): every expert restarts from the merged (deployed) model, trains on the
    round, and :math:`p = \mathrm{softmax}(-\ell / \tau)` over their final training losses :math:`\ell`.

A learner's state follows the model it produced: :meth:`Learner.commit` after the gate deploys, or
:meth:`Learner.rollback` after it refuses (the state returns to before the round). Given a model it did not
produce (first round, trainer restart), a learner starts its state afresh from that model.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from sglang_ext.core.drafters.checkpoint import FeatureDraftModel
from sglang_ext.core.drafters.eagle_ttt import ttt_forward
from sglang_ext.core.drafters.specblock_model import SpecBlockDraftModel
from sglang_ext.core.drafters.specblock_ttt import block_loss
from sglang_ext.core.policies.base import Param

from .capture import TrainingBatch
from .control import resolve

LEARNERS = ("sgd", "adam", "momentum", "optimistic", "hedge")
HEDGE_RULES = ("cumulative", "last-chunk")
#: Measured (``python -m analysis.learner_rates``, results in ``analysis/results/learner-rates-20261202``: two rounds
#: of 4271 and 1054 tokens captured from SmolLM2-135M on 24 GSM8K prompts, the trainer's own gate): at these rates
#: sgd, momentum and optimistic each deployed a round that raised held-out E[accepted] 1.012 -> 1.038-1.040; at 10x
#: every one lost (0.83-0.97). Momentum's step is ``lr / (1 - mu)`` = 10x sgd's at mu = 0.9, so its rate is a third
#: of sgd's: at 1e-2 it already lost (1.012 -> 1.006).
DEFAULT_LR = {"sgd": 1e-2, "adam": 1e-4, "momentum": 3e-3, "optimistic": 1e-2, "hedge": 2e-4}

PARAMS: tuple[Param, ...] = (
    Param("learner", "adam", kind="choice", choices=LEARNERS, doc="online learner"),
    Param("lr", 0.0, 0.0, 10.0, doc="learning rate; 0: the learner's default " + str(DEFAULT_LR)),
    Param("epochs", 2, 1, 100, kind="int", doc="passes over each round (OnlineSpec EAGLE-3 code: 2)"),
    Param("ttt_steps", 3, 1, 8, kind="int", doc="unrolled draft steps in the loss (EAGLE-3 training-time test)"),
    Param("step_weight", 0.8, 0.0, 1.0, doc="loss weight decay per draft step"),
    Param("grad_clip", 0.5, 0.0, 1e6, doc="gradient-norm clip (0: off; OnlineSpec B.10: 0.5)"),
    Param("wrong_weight", 1.0, 0.0, 100.0, doc="OSD-style weight of rows the draft got wrong (1: off)"),
    Param("prefill_weight", 0.1, 0.0, 1.0, doc="weight of prompt (prefill) rows; generated rows weigh 1. Low by default: "
          "chat prompts repeat and are never drafted in serving (measured in analysis/results/workload-shift-*)"),
    Param("momentum", 0.9, 0.0, 0.999, doc="momentum of the momentum learner (OnlineSpec code: 0.9)"),
    Param("hedge_rule", "last-chunk", kind="choice", choices=HEDGE_RULES, doc="Hedge weights: paper or code rule"),
    Param("hedge_experts", 3, 3, 16, kind="int", doc="Hedge experts on the LR grid"),
    Param("hedge_eta", 10.0, 0.0, 1e4, doc="Hedge inverse temperature on cumulative loss (paper B.10: 10)"),
    Param("hedge_tau", 0.2, 1e-6, 1e3, doc="merge temperature of the last-chunk rule (code, EAGLE-3: 0.2)"),
    Param("batch_tokens", 1024, 16, 1_000_000, kind="int",
          doc="padded rows per optimiser step (peak memory ~ rows x draft vocab x 4 B x ~10)"),
    Param("seed", 0, 0, 2**31 - 1, kind="int", doc="batch-order seed"),
    Param("update", "full", kind="choice", choices=("full", "head"),
          doc="which weights a round trains: all, or the head only (SpecBlock: rank head + last layer; EAGLE-style: "
              "the MLP of its layer + final norm); the update bandit's head-only arm"),
)


# ---- loss --------------------------------------------------------------------------------------------------
def weighted_ttt_loss(model, batch: TrainingBatch, steps: int, step_weight: float) -> torch.Tensor:
    """``ttt_loss`` with per-row target weights (see the module docstring); equal to it when all weigh 1.

    A SpecBlock drafter trains with its own loss (:func:`~sglang_ext.core.drafters.specblock_ttt.block_loss`,
    valid-prefix mask and rank loss) on the serving chain ``steps`` deep (each next block where the last ends)."""
    if isinstance(model, SpecBlockDraftModel):
        K = model.config.block_size
        loss, _ = block_loss(model, batch.features, batch.tokens, batch.logp, batch.valid, [K] * (-(-steps // K) - 1),
                             step_weight, label_weight=batch.label_weight)
        return loss
    outs = ttt_forward(model, batch.features, batch.tokens, steps)
    valid = batch.valid
    L = batch.tokens.shape[1] - 1
    p = batch.logp[:, 1:].exp()
    pair_valid = valid[:, 1:] & torch.cat([valid[:, 2:], torch.zeros_like(valid[:, :1])], dim=1)
    w_row = batch.label_weight[:, 1:] * pair_valid
    idx = torch.arange(L, device=batch.tokens.device)
    total = torch.zeros((), device=batch.tokens.device)
    for j, logits in enumerate(outs, start=1):
        m = w_row * (idx >= j - 1).view(1, L)
        ce = -(p * torch.log_softmax(logits.float(), dim=-1)).sum(-1)
        total = total + (step_weight ** (j - 1)) * (ce * m).sum() / m.sum().clamp(min=1e-8)
    return total


@torch.no_grad()
def mean_loss(model: FeatureDraftModel, batches: Sequence[TrainingBatch], steps: int = 3, step_weight: float = 0.8) -> float:
    """Token-weighted mean of :func:`weighted_ttt_loss` over batches (no grad)."""
    dev, dt = model.fc.weight.device, model.fc.weight.dtype
    tot = n = 0.0
    for b in batches:
        tot += float(weighted_ttt_loss(model, b.to(dev, dt), steps, step_weight)) * b.num_tokens
        n += b.num_tokens
    return tot / max(n, 1.0)


# ---- models as named float32 tensors -------------------------------------------------------------------------
def trainable_names(model, scope: str = "full") -> list[str]:
    """Names a round trains: every parameter, or (``scope="head"``) :func:`head_names` only."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if scope == "head":
        head = head_names(model)
        names = [n for n in names if any(n == h or n.startswith(h + ".") for h in head)]
    return names


def head_names(model) -> list[str]:
    """The cheap-to-update part (SpecBlock's head-only update: the rank head and the last layer; EAGLE-style: its
    layer's MLP and the final norm), as parameter-name prefixes."""
    if isinstance(model, SpecBlockDraftModel):
        return ["rank_head", f"layers.{model.config.num_layers - 1}", "final_norm"]
    return ["post_norm", "gate_proj", "up_proj", "down_proj", "final_norm"]


def clone_model(model: FeatureDraftModel, params: dict[str, torch.Tensor] | None = None,
                dtype: torch.dtype | None = None) -> FeatureDraftModel:
    """A fresh drafter with ``model``'s weights (or ``params``), bound to the same frozen target tensors."""
    dev, dt = model.fc.weight.device, dtype or model.fc.weight.dtype
    m = type(model)(copy.deepcopy(model.config))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if params:
        state.update({k: v.detach() for k, v in params.items()})
    if "draft_vocab" in state:
        m.draft_vocab = torch.empty_like(state["draft_vocab"])
    m.load_state_dict(state)
    m = m.to(device=dev, dtype=dt)
    m.embed_weight = model.embed_weight
    lm = model.lm_weight
    m.lm_weight = None if lm is None else (lm if lm.dtype == dt else lm.to(dt))
    return m.train(model.training)


def named_params(model, scope: str = "full") -> dict[str, torch.Tensor]:
    """Trainable parameters (of ``scope``, see :func:`trainable_names`) as detached float32 copies."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().float().clone() for n in trainable_names(model, scope)}


# ---- update rules (in place on float32 tensors, state keyed by parameter name) ------------------------------
class UpdateRule:
    """One online update :math:`w_{t+1} = U(w_t, g_t)` over named tensors; ``state`` is what persists."""

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        self.state = {}


class SGD(UpdateRule):
    r""":math:`w \leftarrow w - \eta g`."""

    @torch.no_grad()
    def step(self, params, grads):
        for n, w in params.items():
            w.sub_(grads[n], alpha=self.lr)


class MomentumSGD(UpdateRule):
    r""":math:`v \leftarrow \mu v + g,\ w \leftarrow w - \eta v` (PyTorch's SGD-momentum convention)."""

    def __init__(self, lr: float, momentum: float = 0.9) -> None:
        super().__init__(lr)
        self.momentum = momentum

    @torch.no_grad()
    def step(self, params, grads):
        for n, w in params.items():
            st = self.state.setdefault(n, {})
            v = st.get("v")
            v = grads[n].clone() if v is None else v.mul_(self.momentum).add_(grads[n])
            st["v"] = v
            w.sub_(v, alpha=self.lr)


class Optimistic(UpdateRule):
    r"""Optimistic online gradient descent with the last gradient as hint.

    .. math:: \hat w_{t+1} = \hat w_t - \eta g_t,\qquad w_{t+1} = \hat w_{t+1} - \eta h_{t+1},\qquad h_{t+1} = g_t

    ``params`` hold the played point :math:`w`; the lazy iterate :math:`\hat w` lives in the state, initialised
    to :math:`w` (so the first step is :math:`w_1 = w_0 - 2\eta g_0`).
    """

    @torch.no_grad()
    def step(self, params, grads):
        for n, w in params.items():
            st = self.state.setdefault(n, {})
            w_hat = st.get("w_hat")
            if w_hat is None:
                w_hat = w.detach().clone()
            g = grads[n]
            w_hat.sub_(g, alpha=self.lr)
            st["w_hat"], st["h"] = w_hat, g.clone()
            w.copy_(w_hat).sub_(g, alpha=self.lr)


class Adam(UpdateRule):
    r""":math:`m \leftarrow \beta_1 m + (1-\beta_1) g,\ v \leftarrow \beta_2 v + (1-\beta_2) g^2,\
    w \leftarrow w - \eta\,\hat m / (\sqrt{\hat v} + \epsilon)` with bias correction (OnlineSpec B.10 betas)."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> None:
        super().__init__(lr)
        self.betas, self.eps = betas, eps

    @torch.no_grad()
    def step(self, params, grads):
        b1, b2 = self.betas
        for n, w in params.items():
            st = self.state.setdefault(n, {})
            if "m" not in st:
                st["m"], st["v"], st["t"] = torch.zeros_like(w), torch.zeros_like(w), torch.zeros(())
            g = grads[n]
            st["t"] += 1
            t = float(st["t"])
            st["m"].mul_(b1).add_(g, alpha=1 - b1)
            st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (st["v"] / (1 - b2 ** t)).sqrt_().add_(self.eps)
            w.addcdiv_(st["m"], denom, value=-self.lr / (1 - b1 ** t))


# ---- hedge weights ----------------------------------------------------------------------------------------
def hedge_weights(rule: str, losses: Sequence[float], eta: float = 10.0, tau: float = 0.2) -> list[float]:
    r"""``cumulative``: :math:`p_i \propto e^{-\eta L_i}` (``losses`` = cumulative); ``last-chunk``:
    :math:`p = \mathrm{softmax}(-\ell/\tau)` (``losses`` = last round's). Shifted by the minimum for stability."""
    if rule not in HEDGE_RULES:
        raise ValueError(f"hedge rule {rule!r} is not one of {HEDGE_RULES}")
    scale = eta if rule == "cumulative" else 1.0 / tau
    lo = min(losses)
    e = [math.exp(-scale * (x - lo)) for x in losses]
    z = sum(e)
    return [x / z for x in e]


# ---- learners ---------------------------------------------------------------------------------------------
@dataclass
class RoundStats:
    learner: str
    steps: int = 0
    tokens: int = 0
    loss_first_epoch: float = float("nan")
    loss_last_epoch: float = float("nan")
    seconds: float = 0.0
    lr: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"learner": self.learner, "steps": self.steps, "tokens": self.tokens,
                "loss_first_epoch": self.loss_first_epoch, "loss_last_epoch": self.loss_last_epoch,
                "seconds": self.seconds, "lr": self.lr, **self.extra}


class Learner:
    """Base: runs epochs of :func:`weighted_ttt_loss` steps over the round; subclasses pick the update rule."""

    name: ClassVar[str] = "base"

    def __init__(self, config: dict[str, Any] | None = None, **overrides: Any) -> None:
        c = self.config = resolve(PARAMS, {**(config or {}), **overrides}, f"learner {self.name}")
        self.lr = c["lr"] or DEFAULT_LR[self.name]
        self.rounds = 0
        self._last: dict[str, torch.Tensor] | None = None  # float32 master of the last output
        self._undo: dict | None = None

    # state lifecycle -----------------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"last": self._last, "rounds": self.rounds}

    def _set_state(self, st: dict) -> None:
        self._last, self.rounds = st["last"], st["rounds"]

    def commit(self) -> None:
        """The round's model was deployed: keep the state."""
        self._undo = None

    def rollback(self) -> None:
        """The round's model was refused: return to the state before the round."""
        if self._undo is not None:
            self._set_state(self._undo)
            self._undo = None

    def _begin(self, model: FeatureDraftModel) -> tuple[dict[str, torch.Tensor], bool]:
        """Snapshot the state; return the float32 start point and whether it continues our own trajectory."""
        self._undo = copy.deepcopy(self._state())
        params = dict(model.named_parameters())
        last = self._last
        continuing = last is not None and set(last) == set(trainable_names(model, self.config["update"])) and all(
            torch.equal(last[n].to(params[n].dtype), params[n].detach()) for n in last)
        start = {n: t.clone() for n, t in last.items()} if continuing else named_params(model, self.config["update"])
        return start, continuing

    # the round -----------------------------------------------------------------------------------------------
    def round(self, model: FeatureDraftModel, batches: Sequence[TrainingBatch]) -> tuple[FeatureDraftModel, RoundStats]:
        raise NotImplementedError

    def _order(self, n: int, epoch: int) -> list[int]:
        order = list(range(n))
        random.Random(self.config["seed"] * 1_000_003 + self.rounds * 1009 + epoch).shuffle(order)
        return order

    def _train(self, model: FeatureDraftModel, start: dict[str, torch.Tensor], rule: UpdateRule,
               batches: Sequence[TrainingBatch]) -> tuple[dict[str, torch.Tensor], list[float]]:
        """Run the epochs from ``start`` with ``rule``; returns the final float32 params and per-epoch mean losses."""
        c = self.config
        work = clone_model(model, start, dtype=torch.float32).train()
        names = trainable_names(work, c["update"])
        params = dict(work.named_parameters())
        dev = work.fc.weight.device
        moved = [b.to(dev) for b in batches]
        epoch_losses = []
        for epoch in range(c["epochs"]):
            tot = n = 0.0
            for i in self._order(len(moved), epoch):
                b = moved[i]
                loss = weighted_ttt_loss(work, b, c["ttt_steps"], c["step_weight"])
                grads = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
                g = {k: (torch.zeros_like(params[k]) if gr is None else gr) for k, gr in zip(names, grads)}
                if c["grad_clip"] > 0:
                    norm = torch.sqrt(sum((x.float() ** 2).sum() for x in g.values()))
                    if float(norm) > c["grad_clip"]:
                        g = {k: x * (c["grad_clip"] / float(norm)) for k, x in g.items()}
                rule.step({k: params[k].data for k in names}, g)
                tot += float(loss.detach()) * b.num_tokens
                n += b.num_tokens
            epoch_losses.append(tot / max(n, 1.0))
        return {k: params[k].detach().clone() for k in names}, epoch_losses

    def _finish(self, model: FeatureDraftModel, out: dict[str, torch.Tensor], stats: RoundStats) -> FeatureDraftModel:
        self._last = out
        self.rounds += 1
        return clone_model(model, out).eval()


class _SingleIterate(Learner):
    """sgd / adam / momentum / optimistic: one iterate, trained from the deployed model."""

    persistent: ClassVar[bool] = False  # does the rule's state survive across rounds?

    def __init__(self, config: dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.rule = self._make_rule()

    def _make_rule(self) -> UpdateRule:
        raise NotImplementedError

    def _state(self) -> dict:
        return {**super()._state(), "rule": self.rule.state}

    def _set_state(self, st: dict) -> None:
        super()._set_state(st)
        self.rule.state = st["rule"]

    def round(self, model, batches):
        t0 = time.perf_counter()
        start, continuing = self._begin(model)
        if not (continuing and self.persistent):
            self.rule.reset()
        out, losses = self._train(model, start, self.rule, batches)
        stats = RoundStats(self.name, steps=len(batches) * self.config["epochs"], tokens=sum(b.num_tokens for b in batches),
                           loss_first_epoch=losses[0], loss_last_epoch=losses[-1], lr=self.lr,
                           extra={"continued": continuing})
        new = self._finish(model, out, stats)
        stats.seconds = time.perf_counter() - t0
        return new, stats


class SGDLearner(_SingleIterate):
    name = "sgd"

    def _make_rule(self):
        return SGD(self.lr)


class AdamLearner(_SingleIterate):
    name = "adam"

    def _make_rule(self):
        return Adam(self.lr)


class MomentumLearner(_SingleIterate):
    name = "momentum"
    persistent = True

    def _make_rule(self):
        return MomentumSGD(self.lr, self.config["momentum"])


class OptimisticLearner(_SingleIterate):
    name = "optimistic"
    persistent = True

    def _make_rule(self):
        return Optimistic(self.lr)


class HedgeLearner(Learner):
    """K Adam experts on an LR grid, merged in weight space by Hedge weights (see the module docstring)."""

    name = "hedge"

    def __init__(self, config: dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        K = self.config["hedge_experts"]
        self.rule_name = self.config["hedge_rule"]
        self.lrs = [self.lr * 2.0 ** (i - (K - 1) // 2) for i in range(K)]
        self.experts: list[dict[str, torch.Tensor]] | None = None  # float32 params per expert
        self.expert_rules = [Adam(lr) for lr in self.lrs]
        self.cum_losses = [0.0] * K
        self.weights = [1.0 / K] * K

    def _state(self) -> dict:
        return {**super()._state(), "experts": self.experts, "rules": [r.state for r in self.expert_rules],
                "cum": list(self.cum_losses), "weights": list(self.weights)}

    def _set_state(self, st: dict) -> None:
        super()._set_state(st)
        self.experts, self.cum_losses, self.weights = st["experts"], st["cum"], st["weights"]
        for r, s in zip(self.expert_rules, st["rules"]):
            r.state = s

    def round(self, model, batches):
        t0 = time.perf_counter()
        c = self.config
        start, continuing = self._begin(model)
        K = len(self.lrs)
        if self.rule_name == "last-chunk" or self.experts is None:
            # code rule: every expert restarts from the merged (deployed) model with a fresh optimiser
            self.experts = [{n: t.clone() for n, t in start.items()} for _ in range(K)]
            for r in self.expert_rules:
                r.reset()
        pre: list[float] = []
        if self.rule_name == "cumulative":  # f_t(w_t^i): each expert's loss on the round before it trains on it
            for e in self.experts:
                pre.append(mean_loss(clone_model(model, e, dtype=torch.float32), batches, c["ttt_steps"], c["step_weight"]))
            self.cum_losses = [a + b for a, b in zip(self.cum_losses, pre)]
        trained, finals, firsts = [], [], []
        for e, rule in zip(self.experts, self.expert_rules):
            params, losses = self._train(model, e, rule, batches)
            trained.append(params)
            firsts.append(losses[0])
            finals.append(losses[-1])
        self.experts = trained
        if self.rule_name == "cumulative":
            self.weights = hedge_weights("cumulative", self.cum_losses, eta=c["hedge_eta"])
        else:
            self.weights = hedge_weights("last-chunk", finals, tau=c["hedge_tau"])
        merged = {n: sum(p * e[n] for p, e in zip(self.weights, trained)) for n in trained[0]}
        stats = RoundStats(self.name, steps=len(batches) * c["epochs"] * K, tokens=sum(b.num_tokens for b in batches),
                           loss_first_epoch=sum(p * x for p, x in zip(self.weights, firsts)),
                           loss_last_epoch=sum(p * x for p, x in zip(self.weights, finals)), lr=self.lr,
                           extra={"rule": self.rule_name, "lrs": list(self.lrs), "weights": list(self.weights),
                                  "expert_final_losses": finals, "expert_pre_losses": pre,
                                  "cum_losses": list(self.cum_losses), "continued": continuing})
        new = self._finish(model, merged, stats)
        stats.seconds = time.perf_counter() - t0
        return new, stats


_CLASSES = {c.name: c for c in (SGDLearner, AdamLearner, MomentumLearner, OptimisticLearner, HedgeLearner)}


def make_learner(config: dict[str, Any] | None = None, **overrides: Any) -> Learner:
    """The learner named by ``config["learner"]`` (default ``adam``), configured from the same dict."""
    cfg = {**(config or {}), **overrides}
    name = cfg.get("learner", "adam")
    if name not in _CLASSES:
        raise ValueError(f"learner {name!r} is not one of {LEARNERS}")
    return _CLASSES[name](cfg)


__all__ = [
    "DEFAULT_LR",
    "HEDGE_RULES",
    "LEARNERS",
    "PARAMS",
    "SGD",
    "Adam",
    "Learner",
    "MomentumSGD",
    "Optimistic",
    "RoundStats",
    "UpdateRule",
    "clone_model",
    "hedge_weights",
    "make_learner",
    "mean_loss",
    "named_params",
    "trainable_names",
    "weighted_ttt_loss",
]
