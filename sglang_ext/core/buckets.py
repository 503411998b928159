"""Length bucketing for training batches: one rule for offline training and the online learner."""

from __future__ import annotations

from collections.abc import Sequence


def length_buckets(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group indices of similar length (sorted, so padding is small) into batches whose padded size
    ``max length × rows`` stays within ``batch_tokens`` (a longer single item gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        n = lengths[i]
        if cur and max(cur_max, n) * (len(cur) + 1) > batch_tokens:
            groups.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        groups.append(cur)
    return groups
