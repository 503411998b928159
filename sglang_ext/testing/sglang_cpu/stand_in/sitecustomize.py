"""Startup hook of the SGLang CPU test harness (TEST STAND-IN; see ``common_ops`` beside this file).

Python imports ``sitecustomize`` at start-up from ``sys.path``; the harness puts this directory first on the
``PYTHONPATH`` of the server it launches, so every SGLang process (launcher, tokenizer, scheduler, detokenizer,
which multiprocessing *spawns* as fresh interpreters) runs this before anything imports sglang.

Why it exists: SGLang uses the ``intel_amx`` attention backend -- the only CPU backend that handles the
speculative verify pass -- only when ``sglang.srt.utils.cpu_has_amx_support()`` holds, i.e. the CPU reports AMX
tiles *and* ``torch.ops.sgl_kernel.convert_weight_packed`` exists. ``sglang/srt/utils/common.py`` evaluates
``torch.cpu._is_amx_tile_supported()`` once at import and ~50 modules cache the answer at their own import, so
the override must be in place before sglang is imported; a plugin hook would run too late. The stand-in kernels
use no AMX instruction, so claiming AMX is harmless here, and it lets the harness run on CPUs without AMX (AMD
EPYC).

It does nothing unless ``SGLANG_EXT_CPU_STANDIN=1`` is set (the harness sets it), and it then chains to any other
``sitecustomize`` further down ``sys.path`` so an environment's own start-up hook still runs. torch itself is not
imported here: a meta-path hook patches it right after its first import, so processes that never use torch pay
nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

ENV_FLAG = "SGLANG_EXT_CPU_STANDIN"
_HERE = os.path.dirname(os.path.abspath(__file__))


def _claim_amx(torch_module) -> None:
    """Make ``torch.cpu._is_amx_tile_supported()`` answer True (see the module docstring for why)."""
    torch_module.cpu._is_amx_tile_supported = lambda: True


class _PatchTorchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when ``torch`` is about to be imported, wraps its loader to patch it afterwards."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)  # one shot, and keeps the lookup below from recursing into this finder
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            _claim_amx(module)

        loader.exec_module = exec_module
        return spec


def _install() -> None:
    if "torch" in sys.modules:
        _claim_amx(sys.modules["torch"])
    else:
        sys.meta_path.insert(0, _PatchTorchOnImport())


def _chain() -> None:
    """Run the next ``sitecustomize`` on ``sys.path`` (the one this module shadows), if there is one."""
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is None or spec.loader is None or os.path.dirname(os.path.abspath(spec.origin or "")) == _HERE:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["_sglang_ext_chained_sitecustomize"] = module
    spec.loader.exec_module(module)


if os.environ.get(ENV_FLAG) == "1":
    _install()
_chain()
