"""uvicorn's server with a deadline for the requests in flight at SIGTERM/SIGINT (``--shutdown-timeout``).

uvicorn alone waits for every open connection (a 400-token stream holds the exit for as long as it runs) or,
with ``timeout_graceful_shutdown``, cancels them without a word to the client. vLLM and SGLang both drain, then
abort. Here the first signal calls :meth:`~sglang_ext.server.runner.EngineRunner.begin_shutdown`: new requests
get a 503, requests in flight may finish for ``shutdown_timeout`` seconds and are then aborted with an error the
client sees (a 503, or an error chunk and ``[DONE]`` in a stream); uvicorn's own timeout, a few seconds later, is
only the backstop. A second signal exits at once, as in uvicorn.
"""

from __future__ import annotations

import contextlib

import uvicorn

from .runner import EngineRunner

#: uvicorn's own graceful-shutdown timeout is this much longer than ours (the aborted streams' last chunks go out)
BACKSTOP_SECONDS = 5.0


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runner: EngineRunner, shutdown_timeout: float) -> None:
        config.timeout_graceful_shutdown = shutdown_timeout + BACKSTOP_SECONDS
        super().__init__(config)
        self.runner, self.shutdown_timeout = runner, shutdown_timeout

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn re-raises the handled SIGTERM/SIGINT after shutdown, so the process dies by the signal and no
        exit handler runs (multiprocessing's cleanup included); the shutdown was graceful, so return normally."""
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()

    def handle_exit(self, sig, frame) -> None:
        self.runner.begin_shutdown(self.shutdown_timeout)
        super().handle_exit(sig, frame)


__all__ = ["BACKSTOP_SECONDS", "GracefulServer"]
