"""A real uvicorn server in a background thread, for tests of the HTTP front end (``sglang-ext serve``'s app).

Why a thread and not a subprocess: the engine can then be a tiny in-process model, and tests can reach the
runner and the uvicorn server object (e.g. to deliver a shutdown signal with ``server.handle_exit``).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sse_events(response: httpx.Response) -> list:
    """``data:`` payloads of a server-sent-events response, JSON-decoded (``[DONE]`` kept as the string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


@dataclass
class ThreadServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    client: httpx.Client


@contextmanager
def serve_in_thread(app, server_factory=None, start_timeout: float = 30.0,
                    client_timeout: float = 60.0) -> Iterator[ThreadServer]:
    """Serve ``app`` on a free localhost port until the block ends (then ask uvicorn to exit and join it).

    ``server_factory(config)`` builds the server (default ``uvicorn.Server``), e.g. a ``GracefulServer``.
    """
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = server_factory(config) if server_factory else uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.time() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=client_timeout)
    try:
        yield ThreadServer(url=url, server=server, thread=thread, client=client)
    finally:
        client.close()
        server.should_exit = True
        thread.join(15)


__all__ = ["ThreadServer", "free_port", "serve_in_thread", "sse_events"]
