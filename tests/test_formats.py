"""The formats that cross between hosts have one neutral home (sglang_ext.formats): the engine, the server, the
SGLang plugin and the core never import the simulator, and the old simulator.* names are the same modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return mods | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_no_host_but_the_simulator_imports_the_simulator():
    hosts = ("engine", "server", "sglang_plugin", "core", "formats", "online", "training")
    for host in hosts:
        for path in (ROOT / "sglang_ext" / host).rglob("*.py"):
            bad = {m for m in _imports(path) if m == "simulator" or m.startswith("simulator.")}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_old_names_are_the_same_modules_and_the_simulator_path_has_no_torch():
    code = ("import sys, simulator.trace, simulator.metrics, sglang_ext.formats.trace, sglang_ext.formats.results\n"
            "assert simulator.trace is sglang_ext.formats.trace and simulator.metrics is sglang_ext.formats.results\n"
            "import simulator.model, simulator.tune, simulator.sim_cli\n"
            "assert 'torch' not in sys.modules, 'the simulator imported torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_saved_result_reads_back_as_its_json_with_nan_as_null(tmp_path):
    """SimResult.save writes the per-request columns compactly; the file is still exactly to_json (NaN -> null)."""
    import json as _json

    import numpy as _np

    from sglang_ext.formats.results import REQUEST_COLUMNS, SimResult

    cols = {name: _np.arange(4, dtype=float if name in ("arrival", "first_token", "finish") else _np.int64)
            for name in REQUEST_COLUMNS}
    cols["first_token"][2] = _np.nan
    res = SimResult({"requests": 4, "x": float("inf")}, cols, {"wall_s": 1.0}, {"seed": 0}, steps={"t": [0.5]})
    path = res.save(tmp_path / "r.json")
    got = _json.loads(path.read_text())
    assert got["requests"]["first_token"] == [0.0, 1.0, None, 3.0]
    assert got["summary"]["x"] is None and got["steps"] == {"t": [0.5]}
    assert got["requests"]["index"] == [0, 1, 2, 3]
    assert SimResult.load(path).requests["arrival"].tolist() == [0.0, 1.0, 2.0, 3.0]
