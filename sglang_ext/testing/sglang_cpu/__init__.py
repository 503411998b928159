"""Test harness: real SGLang 0.5.23 serving on a CPU-only machine with PyTorch stand-ins for the sgl_kernel CPU ops.

- ``stand_in/`` (put first on the server's ``PYTHONPATH``, not a package): ``common_ops.py`` -- the stand-in kernel
  library that ``sgl_kernel`` imports -- and ``sitecustomize.py``, which makes SGLang's AMX check true so the
  ``intel_amx`` attention backend (the only CPU backend with speculative verify) is selected on any x86 CPU.
- :mod:`.launcher`: :class:`SGLangCPUServer` (HTTP server as a context manager), :func:`run_engine` (offline
  ``sglang.Engine`` in a child process) and :func:`harness_env` (the environment, for launching it yourself).

This is a TEST STAND-IN, not a serving path: numbers measured with it are "SGLang control flow with PyTorch
stand-in kernels".
"""

from .launcher import (
    DEFAULT_ENGINE_KWARGS,
    DEFAULT_SERVER_ARGS,
    ENV_FLAG,
    STAND_IN_DIR,
    GenerateResult,
    SGLangCPUServer,
    SGLangGPUServer,
    ServerStartError,
    harness_env,
    merge_args,
    run_engine,
)

__all__ = [
    "DEFAULT_ENGINE_KWARGS", "DEFAULT_SERVER_ARGS", "ENV_FLAG", "STAND_IN_DIR", "GenerateResult", "SGLangCPUServer",
    "SGLangGPUServer", "ServerStartError", "harness_env", "merge_args", "run_engine",
]
