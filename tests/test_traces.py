"""Trace format, importers, generator and the `trace` CLI (issue 6)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from simulator.generator import (
    PRESETS,
    LengthDist,
    TraceFit,
    example_traces,
    fit_trace,
    generate,
    normal_scores,
)
from simulator.importers import (
    import_azure,
    import_burstgpt,
    import_mooncake,
    import_trace,
    import_vidur,
    parse_datetime_seconds,
)
from sglang_ext.formats.trace import (
    Request,
    Trace,
    TraceError,
    TraceMeta,
    read_trace,
    write_trace,
)

REPO = Path(__file__).resolve().parents[1]
AZURE_CODE = REPO.parent / "shared" / "data" / "traces" / "azure2023_code.csv"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---- format ---------------------------------------------------------------------------------------------------
def test_round_trip_keeps_every_field(tmp_path):
    meta = TraceMeta(name="rt", source="hand-made", licence="Apache-2.0", extra={"note": "x"})
    reqs = (Request(0.0, 10, 5, "chat", (3, 0, 2), "a"), Request(0.1 + 0.2, 7, 1),
            Request(0.3000000000000001, 4096, 900, "code", (), None), Request(12.5, 1, 1, None, None, "z"))
    trace = Trace(reqs, meta)
    for name in ("t.jsonl", "t.jsonl.gz"):
        back = read_trace(write_trace(tmp_path / name, trace))
        assert back.requests == reqs  # floats exact (repr), optional fields kept or left out
        assert back.meta == meta and back.skipped == ()
    first = (tmp_path / "t.jsonl").read_text().splitlines()[1]
    assert json.loads(first) == {"arrival": 0.0, "prompt_tokens": 10, "output_tokens": 5, "category": "chat",
                                 "acceptance": [3, 0, 2], "id": "a"}
    # a file without a header reads, named after the file
    _write(tmp_path / "bare.jsonl", '\n{"arrival": 1, "prompt_tokens": 2, "output_tokens": 3}\n\n')
    bare = read_trace(tmp_path / "bare.jsonl")
    assert bare.meta.name == "bare" and bare.requests == (Request(1.0, 2, 3),)


GOOD = '{"arrival": 0.5, "prompt_tokens": 10, "output_tokens": 4}'


@pytest.mark.parametrize("bad, field, words", [
    ('{"arrival": 1.0, "prompt_tokens": 10, "output_tokens": -3}', "output_tokens",
     "output_tokens=-3 must be a positive int"),
    ('{"arrival": 1.0, "prompt_tokens": "10", "output_tokens": 3}', "prompt_tokens",
     "prompt_tokens='10' must be a positive int"),
    ('{"arrival": 1.0, "prompt_tokens": 10.5, "output_tokens": 3}', "prompt_tokens", "must be a positive int"),
    ('{"arrival": 1.0, "prompt_tokens": 0, "output_tokens": 3}', "prompt_tokens", "prompt_tokens=0"),
    ('{"prompt_tokens": 10, "output_tokens": 3}', "arrival", "missing required field 'arrival'"),
    ('{"arrival": -1, "prompt_tokens": 10, "output_tokens": 3}', "arrival", "arrival=-1 must be a finite number >= 0"),
    ('{"arrival": true, "prompt_tokens": 10, "output_tokens": 3}', "arrival", "arrival=True"),
    ('{"arrival": 0.1, "prompt_tokens": 10, "output_tokens": 3}', "arrival", "before the previous arrival 0.5"),
    ('{"arrival": 1.0, "prompt_tokens": 10, "output_tokens": 3, "acceptance": [1, -1]}', "acceptance",
     "acceptance=[1, -1] must be a list of ints >= 0"),
    ('{"arrival": 1.0, "prompt_tokens": 10, "output_tokens": 3, "category": 5}', "category", "category=5"),
    ('{"arrival": 1.0, "prompt_tokens": 10, "output_tokens": 3, "output_token": 3}', "output_token",
     "unknown field 'output_token'"),
    ('{"arrival": 1.0, "prompt_tokens": 10,', None, "not valid JSON"),
    ('[1, 2, 3]', None, "expected a JSON object, got list"),
    ('{"trace": {"name": "late"}}', "trace", "header is allowed only on the first line"),
])
def test_malformed_line_names_file_line_and_field(tmp_path, bad, field, words):
    path = _write(tmp_path / "x.jsonl", f'{{"trace": {{"name": "x"}}}}\n{GOOD}\n{bad}\n{GOOD.replace("0.5", "2")}\n')
    with pytest.raises(TraceError) as info:
        read_trace(path)
    err = info.value
    assert str(err).startswith(f"{path}:3: ") and words in str(err)
    assert (err.line, err.field) == (3, field)
    # on_error="skip" keeps going: the two good lines survive, the bad one is reported with its line
    kept = read_trace(path, on_error="skip")
    assert [r.arrival for r in kept] == [0.5, 2.0]
    assert [(e.line, e.field) for e in kept.skipped] == [(3, field)]


def test_bad_header_time_unit_and_on_error_value(tmp_path):
    path = _write(tmp_path / "ms.jsonl", '{"trace": {"name": "ms", "time_unit": "ms"}}\n' + GOOD + "\n")
    with pytest.raises(TraceError, match=r"ms.jsonl:1: time_unit='ms' is not supported"):
        read_trace(path)
    with pytest.raises(ValueError, match="on_error"):
        read_trace(path, on_error="ignore")  # type: ignore[arg-type]


def test_skip_collects_several_bad_lines(tmp_path):
    lines = [GOOD, '{"arrival": 1, "prompt_tokens": -1, "output_tokens": 2}', "not json",
             '{"arrival": 3, "prompt_tokens": 5, "output_tokens": 6, "category": "code"}',
             '{"arrival": 2, "prompt_tokens": 5, "output_tokens": 6}']
    trace = read_trace(_write(tmp_path / "s.jsonl", "\n".join(lines)), on_error="skip")
    assert [(r.arrival, r.category) for r in trace] == [(0.5, None), (3.0, "code")]
    assert [(e.line, e.field) for e in trace.skipped] == [(2, "prompt_tokens"), (3, None), (5, "arrival")]


def test_trace_order_views_and_stats():
    with pytest.raises(TraceError, match="non-decreasing"):
        Trace((Request(1.0, 1, 1), Request(0.5, 1, 1)))
    t = Trace.from_unsorted([Request(3.0, 40, 4, "b"), Request(0.0, 10, 1, "a"), Request(1.0, 20, 2, "a"),
                             Request(2.0, 30, 3, "b", id="first"), Request(2.0, 31, 3, "b", id="second")])
    assert [r.arrival for r in t] == [0.0, 1.0, 2.0, 2.0, 3.0]
    assert [r.id for r in t if r.arrival == 2.0] == ["first", "second"]  # stable: ties keep their order
    s = t.stats()
    assert (s.num_requests, s.duration_s, s.rate) == (5, 3.0, pytest.approx(4 / 3))
    assert s.interarrival_cv == pytest.approx(np.std([1, 1, 0, 1], ddof=1) / 0.75)
    assert s.categories == {"a": 2, "b": 3} and s.prompt.p50 == 30 and s.output.max == 4
    fast = t.scaled(0.5)
    assert fast.stats().rate == pytest.approx(2 * s.rate) and fast[-1].arrival == 1.5
    assert [r.prompt_tokens for r in t.head(2)] == [10, 20]
    w = t.window(1.0, 3.0)
    assert [(r.arrival, r.prompt_tokens) for r in w] == [(0.0, 20), (1.0, 30), (1.0, 31)]
    assert [r.arrival for r in t.window(1.0, 3.0, rebase=False)] == [1.0, 2.0, 2.0]
    joined = t.head(2).then(t.window(2.0, 9.0), gap=0.5)
    assert [r.arrival for r in joined] == [0.0, 1.0, 1.5, 1.5, 2.5]
    with pytest.raises(ValueError):
        t.scaled(0)


# ---- importers --------------------------------------------------------------------------------------------------
AZURE_CSV = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:04.0319600,3180,8
2023-11-16 18:17:03.9999600,110,27
2023-11-16 18:18:04.0000000,7433,14
"""


def test_import_azure_sorts_and_counts_seconds_from_first(tmp_path):
    trace = import_azure(_write(tmp_path / "az.csv", AZURE_CSV), category="code")
    assert [(r.arrival, r.prompt_tokens, r.output_tokens) for r in trace] == [
        (0.0, 4808, 10), (0.02, 110, 27), (0.052, 3180, 8), (60.02004, 7433, 14)]
    assert {r.category for r in trace} == {"code"} and "CC-BY-4.0" in trace.meta.licence
    assert parse_datetime_seconds("2024-05-10 00:00:01.5+00:00") - parse_datetime_seconds(
        "2024-05-10 02:00:00+02:00") == pytest.approx(1.5)


@pytest.mark.parametrize("row, column, words", [
    ("2023-11-16 18:17:05.1,12,x", "GeneratedTokens", "GeneratedTokens='x' must be an int"),
    ("2023-11-16 18:17:05.1,-4,3", "ContextTokens", "ContextTokens='-4' must be a positive int"),
    ("16/11/2023 18:17,12,3", "TIMESTAMP", "TIMESTAMP: '16/11/2023 18:17' is not a datetime"),
    ("2023-11-16 18:17:05.1,12", "GeneratedTokens", "row ends early"),
    ("2023-11-16 18:17:05.1,12,3,9", None, "more values than columns"),
])
def test_import_azure_malformed_row(tmp_path, row, column, words):
    path = _write(tmp_path / "az.csv", AZURE_CSV + row + "\n2023-11-16 18:19:00.0,5,5\n")
    with pytest.raises(TraceError) as info:
        import_azure(path)
    assert str(info.value).startswith(f"{path}:6: ") and words in str(info.value) and info.value.field == column
    kept = import_azure(path, on_error="skip")
    assert len(kept) == 5 and [e.line for e in kept.skipped] == [6]


def test_import_checks_column_names(tmp_path):
    path = _write(tmp_path / "az.csv", "TIMESTAMP,ContextTokens,OutputTokens\n2023-11-16 18:17:05,1,1\n")
    with pytest.raises(TraceError, match=r"az.csv:1: missing column\(s\) 'GeneratedTokens'"):
        import_azure(path)


def test_import_vidur(tmp_path):
    path = _write(tmp_path / "v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens,extra\n"
                  "0.5,100,20.0,a\n0.25,3000,7,b\n1.75,12,1,c\n")
    trace = import_vidur(path)
    assert [(r.arrival, r.prompt_tokens, r.output_tokens) for r in trace] == [(0.0, 3000, 7), (0.25, 100, 20),
                                                                               (1.5, 12, 1)]
    bad = _write(tmp_path / "b.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0.5,100,20\n0.6,100,0\n")
    with pytest.raises(TraceError, match=r"b.csv:3: num_decode_tokens='0' must be a positive int"):
        import_vidur(bad)
    lengths_only = _write(tmp_path / "l.csv", "num_prefill_tokens,num_decode_tokens\n100,20\n")
    with pytest.raises(TraceError, match="missing column.*'arrived_at'"):
        import_vidur(lengths_only)


MOONCAKE = "\n".join(json.dumps(r) for r in [
    {"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": [0, 1]},
    {"timestamp": 0, "input_length": 6472, "output_length": 26, "hash_ids": [2]},
    {"timestamp": 3000, "input_length": 1000, "output_length": 300, "hash_ids": [3]},
    {"timestamp": 3000, "input_length": 2000, "output_length": 100, "hash_ids": [4]},
    {"timestamp": 9000, "input_length": 512, "output_length": 1, "hash_ids": [5]},
]) + "\n"


def test_import_mooncake_keeps_arrivals_that_are_not_binned(tmp_path):
    """Mooncake's own synthetic traces have millisecond arrivals: jittering them would invent burstiness."""
    rows = [{"timestamp": t, "input_length": 10, "output_length": 5} for t in (0, 1234, 3000, 4517)]
    trace = import_mooncake(_write(tmp_path / "s.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n"), seed=7)
    assert [r.arrival for r in trace] == [0.0, 1.234, 3.0, 4.517]
    assert trace.meta.extra["binned"] is False and trace.meta.extra["jitter_s"] == 0.0


def test_import_mooncake_jitters_within_bins(tmp_path):
    path = _write(tmp_path / "m.jsonl", MOONCAKE)
    binned = import_mooncake(path, jitter_s=0)
    assert [r.arrival for r in binned] == [0.0, 0.0, 3.0, 3.0, 9.0]
    a, b, c = import_mooncake(path, seed=7), import_mooncake(path, seed=7), import_mooncake(path, seed=8)
    assert a.requests == b.requests and a.requests != c.requests
    assert a[0].arrival == 0.0 and a.meta.extra == {"jitter_s": 3.0, "jitter_seed": 7, "binned": True}
    # each request is its 3 s bin's start plus a uniform offset in [0, 3): the first arrival is then shifted to 0
    t = np.array([0.0, 0.0, 3.0, 3.0, 9.0]) + np.random.default_rng(7).uniform(0, 3, 5)
    expected = sorted(zip(np.round(t - t.min(), 6), [6955, 6472, 1000, 2000, 512]))
    assert [(r.arrival, r.prompt_tokens) for r in a] == [(pytest.approx(x, abs=1e-6), p) for x, p in expected]
    bad = _write(tmp_path / "bad.jsonl", MOONCAKE + '{"timestamp": 9000, "input_length": 5}\n')
    with pytest.raises(TraceError, match=r"bad.jsonl:6: missing field 'output_length'"):
        import_mooncake(bad)


BURSTGPT = """Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type
5,1,0.5,ChatGPT,472,18,490,Conversation log
45,2,1.0,ChatGPT,1087,0,1087,Conversation log
118,3,2.0,GPT-4,417,276,693,API log
90,4,0.7,ChatGPT,88,12,100,API log
"""


def test_import_burstgpt_drops_failed_rows(tmp_path):
    trace = import_burstgpt(_write(tmp_path / "b.csv", BURSTGPT))
    assert [(r.arrival, r.prompt_tokens, r.output_tokens) for r in trace] == [(0.0, 472, 18), (85.0, 88, 12),
                                                                               (113.0, 417, 276)]
    assert trace.meta.extra["dropped_failed"] == 1
    v2 = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n1.5,GPT-4,10,x,10,API log\n"
    with pytest.raises(TraceError, match=r"v2.csv:2: Response tokens='x' must be an int"):
        import_burstgpt(_write(tmp_path / "v2.csv", v2))
    assert import_trace("burstgpt", tmp_path / "b.csv").requests == trace.requests
    with pytest.raises(ValueError, match="unknown trace format 'splitwise'"):
        import_trace("splitwise", tmp_path / "b.csv")


@pytest.fixture(scope="module")
def azure_code() -> Trace:
    if not AZURE_CODE.is_file():
        pytest.skip(f"real Azure 2023 code trace not present at {AZURE_CODE} (../shared/data is outside the repo)")
    return import_azure(AZURE_CODE, category="code")


def test_real_azure_code_trace(azure_code):
    s = azure_code.stats()
    assert s.num_requests == 8819
    assert 3300 < s.duration_s < 3700  # about an hour (18:17:04 -> 19:14:20)
    assert s.rate == pytest.approx(2.57, abs=0.01)
    assert s.interarrival_cv == pytest.approx(13.2, abs=0.1)  # very bursty
    assert (s.prompt.p50, s.output.p50) == (1469, 13)
    assert s.prompt.mean == pytest.approx(2048, abs=1) and s.output.mean == pytest.approx(28, abs=0.5)


# ---- generator --------------------------------------------------------------------------------------------------
def test_generate_is_deterministic_per_seed(tmp_path):
    fit = PRESETS["chat"]
    a, b, c = generate(fit, 300, seed=5), generate(fit, 300, seed=5), generate(fit, 300, seed=6)
    assert a.requests == b.requests and a.requests != c.requests
    assert write_trace(tmp_path / "a.jsonl", a).read_bytes() == write_trace(tmp_path / "b.jsonl", b).read_bytes()
    assert len(a) == 300 and a[0].arrival == 0.0
    fast = generate(fit, 2000, rate=20.0, seed=1)
    assert fast.stats().rate == pytest.approx(20.0, rel=1e-4)  # the rate asked for, exactly
    bursty = TraceFit(**{**fit.__dict__, "interarrival_cv": 13.0})  # Azure-code burstiness
    exact, loose = generate(bursty, 3000, rate=5.0, seed=2), generate(bursty, 3000, rate=5.0, seed=2, exact_rate=False)
    assert exact.stats().rate == pytest.approx(5.0, rel=1e-4)
    assert exact.stats().interarrival_cv == pytest.approx(loose.stats().interarrival_cv, rel=1e-3)  # CV kept


def test_fit_recovers_gamma_burstiness_lengths_and_correlation():
    rng = np.random.default_rng(2024)
    n, k, rate, rho = 20_000, 0.5, 4.0, 0.5
    gaps = rng.gamma(shape=k, scale=1 / (k * rate), size=n - 1)
    arrivals = np.round(np.concatenate([[0.0], np.cumsum(gaps)]), 6)
    z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=n)
    prompt = np.maximum(np.rint(np.exp(np.log(800) + 1.0 * z[:, 0])), 1).astype(int)
    output = np.maximum(np.rint(np.exp(np.log(120) + 0.7 * z[:, 1])), 1).astype(int)
    cats = rng.choice(["chat", "code"], size=n, p=[0.7, 0.3])
    trace = Trace(tuple(Request(float(t), int(p), int(o), str(c)) for t, p, o, c in zip(arrivals, prompt, output, cats)))

    fit = fit_trace(trace)
    assert fit.interarrival_cv == pytest.approx(1 / math.sqrt(k), rel=0.1)
    assert fit.gamma_shape == pytest.approx(k, rel=0.2)
    assert fit.rate == pytest.approx(rate, rel=0.1)
    assert fit.prompt.median == pytest.approx(800, rel=0.1) and fit.output.median == pytest.approx(120, rel=0.1)
    assert fit.length_rho == pytest.approx(rho, abs=0.05)
    assert fit.categories == pytest.approx({"chat": 0.7, "code": 0.3}, abs=0.02)

    again = generate(fit, n, seed=9)  # and the generated trace has the same statistics
    s = again.stats()
    assert s.interarrival_cv == pytest.approx(1 / math.sqrt(k), rel=0.1)
    assert s.rate == pytest.approx(rate, rel=0.1)
    assert s.prompt.p50 == pytest.approx(800, rel=0.1) and s.output.p50 == pytest.approx(120, rel=0.1)
    assert s.prompt.p90 == pytest.approx(np.percentile(prompt, 90), rel=0.1)
    assert np.corrcoef(normal_scores(again.prompt_tokens), normal_scores(again.output_tokens))[0, 1] == \
        pytest.approx(rho, abs=0.05)
    assert s.categories["chat"] / n == pytest.approx(0.7, abs=0.02)


def test_fit_json_round_trip_and_errors(tmp_path, azure_code):
    fit = fit_trace(azure_code.head(2000))
    back = TraceFit.load(fit.save(tmp_path / "fit.json"))
    assert back == fit
    assert generate(back, 50, seed=3).requests == generate(fit, 50, seed=3).requests
    with pytest.raises(ValueError, match="not a trace fit"):
        TraceFit.from_dict({"kind": "something-else"})
    with pytest.raises(ValueError, match="at least 3 requests"):
        fit_trace(azure_code.head(2))
    with pytest.raises(ValueError, match="non-decreasing"):
        LengthDist((0.0, 0.5, 1.0), (1.0, 5.0, 3.0))


def test_shipped_traces_match_their_recipe():
    for name, trace in example_traces().items():
        shipped = read_trace(REPO / "traces" / f"{name}.jsonl")
        assert shipped.requests == trace.requests and shipped.meta == trace.meta, name
    shift = read_trace(REPO / "traces" / "shift_chat_code_math.jsonl")
    cats = [r.category for r in shift]
    assert cats == ["chat"] * 40 + ["code"] * 40 + ["math"] * 40
    code = shift.window(shift[40].arrival, shift[80].arrival).stats()
    chat = shift.head(40).stats()
    assert code.prompt.p50 > 2 * chat.prompt.p50 and code.output.p50 < chat.output.p50 / 2


# ---- CLI --------------------------------------------------------------------------------------------------------
def _trace_cli(argv: list[str]) -> int:
    from simulator.trace_cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_import_fit_generate_stats(tmp_path, capsys):
    raw = _write(tmp_path / "az.csv", AZURE_CSV + "2023-11-16 18:18:05.5,300,40\n2023-11-16 18:18:09,20,3\n")
    out = tmp_path / "az.jsonl"
    assert _trace_cli(["trace", "import", "azure", str(raw), "-o", str(out), "--category", "code"]) == 0
    assert len(read_trace(out)) == 6 and "6 requests" in capsys.readouterr().out
    assert _trace_cli(["trace", "fit", str(out), "-o", str(tmp_path / "fit.json")]) == 0
    gen = tmp_path / "gen.jsonl"
    assert _trace_cli(["trace", "generate", "--fit", str(tmp_path / "fit.json"), "--num-requests", "40",
                       "--rate", "5", "--seed", "3", "-o", str(gen)]) == 0
    g = read_trace(gen)
    assert len(g) == 40 and {r.category for r in g} == {"code"}
    assert _trace_cli(["trace", "generate", "--fit", "math", "--num-requests", "7", "-o", str(gen)]) == 0
    assert len(read_trace(gen)) == 7
    capsys.readouterr()
    assert _trace_cli(["trace", "stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert "inter-arrival CV" in text and "prompt" in text and "code 6" in text
    assert _trace_cli(["trace", "stats", str(raw), "--format", "azure"]) == 0


def test_cli_reports_bad_rows(tmp_path, capsys):
    raw = _write(tmp_path / "az.csv", AZURE_CSV + "2023-11-16 18:18:05.5,300,-2\n")
    assert _trace_cli(["trace", "import", "azure", str(raw), "-o", str(tmp_path / "o.jsonl")]) == 1
    assert f"{raw}:6: GeneratedTokens='-2' must be a positive int" in capsys.readouterr().err
    assert _trace_cli(["trace", "import", "azure", str(raw), "-o", str(tmp_path / "o.jsonl"), "--skip-bad"]) == 0
    assert "skipped 1 malformed line" in capsys.readouterr().out and len(read_trace(tmp_path / "o.jsonl")) == 4


def test_main_cli_has_trace_group(tmp_path, capsys):
    from sglang_ext.cli import main

    assert main(["trace", "stats", str(REPO / "traces" / "tiny_chat.jsonl")]) == 0
    assert "tiny_chat" in capsys.readouterr().out


def test_a_preset_name_is_not_shadowed_by_a_directory_of_that_name(tmp_path, monkeypatch):
    """`--fit chat` run where a directory `chat/` exists still means the preset (a directory is never a fit)."""
    (tmp_path / "chat").mkdir()
    monkeypatch.chdir(tmp_path)
    gen = tmp_path / "gen.jsonl"
    assert _trace_cli(["trace", "generate", "--fit", "chat", "--num-requests", "5", "-o", str(gen)]) == 0
    assert len(read_trace(gen)) == 5
