r"""Prove a verifier lossless: exact enumeration, or a Monte-Carlo test where enumeration is impossible.

The claim to check: running *draft → verify → commit* repeatedly emits tokens whose joint distribution
equals sampling from the processed target, token by token:

.. math::

    P_{\text{spec}}(y_1 \dots y_L) \;=\; \prod_{t=1}^{L} p(y_t \mid \text{ctx}, y_{<t}).

**Exact mode** (:func:`check_lossless_exact`): a toy autoregressive target and draft (vocabulary 3–6,
trees of depth ≤ 3) make every distribution explicit. The whole pipeline (drafting included) draws its
randomness from a :class:`~sglang_ext.core.random_source.ScriptedRandomSource`, and
:func:`enumerate_outcomes` re-runs it depth-first over *every* draft sample and *every* accept/reject
branch, weighting each leaf by the product of its branch probabilities. The resulting distribution of
the first ``L`` emitted tokens is compared with the product of target conditionals; in float64 the
two agree to ~1e-15 for a correct rule, so the default tolerance is 1e-12.

**Monte-Carlo mode** (:func:`check_lossless_monte_carlo`): for verifiers that draw raw uniforms (GPU
kernels such as SGLang's ``tree_speculative_sampling_target_only``), run the pipeline ``n`` times with a
seeded generator and test the counts against the target distribution with Pearson's chi-square
(bins with expected count < 5 pooled); the verifier fails when ``p < significance`` (default 1e-3, so a
correct verifier fails one seed in a thousand). Total variation is reported alongside.

A *verify function* has the signature ``verify_fn(tree, target_probs, rng) -> VerifyResult`` (see
:func:`sglang_ext.core.tree_verify.verify_tree`); wrap a kernel with a different signature in a few lines.
"""

from __future__ import annotations

import functools
import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import numpy as np
import torch

from .processing import SamplingParams, process_logits
from .random_source import RandomSource, ScriptedRandomSource, TorchRandomSource
from .tree import DraftTree, Scheme, VerifyResult

VerifyFn = Callable[[DraftTree, torch.Tensor, RandomSource], VerifyResult]


# ---- toy models ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyModel:
    """A tiny autoregressive LM whose logits are a fixed pseudo-random function of the context.

    ``zero_fraction`` of the entries are ``-inf`` (never all of them), to exercise tokens with zero
    probability under one model but not the other. ``scale`` sets how peaked the distributions are.
    """

    vocab_size: int
    seed: int
    scale: float = 1.5
    zero_fraction: float = 0.0

    def logits(self, context: Sequence[int]) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, len(context), *[int(t) for t in context]])
        z = rng.normal(size=self.vocab_size) * self.scale
        if self.zero_fraction > 0:
            mask = rng.random(self.vocab_size) < self.zero_fraction
            mask[int(np.argmax(z))] = False
            z = np.where(mask, -np.inf, z)
        return torch.tensor(z, dtype=torch.float64)

    def probs(self, context: Sequence[int], params: SamplingParams) -> torch.Tensor:
        """Processed distribution after ``context`` (cached: the enumerator asks the same contexts many times)."""
        return _toy_probs(self, tuple(int(t) for t in context), params)


@functools.lru_cache(maxsize=200_000)
def _toy_probs(model: ToyModel, context: tuple[int, ...], params: SamplingParams) -> torch.Tensor:
    return process_logits(model.logits(context).unsqueeze(0), params)[0]


@dataclass(frozen=True)
class TreeSpec:
    """How the toy drafter builds a tree: ``branching[d]`` children per node at depth ``d``, drawn by ``scheme``."""

    scheme: Scheme
    branching: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.branching or any(b < 1 for b in self.branching):
            raise ValueError(f"branching must be a non-empty tuple of positive ints, got {self.branching}")
        if self.scheme == "chain" and any(b != 1 for b in self.branching):
            raise ValueError("a chain has branching 1 at every depth")


def draft_tree(draft: ToyModel, draft_params: SamplingParams, contexts: Sequence[tuple[int, ...]],
               spec: TreeSpec, rng: RandomSource) -> tuple[DraftTree, list[list[tuple[int, ...]]]]:
    """Build one tree per context with ``spec``; returns the batch and each node's full context.

    * ``chain`` / ``iid``: each child ``~ q`` independently (``categorical``);
    * ``without_replacement``: siblings ``~ q`` with earlier siblings removed (stops early if q's support runs out);
    * ``topk``: the ``branching[d]`` most likely tokens of ``q`` (ties: lowest id), no randomness.
    """
    all_tokens, all_parents, all_q, all_ctx = [], [], [], []
    for ctx in contexts:
        tokens, parents, qs, node_ctx = [ctx[-1]], [-1], [], [ctx]
        frontier = [0]
        for depth, width in enumerate(spec.branching):
            next_frontier = []
            for node in frontier:
                q = draft.probs(node_ctx[node], draft_params)
                while len(qs) <= node:
                    qs.append(None)
                qs[node] = q
                if spec.scheme == "topk":
                    order = torch.sort(-q, stable=True).indices.tolist()
                    picks = [t for t in order if q[t] > 0][:width]
                elif spec.scheme == "without_replacement":
                    picks, q_left = [], q.clone()
                    for _ in range(width):
                        if float(q_left.sum()) <= 0:
                            break
                        t = int(rng.categorical((q_left / q_left.sum()).unsqueeze(0))[0])
                        picks.append(t)
                        q_left[t] = 0.0
                else:
                    picks = rng.categorical(q.unsqueeze(0).expand(width, -1)).tolist()
                for t in picks:
                    tokens.append(int(t))
                    parents.append(node)
                    node_ctx.append(node_ctx[node] + (int(t),))
                    next_frontier.append(len(tokens) - 1)
            frontier = next_frontier
        V = draft.vocab_size
        q_full = torch.zeros(len(tokens), V, dtype=torch.float64)
        for i, q in enumerate(qs):
            if q is not None:
                q_full[i] = q
        all_tokens.append(tokens)
        all_parents.append(parents)
        all_q.append(q_full)
        all_ctx.append(node_ctx)
    tree = DraftTree.from_lists(all_tokens, all_parents, spec.scheme, all_q, draft.vocab_size)
    return tree, all_ctx


def target_probs_for(target: ToyModel, params: SamplingParams, node_contexts: list[list[tuple[int, ...]]],
                     num_slots: int) -> torch.Tensor:
    """``[B, N, V]`` processed target distribution at every node (uniform at padding, never read)."""
    V = target.vocab_size
    out = torch.full((len(node_contexts), num_slots, V), 1.0 / V, dtype=torch.float64)
    for b, ctxs in enumerate(node_contexts):
        for i, ctx in enumerate(ctxs):
            out[b, i] = target.probs(ctx, params)
    return out


# ---- the pipeline under test -----------------------------------------------------------------------
@dataclass(frozen=True)
class LosslessCase:
    """One toy problem: a target, a draft, how trees are built, and how many tokens to compare."""

    target: ToyModel
    draft: ToyModel
    spec: TreeSpec
    target_params: SamplingParams = SamplingParams()
    draft_params: SamplingParams = SamplingParams()
    prompts: tuple[tuple[int, ...], ...] = ((0,),)
    num_tokens: int = 2
    drafter: Callable | None = None  # same signature as draft_tree; default draft_tree

    def build_tree(self, contexts: Sequence[tuple[int, ...]], rng: RandomSource):
        return (self.drafter or draft_tree)(self.draft, self.draft_params, contexts, self.spec, rng)

    def __post_init__(self) -> None:
        if self.target.vocab_size != self.draft.vocab_size:
            raise ValueError("target and draft must share a vocabulary")


def run_step(case: LosslessCase, verify_fn: VerifyFn, rng: RandomSource) -> tuple[tuple[int, ...], ...]:
    """One draft → verify step on every prompt; returns what each emitted (truncated to ``num_tokens``)."""
    contexts = [tuple(p) for p in case.prompts]
    tree, node_ctx = case.build_tree(contexts, rng)
    p = target_probs_for(case.target, case.target_params, node_ctx, tree.num_slots)
    result = verify_fn(tree, p, rng)
    return tuple(tuple(seq[: case.num_tokens]) for seq in result.emitted)


def complete_with_target(case: LosslessCase, step_law: dict) -> dict:
    """Extend each one-step outcome to ``num_tokens`` tokens per prompt by exact target sampling.

    If one step is lossless, "one speculative step, then sample the rest from the target" has exactly the
    target's law for the first ``num_tokens`` tokens; by induction so do any number of steps, because a step
    depends only on the context (the checker's drafter is stateless). This turns an exponential multi-step
    enumeration into one step plus arithmetic.
    """
    out: dict = defaultdict(float)
    for outcome, weight in step_law.items():
        per_prompt = [_target_law(case, tuple(prompt), seq) for prompt, seq in zip(case.prompts, outcome)]
        for combo in itertools.product(*[d.items() for d in per_prompt]):
            out[tuple(seq for seq, _ in combo)] += weight * float(np.prod([w for _, w in combo]))
    return dict(out)


def _target_law(case: LosslessCase, prompt: tuple[int, ...], prefix: tuple[int, ...]) -> dict[tuple[int, ...], float]:
    """Law of the first ``num_tokens`` tokens given they start with ``prefix`` (target sampling after it)."""
    dist: dict[tuple[int, ...], float] = {tuple(prefix): 1.0}
    for _ in range(case.num_tokens - len(prefix)):
        nxt: dict[tuple[int, ...], float] = {}
        for seq, w in dist.items():
            for t, pt in enumerate(case.target.probs(prompt + seq, case.target_params).tolist()):
                if pt > 0:
                    nxt[seq + (t,)] = w * pt
        dist = nxt
    return dist


def run_pipeline(case: LosslessCase, verify_fn: VerifyFn, rng: RandomSource) -> tuple[tuple[int, ...], ...]:
    """Draft → verify → commit until every prompt has ``num_tokens`` new tokens; returns them (truncated)."""
    contexts = [tuple(p) for p in case.prompts]
    produced: list[list[int]] = [[] for _ in contexts]
    while True:
        active = [b for b in range(len(contexts)) if len(produced[b]) < case.num_tokens]
        if not active:
            break
        ctxs = [contexts[b] + tuple(produced[b]) for b in active]
        tree, node_ctx = case.build_tree(ctxs, rng)
        p = target_probs_for(case.target, case.target_params, node_ctx, tree.num_slots)
        result = verify_fn(tree, p, rng)
        for slot, b in enumerate(active):
            produced[b].extend(result.emitted[slot])
    return tuple(tuple(seq[: case.num_tokens]) for seq in produced)


def target_distribution(case: LosslessCase) -> dict[tuple[tuple[int, ...], ...], float]:
    """Exact joint law of the first ``num_tokens`` tokens per prompt under the processed target."""
    per_prompt = [_target_law(case, tuple(prompt), ()) for prompt in case.prompts]
    joint: dict[tuple[tuple[int, ...], ...], float] = {}
    for combo in itertools.product(*[d.items() for d in per_prompt]):
        joint[tuple(seq for seq, _ in combo)] = float(np.prod([w for _, w in combo]))
    return joint


def enumerate_outcomes(run: Callable[[RandomSource], Hashable], max_leaves: int = 2_000_000) -> tuple[dict, int]:
    """Exact outcome distribution of ``run`` by depth-first re-execution over all choice points.

    Each execution follows a script of choices; the choice points it meets past the script's end are
    recorded, and each untaken alternative becomes a new script. Every leaf is visited exactly once.
    """
    dist: dict = defaultdict(float)
    stack: list[list[int]] = [[]]
    leaves = 0
    while stack:
        script = stack.pop()
        src = ScriptedRandomSource(script=list(script))
        outcome = run(src)
        dist[outcome] += src.weight
        leaves += 1
        if leaves > max_leaves:
            raise RuntimeError(f"more than {max_leaves} branches; use a smaller case or Monte-Carlo mode")
        for i, point in enumerate(src.new_points):
            for k in range(1, len(point.options)):
                stack.append(script + [0] * i + [k])
    return dict(dist), leaves


@dataclass
class LosslessReport:
    """Distance between the verifier's output law and the target's."""

    max_abs_error: float
    total_variation: float
    branches: int
    observed: dict = field(repr=False)
    expected: dict = field(repr=False)
    p_value: float | None = None
    samples: int | None = None

    def worst(self, n: int = 3) -> list[tuple[object, float, float]]:
        keys = set(self.observed) | set(self.expected)
        rows = [(k, self.observed.get(k, 0.0), self.expected.get(k, 0.0)) for k in keys]
        return sorted(rows, key=lambda r: -abs(r[1] - r[2]))[:n]


def _distance(observed: dict, expected: dict) -> tuple[float, float]:
    keys = set(observed) | set(expected)
    diffs = [abs(observed.get(k, 0.0) - expected.get(k, 0.0)) for k in keys]
    return max(diffs), 0.5 * sum(diffs)


def check_lossless_exact(verify_fn: VerifyFn, case: LosslessCase, tol: float = 1e-12,
                         steps: str = "one") -> LosslessReport:
    """Enumerate every branch of ``case`` under ``verify_fn``; raise ``AssertionError`` if off by > ``tol``.

    ``steps="one"`` (default) enumerates one speculative step exactly and completes it with the target
    (see :func:`complete_with_target`); ``steps="all"`` enumerates speculative steps until ``num_tokens``
    tokens exist (exponentially more branches; for verifiers or drafters that carry state across steps).
    """
    if steps == "one":
        step_law, leaves = enumerate_outcomes(lambda rng: run_step(case, verify_fn, rng))
        observed = complete_with_target(case, step_law)
    elif steps == "all":
        observed, leaves = enumerate_outcomes(lambda rng: run_pipeline(case, verify_fn, rng))
    else:
        raise ValueError(f"steps must be 'one' or 'all', got {steps!r}")
    expected = target_distribution(case)
    max_err, tv = _distance(observed, expected)
    report = LosslessReport(max_err, tv, leaves, observed, expected)
    if not max_err <= tol:
        raise AssertionError(
            f"verifier is not lossless: max |P_spec - P_target| = {max_err:.3e} > {tol:.0e} (TV {tv:.3e}, "
            f"{leaves} branches); worst outcomes (seq, spec, target): {report.worst()}"
        )
    return report


def check_lossless_monte_carlo(verify_fn: VerifyFn, case: LosslessCase, samples: int = 20_000, seed: int = 0,
                               significance: float = 1e-3) -> LosslessReport:
    """Chi-square goodness of fit of ``samples`` seeded runs; raise ``AssertionError`` if ``p < significance``."""
    rng = TorchRandomSource(seed)
    counts: dict = defaultdict(int)
    for _ in range(samples):
        counts[run_pipeline(case, verify_fn, rng)] += 1
    return chi_square_check(counts, target_distribution(case), samples, significance)


def chi_square_check(counts: dict, expected: dict, samples: int, significance: float = 1e-3) -> LosslessReport:
    """Pearson chi-square of observed outcome ``counts`` against ``expected`` probabilities.

    Bins with an expected count below 5 are pooled into one (Cochran's rule). Raises ``AssertionError`` if an
    outcome the target gives probability 0 occurs, or if ``p < significance``. Shared by the toy-model checker
    and the real-model test (first tokens after a fixed prefix, many seeds).
    """
    from scipy.stats import chi2

    unexpected = [k for k in counts if expected.get(k, 0.0) == 0.0]
    observed_freq = {k: c / samples for k, c in counts.items()}
    max_err, tv = _distance(observed_freq, expected)
    if unexpected:
        raise AssertionError(f"verifier emitted sequences the target gives probability 0: {unexpected[:3]}")
    obs_bins, exp_bins, pool_o, pool_e = [], [], 0.0, 0.0
    for k, pk in expected.items():
        e = pk * samples
        if e < 5:
            pool_o += counts.get(k, 0)
            pool_e += e
        else:
            obs_bins.append(counts.get(k, 0))
            exp_bins.append(e)
    if pool_e > 0:
        obs_bins.append(pool_o)
        exp_bins.append(pool_e)
    o, e = np.asarray(obs_bins, dtype=float), np.asarray(exp_bins, dtype=float)
    stat = float(((o - e) ** 2 / e).sum())
    dof = max(len(o) - 1, 1)
    p_value = float(chi2.sf(stat, dof))
    report = LosslessReport(max_err, tv, samples, observed_freq, expected, p_value=p_value, samples=samples)
    if p_value < significance:
        raise AssertionError(
            f"verifier output differs from the target: chi-square p = {p_value:.2e} < {significance:g} "
            f"({samples} samples, {len(o)} bins, TV {tv:.4f}); worst outcomes: {report.worst()}"
        )
    return report
