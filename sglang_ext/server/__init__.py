"""An OpenAI- and SGLang-compatible HTTP server around the reference engine (``sglang-ext serve``).

``EngineRunner`` and ``create_app`` are imported on first use: the CLI registers ``serve`` without pulling in
fastapi, prometheus_client or torch.
"""

from __future__ import annotations

__all__ = ["EngineRunner", "create_app"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
