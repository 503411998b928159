"""Child-process entry point for :func:`sglang_ext.testing.sglang_cpu.launcher.run_engine` (TEST harness).

``python -m sglang_ext.testing.sglang_cpu.engine_runner SPEC.json`` builds ``sglang.Engine(model_path=...,
**engine_kwargs)``, generates for ``prompts`` or ``input_ids`` with ``sampling_params``, writes the outputs as JSON
to ``output_path`` and prints them after a ``SGLANG_CPU_ENGINE_OUTPUT`` marker line. It must run as ``__main__``
(hence its own module): the Engine starts its scheduler with multiprocessing *spawn*, which re-imports the main
module in the child. The launcher gives it the harness environment (stand-in kernels, AMX claim).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MARKER = "SGLANG_CPU_ENGINE_OUTPUT"


def run(spec: dict[str, Any]) -> list[dict[str, Any]]:
    from sglang_ext.sglang_plugin import engine as make_engine  # loads plugins first: our keywords are accepted

    engine = make_engine(model_path=spec["model_path"], **spec["engine_kwargs"])
    try:
        if spec.get("input_ids") is not None:
            outputs = engine.generate(input_ids=spec["input_ids"], sampling_params=spec["sampling_params"])
        else:
            outputs = engine.generate(prompt=spec["prompts"], sampling_params=spec["sampling_params"])
    finally:
        engine.shutdown()
    return [{"text": o.get("text", ""), "output_ids": list(o.get("output_ids") or []),
             "meta_info": o.get("meta_info", {})} for o in outputs]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m sglang_ext.testing.sglang_cpu.engine_runner SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    outputs = run(spec)
    text = json.dumps(outputs, default=str)
    Path(spec["output_path"]).write_text(text)
    print(MARKER, flush=True)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
