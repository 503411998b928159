"""sglang-ext inside SGLang 0.5.23: an adapter on SGLang's plugin seams; every decision comes from the core.

Installed with the package, the entry point ``sglang.srt.plugins: sglang_ext`` makes SGLang call :func:`register`
in every server process (launcher, scheduler, detokenizer). It registers the hooks of :mod:`.hooks` with SGLang's
``HookRegistry``; nothing of SGLang's source is copied or patched outside that registry.

- :mod:`.launch_flags` — our flags in ``python -m sglang.launch_server --help`` and how they reach the scheduler;
- :mod:`.steps` — a core policy behind SGLang's ``AdaptiveSpecPolicy`` seam (per-batch draft steps);
- :mod:`.online` — capture of committed rows from the verify step, the core trainer, drafter hot swap;
- :mod:`.metrics` — the extension's gauges on SGLang's ``/metrics``;
- :mod:`.export` — our drafter checkpoints to SGLang's EAGLE3 format and back (``sglang-ext export-drafter``).

For the offline ``sglang.Engine``, call :func:`engine` (it loads the plugins before the Engine parses its
keywords, so ``speculative_policy=...`` and ``online_learning=...`` are accepted).
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger("sglang_ext.sglang_plugin")

#: when set to a file path, each process that loads the plugin appends one JSON line (pid, process name) to it;
#: SGLang runs plugins before its logging is configured, so this is how a test sees every process load it
TRACE_ENV = "SGLANG_EXT_PLUGIN_TRACE"


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: register the hooks (SGLang applies them right after)."""
    from .hooks import register_hooks

    register_hooks()
    trace = os.environ.get(TRACE_ENV)
    if trace:
        import multiprocessing

        with open(trace, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "process": multiprocessing.current_process().name}) + "\n")


def engine(**kwargs):
    """``sglang.Engine(**kwargs)`` with the extension's keywords (the flags' names with underscores)."""
    from sglang.srt.plugins import load_plugins

    load_plugins()
    import sglang

    return sglang.Engine(**kwargs)


__all__ = ["engine", "register"]
