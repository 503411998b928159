"""Fanning sweeps and tuning out beyond one machine, on Ray (the optional extra ``cluster``).

``sim sweep/tune --ray-address ADDRESS`` sends every simulation point to a Ray cluster as a task: ``auto`` joins the
cluster this machine belongs to (``ray start --head`` on one machine, ``ray start --address HEAD:6379`` on the
others), ``HOST:PORT`` a given head, ``local`` starts a Ray on this machine for the run. The trace, the cost model
and the acceptance model are put in Ray's object store once and shared by every task. Each point is the same
pure function of its inputs and seed as in the local process pool (:func:`simulator.tune.run_point`), so the
results are identical to a local run, row for row.

Without ``--ray-address`` (or without Ray installed) sweeps use the local process pool, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any


class RayUnavailable(ValueError):
    pass


def _init(address: str) -> Any:
    try:
        import ray
    except ImportError as e:
        raise RayUnavailable(f"--ray-address {address}: Ray is not installed (pip install 'sglang-ext[cluster]')") from e
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        try:
            ray.init(address=None if address == "local" else address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RayUnavailable(f"--ray-address {address}: cannot join a Ray cluster there ({e})") from e
    return ray


def _run_shared(point: dict[str, Any], shared: tuple) -> dict[str, Any]:
    from simulator.tune import run_point

    trace, cost_model, acceptance = shared
    return run_point(point, trace, cost_model, acceptance)


class RayPool:
    """The slice of a process pool the sweep and the tuner use (``map`` in order, ``as_completed`` with indices)."""

    def __init__(self, address: str, trace: Any, cost_model: Any, acceptance: dict | None) -> None:
        self.ray = _init(address)
        self._shared = self.ray.put((trace, cost_model, acceptance))
        self._task = self.ray.remote(_run_shared)

    def map(self, fn: Callable, points: Sequence[dict]) -> list[dict]:  # noqa: ARG002 - fn is always run_point
        return self.ray.get([self._task.remote(p, self._shared) for p in points])

    def as_completed(self, points: Sequence[dict]) -> Iterator[tuple[int, dict]]:
        refs = {self._task.remote(p, self._shared): i for i, p in enumerate(points)}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            for ref in done:
                yield refs[ref], self.ray.get(ref)

    def shutdown(self) -> None:
        """Nothing to stop: the Ray session outlives one sweep (``ray.shutdown()`` ends it)."""
