"""Run SGLang's own Triton kernels under the Triton interpreter on CPU tensors (TEST reference for the stand-in).

The stand-in ops in ``stand_in/common_ops.py`` re-implement SGLang's speculative-decoding bookkeeping kernels;
the tests check them against the originals -- the ``@triton.jit`` kernels shipped in the sglang wheel -- executed by
Triton's CPU interpreter. The interpreter is chosen when ``triton.language`` is *imported* (``TRITON_INTERPRET=1``
turns its ``@jit`` reductions such as ``tl.sum`` into interpretable functions), so the kernels must run in a fresh
interpreter: :func:`run_cases` starts ``python -m sglang_ext.testing.sglang_cpu.triton_reference CASES RESULTS``.

A case is ``{"target": "module:attribute", "grid": tuple | None, "args": [...], "kwargs": {...}}``: with a grid the
target is a kernel launched as ``target[grid](*args, **kwargs)``, without one a Python wrapper called directly.
The result of each case is its ``args`` list after the call (the kernels write their outputs in place).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

STAND_IN_DIR = Path(__file__).resolve().parent / "stand_in"


def _resolve(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _run(cases: Sequence[dict[str, Any]]) -> list[list[Any]]:
    results = []
    for case in cases:
        fn = _resolve(case["target"])
        args, kwargs = list(case["args"]), dict(case.get("kwargs") or {})
        if case.get("grid") is not None:
            fn[tuple(case["grid"])](*args, **kwargs)
        else:
            fn(*args, **kwargs)
        results.append(args)
    return results


def run_cases(cases: Sequence[dict[str, Any]], timeout: float = 600.0) -> list[list[Any]]:
    """Run ``cases`` in a child interpreter with ``TRITON_INTERPRET=1``; return each case's arguments afterwards.

    The child gets the stand-in directory on ``sys.path`` because some SGLang kernel modules import ``sgl_kernel``
    at import time; it does not get the CPU-engine variables, so SGLang takes its generic (Triton) code paths.
    """
    import torch

    with tempfile.TemporaryDirectory(prefix="sglang-triton-ref-") as tmp:
        cases_path, results_path = Path(tmp) / "cases.pt", Path(tmp) / "results.pt"
        torch.save(list(cases), cases_path)
        env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_USE_CPU_ENGINE", "SGLANG_EXT_CPU_STANDIN")}
        env["TRITON_INTERPRET"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(STAND_IN_DIR), env.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-m", "sglang_ext.testing.sglang_cpu.triton_reference",
                               str(cases_path), str(results_path)], env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0 or not results_path.is_file():
            raise RuntimeError(f"Triton reference run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-5000:]}")
        return torch.load(results_path, weights_only=False)


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("triton_reference: TRITON_INTERPRET=1 must be set before Python starts", file=sys.stderr)
        return 2
    import torch

    cases = torch.load(argv[0], weights_only=False)
    torch.save(_run(cases), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
