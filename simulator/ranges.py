"""How far a replay leaves the cost profile's measured range.

A profile measured on a CPU covers, say, batch <= 8, context <= 1,024 and prefill chunks <= 512 tokens; a replay with
batch 64 and 4,096-token chunks prices most of its steps by extrapolating the fitted formulas. That can be fine (the
formulas are physical: linear in tokens, attention in token pairs) or badly wrong (a GPU's compute-bound knee), so
the simulator never does it silently: :class:`RangeGuard` counts, per input, the cost lookups beyond the largest
measured value and the largest value seen; ``strict`` (``--strict-profile``) turns the first one into an error.
"""

from __future__ import annotations

from typing import Any

#: (cost part, input) pairs checked, as named in ``CostModel.source["ranges"]``
CHECKED = (("verify", "batch_size"), ("verify", "tokens_per_request"), ("verify", "context_len"),
           ("prefill", "tokens"), ("prefill", "context_len"), ("draft", "batch_size"), ("draft", "depth"))


class ProfileRangeError(ValueError):
    """A cost lookup beyond the profile's measured range under ``--strict-profile``."""


class RangeGuard:
    """Counts lookups beyond the measured maxima (lookups below the minima are interpolation towards zero work and
    are not counted). ``ranges``: ``CostModel.source["ranges"]``; None (a cost object without a profile) checks
    nothing."""

    def __init__(self, ranges: dict[str, Any] | None, strict: bool = False, profile: str = "the profile") -> None:
        self.strict = strict
        self.profile = profile
        self.limits: dict[str, float] = {}
        for part, key in CHECKED:
            span = (ranges or {}).get(part, {}).get(key)
            if span:
                self.limits[f"{part}.{key}"] = float(span[1])
        inf = float("inf")
        lim = self.limits.get
        self._vb, self._vt, self._vc = lim("verify.batch_size", inf), lim("verify.tokens_per_request", inf), \
            lim("verify.context_len", inf)
        self._pt, self._pc = lim("prefill.tokens", inf), lim("prefill.context_len", inf)
        self._db, self._dd = lim("draft.batch_size", inf), lim("draft.depth", inf)
        self.counts: dict[str, int] = {}
        self.largest: dict[str, float] = {}

    def _hit(self, name: str, value: float, now: float) -> None:
        if self.strict:
            raise ProfileRangeError(f"--strict-profile: at t={now:.3f} s a step needs {name.replace('.', ' ')} = "
                                    f"{value:g}, beyond {self.profile}'s measured maximum {self.limits[name]:g}")
        self.counts[name] = self.counts.get(name, 0) + 1
        if value > self.largest.get(name, 0.0):
            self.largest[name] = value

    def verify(self, batch: int, tokens: int, context: float, now: float) -> None:
        if batch > self._vb:
            self._hit("verify.batch_size", batch, now)
        if tokens > self._vt:
            self._hit("verify.tokens_per_request", tokens, now)
        if context > self._vc:
            self._hit("verify.context_len", context, now)

    def prefill(self, tokens: int, context: int, now: float) -> None:
        if tokens > self._pt:
            self._hit("prefill.tokens", tokens, now)
        if context > self._pc:
            self._hit("prefill.context_len", context, now)

    def draft(self, batch: int, depth: int, now: float) -> None:
        if batch > self._db:
            self._hit("draft.batch_size", batch, now)
        if depth > self._dd:
            self._hit("draft.depth", depth, now)

    def report(self) -> dict[str, Any]:
        """``{input: {lookups, measured_max, largest}}`` for every input that went beyond its range."""
        return {k: {"lookups": n, "measured_max": self.limits[k], "largest": self.largest[k]}
                for k, n in sorted(self.counts.items())}


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rep in reports:
        for k, v in rep.items():
            if k in out:
                out[k] = {"lookups": out[k]["lookups"] + v["lookups"], "measured_max": v["measured_max"],
                          "largest": max(out[k]["largest"], v["largest"])}
            else:
                out[k] = dict(v)
    return out
