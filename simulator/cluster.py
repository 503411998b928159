"""Several engine replicas behind a router, and the one process that walks the trace and dispatches arrivals.

Same process structure as one engine (DistServe's ``simdistserve``): one arrival process for the whole cluster,
one SimPy process per replica; the router decides at arrival time, from the replicas' state at that moment.

Routers:

- ``round-robin``: replica ``i mod N`` for the i-th arrival.
- ``least-loaded``: the replica with the fewest outstanding requests (waiting + prefilling + running; Vidur's
  ``lor``); ties go to the lowest index, so routing is deterministic.
- ``least-tokens``: the fewest outstanding tokens (prompt tokens still to prefill + output tokens still to
  generate; SplitwiseSim's ``token_jsq``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from sglang_ext.formats.trace import Request, TraceError


class ReplicaLike(Protocol):
    def outstanding_requests(self) -> int: ...

    def outstanding_tokens(self) -> int: ...

    def add(self, index: int, request: Request) -> None: ...


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self.next = 0

    def pick(self, replicas: list[ReplicaLike], request: Request) -> int:
        i = self.next % len(replicas)
        self.next += 1
        return i


class LeastLoaded:
    name = "least-loaded"

    def pick(self, replicas: list[ReplicaLike], request: Request) -> int:
        return min(range(len(replicas)), key=lambda i: (replicas[i].outstanding_requests(), i))


class LeastTokens:
    name = "least-tokens"

    def pick(self, replicas: list[ReplicaLike], request: Request) -> int:
        return min(range(len(replicas)), key=lambda i: (replicas[i].outstanding_tokens(), i))


ROUTERS: dict[str, Callable[[], Any]] = {"round-robin": RoundRobin, "least-loaded": LeastLoaded,
                                         "least-tokens": LeastTokens}


def make_router(name: str) -> Any:
    try:
        return ROUTERS[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r}; known: {', '.join(ROUTERS)}") from None


def arrivals(env: Any, requests: Iterator[Request], replicas: list[ReplicaLike], router: Any,
             on_error: Callable[[TraceError], None], on_arrival: Callable[[int, Request], None] | None = None):
    """SimPy process: sleep until each request's arrival, route it, hand it to its replica.

    ``requests`` may be a lazy reader: a :class:`TraceError` raised while reading stops the arrivals (reported
    through ``on_error``) and the requests already in the system still run to completion, so the partial result
    covers everything read before the bad line.
    """
    index = 0
    while True:
        try:
            req = next(requests)
        except StopIteration:
            return
        except TraceError as e:
            on_error(e)
            return
        delay = req.arrival - env.now
        if delay > 0:
            yield env.timeout(delay)
        if on_arrival is not None:
            on_arrival(index, req)
        replicas[router.pick(replicas, req) if len(replicas) > 1 else 0].add(index, req)
        index += 1
