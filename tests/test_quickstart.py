"""`sglang-ext --quick` end to end on a tiny random model (SmolLM2's tokenizer) and a tiny trace: every step runs,
the report's files exist and its numbers are the run's own; an interrupt after a step resumes from there; a run
directory written with other settings is refused; a bad step list is refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sglang_ext.cli import main
from sglang_ext.quickstart import steps as qs_steps
from sglang_ext.quickstart.settings import QUICK, STEPS, Settings

pytestmark = pytest.mark.slow  # needs the provisioned model's tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer, saved as a Hugging Face directory."""
    from conftest import require_model

    require_model("smollm2-135m", "tokenizer")
    from transformers import AutoTokenizer

    from sglang_ext.models.provision import model_dir
    from sglang_ext.models.tiny import tiny_llama

    tok = AutoTokenizer.from_pretrained(model_dir("smollm2-135m"))
    d = tmp_path_factory.mktemp("tiny-smol")
    model = tiny_llama(vocab_size=len(tok), hidden_size=64, num_layers=2, max_positions=1024, seed=5)
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("trace") / "tiny.jsonl"
    rows = [{"trace": {"name": "tiny", "source": "test", "licence": "Apache-2.0 (self-made)", "time_unit": "s"}}]
    cats = ["chat", "chat", "code", "code", "math", "math", "chat", "code", "math", "chat"]
    rows += [{"arrival": 0.5 * i, "prompt_tokens": 20 + 7 * i, "output_tokens": 6 + i, "category": c}
             for i, c in enumerate(cats)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def _args(tiny_dir: Path, trace: Path, out: Path, *extra: str) -> list[str]:
    return ["--quick", "--prompts", "builtin", "--model-path", str(tiny_dir), "--trace", str(trace), "--out", str(out),
            *extra]


def test_quickstart_interrupt_resume_and_report(tiny_dir, tiny_trace, tmp_path, monkeypatch):
    out = tmp_path / "report"

    def interrupted(ctx):
        raise KeyboardInterrupt

    # 1. Ctrl-C during `serve`: provision and profile are kept, nothing of serve is recorded
    monkeypatch.setitem(qs_steps.STEP_FUNCTIONS, "serve", interrupted)
    assert main(_args(tiny_dir, tiny_trace, out)) == 130
    state = json.loads((out / "state.json").read_text())
    assert list(state["steps"]) == ["provision", "profile"]
    profile_done = state["steps"]["profile"]["finished"]
    profile_bytes = (out / "profile.json").read_bytes()
    monkeypatch.undo()

    # 2. the same command resumes: the finished steps are not run again
    assert main(_args(tiny_dir, tiny_trace, out)) == 0
    state = json.loads((out / "state.json").read_text())
    assert list(state["steps"]) == list(STEPS)
    assert state["steps"]["profile"]["finished"] == profile_done
    assert (out / "profile.json").read_bytes() == profile_bytes
    for f in ("report.md", "report.html", "deploy.sh", "tuned-policy.json", "profile.json", "acceptance.png",
              "latency_vs_load.png", "tuning.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f

    # 3. the report's numbers are the run's: the profile it quotes is the written profile, the tables are the
    # steps' records, and the tuned config is the one written
    from sglang_ext.core.costs import CostModel
    from sglang_ext.engine.profile import summary_line

    md = (out / "report.md").read_text()
    prof = json.loads((out / "profile.json").read_text())
    assert summary_line(prof) in md
    sim = json.loads((out / "step-simulate.json").read_text())
    s = QUICK
    cost = CostModel.fit(out / "profile.json")
    assert sim["decode_step_s"] == pytest.approx(cost.verify_seconds(s.batch, 1, s.max_trace_prompt // 2))
    assert f"{1e3 * sim['slo_tpot_s']:.0f} ms" in md
    off = next(r for r in sim["rows"] if r["policy"] == "off" and r["load"] == s.tune_load)
    assert sim["slo_tpot_s"] == off["tpot_p90_s"]  # the default SLO: no worse than speculation off
    chk = json.loads((out / "step-check.json").read_text())
    assert chk["verdict"]["greedy_identical"] is True
    for arm in chk["arms"]:
        assert re.search(rf"\| {arm['arm']} \| {arm['median_tok_s']:.2f} \|", md), arm["arm"]
    assert f"{chk['verdict']['tuned_vs_defaults']:.3f}×" in md
    tuned = json.loads((out / "tuned-policy.json").read_text())
    assert tuned["policy"] == sim["best_policy"]
    assert {k: tuned["params"][k] for k in sim["tune"]["params"]} == sim["tune"]["params"]
    serve = json.loads((out / "step-serve.json").read_text())
    assert serve["summary"]["greedy_identity"] and set(serve["summary"]["segments"]) == {"chat", "code", "math"}
    assert str(out / "tuned-policy.json") in (out / "deploy.sh").read_text()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<table>" in html

    # 4. a finished run is all reuse; other settings in the same directory are refused, naming what differs
    assert main(_args(tiny_dir, tiny_trace, out, "--steps", "report")) == 0
    assert main(_args(tiny_dir, tiny_trace, out, "--seed", "3")) == 2


def test_bad_steps_and_settings_key(tmp_path, monkeypatch):
    with pytest.raises(SystemExit):
        main(["--steps", "profile,nonsense", "--out", "/nonexistent"])
    # options before anything else are the quickstart's, even when a value is also a subcommand's name
    seen = []
    monkeypatch.setattr("sglang_ext.quickstart.run", lambda args, console=None: seen.append(args.steps) or 0)
    assert main(["--steps", "profile", "--out", str(tmp_path)]) == 0 and seen == [("profile",)]
    a, b = Settings(), Settings(seed=1)
    assert a.key() != b.key() and "seed: 0 -> 1" in b.differences(a.to_json())
