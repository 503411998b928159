"""The one interface every speculation-control policy implements, whichever host runs it.

A host calls, once per step::

    decision = policy.decide(BatchView(rids=[...], batch_size=B, ...))
    ...draft decision.lengths[rid] tokens per request (0: none), one target forward, verify...
    policy.observe(step_result)          # sglang_ext.core.signals.StepResult

plus ``admit(rid)`` / ``release(rid)`` as requests enter and leave. Policies are pure Python (no torch, no
SimPy, no SGLang), deterministic given their seed, and their tunables are declared once as :class:`Param`
so the simulator's tuner can search them and write a config file every host loads (:mod:`.config`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from ..signals import StepResult


@dataclass(frozen=True)
class Param:
    """A named tunable with its default and bounds (``kind``: "int", "float" or "choice" over ``choices``).

    Two additions for policies whose settings are not a number: ``kind="json"`` holds any JSON value (a list of
    bandit arms, a table of slots) that the policy validates itself and the tuner leaves alone; and a parameter
    whose ``default`` is None accepts None (meaning "derived", e.g. from a ``variant`` choice).
    """

    name: str
    default: Any
    low: float | None = None
    high: float | None = None
    kind: str = "float"
    choices: tuple = ()
    doc: str = ""
    #: a draft length in steps: a deployment caps it at ``--speculative-num-steps`` (the tuner searches below that)
    depth: bool = False

    @property
    def flag_help(self) -> str:
        """The doc and default as argparse help text (``%`` escaped: argparse formats help with ``%``)."""
        return f"{self.doc} (default {self.default})".replace("%", "%%")

    def check(self, value: Any, where: str = "") -> Any:
        """Coerce and bounds-check ``value``; raise a ValueError naming the parameter (and ``where``)."""
        at = f"{where}: " if where else ""
        if value is None and self.default is None:
            return None
        if self.kind == "json":
            import json

            try:
                json.dumps(value)
            except (TypeError, ValueError):
                raise ValueError(f"{at}{self.name}={value!r} is not JSON-serialisable") from None
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{at}{self.name}={value!r} is not one of {list(self.choices)}")
            return value
        try:
            value = int(value) if self.kind == "int" else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{at}{self.name}={value!r} is not a{'n int' if self.kind == 'int' else ' float'}") from None
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise ValueError(f"{at}{self.name}={value} outside [{self.low}, {self.high}]")
        return value

    @property
    def tunable(self) -> bool:
        """Whether a tuner may search it (numbers and choices; not free-form JSON)."""
        return self.kind in ("int", "float", "choice")


@dataclass
class BatchView:
    """What a policy may look at before a step: the running requests (in batch order) and their contexts."""

    rids: Sequence[str]
    context_lens: Sequence[int] = ()
    temperatures: Sequence[float] = ()

    @property
    def batch_size(self) -> int:
        return len(self.rids)


class BatchLengths(Mapping[str, int]):
    """``Decision.lengths`` kept in the batch's order: one length per request (``ks``) or one for all (``uniform``).

    Why: it is a read-only ``{rid: k}`` mapping for every host, but a host that already holds the batch's ``rids``
    reads the lengths as a list (:func:`lengths_in_order`) without a dict lookup per request — at 64 requests per
    step over a long simulated run, those lookups were a visible share of the time. The dict is built only if a
    host asks for a single request.
    """

    __slots__ = ("_dict", "_ks", "_uniform", "rids")

    def __init__(self, rids: Sequence[str], ks: Sequence[int] | None = None, uniform: int | None = None) -> None:
        if (ks is None) == (uniform is None):
            raise ValueError("BatchLengths: give either ks (one per request) or uniform")
        if ks is not None and len(ks) != len(rids):
            raise ValueError(f"BatchLengths: {len(ks)} lengths for {len(rids)} requests")
        self.rids = rids
        self._ks = ks
        self._uniform = uniform
        self._dict: dict[str, int] | None = None

    @property
    def uniform(self) -> int | None:
        """The one length of every request, or None when each has its own."""
        return self._uniform

    def in_order(self) -> list[int]:
        """The lengths in batch order."""
        if self._ks is None:
            return [self._uniform] * len(self.rids)
        if isinstance(self._ks, list):
            return self._ks
        if isinstance(self._ks, np.ndarray) and self._ks.dtype.kind == "i":
            return self._ks.tolist()
        return [int(k) for k in self._ks]

    def as_array(self) -> np.ndarray:
        """The lengths in batch order as an int64 array (the policy's own when it answered with one: a host that
        works on arrays takes them without a round trip through a list)."""
        ks = self._ks
        if isinstance(ks, np.ndarray) and ks.dtype == np.int64:
            return ks
        return np.asarray(self.in_order(), dtype=np.int64)

    def _map(self) -> dict[str, int]:
        if self._dict is None:
            self._dict = dict(zip(self.rids, self.in_order()))
        return self._dict

    def __getitem__(self, rid: str) -> int:
        return self._map()[rid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map())

    def __len__(self) -> int:
        return len(self._map())

    def __repr__(self) -> str:
        return f"BatchLengths({self._map()!r})"


def lengths_in_order(lengths: Mapping[str, int], rids: Sequence[str]) -> list[int]:
    """``[lengths.get(rid, 0) for rid in rids]``, without the lookups when the policy answered for this batch."""
    if isinstance(lengths, BatchLengths) and lengths.rids is rids:
        return lengths.in_order()
    get = lengths.get
    return [get(rid, 0) for rid in rids]


@dataclass
class Decision:
    """What to do this step. ``speculate=False`` means a plain decode step (every length 0).

    ``lengths[rid]`` is the draft depth for that request (0: no draft); ``tree_budget`` (nodes per request,
    None: a chain) and ``drafter`` (None: the host's default) are optional per-batch choices (bandit arms).
    """

    speculate: bool
    lengths: Mapping[str, int]
    tree_budget: int | None = None
    drafter: str | None = None
    info: dict = field(default_factory=dict)


class Policy:
    """Base class: subclasses set ``name``, ``params`` and implement :meth:`decide` (and usually :meth:`observe`)."""

    name: ClassVar[str] = "base"
    params: ClassVar[tuple[Param, ...]] = ()
    #: "length" for the speculation-control policies (decide/observe); "drafter-update" for the update bandit
    role: ClassVar[str] = "length"
    #: constructor keywords that are objects, not config (e.g. a cost model): never saved, passed at load time
    extra_args: ClassVar[tuple[str, ...]] = ()
    #: groups of depth parameters that must not decrease in the order given (DSDE: min_k <= init_k <= max_k); the
    #: policy clamps a violation, but a deployment's flags and the tuner treat one as a contradiction
    ordered_params: ClassVar[tuple[tuple[str, ...], ...]] = ()
    #: True: the policy reads ``RequestStep.kl`` / entropies, so a host should record the drafter's q for every
    #: proposed position (greedy requests included); False: the host can skip that work
    needs_kl: ClassVar[bool] = False

    def __init__(self, **overrides: Any) -> None:
        known = {p.name: p for p in self.params}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"policy {self.name!r} has no parameter(s) {unknown}; known: {sorted(known)}")
        self.config: dict[str, Any] = {p.name: p.check(overrides.get(p.name, p.default), self.name) for p in self.params}

    # request lifetime -------------------------------------------------------------------------------------------
    def admit(self, rid: str) -> None:
        """A request joined the batch."""

    def release(self, rid: str) -> None:
        """A request finished or was aborted: drop its state (bounded memory)."""

    # the loop ---------------------------------------------------------------------------------------------------
    def decide(self, batch: BatchView) -> Decision:
        raise NotImplementedError

    def observe(self, result: StepResult) -> None:
        """The outcome of the step this policy last decided."""

    # persistence ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable learned state (not the config). Subclasses with state override both methods."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
