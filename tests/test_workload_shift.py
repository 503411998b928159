"""The workload-shift benchmark's pieces (sglang_ext/studies/workload_shift.py): stream construction, configuration specs,
windowed metrics, and an interleaved static-vs-online run on a tiny random model (greedy identity included)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sglang_ext.studies import workload_shift as ws


def test_parse_segments_and_configs():
    segs = ws.parse_segments("chat=mt-bench:20, code=humaneval:40,math=gsm8k:4")
    assert [(s.name, s.source, s.count) for s in segs] == [("chat", "mt-bench", 20), ("code", "humaneval", 40),
                                                           ("math", "gsm8k", 4)]
    for bad in ("chat=mt-bench", "chat=mt-bench:0", "a=x:1,a=y:2", ""):
        with pytest.raises(ValueError):
            ws.parse_segments(bad)
    specs = ws.parse_configs("static,adam,online-momentum[lr=0.02,epochs=3],hedge")
    assert [s.name for s in specs] == ["static", "online-adam", "online-momentum[lr=0.02,epochs=3]", "online-hedge"]
    assert specs[0].learner is None and specs[2].overrides == {"lr": 0.02, "epochs": 3}
    specs = ws.parse_configs("static,static[drafter=drafters/x,label=oracle],adam[drafter=drafters/y,lr=0.1]")
    assert [(s.name, s.drafter) for s in specs] == [("static", None), ("oracle", "drafters/x"),
                                                    ("online-adam[lr=0.1,drafter=drafters/y]", "drafters/y")]
    assert specs[2].overrides == {"lr": 0.1}
    assert ws.parse_configs("static[drafter=d]")[0].name == "static[drafter=d]"
    for bad in ("adam,static", "static,adam,adam", "static,rmsprop", "static[lr=1]", "static,adam[lr=1",
                "static,static[label=static]", "static[drafter=]"):
        with pytest.raises(ValueError):
            ws.parse_configs(bad)


def test_stream_is_seeded_ordered_and_never_repeats_a_prompt():
    pools = {"a": [(f"a{i}", f"text a{i}") for i in range(10)], "b": [(f"b{i}", f"text b{i}") for i in range(6)]}
    segs = ws.parse_segments("x=a:3,y=b:4,z=a:5")
    s1 = ws.select_stream(pools, segs, seed=7)
    assert s1 == ws.select_stream(pools, segs, seed=7)
    assert s1 != ws.select_stream(pools, segs, seed=8)
    assert [t[0] for t in s1] == ["x"] * 3 + ["y"] * 4 + ["z"] * 5
    ids = [t[2] for t in s1]
    assert len(set(ids)) == len(ids)  # source "a" feeds two segments without repeating
    with pytest.raises(ValueError):
        ws.select_stream(pools, ws.parse_segments("x=b:7"), seed=0)

    class Tok:  # encode_stream only needs a chat template
        def apply_chat_template(self, msgs, add_generation_prompt, return_dict):
            return {"input_ids": [1] + [ord(c) % 50 + 2 for c in msgs[0]["content"]] + [0]}

    stream = ws.encode_stream(Tok(), s1, max_prompt_tokens=9)
    assert [it.index for it in stream] == list(range(12)) and all(len(it.ids) <= 9 for it in stream)
    assert ws.segment_starts(stream) == {"x": 0, "y": 3, "z": 7}


def test_windowed_metrics():
    assert ws.moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    # a shift at 4: acceptance drops to 1 and climbs back to 3
    acc = [3, 3, 3, 3, 1, 1, 2, 3, 3, 3, 3, 3]
    clock = [float(i + 1) for i in range(len(acc))]
    r = ws.recovery(acc, clock, 4, 12, window=2, frac=0.9)
    assert r["plateau"] == 3 and r["level"] == pytest.approx(2.7)
    assert r["index"] == 8 and r["requests"] == 5 and r["finish_clock"] == 9.0  # mov(7,8) = 3 >= 2.7
    never = ws.recovery([1.0] * 4 + [0.0] * 4, clock, 4, 8, window=2, level=10.0)
    assert never["requests"] is None
    steps = [ws.StepRecord(1.0, 1.0, 4, [0, 1]), ws.StepRecord(2.0, 1.0, 6, []), ws.StepRecord(4.0, 2.0, 8, [2]),
             ws.StepRecord(5.0, 1.0, 2, [3])]
    w = ws.window_throughput(steps, 2)
    assert (w["tokens"], w["seconds"], w["clock_start"]) == (10, 3.0, 2.0) and w["tokens_per_s"] == pytest.approx(10 / 3)
    w = ws.window_throughput(steps, 0, 2)
    assert (w["tokens"], w["seconds"]) == (10, 2.0)


@pytest.fixture(scope="module")
def tiny():
    from sglang_ext.models.tiny import tiny_llama

    return tiny_llama(vocab_size=96, hidden_size=64, num_layers=2, seed=3)


def test_interleaved_static_vs_online_on_a_tiny_model(tiny, tmp_path):
    """Two configurations on one stream, stepped alternately with trainer gating: rounds happen, the drafter is
    swapped, every output matches static's, and the report (JSON, markdown, plot) is written."""
    from test_engine import make_engine, prompts  # tests/ is on sys.path under pytest
    from test_engine_online import FAST_ROUNDS

    ps = prompts(41, 12)
    stream = [ws.StreamItem(i, "chat" if i < 4 else "code", "toy", str(i), p) for i, p in enumerate(ps)]
    specs = ws.parse_configs("static,adam")
    shared = {k: v for k, v in FAST_ROUNDS.items() if k != "learner"}
    runs = ws.build_runs(specs, lambda drafter: make_engine(tiny, "eagle", num_steps=3, max_batch=3), shared,
                         tmp_path / "handoff", log=lambda m: None)
    try:
        for r in runs:
            r.submit(stream, 20)
        assert runs[1].online.trainer.pid is not None
        gate = ws.run_interleaved(runs, gate_trainers=True, log=lambda m: None)
        deadline = 60
        while runs[1].online.trainer.stats["rounds"] < 1 and deadline > 0:  # a round in flight: let it finish
            runs[1].online.trainer.wait_idle(1.0)
            runs[1].online.trainer.poll()
            deadline -= 1
        summary = ws.summarize(runs, stream, window=3)
    finally:
        ws.stop_runs(runs)
    assert gate.rescues == 0
    assert summary["greedy_identity"]
    on = summary["configs"]["online-adam"]
    assert on["identical_to_static"] == len(stream)
    assert on["online"]["rounds_submitted"] >= 1 and on["online"]["trainer_cpu_seconds"] >= 0
    st = summary["configs"]["static"]
    assert st["tokens"] == sum(st["per_request"]["tokens"]) and st["seconds"] > 0
    assert set(st["segments"]) == {"chat", "code"} and summary["post_shift_start"] == 4
    assert st["ratios_vs_static"]["post_shift_tokens_per_s"] == pytest.approx(1.0)
    assert math.isclose(st["post_shift"]["tokens"] + 0.0, st["post_shift"]["tokens"])
    assert st["accept_length"] == pytest.approx(sum(st["per_request"]["tokens"]) / sum(st["per_request"]["verify_steps"]))
    meta = {"command": "x", "max_new_tokens": 20, "batch": 3, "num_steps": 3, "serve_threads": 1, "trainer_threads": 1,
            "gate_trainers": True, "online_shared": shared, "stream_sources": "toy", "machine": "test"}
    md = ws.results_markdown(summary, meta)
    assert "| online-adam |" in md and "Greedy identity" in md
    png = ws.plot_acceptance(summary, tmp_path / "a.png")
    assert png.stat().st_size > 1000
    json.dumps(summary, default=str)
    # --rejudge: the derived tables again from results.json alone (last halves from the per-request records)
    half = on["last_half"]["code"]
    assert half["start"] == 4 + 8 // 2 and half["stop"] == 12 and half["tokens"] == sum(on["per_request"]["tokens"][8:])
    assert half["accept_length"] == pytest.approx(sum(on["per_request"]["tokens"][8:])
                                                  / sum(on["per_request"]["verify_steps"][8:]))
    res = tmp_path / "results.json"
    res.write_text(json.dumps({"meta": meta, **summary}, default=str))
    again = ws.rejudge(res)
    assert again["configs"]["online-adam"]["last_half"] == json.loads(json.dumps(on["last_half"]))
    assert "Last half of each new segment (code 8–11)" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="not a workload-shift results.json"):
        ws.rejudge(tmp_path / "a.png")


@pytest.mark.slow
def test_real_model_smoke(tmp_path, capsys):
    """The script end to end on SmolLM2-135M: a 2 + 2 stream, short outputs, static vs adam."""
    from conftest import require_model, skip_or_fail

    require_model("smollm2-135m")
    root = Path(__file__).resolve().parents[1]
    if not (root / "drafters/smollm2-135m-eagle/model.safetensors").is_file():
        skip_or_fail("shipped drafter drafters/smollm2-135m-eagle/model.safetensors missing")
    out = tmp_path / "out"
    flags = ["--segments", "chat=mt-bench:2,code=humaneval:2", "--configs", "static,adam", "--max-new-tokens", "12",
             "--batch", "2", "--online-n-threshold", "64", "--online-n-init", "1",
             "--draft-model-path", str(root / "drafters/smollm2-135m-eagle"), "--out", str(out)]
    rc = ws.main(flags)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["greedy_identity"] and set(res["configs"]) == {"static", "online-adam"}
    assert (out / "acceptance.png").is_file() and (out / "results.md").is_file()
    # the journal has every request; the same --out again is refused, and --resume finds nothing left to serve
    journal = ws.Journal.read(out / "journal.jsonl")
    assert journal[0]["t"] == "header" and sum(r["t"] == "finish" for r in journal) == 2 * 4
    assert not (out / "handoff").exists()  # a completed run leaves no drafter versions behind
    assert ws.main(flags) == 2
    assert "journal.jsonl exists: pass --resume" in capsys.readouterr().err
    assert ws.main([*flags, "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    for name in ("static", "online-adam"):
        assert again["configs"][name]["per_request"]["tokens"] == res["configs"][name]["per_request"]["tokens"]
        assert again["configs"][name]["resumes"][0]["finished"] == 4


def test_an_interrupted_run_resumes_from_its_journal(tiny, tmp_path):
    """A run stopped mid-stream (its journal's last line torn) resumes: finished requests keep their recorded
    outputs and clocks, the rest run again, every output still equals static's, and the online configuration starts
    from the newest drafter it had deployed. A journal of other settings, or a bad line inside it, is refused by
    name."""
    from test_engine import make_engine, prompts
    from test_engine_online import FAST_ROUNDS

    ps = prompts(43, 10)
    stream = [ws.StreamItem(i, "chat" if i < 3 else "code", "toy", str(i), p) for i, p in enumerate(ps)]
    specs = ws.parse_configs("static,adam")
    shared = {k: v for k, v in FAST_ROUNDS.items() if k != "learner"}
    header = {"t": "header", "segments": "toy", "stream_sha256": "abc", "configs_parsed": [s.name for s in specs]}
    path, handoff = tmp_path / "journal.jsonl", tmp_path / "handoff"
    build = lambda sp: ws.build_runs(sp, lambda drafter: make_engine(tiny, "eagle", num_steps=3, max_batch=3),  # noqa: E731
                                     shared, handoff, log=lambda m: None)

    journal = ws.Journal(path)
    journal.write(header)
    runs = build(specs)
    try:
        for r in runs:
            r.journal = journal
            r.submit(stream, 16)
        with ws.TrainerGate(runs) as gate:
            while len(runs[0].finish_order) < 5:  # "interrupted" with part of the stream served
                for r in runs:
                    gate.step(r)
        first = {r.spec.name: (list(r.finish_order), r.clock) for r in runs}
    finally:
        ws.stop_runs(runs)
        journal.close()
    with open(path, "a") as f:
        f.write('{"t":"step","c":"sta')  # the process died mid-write

    per = ws.check_resumable(ws.Journal.read(path), header, path)
    resumed = [ws.resumed_spec(s, handoff) for s in specs]
    assert resumed[0] is specs[0] and resumed[1].name == specs[1].name
    assert resumed[1].drafter is not None and Path(resumed[1].drafter).parent == ws.handoff_dir_of(handoff, specs[1])
    journal = ws.Journal(path)
    runs = build(resumed)
    try:
        for r in runs:
            r.restore(per[r.spec.name])
            order, clock = first[r.spec.name]
            assert r.finish_order == order and r.clock == pytest.approx(clock) and set(r.restored) == set(order)
            r.journal = journal
            r.submit(stream, 16)
        ws.run_interleaved(runs, gate_trainers=True, log=lambda m: None)
        summary = ws.summarize(runs, stream, window=3)
    finally:
        ws.stop_runs(runs)
        journal.close()
    assert summary["greedy_identity"] and all(c["identical_to_static"] == len(stream)
                                              for c in summary["configs"].values())
    st = summary["configs"]["static"]
    assert st["resumes"][0]["finished"] >= 5 and st["seconds"] > first["static"][1]
    assert set(st["last_half"]) == {"code"} and st["last_half"]["code"]["start"] == 3 + 7 // 2
    assert st["ratios_vs_static"]["code_last_half_accept_length"] == pytest.approx(1.0)
    # every request has exactly one finish record across both sessions
    finishes = [r["i"] for r in ws.Journal.read(path) if r.get("t") == "finish" and r["c"] == "static"]
    assert sorted(finishes) == list(range(len(stream)))

    with pytest.raises(ValueError, match="seed: journal None, now 1"):
        ws.check_resumable(ws.Journal.read(path), {**header, "seed": 1}, path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text().replace('"t":"step"', "oops", 1))
    with pytest.raises(ValueError, match=r"bad.jsonl:\d+: not a journal record"):
        ws.Journal.read(bad)


def test_gap_closed_and_last_half_table():
    assert ws.gap_closed(1.2, 1.0, 1.4) == pytest.approx(0.5)
    assert ws.gap_closed(1.2, 1.0, 0.9) is None and ws.gap_closed(None, 1.0, 1.4) is None
    assert ws.request_span_throughput([10, 20, 30], [0.0, 1.0, 2.0], [3.0, 4.0, 6.0], 1, 3) == {
        "tokens": 50, "seconds": 5.0, "tokens_per_s": 10.0}
    cfg = lambda a, t: {"last_half": {"code": {"start": 5, "stop": 10, "accept_length": a, "tokens_per_s": t}},  # noqa: E731
                        "ratios_vs_static": {"code_last_half_accept_length": a / 1.0,
                                             "code_last_half_tokens_per_s": t / 20.0}}
    summary = {"segments": {"chat": {}, "code": {}}, "oracle": "oracle",
               "configs": {"static": cfg(1.0, 20.0), "oracle": cfg(1.4, 26.0), "online": {**cfg(1.3, 25.0),
                                                                                        "gap_closed": {"code": 0.75}}}}
    md = "\n".join(ws.last_half_markdown(summary))
    assert "code 5–9" in md and "| online | 1.30 (1.300×) | 25.0 (1.250×) | 75% |" in md
