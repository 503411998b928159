"""Where verification gets its randomness from.

Every lossless rule in :mod:`sglang_ext.core` draws randomness only through two calls:

* ``bernoulli(prob)``: one independent coin per element, ``True`` with probability ``prob``;
* ``categorical(probs)``: one independent draw per row of ``probs`` (rows sum to 1).

Serving uses :class:`TorchRandomSource` (a seeded ``torch.Generator``). The lossless checker swaps in
:class:`ScriptedRandomSource`, which follows a script of choices and records every choice point it
meets, so that :mod:`sglang_ext.core.lossless` can enumerate *every* accept/reject branch exactly
instead of sampling it. Coins whose probability is exactly 0 or 1 are not branches: they are decided
without consuming a choice, which is how impossible branches are pruned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


class RandomSource(Protocol):
    """The only randomness a verifier may use."""

    def bernoulli(self, prob: torch.Tensor) -> torch.Tensor:
        """Elementwise coins: ``out[i] = True`` with probability ``prob[i]`` (same shape, bool)."""

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        """One index per row of ``probs`` (shape ``[..., V]``), drawn with those probabilities."""


class TorchRandomSource:
    """Randomness from a seeded ``torch.Generator`` (what the engine uses).

    ``bernoulli`` is ``U < prob`` with ``U ~ Uniform[0, 1)``, so ``prob == 1`` always accepts and
    ``prob == 0`` never does.
    """

    def __init__(self, seed: int | None = None, device: str | torch.device = "cpu") -> None:
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def bernoulli(self, prob: torch.Tensor) -> torch.Tensor:
        u = torch.rand(prob.shape, generator=self.generator, device=prob.device, dtype=torch.float64)
        return u < prob.to(torch.float64)

    def uniform(self, shape: tuple[int, ...], device: str | torch.device = "cpu") -> torch.Tensor:
        """Raw ``U ~ Uniform[0, 1)`` for kernels that take coin tensors (e.g. SGLang's tree sampler)."""
        return torch.rand(shape, generator=self.generator, device=device, dtype=torch.float64)

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        flat = probs.reshape(-1, probs.shape[-1]).to(torch.float64)
        if flat.shape[0] == 0:
            return torch.empty(probs.shape[:-1], dtype=torch.long, device=probs.device)
        idx = torch.multinomial(flat, 1, generator=self.generator).squeeze(-1)
        return idx.reshape(probs.shape[:-1])


class NotEnumerable(RuntimeError):
    """Raised when a verifier draws randomness the exact checker cannot branch on."""


@dataclass
class ChoicePoint:
    """One branch point met while running a verifier: its options and their probabilities."""

    options: list[int]
    weights: list[float]


@dataclass
class ScriptedRandomSource:
    """Follows ``script`` (a list of option indices); records choice points past its end.

    Past the end of the script it takes option 0 and records the choice point, so a depth-first
    enumerator can re-run the verifier with every alternative (see ``lossless.enumerate_outcomes``).
    ``weight`` is the probability of the path taken so far.
    """

    script: list[int]
    position: int = 0
    weight: float = 1.0
    new_points: list[ChoicePoint] = field(default_factory=list)

    def _choose(self, options: list[int], weights: list[float]) -> int:
        if len(options) == 1:
            self.weight *= weights[0]
            return options[0]
        if self.position < len(self.script):
            k = self.script[self.position]
        else:
            k = 0
            self.new_points.append(ChoicePoint(options, weights))
        self.position += 1
        self.weight *= weights[k]
        return options[k]

    def bernoulli(self, prob: torch.Tensor) -> torch.Tensor:
        flat = prob.detach().reshape(-1).to(torch.float64).tolist()
        out = []
        for p in flat:
            if p >= 1.0:
                out.append(True)
            elif p <= 0.0:
                out.append(False)
            else:
                out.append(bool(self._choose([1, 0], [p, 1.0 - p])))
        return torch.tensor(out, dtype=torch.bool, device=prob.device).reshape(prob.shape)

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        rows = probs.detach().reshape(-1, probs.shape[-1]).to(torch.float64)
        out = []
        for row in rows:
            total = float(row.sum())
            support = [i for i, w in enumerate(row.tolist()) if w > 0.0]
            if not support:
                raise ValueError("categorical() called with an all-zero distribution")
            weights = [float(row[i]) / total for i in support]
            out.append(self._choose(support, weights))
        return torch.tensor(out, dtype=torch.long, device=probs.device).reshape(probs.shape[:-1])

    def uniform(self, shape: tuple[int, ...], device: str | torch.device = "cpu") -> torch.Tensor:
        raise NotEnumerable(
            "this verifier draws raw uniforms; exact enumeration needs bernoulli()/categorical(). "
            "Use lossless.check_lossless_monte_carlo instead."
        )
