r"""A replay window over past rounds: more tokens per update than one round, recent data weighted more.

One 4k-token round moves held-out acceptance by about 3 % at best (``analysis/results/learner-rates-*``), and
the round's own rows are all a round trains on, so a drafter chasing a new domain needs many rounds to get
anywhere. The replay window keeps the *training* part of the last rounds (never their held-back gate slices,
so the gate keeps judging on rows no candidate trained on) and trains every round on all of it:

.. math:: w_s = \text{decay}^{\,a_s}

for a sample ``s`` added ``a_s`` rounds ago (the round being trained has ``a = 0``): a sample's rows weigh
``w_s`` in the loss, on top of their per-row weights (prefill, OSD). The window holds at most
``replay_tokens`` tokens, oldest samples dropped first; ``replay_tokens = 0`` switches it off (train on the
round only: the learner as it was). The window lives beside the learner in the trainer process and is
restored with it: a refused round's rows stay (they are still good data; only the candidate was not).

Default 16,384 tokens (four default rounds), from measurements on one captured stream and live
(``docs/results.md``, "Learning curves offline" and "Live, long stream"): from a chat-only drafter it lifted
held-out acceptance length on code 1.15 → 1.53 (round only: 1.32) and deployed 11 of 13 rounds (round only: 7),
and live reached +17.8 % acceptance over code's last half. It costs about 2.7× the training compute per round.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from sglang_ext.core.policies.base import Param

from .capture import CapturedSample

PARAMS: tuple[Param, ...] = (
    Param("replay_tokens", 16384, 0, 100_000_000, kind="int",
          doc="tokens of past rounds' training rows kept and trained on again each round (0: off, train on the "
              "round only)"),
    Param("replay_decay", 0.7, 0.0, 1.0, doc="loss weight per round of age of a replayed sample (decay^age)"),
)


class ReplayWindow:
    """The training rows of recent rounds, bounded in tokens, with their round of arrival."""

    def __init__(self, max_tokens: int, decay: float) -> None:
        if max_tokens < 0:
            raise ValueError(f"replay_tokens must be >= 0, got {max_tokens}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"replay_decay must be in [0, 1], got {decay}")
        self.max_tokens, self.decay = max_tokens, decay
        self._items: deque[tuple[int, CapturedSample]] = deque()  # (round added, sample), oldest first
        self.tokens = 0
        self.rounds = 0

    @classmethod
    def from_config(cls, config: dict) -> ReplayWindow | None:
        """The window the config asks for, or None when ``replay_tokens`` is 0."""
        n = int(config.get("replay_tokens", 0))
        return cls(n, float(config.get("replay_decay", 0.7))) if n > 0 else None

    def __len__(self) -> int:
        return len(self._items)

    def training_set(self, fresh: Sequence[CapturedSample]) -> tuple[list[CapturedSample], list[float]]:
        """``(samples, weights)`` to train this round on: the window (weights ``decay^age``) then ``fresh`` (1.0)."""
        old = [s for _, s in self._items]
        weights = [self.decay ** (self.rounds - r + 1) for r, _ in self._items]
        return old + list(fresh), weights + [1.0] * len(fresh)

    def add(self, fresh: Sequence[CapturedSample]) -> None:
        """Keep this round's training rows (after it was trained) and age everything by one round."""
        self.rounds += 1
        for s in fresh:
            self._items.append((self.rounds, s))
            self.tokens += len(s)
        while self._items and self.tokens > self.max_tokens:
            _, s = self._items.popleft()
            self.tokens -= len(s)


__all__ = ["PARAMS", "ReplayWindow"]
