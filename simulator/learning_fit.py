r"""Fit a measured online-learning curve into the simulator's training model (``--train-gain``, ``ceiling``).

The simulator's model of online training (:class:`simulator.acceptance.ParametricAcceptance`): after ``n``
training rounds of ``train_round_tokens`` collected tokens each, a further share ``g`` of the gap to the ceiling
has been closed every round,

.. math:: \alpha_n = \alpha_0 + f_n\,(\alpha_{\rm ceil} - \alpha_0), \qquad f_n = 1 - (1 - g)^n .

A measured curve (``python -m analysis.learner_curve``) gives, per round, the held-out expected accepted drafts of a
greedy ``k``-step chain, :math:`E_n`. Each is turned into the per-position acceptance rate of the simulator's chain
model with decay ``δ`` by inverting

.. math:: E(\alpha) = \sum_{i=1}^{k} \prod_{j=1}^{i} \alpha\,\delta^{\,j-1}

(monotone in α, solved by bisection), and ``(g, α_ceil)`` are fitted by least squares on :math:`\alpha_n` with
:func:`scipy.optimize.least_squares`; ``α_0`` is the static drafter's measured rate. Rounds count *every* round
the trainer ran (a refused round closes nothing in reality; the fitted ``g`` averages over them, which is what the
simulator, which deploys every round, needs). The fit error is reported in acceptance-length units (1 + E).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


def chain_expected_accepted(alpha: float, k: int, decay: float = 1.0) -> float:
    """:math:`E(\\alpha)`: expected accepted drafts of a ``k``-step greedy chain under the geometric model."""
    total, run = 0.0, 1.0
    for j in range(k):
        run *= alpha * decay ** j
        total += run
    return total


def alpha_from_expected(expected: float, k: int, decay: float = 1.0) -> float:
    """The α whose chain gives ``expected`` accepted drafts (clipped to [0, 1]; bisection, monotone)."""
    lo, hi = 0.0, 1.0
    if expected <= 0.0:
        return 0.0
    if expected >= chain_expected_accepted(1.0, k, decay):
        return 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if chain_expected_accepted(mid, k, decay) < expected:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass
class LearningFit:
    gain: float  # --train-gain
    ceiling: float  # the acceptance model's ceiling (per-position α)
    alpha_start: float
    round_tokens: int  # --train-round-tokens
    rounds: int
    mean_abs_error_accept_len: float  # |fitted − measured| in acceptance-length units, mean over rounds
    max_abs_error_accept_len: float
    k: int
    decay: float
    round_seconds: float | None = None  # --train-round-seconds: the curve's trainer CPU seconds per round (one core)

    def flags(self) -> str:
        secs = f"--train-round-seconds {self.round_seconds:.1f} " if self.round_seconds else ""
        return (f"--trainer separate --train-round-tokens {self.round_tokens} --train-gain {self.gain:.4f} {secs}"
                f"--acceptance 'alpha={self.alpha_start:.4f},decay={self.decay:g},ceiling={self.ceiling:.4f}'")


def fit_curve(expected: list[float], static: float, round_tokens: int, k: int = 3, decay: float = 1.0) -> LearningFit:
    """Fit ``(gain, ceiling)`` to held-out E[accepted] after rounds 1..n (``expected``), from ``static`` at round 0."""
    from scipy.optimize import least_squares

    if not expected:
        raise ValueError("a learning curve needs at least one round")
    a0 = alpha_from_expected(static, k, decay)
    measured = np.array([alpha_from_expected(e, k, decay) for e in expected])
    n = np.arange(1, len(expected) + 1)

    def model(p: np.ndarray) -> np.ndarray:
        g, ceil = p
        return a0 + (1 - (1 - g) ** n) * (ceil - a0)

    best = max(float(measured.max()), a0 + 1e-6)
    fit = least_squares(lambda p: model(p) - measured, x0=[0.3, min(best + 0.02, 0.99)],
                        bounds=([0.0, a0], [1.0, 0.999]))
    g, ceil = (float(x) for x in fit.x)
    fitted = model(fit.x)
    err = np.abs(np.array([1 + chain_expected_accepted(a, k, decay) for a in fitted])
                 - (1 + np.array(expected)))
    return LearningFit(gain=g, ceiling=ceil, alpha_start=a0, round_tokens=round_tokens, rounds=len(expected),
                       mean_abs_error_accept_len=float(err.mean()), max_abs_error_accept_len=float(err.max()),
                       k=k, decay=decay)


def fit_from_results(path: Path, variant: str, domain: str, decay: float = 1.0, first_round: int = 0) -> LearningFit:
    """Fit one (variant, domain) curve of a ``learner_curve`` ``results.json``; errors name the file and the choice.

    ``first_round``: fit from that round on (the round where this domain's traffic starts in a stream of several
    domains), starting from the score the round before left.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a learner-curve results.json ({e})") from None
    results = data.get("results", {})
    if variant not in results:
        raise ValueError(f"{path}: no variant {variant!r} (has: {', '.join(results) or 'none'})")
    static = data.get("static", {})
    if domain not in static:
        raise ValueError(f"{path}: no domain {domain!r} (has: {', '.join(static) or 'none'})")
    curve = [p["heldout"][domain] for p in results[variant]["curve"]]
    if not 0 <= first_round < len(curve):
        raise ValueError(f"{path}: --first-round {first_round} outside 0..{len(curve) - 1}")
    start = static[domain] if first_round == 0 else curve[first_round - 1]
    meta = data.get("meta", {})
    fit = fit_curve(curve[first_round:], start, int(meta.get("n_threshold", 4096)), int(meta.get("gate_steps", 3)),
                    decay)
    total = results[variant].get("cpu_s")
    if isinstance(total, (int, float)) and total > 0:
        # the trainer's one core: CPU seconds per round (the curve's cumulative total includes its held-out
        # scoring, so this is a slight over-estimate of a round's wall time on that core)
        fit.round_seconds = float(total) / len(curve)
    return fit


def as_dict(fit: LearningFit) -> dict:
    return {**asdict(fit), "flags": fit.flags()}


__all__ = ["LearningFit", "alpha_from_expected", "as_dict", "chain_expected_accepted", "fit_curve", "fit_from_results"]
