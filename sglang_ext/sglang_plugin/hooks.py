"""The SGLang hooks: each translates SGLang's objects into the core's calls and back; no rule lives here.

Registered through SGLang's ``HookRegistry`` by :func:`sglang_ext.sglang_plugin.register` (every server process
runs it through the ``sglang.srt.plugins`` entry point). Targets, all in SGLang 0.5.23 (``tests/test_sglang_seams.py``
fails if one moves):

======================================================================  ======  ================================
target                                                                  type    what it does
======================================================================  ======  ================================
``sglang.srt.server_args.ServerArgs.add_cli_args``                      AFTER   adds the "sglang-ext" flag group
``sglang.srt.server_args.prepare_server_args``                          AROUND  checks our flags, rewrites argv
``sglang.srt.entrypoints.engine.Engine.__init__``                       AROUND  the same for ``Engine(**kwargs)``
``sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.__init__``       AROUND  puts the core policy behind the
                                                                                adaptive controller; starts online
                                                                                learning
``...EAGLEWorkerV2.forward_batch_generation``                           AROUND  tells the policy the batch's rids;
                                                                                deploys a new drafter between steps
``...EAGLEWorkerV2.verify``                                             AROUND  captures committed rows (online)
``...eagle_worker_v2.EagleDraftWorker.draft``                           AROUND  times the draft stage
``sglang.srt.speculative.base_spec_worker.BaseSpecWorker.note_request_finished``  AFTER  releases a request
======================================================================  ======  ================================
"""

from __future__ import annotations

import logging
import time
from typing import Any

from . import launch_flags
from .runtime import Runtime

log = logging.getLogger("sglang_ext.sglang_plugin")

WORKER = "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2"
DRAFT_WORKER = "sglang.srt.speculative.eagle_worker_v2.EagleDraftWorker"


# ---- flags ----------------------------------------------------------------------------------------------------
def after_add_cli_args(result: Any, parser, *args, **kwargs) -> Any:
    launch_flags.add_cli_args(parser)
    return result


def around_prepare_server_args(original, argv, *args, **kwargs):
    argv, config = launch_flags.prepare_argv(list(argv))
    launch_flags.publish(config)
    server_args = original(argv, *args, **kwargs)
    launch_flags.publish(config, server_args)
    return server_args


def around_engine_init(original, self, *args, **kwargs):
    argv = launch_flags.engine_kwargs_to_argv(kwargs)
    if "server_args" in kwargs:
        config = launch_flags.current(kwargs["server_args"])
    else:
        spec_argv = []
        for key in ("speculative_algorithm", "speculative_num_steps", "speculative_eagle_topk",
                    "speculative_num_draft_tokens", "speculative_draft_model_path"):
            if kwargs.get(key) is not None:
                spec_argv += ["--" + key.replace("_", "-"), str(kwargs[key])]
        if kwargs.get("speculative_adaptive"):
            spec_argv.append("--speculative-adaptive")
        # a FlagError (a ValueError naming the flag) propagates to the caller of Engine(...)
        config, extra = launch_flags.resolve(launch_flags._ext_view(argv), launch_flags._speculative_view(spec_argv))
        it = iter(extra)
        for flag in it:
            key = flag[2:].replace("-", "_")
            kwargs[key] = True if key == "speculative_adaptive" else next(it)
        for key in ("speculative_num_steps", "speculative_eagle_topk"):
            if isinstance(kwargs.get(key), str):
                kwargs[key] = int(kwargs[key])
    launch_flags.publish(config)
    return original(self, *args, **kwargs)


# ---- the speculative worker -------------------------------------------------------------------------------
def around_worker_init(original, self, *args, **kwargs):
    original(self, *args, **kwargs)
    server_args = kwargs.get("server_args", args[0] if args else None)
    config = launch_flags.current(server_args)
    if config.active:
        Runtime.start(self, config, server_args)


def around_forward_batch_generation(original, self, batch, *args, **kwargs):
    rt = Runtime.for_worker(self)
    if rt is not None:
        rt.before_step(batch)
    return original(self, batch, *args, **kwargs)


def around_verify(original, self, batch, *args, **kwargs):
    rt = Runtime.for_worker(self)
    if rt is None or rt.online is None:
        return original(self, batch, *args, **kwargs)
    verify_input = batch.spec_info
    result = original(self, batch, *args, **kwargs)
    rt.after_verify(batch, verify_input, result)
    return result


def around_draft(original, self, *args, **kwargs):
    rt = Runtime.instance
    if rt is None or rt.steps is None:
        return original(self, *args, **kwargs)
    t0 = time.perf_counter()
    out = original(self, *args, **kwargs)
    rt.steps.add_draft_seconds(time.perf_counter() - t0)
    return out


def after_note_request_finished(result, self, *args, rid: str = "", **kwargs):
    rt = Runtime.for_worker(self)
    if rt is not None:
        rt.finish(rid)
    return result


HOOKS: tuple[tuple[str, str, Any], ...] = (
    ("sglang.srt.server_args.ServerArgs.add_cli_args", "AFTER", after_add_cli_args),
    ("sglang.srt.server_args.prepare_server_args", "AROUND", around_prepare_server_args),
    ("sglang.srt.entrypoints.engine.Engine.__init__", "AROUND", around_engine_init),
    (WORKER + ".__init__", "AROUND", around_worker_init),
    (WORKER + ".forward_batch_generation", "AROUND", around_forward_batch_generation),
    (WORKER + ".verify", "AROUND", around_verify),
    (DRAFT_WORKER + ".draft", "AROUND", around_draft),
    ("sglang.srt.speculative.base_spec_worker.BaseSpecWorker.note_request_finished", "AFTER",
     after_note_request_finished),
)


def register_hooks() -> None:
    """Register every hook with SGLang's HookRegistry (``load_plugins`` applies them)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, kind, fn in HOOKS:
        HookRegistry.register(target, fn, getattr(HookType, kind))


__all__ = ["HOOKS", "register_hooks"]
