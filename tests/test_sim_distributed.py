"""`sim sweep/tune --ray-address`: the points run as Ray tasks on a local Ray the test starts, and the table is the
local process pool's, row for row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "traces" / "profiles" / "cpu-2core-smollm2-135m.json"
TRACE = ROOT / "traces" / "tiny_chat.jsonl"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_without_ray_the_flag_says_how_to_install_it(monkeypatch):
    import sys

    from simulator.distributed import RayUnavailable, _init

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RayUnavailable, match=r"--ray-address auto: Ray is not installed .*sglang-ext\[cluster\]"):
        _init("auto")


def _outcome(out: Path) -> list[dict]:
    rows = json.loads((out / "sweep.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    return [{k: v for k, v in r.items() if k not in ("perf", "sim_wall_s")} for r in rows]


def test_sweep_on_ray_equals_the_local_pool(local_ray, tmp_path):
    from sglang_ext.cli import main

    common = ["sim", "sweep", "--trace", str(TRACE), "--head", "24", "--profile", str(PROFILE), "--policy", "dsde",
              "--grid", "max_k=1,2,3", "--grid", "time_scale=1,0.5", "--seed", "3"]
    assert main([*common, "--jobs", "2", "--out", str(tmp_path / "local")]) == 0
    assert main([*common, "--ray-address", "auto", "--out", str(tmp_path / "ray")]) == 0
    local, remote = _outcome(tmp_path / "local"), _outcome(tmp_path / "ray")
    assert len(local) == 6 and local == remote


def test_tune_on_ray_equals_the_local_run(local_ray):
    from sglang_ext.core.costs import CostModel
    from sglang_ext.formats.trace import read_trace
    from simulator.tune import tune

    cost, trace = CostModel.fit(PROFILE), read_trace(TRACE).head(16)
    kw = dict(objective="throughput", params=["max_k", "window"], maxiter=2, popsize=3, seed=1)
    here = tune(trace, cost, "dsde", **kw)
    there = tune(trace, cost, "dsde", ray_address="auto", **kw)
    assert here.best_params == there.best_params and here.best_score == there.best_score
    assert [h["score"] for h in here.history] == [h["score"] for h in there.history]
