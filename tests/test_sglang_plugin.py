"""The SGLang plugin without a server: flags, the policy adapter's translation, the seams it hooks.

The end-to-end checks inside a real SGLang server are in ``tests/test_sglang_e2e.py``.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from sglang_ext.core.policies import Decision, batch_length, make_policy
from sglang_ext.flags import FlagError
from sglang_ext.sglang_plugin import launch_flags
from sglang_ext.sglang_plugin.steps import CorePolicySteps, read_decision_log, replay_decisions, step_result


# ---- flags ----------------------------------------------------------------------------------------------------
def _resolve(argv):
    return launch_flags.resolve(launch_flags._ext_view(argv), launch_flags._speculative_view(argv))


def test_policy_flags_rewrite_sglang_speculative_flags():
    config, extra = _resolve(["--speculative-algorithm", "EAGLE3", "--speculative-num-steps", "4",
                              "--speculative-policy", "dsde", "--speculative-policy-param", "max_k=6"])
    assert config.policy["policy"] == "dsde" and config.policy["params"]["max_k"] == 6
    assert config.max_steps == 4
    assert "--speculative-adaptive" in extra and extra[extra.index("--speculative-eagle-topk") + 1] == "1"
    cfg_file = extra[extra.index("--speculative-adaptive-config") + 1]
    assert json.loads(open(cfg_file).read()) == {"1": {"candidate_steps": [0, 1, 2, 3, 4]}}
    # the config crosses a process boundary as JSON, intact
    assert launch_flags.PluginConfig.from_json(config.to_json()) == config


def test_no_extension_flags_change_nothing():
    config, extra = _resolve(["--speculative-algorithm", "NGRAM"])
    assert not config.active and extra == []


@pytest.mark.parametrize("argv, needle", [
    (["--speculative-algorithm", "EAGLE3", "--speculative-policy", "nope"], "--speculative-policy 'nope'"),
    (["--speculative-algorithm", "EAGLE3", "--speculative-policy", "dsde", "--speculative-policy-param", "max_k=99"],
     "--speculative-policy-param: dsde: max_k=99"),
    (["--speculative-algorithm", "EAGLE3", "--speculative-policy-param", "k=2"], "--speculative-policy-param needs"),
    (["--speculative-algorithm", "NGRAM", "--speculative-policy", "static"], "--speculative-policy: SGLang's adaptive"),
    (["--speculative-algorithm", "EAGLE3", "--speculative-eagle-topk", "4", "--speculative-policy", "static"],
     "--speculative-eagle-topk 1"),
    (["--speculative-algorithm", "EAGLE3", "--speculative-policy", "static", "--speculative-adaptive"],
     "drop --speculative-adaptive"),
    (["--speculative-algorithm", "EAGLE3", "--speculative-policy-config", "/nonexistent.json"],
     "--speculative-policy-config"),
    (["--online-capture-bytes", "5"], "--online-capture-bytes: needs --online-learning"),
    (["--speculative-algorithm", "EAGLE3", "--online-learning", "--online-capture-bytes", "5"],
     "--online-capture-bytes: capture_bytes=5"),
    (["--speculative-algorithm", "NGRAM", "--online-learning"], "--online-learning needs --speculative-algorithm"),
    (["--speculative-algorithm", "EAGLE3", "--speculative-policy-log", "/tmp/x.jsonl"], "--speculative-policy-log"),
])
def test_bad_values_name_the_flag(argv, needle):
    with pytest.raises(FlagError) as e:
        _resolve(argv)
    assert needle in str(e.value)


def test_prepare_argv_exits_2_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        launch_flags.prepare_argv(["--speculative-algorithm", "EAGLE3", "--speculative-policy", "nope"])
    assert e.value.code == 2
    assert "error: --speculative-policy 'nope'" in capsys.readouterr().err


def test_engine_keywords_become_flags():
    kwargs = {"model_path": "m", "speculative_policy": "static", "speculative_policy_param": {"k": 2},
              "online_learning": False, "online_lr": 0.01}
    argv = launch_flags.engine_kwargs_to_argv(kwargs)
    assert kwargs == {"model_path": "m"}
    assert argv == ["--speculative-policy", "static", "--speculative-policy-param", "k=2", "--online-lr", "0.01"]


def test_policy_config_file_from_sim_tune_is_accepted(tmp_path):
    from sglang_ext.core.policies.config import save_policy_config

    path = tmp_path / "tuned.json"
    save_policy_config(path, make_policy("static", k=2))
    config, _ = _resolve(["--speculative-algorithm", "EAGLE3", "--speculative-policy-config", str(path),
                          "--speculative-policy-param", "k=3"])
    assert config.policy["policy"] == "static" and config.policy["params"]["k"] == 3


# ---- the adapter: SGLang's AdaptiveSpecPolicy over a core policy ----------------------------------------------------
def test_batch_length_is_the_dsde_batch_cap():
    d = Decision(speculate=True, lengths={"a": 1, "b": 2, "c": 6})
    assert batch_length(d, 10) == 3  # ceil(mean 3) = 3 = max(min(k, 3))
    assert batch_length(d, 2) == 2  # clipped to --speculative-num-steps
    assert batch_length(Decision(speculate=False, lengths={"a": 4}), 10) == 0
    already = Decision(speculate=True, lengths={"a": 1, "b": 4}, info={"sl_cap": 4})
    assert batch_length(already, 10) == 4  # a policy's own cap is not applied twice


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 0.01
        return self.t


@pytest.mark.parametrize("name, params", [("static", {"k": 2}), ("dsde", {}), ("tide-control", {}),
                                           ("sglang-adaptive", {"warmup": 2, "update_interval": 1}),
                                           ("goodput", {}), ("bandit", {})])
def test_adapter_decides_what_the_core_policy_decides(name, params, tmp_path):
    """The adapter's steps equal a fresh core policy's on the same batches, accept counts and seconds (replayed
    from the decision log), and they change with the accept counts (so the check could fail)."""
    import random

    log = tmp_path / "decisions.jsonl"
    steps = CorePolicySteps(make_policy(name, **params), max_steps=4, log_path=log, clock=FakeClock())
    assert steps.candidate_steps == [0, 1, 2, 3, 4]
    rng = random.Random(0)
    live = ["r0", "r1", "r2"]
    decided = []
    for i in range(60):
        if i % 17 == 16:  # a request leaves, another joins
            steps.finish(live.pop(0))
            live.append(f"r{i}")
        steps.begin_batch(live, [10 + i] * len(live))
        k = steps.get_steps_for_batch(len(live))
        assert 0 <= k <= 4
        decided.append(k)
        steps.add_draft_seconds(0.002 * k)
        accepted = [min(k, rng.choice([0, 1, 2, 3, 4])) if i < 30 else 0 for _ in live]
        assert steps.on_verify_complete(accepted, len(live)) is None
    steps.close()
    records = read_decision_log(log)
    assert [r["steps"] for r in records if "steps" in r] == decided
    assert replay_decisions(make_policy(name, **params), records, max_steps=4) == decided
    assert steps.status()["decisions"] == 60


def test_adapter_pairs_results_first_in_first_out_and_skips_mismatches():
    steps = CorePolicySteps(make_policy("static", k=3), max_steps=3, clock=FakeClock())
    steps.begin_batch(["a", "b"])
    steps.get_steps_for_batch(2)
    steps.begin_batch(["a", "b", "c"])
    steps.get_steps_for_batch(3)  # overlap scheduling: the second step is decided before the first is verified
    steps.on_verify_complete([1, 2], 2)
    steps.on_verify_complete([0, 0], 3)  # wrong size for the second step: not observed
    assert steps.status()["mismatched"] == 1
    # without begin_batch (or with another size), slots stand in for the request ids
    assert steps.get_steps_for_batch(4) == 3


def test_step_result_translation():
    r = step_result(["a", "b"], 3, [1, 5], 0.1, 0.2, [7, 8])
    assert [(q.proposed, q.accepted, q.context_len) for q in r.requests] == [(3, 1, 7), (3, 3, 8)]
    assert r.speculated and r.verify_tokens == 8 and r.seconds == pytest.approx(0.3)
    assert not step_result(["a"], 0, [0], 0.0, 0.1).speculated


def test_metrics_read_status_paths():
    from sglang_ext.sglang_plugin.metrics import GAUGES, _read

    status = {"policy": {"last_steps": 2, "decisions": 5}, "online": {"collecting": True}}
    values = {name: _read(status, path) for name, _doc, path in GAUGES}
    assert values["sglang_ext:spec_steps"] == 2 and values["sglang_ext:online_collecting"] == 1.0
    assert values["sglang_ext:online_rounds"] is None


# ---- SGLang's seams ---------------------------------------------------------------------------------------------
sglang_required = pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs the sglang extra")


@sglang_required
def test_every_hook_target_exists_in_sglang():
    """Fails loudly if SGLang moves a seam the plugin hooks."""
    from sglang_ext.sglang_plugin.hooks import HOOKS

    for target, _kind, _fn in HOOKS:
        module_path, _, attr_path = target.partition(".srt.")
        parts = ("sglang.srt." + attr_path).split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for name in parts[i:]:
                obj = getattr(obj, name)
            break
        assert callable(obj), target


@sglang_required
def test_adaptive_policy_protocol_matches():
    from sglang.srt.speculative.adaptive_runtime_state import AdaptiveSpecPolicy

    members = [m for m in dir(AdaptiveSpecPolicy) if not m.startswith("_")]
    assert members and all(hasattr(CorePolicySteps, m) for m in members), members


@sglang_required
def test_plugin_is_an_sglang_entry_point():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("sglang_ext") == "sglang_ext.sglang_plugin:register"


@sglang_required
def test_launch_server_help_lists_the_extension_flags():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    section = out.stdout[out.stdout.index(launch_flags.GROUP_TITLE):]
    for flag in ("--speculative-policy ", "--speculative-policy-param", "--speculative-policy-config",
                 "--online-learning", "--online-learner", "--online-capture-bytes"):
        assert flag in section, flag


@sglang_required
def test_launch_server_refuses_a_bad_value_before_loading_anything():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", "/nonexistent",
                          "--speculative-algorithm", "EAGLE3", "--speculative-policy", "dsde",
                          "--speculative-policy-param", "max_k=99"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "--speculative-policy-param: dsde: max_k=99 outside [1, 32]" in out.stderr
