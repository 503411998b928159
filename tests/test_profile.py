"""`sglang-ext profile` (measured costs) and the cost model fitted to a profile (`sglang_ext.core.costs`)."""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from sglang_ext.core.costs import (
    MODEL_FORMAT,
    PROFILE_FORMAT,
    CostModel,
    ProfileError,
    load_profile,
    validate_profile,
)

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "traces" / "profiles"
TINY_GRID = dict(batch_sizes=(1, 2), tokens=(1, 3), context_lens=(8, 32), prefill_tokens=(4, 16), prefill_context_lens=(0, 8),
                 draft_depths=(1, 2), train_tokens=(16, 32), train_seq_len=16, repeats=2, warmup=1)


# ---- measuring ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_profile() -> dict:
    """A real (tiny, random-weight Llama) profile measured on this CPU with a tiny grid."""
    import torch

    from sglang_ext.engine.profile import ProfileGrid, run_profile
    from sglang_ext.models import tiny_llama

    torch.set_num_threads(1)
    return run_profile(tiny_llama(), name="tiny-llama", grid=ProfileGrid(**TINY_GRID), random_weights=True,
                       command="pytest", progress=False)


def test_profile_of_a_tiny_llama_is_valid_and_complete(tiny_profile):
    prof = validate_profile(tiny_profile, "tiny")
    assert prof["format"] == PROFILE_FORMAT
    # every grid point measured once, with positive, ordered statistics
    keys = {(r["batch_size"], r["tokens_per_request"], r["context_len"]) for r in prof["target"]}
    assert keys == {(b, t, c) for b in (1, 2) for t in (1, 3) for c in (8, 32)}
    assert {(r["batch_size"], r["depth"]) for r in prof["draft"]} == {(b, d) for b in (1, 2) for d in (1, 2)}
    assert sorted(r["tokens"] for r in prof["train"]) == [16, 32]
    assert {(r["tokens"], r["context_len"]) for r in prof["prefill"]} == {(p, c) for p in (4, 16) for c in (0, 8)}
    for r in prof["target"] + prof["prefill"] + prof["draft"] + prof["train"]:
        assert 0 < r["min_seconds"] <= r["seconds"] <= r["max_seconds"]
    meta = prof["meta"]
    assert meta["model"] == "tiny-llama" and meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["random_weights"] is True and meta["command"] == "pytest"
    assert meta["hardware"]["cpu_count"] >= 1 and meta["hardware"]["summary"]
    assert set(meta["versions"]) >= {"torch", "transformers", "sglang_ext"}
    arch = meta["architecture"]
    assert (arch["hidden_size"], arch["num_hidden_layers"], arch["num_key_value_heads"], arch["vocab_size"]) == (64, 2, 2, 128)
    assert re.match(r"\d{4}-\d\d-\d\dT", meta["date"])
    assert meta["engine"]["fast_forward"] is True  # the engine's own (fast) forward was measured
    assert meta["timing"] == {**meta["timing"], "statistic": "median", "repeats": 2, "warmup": 1}
    assert meta["drafter"]["kind"] == "eagle" and meta["train"]["ttt_steps"] == 3


def test_fit_report_on_a_real_tiny_profile(tiny_profile):
    model = CostModel.fit(tiny_profile)
    rep = model.fit_report()
    for name, points in (("verify", 8), ("prefill", 4), ("draft", 4), ("train", 2)):
        r = rep[name]
        assert r["points"] == points and r["structure"] in ("linear", "jump", "hinge", "hinge+jump", "knots")
        assert 0 <= r["mean_rel_error"] <= r["max_rel_error"] < math.inf, r  # timings of a ~1 ms model are noisy here
        assert all(v >= 0 for v in r["coefficients"].values()) and r["formula"]
    assert rep["source"]["model"] == "tiny-llama"
    assert "verify:" in model.describe() and "mean rel. error" in model.describe()
    # the fit reproduces the measured median within its reported max error
    for r in tiny_profile["target"]:
        pred = model.verify_seconds(r["batch_size"], r["tokens_per_request"], r["context_len"])
        assert abs(pred / r["seconds"] - 1) <= rep["verify"]["max_rel_error"] + 1e-9


# ---- fitting known costs -------------------------------------------------------------------------------------
def _true_verify(B, t, c):
    """A GPU-like cost: flat (memory-bound) to 24 batched tokens, then linear, plus KV reads."""
    n = B * t
    return 0.008 + 0.00005 * min(n, 24) + 0.0004 * max(n - 24, 0) + 2e-7 * B * c


def _synthetic_profile(verify=_true_verify, noise: float = 0.0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    jitter = (lambda: 1.0 + noise * rng.standard_normal()) if noise else (lambda: 1.0)
    target = [{"batch_size": B, "tokens_per_request": t, "context_len": c, "seconds": verify(B, t, c) * jitter()}
              for B in (1, 2, 4, 8, 16, 32) for t in (1, 2, 3, 4, 6, 8) for c in (0, 512, 2048)]
    draft = [{"batch_size": B, "depth": d, "seconds": (0.001 + 0.00002 * B + d * (0.002 + 0.0001 * B)) * jitter()}
             for B in (1, 2, 4, 8, 16, 32) for d in (1, 2, 4)]
    train = [{"tokens": N, "seconds": (0.05 + 2e-5 * N) * jitter()} for N in (512, 1024, 2048, 4096)]
    prefill = [{"tokens": P, "context_len": c, "seconds": _true_prefill(P, c) * jitter()}
               for P in (16, 64, 128, 256, 512, 1024) for c in (0, 1024, 4096)]
    return {"format": PROFILE_FORMAT, "meta": {"model": "synthetic", "hardware": "none"},
            "target": target, "prefill": prefill, "draft": draft, "train": train}


def _true_prefill(P, c):
    """Linear in the chunk plus quadratic causal attention and the prefix read."""
    return 0.01 + 0.0002 * P + 1e-8 * (P * c + P * (P + 1) / 2) + 1e-7 * c


def _check_monotone_in_n(model: CostModel) -> None:
    for B in (1, 2, 3, 8, 33):
        for c in (0, 700):
            costs = [model.verify_seconds(B, t, c) for t in range(1, 40)]
            assert all(b >= a for a, b in zip(costs, costs[1:])), (B, c)
    # as a function of n itself (t = 1), far past the measured range too
    costs = [model.verify_seconds(n, 1, 100) for n in range(1, 400)]
    assert all(b >= a for a, b in zip(costs, costs[1:]))


def test_fit_recovers_a_known_piecewise_linear_cost_within_2_percent():
    model = CostModel.fit(_synthetic_profile())
    assert model.verify.structure == "hinge" and model.verify.breakpoint == pytest.approx(24, abs=0.5)
    queries = [(B, t, c) for B in (1, 3, 5, 8, 12, 32, 48) for t in (1, 2, 5, 7, 8) for c in (0, 100, 1000, 3000)]
    worst = max(abs(model.verify_seconds(*q) / _true_verify(*q) - 1) for q in queries)  # off-grid and beyond it
    assert worst < 0.02
    assert model.fit_report()["verify"]["max_rel_error"] < 0.02
    for B, d in ((1, 1), (3, 2), (8, 3), (20, 5)):
        assert model.draft_seconds(B, d) == pytest.approx(0.001 + 0.00002 * B + d * (0.002 + 0.0001 * B), rel=0.02)
    assert model.draft_seconds(4, 0) == 0.0
    for N in (300, 1500, 8000):
        assert model.train_seconds(N) == pytest.approx(0.05 + 2e-5 * N, rel=0.02)
    for P, c in ((32, 0), (300, 2000), (512, 512), (2048, 8192)):
        assert model.prefill_seconds(P, c) == pytest.approx(_true_prefill(P, c), rel=0.02)
    _check_monotone_in_n(model)


def test_fit_finds_a_cpu_style_jump_and_averages_out_noise():
    def cpu_like(B, t, c):  # a GEMM kernel switch past 3 batched tokens: a step, then a gentler slope
        n = B * t
        return 0.040 + 0.002 * min(n, 3.5) + 0.012 * (n > 3.5) + 0.001 * max(n - 3.5, 0) + 4e-6 * B * c

    exact = CostModel.fit(_synthetic_profile(cpu_like))
    assert exact.verify.structure == "hinge+jump" and exact.verify.jump_at == 3.5 and 3 <= exact.verify.breakpoint <= 4
    assert exact.fit_report()["verify"]["max_rel_error"] < 0.02
    # 3 % measurement noise: the fit stays within 2 % of the noiseless truth on average
    noisy = CostModel.fit(_synthetic_profile(cpu_like, noise=0.03, seed=1))
    queries = [(B, t, c) for B in (1, 2, 4, 8, 16, 32) for t in (1, 2, 3, 4, 6, 8) for c in (0, 512, 2048)]
    errs = [abs(noisy.verify_seconds(*q) / cpu_like(*q) - 1) for q in queries]
    assert np.mean(errs) < 0.02 and max(errs) < 0.06
    _check_monotone_in_n(noisy)


def _epyc_like(B, t, c):
    """A 2-core EPYC's shape (measured): 2-3 batched tokens cost more than 4, then a gentle slope, plus KV reads."""
    n = B * t
    gemm = {1: 0.062, 2: 0.100, 3: 0.135}.get(n, 0.090 + 0.0033 * (n - 4))
    return gemm + 5e-6 * B * c


def test_knots_follow_a_cost_that_falls_from_3_to_4_batched_tokens():
    prof = _synthetic_profile(_epyc_like, noise=0.02, seed=3)
    model = CostModel.fit(prof)
    assert model.verify.structure == "knots"
    assert model.verify_seconds(1, 3, 256) > model.verify_seconds(1, 4, 256)  # what no monotone structure can say
    assert model.fit_report()["verify"]["max_rel_error"] < 0.08
    queries = [(B, t, c) for B in (1, 2, 3, 4, 8, 16) for t in (1, 2, 3, 4) for c in (0, 512, 2048)]
    assert max(abs(model.verify_seconds(*q) / _epyc_like(*q) - 1) for q in queries) < 0.06
    # the best monotone fit (what the model was before knots) misses the 3-token point by far more
    from sglang_ext.core.costs import VERIFY, fit_term

    monotone = fit_term(VERIFY, prof["target"], structures=("linear", "jump", "hinge", "hinge+jump"))
    assert monotone.max_rel_error > 2 * model.verify.max_rel_error
    # scalar and vectorised evaluation agree, and the curve is exact at every knot (noiseless)
    q = {"batch_size": np.array([1, 3, 5, 32]), "tokens_per_request": np.array([3, 1, 3, 8]),
         "context_len": np.array([0, 100, 700, 3000])}
    assert np.allclose(model.verify.predict(q), [model.verify_seconds(*x) for x in zip(*q.values())], rtol=1e-12)
    exact = CostModel.fit(_synthetic_profile(_epyc_like))
    assert exact.verify.structure == "knots" and exact.fit_report()["verify"]["max_rel_error"] < 1e-6


def test_knot_curve_ends_and_interpolation():
    from sglang_ext.core.costs import knot_curve

    knots, g = (1.0, 2.0, 4.0), (5.0, 9.0, 7.0)
    assert knot_curve(knots, g, 0.5) == 5.0  # flat below the first knot
    assert knot_curve(knots, g, 1.5) == pytest.approx(7.0) and knot_curve(knots, g, 3.0) == pytest.approx(8.0)
    assert knot_curve(knots, g, 40.0) == 7.0  # a falling last segment extrapolates flat, never lower
    assert knot_curve(knots, (5.0, 7.0, 9.0), 6.0) == pytest.approx(11.0)  # a rising one keeps its slope (1 per unit)


def test_knots_are_not_chosen_where_a_hinge_explains_the_data():
    for prof in (_synthetic_profile(), _synthetic_profile(noise=0.03, seed=1)):
        assert CostModel.fit(prof).verify.structure in ("hinge", "hinge+jump")


def test_knots_draft_curve_is_per_step_and_round_trips(tmp_path):
    def draft_cost(B, d):  # per-step cost slower at 2-3 requests than at 4 (the EPYC again)
        return 0.0008 + d * {1: 0.0073, 2: 0.0132, 3: 0.0178}.get(B, 0.011 + 0.0006 * (B - 4))

    prof = _synthetic_profile(_epyc_like)
    prof["draft"] = [{"batch_size": B, "depth": d, "seconds": draft_cost(B, d)} for B in (1, 2, 3, 4, 6, 8)
                     for d in (1, 2, 3)]
    model = CostModel.fit(prof)
    assert model.draft.structure == "knots"
    for B, d in ((1, 1), (3, 2), (5, 3), (8, 1)):
        assert model.draft_seconds(B, d) == pytest.approx(draft_cost(B, d), rel=1e-4)
    back = CostModel.load(model.save(tmp_path / "m.json"))
    assert back.to_dict() == model.to_dict() and back.draft.knots == model.draft.knots
    assert back.verify_seconds(3, 1, 500) == model.verify_seconds(3, 1, 500)
    bad = model.to_dict()
    bad["verify"]["knots"] = [4.0, 2.0]
    with pytest.raises(ProfileError, match=r"bad\.json: verify\.knots must be a non-empty increasing list"):
        CostModel.load(_write(tmp_path, bad, "bad.json"))
    bad = model.to_dict()
    del bad["verify"]["coefficients"]["at_n=3"]
    with pytest.raises(ProfileError, match=r"missing the curve's value at at_n=3"):
        CostModel.load(_write(tmp_path, bad, "bad.json"))


def test_from_table_for_hand_written_gpu_numbers():
    # SplitwiseSim perf_model.csv: Llama2-70B, 8xH100 TP8, decode 30.6 ms at batch 1 and 50.2 ms at batch 64
    model = CostModel.from_table(target=[(1, 1, 0, 0.0306), (64, 1, 0, 0.0502)], draft=[(1, 1, 0.004), (64, 1, 0.006)],
                                 model="llama2-70b", hardware="8x H100")
    assert model.verify_seconds(1, 1) == pytest.approx(0.0306, rel=1e-6)
    assert model.verify_seconds(64, 1) == pytest.approx(0.0502, rel=1e-6)
    assert 0.0306 < model.verify_seconds(16, 1) < 0.0502
    # draft entries of one depth are per-step times: d steps cost d times as much
    assert model.draft_seconds(1, 3) == pytest.approx(3 * 0.004, rel=1e-6)
    with pytest.raises(ValueError, match="no 'train' entries"):
        model.train_seconds(100)
    # no prefill entries: a prefill chunk is priced as the same forward through the verify formula
    assert model.prefill_seconds(8, 100) == model.verify_seconds(1, 8, 100) and model.prefill_seconds(0) == 0.0


def test_the_readme_example_profile_is_valid_and_fits():
    text = (PROFILES / "README.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, re.DOTALL)
    assert blocks, "traces/profiles/README.md should show a hand-written profile"
    model = CostModel.fit(json.loads(blocks[0]))
    assert model.verify_seconds(64, 1) == pytest.approx(0.0502, rel=1e-6)


# ---- files ----------------------------------------------------------------------------------------------------
def _write(tmp_path: Path, data, name: str = "p.json") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["target"][3].update(seconds=-0.1), r"p\.json: target\[3\]\.seconds must be > 0"),
    (lambda d: d["target"][3].update(seconds=float("nan")), r"p\.json: target\[3\]\.seconds must be > 0"),
    (lambda d: d["target"][0].pop("batch_size"), r"p\.json: target\[0\]\.batch_size is missing"),
    (lambda d: d["target"][1].update(tokens_per_request=True), r"p\.json: target\[1\]\.tokens_per_request must be an integer >= 1"),
    (lambda d: d["target"][2].update(context_len=-5), r"p\.json: target\[2\]\.context_len must be an integer >= 0"),
    (lambda d: d["draft"][1].update(depth=0), r"p\.json: draft\[1\]\.depth must be an integer >= 1"),
    (lambda d: d["prefill"][4].update(context_len=1.5), r"p\.json: prefill\[4\]\.context_len must be an integer >= 0"),
    (lambda d: d["train"][0].update(seconds="1"), r"p\.json: train\[0\]\.seconds must be > 0"),
    (lambda d: d["train"].__setitem__(1, [1, 2]), r"p\.json: train\[1\] must be an object"),
    (lambda d: d.update(draft={"batch_size": 1}), r"p\.json: draft must be a list"),
    (lambda d: d.update(format="other/2"), r"p\.json: format must be 'sglang-ext-profile/1'"),
    (lambda d: d["meta"].pop("model"), r"p\.json: meta\.model must be a non-empty string"),
    (lambda d: d["meta"].pop("hardware"), r"p\.json: meta\.hardware must be"),
])
def test_malformed_profiles_name_file_and_entry(tmp_path, mutate, message):
    data = _synthetic_profile()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError, match=message):
        load_profile(path)
    with pytest.raises(ProfileError, match=message):  # fitting a file validates it the same way
        CostModel.fit(path)


def test_unreadable_profiles_name_the_file(tmp_path):
    with pytest.raises(ProfileError, match=r"p\.json: invalid JSON at line 1 column"):
        load_profile(_write(tmp_path, "{not json"))
    with pytest.raises(ProfileError, match=r"missing\.json: cannot read"):
        load_profile(tmp_path / "missing.json")
    with pytest.raises(ProfileError, match=r"p\.json: top level must be a JSON object"):
        load_profile(_write(tmp_path, "[1, 2]"))


def test_fitted_model_json_round_trip(tmp_path):
    model = CostModel.fit(_synthetic_profile(noise=0.02))
    path = model.save(tmp_path / "costs.json")
    back = CostModel.load(path)
    assert json.loads(path.read_text())["format"] == MODEL_FORMAT
    assert back.to_dict() == model.to_dict()
    for q in ((1, 1, 0), (3, 4, 900), (40, 8, 4000)):
        assert back.verify_seconds(*q) == model.verify_seconds(*q)
    assert back.draft_seconds(5, 3) == model.draft_seconds(5, 3) and back.train_seconds(999) == model.train_seconds(999)
    assert back.prefill_seconds(300, 100) == model.prefill_seconds(300, 100)
    # the scalar evaluation is the vectorised formula the fit used
    q = {"batch_size": np.array([1, 3, 40]), "tokens_per_request": np.array([1, 4, 8]), "context_len": np.array([0, 900, 4000])}
    assert np.allclose(model.verify.predict(q), [model.verify_seconds(1, 1, 0), model.verify_seconds(3, 4, 900),
                                                 model.verify_seconds(40, 8, 4000)], rtol=1e-12)
    # a profile file given to `load` is fitted on load
    prof = _write(tmp_path, _synthetic_profile(), "prof.json")
    assert CostModel.load(prof).verify_seconds(4, 2, 100) == pytest.approx(CostModel.fit(prof).verify_seconds(4, 2, 100))
    # a broken cost-model file is named with the field at fault
    bad = model.to_dict()
    bad["verify"]["coefficients"]["const"] = -1.0
    with pytest.raises(ProfileError, match=r"bad\.json: verify\.coefficients\.const must be a finite number >= 0"):
        CostModel.load(_write(tmp_path, bad, "bad.json"))


def test_costs_module_does_not_import_torch():
    tree = ast.parse((ROOT / "sglang_ext" / "core" / "costs.py").read_text())
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert "torch" not in imported and "numpy" in imported


# ---- command line ---------------------------------------------------------------------------------------------
@pytest.fixture()
def tiny_config(tmp_path) -> Path:
    from sglang_ext.models import tiny_llama

    path = tmp_path / "tiny-arch.config.json"
    path.write_text(json.dumps(tiny_llama().config.to_dict(), default=str))
    return path


def _cli(*argv: str) -> int:
    from sglang_ext.cli import main

    return main(["profile", *argv])


def test_cli_profiles_a_config_with_random_weights_end_to_end(tmp_path, tiny_config, capsys):
    from sglang_ext.core.drafters.eagle_model import EagleConfig, EagleDraftModel
    from sglang_ext.models import tiny_llama

    # a drafter checkpoint whose architecture (feature layers, draft vocabulary) the profile must use
    cfg = EagleConfig.for_target(tiny_llama().config, [0, 1], draft_vocab_size=64)
    EagleDraftModel(cfg).save(tmp_path / "drafter")
    out = tmp_path / "prof" / "tiny.json"
    rc = _cli("--random-weights", "--config", str(tiny_config), "--draft-model-path", str(tmp_path / "drafter"),
              "--batch-sizes", "1,2", "--tokens", "1,2", "--context-lens", "4", "--draft-depths", "1",
              "--prefill-tokens", "4", "--prefill-context-lens", "0",
              "--train-tokens", "8", "--train-seq-len", "8", "--repeats", "1", "--warmup", "0", "--threads", "1",
              "--no-progress", "-o", str(out))
    assert rc == 0
    prof = load_profile(out)
    meta = prof["meta"]
    assert meta["model"] == "tiny-arch" and meta["random_weights"] is True
    assert meta["command"].startswith("sglang-ext profile --random-weights --config ")
    assert meta["drafter"]["feature_layers"] == [0, 1] and meta["drafter"]["draft_vocab_size"] == 64
    assert "random weights, architecture of" in meta["drafter"]["source"]
    assert len(prof["target"]) == 4 and len(prof["draft"]) == 2 and len(prof["train"]) == 1 and len(prof["prefill"]) == 1
    assert "wrote" in capsys.readouterr().out
    assert CostModel.load(out).verify_seconds(2, 2, 4) > 0
    # no checkpoint: a random EAGLE-3-style drafter shaped by the flags, draft part only
    rc = _cli("--random-weights", "--config", str(tiny_config), "--parts", "draft", "--feature-layers", "1",
              "--draft-vocab-size", "100", "--batch-sizes", "1", "--draft-depths", "1,3", "--context-lens", "4",
              "--repeats", "1", "--warmup", "0", "--no-progress", "-o", str(out))
    assert rc == 0
    prof = load_profile(out)  # a partial profile is valid; fitting it needs target entries
    assert prof["target"] == [] and prof["train"] == [] and prof["prefill"] == []
    with pytest.raises(ProfileError, match=r"tiny\.json: target must list at least one measured forward"):
        CostModel.fit(out)
    assert prof["meta"]["drafter"]["feature_layers"] == [1] and prof["meta"]["drafter"]["draft_vocab_size"] == 100
    assert [r["depth"] for r in sorted(prof["draft"], key=lambda r: r["depth"])] == [1, 3]


def test_cli_errors_name_the_flag(tmp_path, tiny_config, capsys):
    assert _cli("--config", str(tiny_config), "-o", str(tmp_path / "x.json")) == 2
    assert "--config needs --random-weights" in capsys.readouterr().err
    assert _cli("--random-weights", "--model-path", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.json")) == 2
    assert "--model-path" in capsys.readouterr().err
    assert _cli("--random-weights", "--config", str(tiny_config), "--parts", "target,bogus") == 2
    assert "--parts" in capsys.readouterr().err
    assert _cli("--random-weights", "--config", str(tiny_config), "--context-lens", "4096", "--parts", "target") == 2
    assert "--context-lens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli("--batch-sizes", "1,0")
    assert not (tmp_path / "x.json").exists()


# ---- shipped files --------------------------------------------------------------------------------------------
def test_llama_3_1_8b_config_builds_the_engine_path_without_weights():
    import torch

    from sglang_ext.engine.profile import config_from_dict, random_model
    from sglang_ext.engine.target import TargetModel

    cfg = config_from_dict(json.loads((PROFILES / "llama-3.1-8b.config.json").read_text()))
    model = random_model(cfg, torch.bfloat16, "meta")  # shapes only: no memory, no time
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(8.03e9, rel=1e-3)
    target = TargetModel(model)
    assert (target.num_layers, target.num_heads, target.num_kv_heads, target.head_dim) == (32, 32, 8, 128)
    assert target.use_fast_forward


def test_shipped_epyc_profile_fits_with_knots():
    """The EPYC VM's forwards are slower at 2-3 batched tokens than at 4: only the knots structure follows it."""
    prof = load_profile(PROFILES / "cpu-2core-epyc-1thread-smollm2-135m.json")
    assert prof["meta"]["hardware"]["torch_threads"] == 1 and "EPYC" in prof["meta"]["hardware"]["cpu"]
    model = CostModel.fit(prof)
    assert model.verify.structure == "knots" and model.draft.structure == "knots"
    assert model.verify_seconds(1, 3, 64) > model.verify_seconds(1, 4, 64)
    assert model.draft_seconds(3, 1) > model.draft_seconds(4, 1)
    assert model.fit_report()["verify"]["max_rel_error"] < 0.2 and model.fit_report()["draft"]["max_rel_error"] < 0.1


def test_shipped_cpu_profile_fits():
    path = PROFILES / "cpu-2core-smollm2-135m.json"
    if not path.is_file():
        pytest.skip(f"{path} not measured yet")
    prof = load_profile(path)
    assert prof["meta"]["model"] == "smollm2-135m" and prof["meta"]["random_weights"] is False
    model = CostModel.fit(prof)
    rep = model.fit_report()
    assert rep["verify"]["mean_rel_error"] < 0.12 and rep["draft"]["mean_rel_error"] < 0.12
    assert rep["prefill"]["mean_rel_error"] < 0.12 and model.prefill_seconds(512, 512) > model.prefill_seconds(512, 0)
    assert model.verify_seconds(8, 4, 1024) > model.verify_seconds(1, 1, 128) > 0
    assert math.isfinite(model.train_seconds(1024))


def test_a_cached_fit_answers_exactly_as_a_fresh_one_and_an_edited_profile_refits(tmp_path):
    """CostModel.fit_cached: the second call reads the cache (same predictions, same ranges); changing the profile's
    bytes changes the key; a bad profile still fails naming the file; an unusable cache is passed over."""
    from sglang_ext.core.costs import CostModel

    src = Path(__file__).resolve().parents[1] / "traces" / "profiles" / "cpu-2core-smollm2-135m.json"
    prof = tmp_path / "p.json"
    prof.write_bytes(src.read_bytes())
    cache = tmp_path / "fits"
    fresh = CostModel.fit(prof)
    first = CostModel.fit_cached(prof, cache)
    assert len(list(cache.glob("*.json"))) == 1
    again = CostModel.fit_cached(prof, cache)
    grid = [(b, t, c) for b in (1, 8, 64) for t in (1, 3, 9) for c in (0, 300, 2000)]
    for m in (first, again):
        assert [m.verify_seconds(*g) for g in grid] == [fresh.verify_seconds(*g) for g in grid]
        assert [m.draft_seconds(b, d) for b in (1, 8, 64) for d in (1, 4)] == \
               [fresh.draft_seconds(b, d) for b in (1, 8, 64) for d in (1, 4)]
        assert [m.prefill_seconds(t, c) for t in (16, 512, 4096) for c in (0, 1000)] == \
               [fresh.prefill_seconds(t, c) for t in (16, 512, 4096) for c in (0, 1000)]
        assert m.source == fresh.source
    data = json.loads(prof.read_text())
    data["target"] = data["target"][: len(data["target"]) // 2 + 1]
    prof.write_text(json.dumps(data))
    CostModel.fit_cached(prof, cache)
    assert len(list(cache.glob("*.json"))) == 2  # new bytes, new key: fitted again
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="bad.json"):
        CostModel.fit_cached(bad, cache)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory should be")
    assert CostModel.fit_cached(src, blocked).verify_seconds(8, 3, 300) == fresh.verify_seconds(8, 3, 300)
