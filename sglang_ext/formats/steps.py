"""The per-step record of a served request, read back by output position.

The engine records, per verify step of a request, how many drafted tokens were accepted (``acceptance`` in the
trace format, the bonus token not counted) and, when the drafter gives its distribution, the KL of each proposed
position. The simulator replays a request by *output position*: position ``p`` of the output is where some step
started or continued, and these functions map the step records onto positions.
"""

from __future__ import annotations

from collections.abc import Sequence


def positions_from_steps(accepted: Sequence[int], length: int | None = None) -> list[int]:
    """Recorded accepted counts per step → accepted run available at each output position (see module doc)."""
    out: list[int] = []
    for a in accepted:
        out.extend(range(a, -1, -1))  # positions p_j .. p_j + a_j accept a_j, a_j − 1, ..., 0
        if length is not None and len(out) >= length:
            break
    return out if length is None else out[:length]


def kl_positions_from_steps(steps: Sequence[tuple[int, Sequence[float]]],
                            length: int | None = None) -> list[float | None]:
    """Recorded ``(accepted, kl per proposed position)`` per verify step → KL per output position.

    Step ``j`` started at ``p_j = Σ_{i<j} (a_i + 1)`` and its ``i``-th proposal sits at position ``p_j + i``; a
    position proposed twice keeps its first value; positions never proposed are None.
    """
    out: list[float | None] = []
    p = 0
    for a, kl in steps:
        need = p + len(kl)
        if len(out) < need:
            out.extend([None] * (need - len(out)))
        for i, v in enumerate(kl):
            if out[p + i] is None:
                out[p + i] = float(v)
        p += int(a) + 1
    if length is not None:
        out = out[:length]
    return out


__all__ = ["kl_positions_from_steps", "positions_from_steps"]
