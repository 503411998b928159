"""Prompt-lookup (n-gram) drafting: the model-free baseline (Saxena 2023; HF ``prompt_lookup_num_tokens``).

Find the most recent earlier occurrence of the sequence's last ``n`` tokens (``n`` from ``max_ngram``
down to ``min_ngram``) and propose the up-to-``k`` tokens that followed it. Proposals are deterministic,
so for stochastic verification they form a ``topk``-scheme chain (point-mass proposals), never ``chain``
with a made-up q.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .base import Draft, DraftRequest, StatelessDrafter


@dataclass
class NgramDrafter(StatelessDrafter):
    max_ngram: int = 3
    min_ngram: int = 1
    name: str = "ngram"

    def __post_init__(self) -> None:
        if not (1 <= self.min_ngram <= self.max_ngram):
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` draft tokens continuing ``tokens`` (possibly none)."""
        if k <= 0:
            return []
        seq = list(tokens)
        n_tokens = len(seq)
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            suffix = seq[n_tokens - n:]
            # scan right-to-left for the most recent earlier match that has at least one follower
            for start in range(n_tokens - n - 1, -1, -1):
                if seq[start:start + n] == suffix:
                    follow = seq[start + n:start + n + k]
                    if follow:
                        return follow
        return []

    def draft(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        """One chain per request (point-mass proposals: scheme ``topk``)."""
        return [Draft.chain(r.tokens[-1], self.propose(r.tokens, r.num_steps)) for r in requests]
