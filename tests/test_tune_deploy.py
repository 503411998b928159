"""The tuner respects the serving flags it will be deployed with, the config records them, and a launch whose flags
contradict the config (or whose overrides contradict it) is refused naming both."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from sglang_ext.flags import FlagError, add_policy_args, policy_spec_from_args
from simulator.tune import ordered, save_tuned, search_space, tune
from sglang_ext.formats.trace import Request, Trace

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "traces" / "profiles" / "cpu-2core-smollm2-135m.json"


def test_depth_parameters_are_searched_below_the_num_steps_only():
    dims = {d.name: d for d in search_space("dsde", ["max_k", "init_k", "window"], max_depth=4)}
    assert dims["max_k"].high == 4 and dims["init_k"].high == 4 and dims["window"].high == 1024
    assert "gamma" not in {d.name for d in search_space("tide-control", ["gamma", "threshold"], max_depth=1)}
    assert ordered({"min_k": 3, "init_k": 26, "max_k": 2}, "dsde") == {"min_k": 2, "init_k": 2, "max_k": 2}


def test_tuned_config_records_the_deployment_and_stays_inside_it(tmp_path):
    from sglang_ext.core.costs import CostModel

    cost = CostModel.fit(PROFILE)
    trace = Trace(tuple(Request(0.3 * i, 200, 24) for i in range(20)))
    res = tune(trace, cost, "dsde", objective="throughput", params=["max_k", "init_k"], maxiter=2, popsize=4,
               deploy={"speculative_num_steps": 3, "speculative_eagle_topk": 1, "max_running_requests": 8})
    assert all(h["params"]["max_k"] <= 3 and h["params"]["init_k"] <= h["params"]["max_k"] for h in res.history)
    path = save_tuned(res, tmp_path / "tuned.json")
    assert json.loads(path.read_text())["meta"]["deploy"] == {"speculative_num_steps": 3, "speculative_eagle_topk": 1,
                                                              "max_running_requests": 8}
    with pytest.raises(ValueError, match="max_k=9 exceeds --speculative-num-steps 3"):
        tune(trace, cost, "dsde", fixed={"max_k": 9}, params=["init_k"], deploy={"speculative_num_steps": 3})


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_policy_args(p)
    p.add_argument("--speculative-num-steps", type=int)
    p.add_argument("--speculative-eagle-topk", type=int)
    p.add_argument("--max-running-requests", type=int)
    return p.parse_args(argv)


def _config(tmp_path: Path, params: dict, deploy: dict | None) -> str:
    d = {"policy": "dsde", "params": params, "meta": {"tuner": "test", **({"deploy": deploy} if deploy else {})}}
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(d))
    return str(path)


def test_launch_flags_must_match_the_tuned_config(tmp_path):
    cfg = _config(tmp_path, {"max_k": 3, "init_k": 3}, {"speculative_num_steps": 3, "max_running_requests": 8})
    assert policy_spec_from_args(_args("--speculative-policy-config", cfg, "--speculative-num-steps", "3"))
    with pytest.raises(FlagError, match=r"tuned for --speculative-num-steps 3, but this launch has --speculative-num-steps 2"):
        policy_spec_from_args(_args("--speculative-policy-config", cfg, "--speculative-num-steps", "2"))
    with pytest.raises(FlagError, match="--max-running-requests 8, but this launch has --max-running-requests 16"):
        policy_spec_from_args(_args("--speculative-policy-config", cfg, "--max-running-requests", "16"))
    # a config tuned without the flags (max_k 19) on a 4-step server, and an override beyond the steps
    old = _config(tmp_path, {"max_k": 19, "init_k": 5}, None)
    with pytest.raises(FlagError, match=r"max_k=19 exceeds --speculative-num-steps 4"):
        policy_spec_from_args(_args("--speculative-policy-config", old, "--speculative-num-steps", "4"))
    with pytest.raises(FlagError, match=r"--speculative-policy-param max_k=6 exceeds --speculative-num-steps 4"):
        policy_spec_from_args(_args("--speculative-policy", "dsde", "--speculative-policy-param", "max_k=6",
                                    "--speculative-num-steps", "4"))
    # defaults beyond the steps are fine (the server caps them): dsde's max_k 10 on a 3-step server
    assert policy_spec_from_args(_args("--speculative-policy", "dsde", "--speculative-num-steps", "3"))


def test_an_override_that_contradicts_the_config_names_both(tmp_path):
    cfg = _config(tmp_path, {"max_k": 8, "init_k": 5}, None)
    with pytest.raises(FlagError, match=r"init_k=5 contradicts --speculative-policy-param max_k=4"):
        policy_spec_from_args(_args("--speculative-policy-config", cfg, "--speculative-policy-param", "max_k=4"))
    assert policy_spec_from_args(_args("--speculative-policy-config", cfg, "--speculative-policy-param", "max_k=6"))


def test_sim_tune_cli_takes_the_serving_flags(tmp_path):
    from sglang_ext.cli import main

    out = tmp_path / "tuned.json"
    assert main(["sim", "tune", "--trace", str(ROOT / "traces" / "tiny_chat.jsonl"), "--head", "12", "--profile",
                 str(PROFILE), "--policy", "dsde", "--params", "max_k,init_k", "--objective", "throughput",
                 "--maxiter", "1", "--popsize", "3", "--speculative-num-steps", "2", "--max-running-requests", "4",
                 "--out", str(out)]) == 0
    cfg = json.loads(out.read_text())
    assert cfg["meta"]["deploy"] == {"speculative_num_steps": 2, "max_running_requests": 4}
    assert cfg["params"]["max_k"] <= 2 and cfg["params"]["init_k"] <= cfg["params"]["max_k"]
