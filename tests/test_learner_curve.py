"""The offline learner-curve study: gap arithmetic, and a variant trained round by round on a tiny learnable stream."""

from __future__ import annotations

import torch

from analysis.learner_curve import (
    gap_closed,
    label_against_defaults,
    markdown,
    run_variant,
    score_domains,
    summarize,
    variant_configs,
)
from sglang_ext.core.learning.control import resolve
from sglang_ext.engine.target import TargetModel
from sglang_ext.models.tiny import tiny_llama
from sglang_ext.online import ONLINE_PARAMS
from test_online_learning import V, capture, new_drafter, progressions  # tests/ is on sys.path under pytest


def test_gap_closed():
    assert gap_closed(1.2, 1.0, 1.4) == 0.5
    assert gap_closed(0.9, 1.0, 1.4) == -0.25
    assert gap_closed(1.2, 1.0, None) is None and gap_closed(1.2, 1.0, 1.0) is None


def test_a_variant_learns_the_stream_and_the_report_says_so():
    torch.set_num_threads(1)
    target = TargetModel(tiny_llama(vocab_size=V, hidden_size=64, num_layers=3, seed=5), feature_layers=(0, 2))
    stream = capture(target, progressions(48, 1))
    heldout = {"prog": capture(target, progressions(12, 2))}
    rounds = [stream[i:i + 12] for i in range(0, 48, 12)]
    start = new_drafter(target)
    config = resolve(ONLINE_PARAMS, {"learner": "adam", "lr": 3e-3, "epochs": 3, "batch_tokens": 24 * 8,
                                     "gate_margin": 0.0, "replay_tokens": 2000}, "test")
    static = score_domains(start, heldout, config)
    r = run_variant(start, rounds, heldout, config, log=lambda m: None)
    assert len(r["curve"]) == 4 and r["deployed"] >= 1
    assert r["curve"][-1]["heldout"]["prog"] > static["prog"] + 0.05  # deployed rounds raised held-out acceptance
    tokens = [p["captured_tokens"] for p in r["curve"]]
    assert tokens == sorted(tokens) and tokens[-1] == sum(len(s) for s in stream)
    rows = summarize({"adam": r}, static, {"prog": static["prog"] + 1.0})
    assert rows[0]["prog_final"] == r["curve"][-1]["heldout"]["prog"] and 0 < rows[0]["prog_gap_closed"] < 1
    meta = {"date": "d", "command": "c", "machine": "m", "threads": 1, "stream": "s", "captured_tokens": tokens[-1],
            "rounds": 4, "n_threshold": 1, "heldout": "h", "gate_steps": 3}
    text = markdown(meta, static, None, rows)
    assert "| adam |" in text and f"{r['deployed']}/4" in text


def test_an_earlier_result_is_named_by_what_differs_from_todays_defaults():
    defaults = resolve(ONLINE_PARAMS, {"learner": "adam"}, "test")
    assert label_against_defaults(dict(defaults), defaults) == "online-adam"
    recorded = {**defaults, "replay_tokens": 0, "epochs": 1}  # run before the replay window became the default
    assert label_against_defaults(recorded, defaults) == "online-adam[epochs=1,replay_tokens=0]"



def test_one_configuration_has_one_name_however_it_is_spelled():
    named = variant_configs("adam[replay_tokens=16384],adam[epochs=1,lr=0.0],hedge[label=mine,epochs=1]", {})
    assert list(named) == ["online-adam", "online-adam[epochs=1]", "mine"]  # defaults dropped, label kept
    assert named["mine"]["learner"] == "hedge" and named["mine"]["epochs"] == 1
    shared = variant_configs("adam[epochs=1]", {"epochs": 1})  # --set epochs=1 is then the run's default
    assert list(shared) == ["online-adam"]
