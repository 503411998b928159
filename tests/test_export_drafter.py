"""`sglang-ext export-drafter`: our EAGLE drafter <-> SGLang's EAGLE3 checkpoint format.

The numerical test re-implements SGLang's ``LlamaForCausalLMEagle3`` forward (``sglang/srt/models/llama_eagle3.py``)
in plain torch from the *exported* tensors and config alone, and checks it against our ``EagleDraftModel`` driven by
our ``TargetModel`` features: the weight mapping, the aux-layer convention and the d2t id mapping together.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import require_module
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sglang_ext.core.drafters.eagle_model import EagleConfig, EagleDraftModel, target_identity
from sglang_ext.engine.target import TargetModel
from sglang_ext.models import tiny_llama
from sglang_ext.sglang_plugin.export import WEIGHT_MAP, export_eagle3, import_eagle3

FEATURE_LAYERS = [0, 1, 2]  # of a 4-layer target (the last one, 3, cannot be captured by SGLang)


# ---- fixtures -------------------------------------------------------------------------------------------
def _tied_tiny(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=0,
                      eos_token_id=1, rope_theta=5000.0)
    return LlamaForCausalLM(cfg).eval()


def _save_target(model, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _random_drafter(model, name: str, feature_layers=FEATURE_LAYERS, draft_vocab_size: int | None = 32,
                    seed: int = 1) -> EagleDraftModel:
    torch.manual_seed(seed)
    cfg = EagleConfig.for_target(model.config, feature_layers, draft_vocab_size, target_identity(name, model.config))
    drafter = EagleDraftModel(cfg)
    with torch.no_grad():
        for p in drafter.parameters():  # norms away from 1 and larger weights, so a wrong mapping shows
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 2 else 1.0) + (1.0 if p.ndim == 1 else 0.0))
    if draft_vocab_size is not None:
        drafter.set_draft_vocab(torch.randperm(model.config.vocab_size)[:draft_vocab_size])
    return drafter


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A 4-layer tiny target with its own LM head, saved as an HF dir, and a float32 drafter for it."""
    root = tmp_path_factory.mktemp("untied")
    model = tiny_llama(num_layers=4, seed=3)
    tdir = _save_target(model, root / "tiny-untied")
    drafter = _random_drafter(model, "tiny-untied")
    src = drafter.save(root / "drafter")
    return model, tdir, src


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tied-embedding target (as SmolLM2) and a bfloat16 drafter for it."""
    root = tmp_path_factory.mktemp("tied")
    model = _tied_tiny(seed=4)
    tdir = _save_target(model, root / "tiny-tied")
    drafter = _random_drafter(model, "tiny-tied", seed=5).to(torch.bfloat16)
    src = drafter.save(root / "drafter", extra={"training": {"note": "kept through a round trip"}})
    return model, tdir, src


# ---- a plain-torch SGLang LlamaForCausalLMEagle3 (one decoder layer, draft extend + one decode step) ----------
class Eagle3Reference:
    """Follows ``llama_eagle3.py``: fc on the aux states; input_layernorm(embeds) ; hidden_norm(hidden); attention
    with neox RoPE; residual = fc output; post_attention_layernorm(attn + residual); mlp; norm(mlp + residual);
    lm_head; draft id -> target id through ``d2t``. Reads nothing but the exported directory and the target's
    embedding (SGLang shares it via ``set_embed``)."""

    def __init__(self, directory: Path, embed: torch.Tensor) -> None:
        self.cfg = json.loads((directory / "config.json").read_text())
        self.w = load_file(str(directory / "model.safetensors"))
        self.embed = embed.float()
        c = self.cfg
        self.H, self.Hkv, self.D = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.cfg["rms_norm_eps"]) * self.w[name]

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # x [T, heads, D], neox style
        half = self.D // 2
        inv = 1.0 / (self.cfg["rope_theta"] ** (torch.arange(0, self.D, 2, dtype=torch.float32) / self.D))
        ang = positions.float()[:, None] * inv[None, :]  # [T, D/2]
        cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor):
        """``input_ids [T]``, ``hidden [T, 3d]`` (aux states) or ``[T, d]`` (own state), ``positions [T]`` ->
        (draft logits [T, V_d], aux state [T, d]). Appends to its KV cache (the first call starts it)."""
        w, d = self.w, self.cfg["hidden_size"]
        if hidden.shape[-1] != d:
            hidden = F.linear(hidden, w["fc.weight"])
        embeds = self.embed[input_ids]
        residual = hidden
        x = torch.cat([self.rms(embeds, "midlayer.input_layernorm.weight"),
                       self.rms(hidden, "midlayer.hidden_norm.weight")], dim=-1)
        T = x.shape[0]
        q = F.linear(x, w["midlayer.self_attn.q_proj.weight"]).view(T, self.H, self.D)
        k = F.linear(x, w["midlayer.self_attn.k_proj.weight"]).view(T, self.Hkv, self.D)
        v = F.linear(x, w["midlayer.self_attn.v_proj.weight"]).view(T, self.Hkv, self.D)
        q, k = self.rope(q, positions), self.rope(k, positions)
        past = 0 if self.k_cache is None else self.k_cache.shape[0]
        self.k_cache = k if self.k_cache is None else torch.cat([self.k_cache, k])
        self.v_cache = v if self.v_cache is None else torch.cat([self.v_cache, v])
        rep = self.H // self.Hkv
        kk = self.k_cache.repeat_interleave(rep, dim=1)  # [S, H, D]
        vv = self.v_cache.repeat_interleave(rep, dim=1)
        scores = torch.einsum("thd,shd->hts", q, kk) * self.D ** -0.5
        S = kk.shape[0]
        allowed = torch.arange(S)[None, :] <= (past + torch.arange(T))[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = torch.einsum("hts,shd->thd", scores.softmax(-1), vv).reshape(T, self.H * self.D)
        attn = F.linear(attn, w["midlayer.self_attn.o_proj.weight"])
        residual = attn + residual  # fused add + post_attention_layernorm
        h = self.rms(residual, "midlayer.post_attention_layernorm.weight")
        h = F.linear(F.silu(F.linear(h, w["midlayer.mlp.gate_proj.weight"])) * F.linear(h, w["midlayer.mlp.up_proj.weight"]),
                     w["midlayer.mlp.down_proj.weight"])
        aux = h + residual  # norm(hidden, residual): the pre-norm sum is the next step's hidden
        logits = F.linear(self.rms(aux, "norm.weight"), w["lm_head.weight"])
        return logits, aux

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.w["d2t"][draft_ids]  # hot_token_id = d2t + arange


def _causal_attend(past: list[tuple[torch.Tensor, torch.Tensor]]):
    """Our ``Attend`` (q, k, v -> [B, T, H*D]) over a growing KV list, causal within the new tokens."""
    def attend(q, k, v):
        if past:
            k, v = torch.cat([past[0][0], k], dim=2), torch.cat([past[0][1], v], dim=2)
            past[0] = (k, v)
        else:
            past.append((k, v))
        B, H, T, D = q.shape
        S = k.shape[2]
        rep = H // k.shape[1]
        mask = torch.arange(S)[None, :] <= (S - T + torch.arange(T))[:, None]
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
        return out.transpose(1, 2).reshape(B, T, H * D)
    return attend


def _check_numerics(model, src: Path, exported: Path, seq: list[int], atol: float = 1e-4) -> None:
    """Ours (TargetModel features -> EagleDraftModel) vs the EAGLE3 reference (HF hidden_states[i + 1])."""
    ours = EagleDraftModel.load(src).float()
    ours.bind_target(model.model.embed_tokens.weight.float(), model.lm_head.weight.float())
    ref = Eagle3Reference(exported, model.model.embed_tokens.weight.detach())
    layer_ids = ref.cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    S = len(seq)
    ids = torch.tensor([seq])
    with torch.no_grad():
        # our feature convention: TargetModel's feature_layers = decoder layer outputs
        target = TargetModel(model, feature_layers=tuple(ours.config.feature_layers))
        out = target.forward(target.new_cache(1, S), ids, torch.ones(S, S, dtype=torch.bool).tril().unsqueeze(0),
                             torch.arange(S).unsqueeze(0), hidden_only=True)
        # SGLang's: layer id i is captured at the input of layer i + 1 == HF hidden_states[i + 1]
        hs = model(ids, output_hidden_states=True).hidden_states
        aux = torch.cat([hs[i + 1] for i in layer_ids], dim=-1)[0].float()
        torch.testing.assert_close(out.features[0].float(), aux, atol=1e-5, rtol=1e-5)

        # step 1 (draft extend): pair h_t with x_{t+1}
        tokens, pos = ids[:, 1:], torch.arange(S - 1).unsqueeze(0)
        kv: list = []
        a = ours.layer(tokens, ours.project_features(out.features[:, :-1].float()), pos, _causal_attend(kv))
        ours_logits = ours.logits(a)[0]
        ref_logits, ref_aux = ref.forward(tokens[0], aux[:-1], pos[0])
        torch.testing.assert_close(ours_logits, ref_logits, atol=atol, rtol=1e-4)
        torch.testing.assert_close(a[0], ref_aux, atol=atol, rtol=1e-4)
        ours_next = ours.draft_vocab[ours_logits[-1].argmax()]
        ref_next = ref.to_target_ids(ref_logits[-1].argmax())
        assert int(ours_next) == int(ref_next)

        # step 2 (draft decode): the drafted token with the drafter's own state, one position further
        a2 = ours.layer(ours_next.view(1, 1), a[:, -1:], torch.tensor([[S - 1]]), _causal_attend(kv))
        ours2 = ours.logits(a2)[0]
        ref2, _ = ref.forward(ref_next.view(1), ref_aux[-1:], torch.tensor([S - 1]))
        torch.testing.assert_close(ours2, ref2, atol=atol, rtol=1e-4)
        assert int(ours.draft_vocab[ours2[-1].argmax()]) == int(ref.to_target_ids(ref2[-1].argmax()))
        # every draft index maps to the same target id both ways
        assert torch.equal(ref.to_target_ids(torch.arange(ours.draft_vocab.numel())), ours.draft_vocab)


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


# ---- tests ------------------------------------------------------------------------------------------------
def test_exported_eagle3_forward_matches_our_drafter(untied, tmp_path):
    model, tdir, src = untied
    out = export_eagle3(src, tmp_path / "eagle3", target_model_dir=tdir)
    _check_numerics(model, src, out, seq=[5, 17, 99, 3, 64, 120, 7, 42])


def test_tied_target_lm_head_is_the_embedding_rows(tied, tmp_path):
    model, tdir, src = tied
    out = export_eagle3(src, tmp_path / "eagle3", target_model_dir=tdir)
    w = load_file(str(out / "model.safetensors"))
    vocab = load_file(str(src / "model.safetensors"))["draft_vocab"]
    assert torch.equal(w["lm_head.weight"], model.model.embed_tokens.weight.detach()[vocab].float())
    assert w["fc.weight"].dtype == torch.float32  # bf16 weights up-cast (exactly)
    _check_numerics(model, src, out, seq=[9, 8, 70, 71, 2, 100])


def test_exported_layout(untied, tmp_path):
    model, tdir, src = untied
    out = export_eagle3(src, tmp_path / "eagle3", target_model_dir=tdir)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".eagle3*"))  # no temporary directory left behind
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == FEATURE_LAYERS
    assert (cfg["vocab_size"], cfg["draft_vocab_size"], cfg["tie_word_embeddings"]) == (128, 32, False)
    assert cfg["max_position_embeddings"] == 512 and (cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 1)
    assert cfg["sglang_ext"]["target"]["name"] == "tiny-untied"
    w = load_file(str(out / "model.safetensors"))
    assert set(w) == set(WEIGHT_MAP.values()) | {"lm_head.weight", "d2t", "t2d"}
    vocab = load_file(str(src / "model.safetensors"))["draft_vocab"]
    assert torch.equal(w["d2t"], vocab - torch.arange(32)) and w["d2t"].dtype == torch.int64
    assert w["t2d"].dtype == torch.bool and int(w["t2d"].sum()) == 32 and bool(w["t2d"][vocab].all())
    assert torch.equal(w["lm_head.weight"], model.lm_head.weight.detach()[vocab])
    # transformers reads the config as SGLang will (plain RoPE with the drafter's theta)
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(out)
    assert hf.draft_vocab_size == 32 and hf.rope_parameters["rope_type"] == "default"


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_round_trip_is_bit_exact(which, request, tmp_path):
    _, tdir, src = request.getfixturevalue(which)
    out = export_eagle3(src, tmp_path / "eagle3", target_model_dir=tdir)
    back = import_eagle3(out, tmp_path / "back")
    _assert_same_checkpoint(src, back)
    again = import_eagle3(out, tmp_path / "back2", target_model_dir=tdir)  # with the LM-head check
    _assert_same_checkpoint(src, again)
    EagleDraftModel.load(back)


def test_import_foreign_eagle3_checkpoint(untied, tmp_path):
    """An EAGLE3 dir without our block (``layers.0.`` names, as SGLang's params are spelled) imports given the target."""
    model, tdir, src = untied
    out = export_eagle3(src, tmp_path / "eagle3", target_model_dir=tdir)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["sglang_ext"]
    from safetensors.torch import save_file

    w = {k.replace("midlayer.", "layers.0."): v for k, v in load_file(str(out / "model.safetensors")).items()}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file(w, str(foreign / "model.safetensors"))
    (foreign / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="pass target_model_dir"):
        import_eagle3(foreign, tmp_path / "x")
    back = import_eagle3(foreign, tmp_path / "back", target_model_dir=tdir)
    a, b = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((back / "config.json").read_text())["target"] == target_identity("tiny-untied", model.config)
    # a separately trained draft LM head cannot live in our format
    w["lm_head.weight"] = w["lm_head.weight"] + 0.5
    save_file(w, str(foreign / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        import_eagle3(foreign, tmp_path / "y", target_model_dir=tdir)


def test_refuses_a_drafter_for_another_target(untied, tmp_path):
    _, _, src = untied
    other = tiny_llama(num_layers=6, seed=9)
    odir = _save_target(other, tmp_path / "tiny-untied")  # same name, different depth
    with pytest.raises(ValueError, match=r"num_hidden_layers=4.*num_hidden_layers=6") as e:
        export_eagle3(src, tmp_path / "out", target_model_dir=odir)
    assert str(src / "config.json") in str(e.value)
    renamed = _save_target(tiny_llama(num_layers=4, seed=3), tmp_path / "some-other-model")
    with pytest.raises(ValueError, match=r"name='tiny-untied'.*name='some-other-model'"):
        export_eagle3(src, tmp_path / "out", target_model_dir=renamed)
    with pytest.raises(ValueError, match=r"vocab_size=128.*vocab_size=999"):
        export_eagle3(src, tmp_path / "out", target_model_dir=renamed,
                      expect_target={"name": "tiny-untied", "vocab_size": 999})
    assert not (tmp_path / "out").exists()


def test_clear_errors(untied, tmp_path):
    model, tdir, src = untied
    with pytest.raises(FileNotFoundError, match="no such directory"):
        export_eagle3(tmp_path / "nope", tmp_path / "out", target_model_dir=tdir)
    exported = export_eagle3(src, tmp_path / "eagle3", target_model_dir=tdir)
    with pytest.raises(ValueError, match=r"config.json: architecture None is not an sglang-ext EAGLE drafter"):
        export_eagle3(exported, tmp_path / "out", target_model_dir=tdir)
    with pytest.raises(ValueError, match="is not 'LlamaForCausalLMEagle3'"):
        import_eagle3(src, tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{bad / 'config.json'}: invalid JSON"):
        export_eagle3(bad, tmp_path / "out", target_model_dir=tdir)
    with pytest.raises(FileExistsError, match="already exists"):
        export_eagle3(src, exported, target_model_dir=tdir)
    assert export_eagle3(src, exported, target_model_dir=tdir, overwrite=True) == exported
    for layers, what in (([0, 7, 2], "entry 7 is out of range for the 4-layer target"), ([0, 1, 3], "last layer")):
        d = _random_drafter(model, "tiny-untied", feature_layers=layers).save(tmp_path / f"d{layers[1]}")
        with pytest.raises(ValueError, match=what) as e:
            export_eagle3(d, tmp_path / "out", target_model_dir=tdir)
        assert str(d / "config.json") in str(e.value)
    # negative layer ids are normalised as TargetModel does
    d = _random_drafter(model, "tiny-untied", feature_layers=[0, -3, -2]).save(tmp_path / "dneg")
    cfg = json.loads((export_eagle3(d, tmp_path / "neg", target_model_dir=tdir) / "config.json").read_text())
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]


def test_full_vocabulary_drafter(untied, tmp_path):
    model, tdir, _ = untied
    src = _random_drafter(model, "tiny-untied", draft_vocab_size=None).save(tmp_path / "full")
    out = export_eagle3(src, tmp_path / "eagle3", target_model_dir=tdir)
    w = load_file(str(out / "model.safetensors"))
    assert w["lm_head.weight"].shape == (128, 64) and not w["d2t"].any()
    _assert_same_checkpoint(src, import_eagle3(out, tmp_path / "back"))


def test_cli(untied, tmp_path, capsys):
    from sglang_ext.cli import main

    _, tdir, src = untied
    out = tmp_path / "eagle3"
    assert main(["export-drafter", str(src), str(out), "--target-model-path", str(tdir)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'model.safetensors'}" in printed and f"wrote {out / 'config.json'}" in printed
    assert main(["export-drafter", str(src), str(out), "--target-model-path", str(tdir)]) == 1  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["export-drafter", str(src), str(out), "--target-model-path", str(tdir), "--force"]) == 0
    assert main(["export-drafter", str(out), str(tmp_path / "back"), "--to", "sglang-ext"]) == 0
    _assert_same_checkpoint(src, tmp_path / "back")
    assert main(["export-drafter", str(tmp_path / "missing"), str(tmp_path / "x"),
                 "--target-model-path", str(tdir)]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_sglang_load_weights_routes_every_exported_key(untied, tmp_path):
    """SGLang's own ``LlamaForCausalLMEagle3.load_weights`` run on the exported tensors.

    Instantiating the class needs SGLang's runtime context (parallel groups, server args), so ``self`` is a stand-in
    whose ``named_parameters()`` are the parameter names the class's modules create (read from llama_eagle3.py:
    ``model.fc``, ``model.layers.0.{input_layernorm,hidden_norm,post_attention_layernorm}``, fused
    ``self_attn.qkv_proj`` / ``mlp.gate_up_proj``, ``self_attn.o_proj``, ``mlp.down_proj``, ``model.norm``,
    ``lm_head``, ``model.embed_tokens``), each with a recording ``weight_loader``."""
    require_module("sglang")
    try:
        from sglang.srt.models.llama_eagle3 import LlamaForCausalLMEagle3
    except Exception as e:  # noqa: BLE001 - any import failure of the optional runtime
        pytest.skip(f"sglang.srt.models.llama_eagle3 does not import here: {e}")
    from types import SimpleNamespace

    _, tdir, src = untied
    out = export_eagle3(src, tmp_path / "eagle3", target_model_dir=tdir)
    names = ["model.embed_tokens.weight", "model.fc.weight", "model.layers.0.input_layernorm.weight",
             "model.layers.0.hidden_norm.weight", "model.layers.0.post_attention_layernorm.weight",
             "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.o_proj.weight",
             "model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight",
             "lm_head.weight"]
    calls: dict[str, list] = {n: [] for n in names}
    params = {}
    for n in names:
        p = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        p.weight_loader = (lambda n: lambda param, w, shard=None: calls[n].append((shard, tuple(w.shape))))(n)
        params[n] = p
    fake = SimpleNamespace(named_parameters=lambda: params.items(), hot_token_id=None)
    LlamaForCausalLMEagle3.load_weights(fake, load_file(str(out / "model.safetensors")).items())
    assert sorted(s for s, _ in calls["model.layers.0.self_attn.qkv_proj.weight"]) == ["k", "q", "v"]
    assert sorted(s for s, _ in calls["model.layers.0.mlp.gate_up_proj.weight"]) == [0, 1]
    assert calls["model.embed_tokens.weight"] == []  # shared from the target by set_embed
    assert all(len(calls[n]) == 1 for n in names if n not in (
        "model.embed_tokens.weight", "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"))
    assert calls["lm_head.weight"] == [(None, (32, 64))]
    assert torch.equal(fake.hot_token_id, load_file(str(src / "model.safetensors"))["draft_vocab"])


@pytest.mark.slow
def test_shipped_drafter_exports_for_real_smollm2(tmp_path):
    from sglang_ext.models import load_model

    src = Path(__file__).resolve().parents[1] / "drafters" / "smollm2-135m-eagle"
    out = export_eagle3(src, tmp_path / "eagle3-smollm2")  # target: the recorded name, through the model registry
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (576, 9, 3, 64)
    assert (cfg["vocab_size"], cfg["draft_vocab_size"], cfg["rope_theta"]) == (49152, 16384, 100000.0)
    assert (cfg["max_position_embeddings"], cfg["bos_token_id"], cfg["eos_token_id"]) == (8192, 1, 2)
    assert cfg["sglang_ext"]["target"]["name"] == "smollm2-135m"
    w = load_file(str(out / "model.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in w.items()}
    assert shapes == {
        "fc.weight": (576, 1728), "midlayer.input_layernorm.weight": (576,), "midlayer.hidden_norm.weight": (576,),
        "midlayer.self_attn.q_proj.weight": (576, 1152), "midlayer.self_attn.k_proj.weight": (192, 1152),
        "midlayer.self_attn.v_proj.weight": (192, 1152), "midlayer.self_attn.o_proj.weight": (576, 576),
        "midlayer.post_attention_layernorm.weight": (576,), "midlayer.mlp.gate_proj.weight": (1536, 576),
        "midlayer.mlp.up_proj.weight": (1536, 576), "midlayer.mlp.down_proj.weight": (576, 1536),
        "norm.weight": (576,), "lm_head.weight": (16384, 576), "d2t": (16384,), "t2d": (49152,)}
    _assert_same_checkpoint(src, import_eagle3(out, tmp_path / "back"))
    model, tokenizer, _ = load_model("smollm2-135m")
    assert torch.equal(w["lm_head.weight"], model.model.embed_tokens.weight.detach()[w["d2t"] + torch.arange(16384)])
    seq = tokenizer("The quick brown fox jumps over the lazy dog, and then")["input_ids"]
    _check_numerics(model, src, out, seq=seq, atol=2e-3)
