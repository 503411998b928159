r"""Convert this project's EAGLE drafter (``architecture: "sglang-ext-eagle"``) to and from SGLang's EAGLE3 format.

SGLang 0.5.23 serves EAGLE3 drafters with ``LlamaForCausalLMEagle3`` (``sglang/srt/models/llama_eagle3.py``). Our
:class:`~sglang_ext.core.drafters.eagle_model.EagleDraftModel` is the same network, so the conversion is a renaming
plus two tensors that our checkpoint leaves to the target (the LM head rows and the draft->target id map):

============================  ============================================  ===========================================
ours (``model.safetensors``)  EAGLE3 (``model.safetensors``)                SGLang parameter it loads into
============================  ============================================  ===========================================
``fc.weight``                 ``fc.weight``                                 ``model.fc.weight``
``embed_norm.weight``         ``midlayer.input_layernorm.weight``           ``model.layers.0.input_layernorm.weight``
``feature_norm.weight``       ``midlayer.hidden_norm.weight``               ``model.layers.0.hidden_norm.weight``
``q_proj.weight``             ``midlayer.self_attn.q_proj.weight``          ``model.layers.0.self_attn.qkv_proj`` (q)
``k_proj.weight``             ``midlayer.self_attn.k_proj.weight``          ``model.layers.0.self_attn.qkv_proj`` (k)
``v_proj.weight``             ``midlayer.self_attn.v_proj.weight``          ``model.layers.0.self_attn.qkv_proj`` (v)
``o_proj.weight``             ``midlayer.self_attn.o_proj.weight``          ``model.layers.0.self_attn.o_proj.weight``
``post_norm.weight``          ``midlayer.post_attention_layernorm.weight``  ``model.layers.0.post_attention_layernorm``
``gate_proj.weight``          ``midlayer.mlp.gate_proj.weight``             ``model.layers.0.mlp.gate_up_proj`` (0)
``up_proj.weight``            ``midlayer.mlp.up_proj.weight``               ``model.layers.0.mlp.gate_up_proj`` (1)
``down_proj.weight``          ``midlayer.mlp.down_proj.weight``             ``model.layers.0.mlp.down_proj.weight``
``final_norm.weight``         ``norm.weight``                               ``model.norm.weight``
(target) LM head rows         ``lm_head.weight`` = ``W_lm[draft_vocab]``    ``lm_head.weight`` ``[V_d, d]``
``draft_vocab`` (int64)       ``d2t[i] = draft_vocab[i] - i`` (int64)       ``hot_token_id = d2t + arange``
``draft_vocab`` (int64)       ``t2d`` bool ``[vocab]``, True at draft ids   skipped by SGLang (standard file)
============================  ============================================  ===========================================

``W_lm`` is the target's ``lm_head.weight``, or ``model.embed_tokens.weight`` when the target ties its embeddings
(SmolLM2 does). The token embedding is not written: SGLang shares the target's (``set_embed``), as we do.

Feature layers: our ``feature_layers = [i, ...]`` are the *outputs* of target decoder layers ``i`` (0-based, before
the final norm; :class:`~sglang_ext.engine.target.TargetModel`). SGLang's ``eagle_aux_hidden_state_layer_ids`` use the
same convention: ``LlamaForCausalLM.set_eagle3_layers_to_capture`` captures at the *input* of layer ``i + 1`` (the
residual stream, i.e. layer ``i``'s output). So the ids are written unchanged (negative ones normalised), and the
last layer (``i = n - 1``) cannot be exported: SGLang never reaches a layer ``n`` to capture it.

Exported ``config.json``: ``LlamaForCausalLMEagle3``, one layer, the drafter's shapes, ``rope_theta`` of the drafter
with ``rope_scaling: null`` (our drafter applies plain RoPE whatever the target does), the target's vocabulary,
``max_position_embeddings`` and bos/eos/pad ids, ``torch_dtype: float32``: every tensor is written in float32 (the
drafter's bfloat16 weights up-cast exactly; the LM head rows at the target's precision). A ``sglang_ext`` block
records the source config, the source dtypes and the target identity, so :func:`import_eagle3` restores the
original checkpoint bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

OUR_ARCH = "sglang-ext-eagle"
EAGLE3_ARCH = "LlamaForCausalLMEagle3"
FORMAT_VERSION = 1

# ours -> EAGLE3 (the drafter-owned weights; lm_head / d2t / t2d are computed)
WEIGHT_MAP: dict[str, str] = {
    "fc.weight": "fc.weight",
    "embed_norm.weight": "midlayer.input_layernorm.weight",
    "feature_norm.weight": "midlayer.hidden_norm.weight",
    "q_proj.weight": "midlayer.self_attn.q_proj.weight",
    "k_proj.weight": "midlayer.self_attn.k_proj.weight",
    "v_proj.weight": "midlayer.self_attn.v_proj.weight",
    "o_proj.weight": "midlayer.self_attn.o_proj.weight",
    "post_norm.weight": "midlayer.post_attention_layernorm.weight",
    "gate_proj.weight": "midlayer.mlp.gate_proj.weight",
    "up_proj.weight": "midlayer.mlp.up_proj.weight",
    "down_proj.weight": "midlayer.mlp.down_proj.weight",
    "final_norm.weight": "norm.weight",
}
IDENTITY_KEYS = ("name", "architecture", "hidden_size", "num_hidden_layers", "vocab_size")


# ---- reading ----------------------------------------------------------------------------------------------
def _read_config(directory: Path, what: str) -> dict[str, Any]:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory ({what})")
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing ({what})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return cfg


def _weights_file(directory: Path) -> Path:
    path = directory / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    return path


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from e


def resolve_target(name_or_dir: str | os.PathLike) -> tuple[Path, str]:
    """``(HF directory, registered name)`` for a registered model name (provisioned on first use) or a directory.

    A directory that is the cache of a registered model maps back to that name (as ``launch.load_target`` does);
    any other directory is named by its basename.
    """
    from sglang_ext.models import MODELS, fetch_model, model_dir

    text = str(name_or_dir)
    if text in MODELS:
        return fetch_model(text), text
    path = Path(text).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{text}: neither a registered model ({', '.join(sorted(MODELS))}) nor a directory")
    resolved = path.resolve()
    name = next((n for n in MODELS if model_dir(n).resolve() == resolved), resolved.name)
    return path, name


def target_identity_of(target_dir: Path, name: str) -> dict[str, Any]:
    """The identity a drafter checkpoint records (``eagle_model.target_identity``), from the target's config.json."""
    from types import SimpleNamespace

    from sglang_ext.core.drafters.eagle_model import target_identity

    cfg = _read_config(target_dir, "target model")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "vocab_size") if k not in cfg]
    if missing:
        raise ValueError(f"{target_dir / 'config.json'}: missing {missing[0]!r}")
    return target_identity(name, SimpleNamespace(architectures=cfg.get("architectures"), **{
        k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}))


def check_target(recorded: dict[str, Any], expected: dict[str, Any], where: Path) -> None:
    """Refuse a drafter trained for another target: every key both identities have must agree."""
    for key in IDENTITY_KEYS:
        if key in recorded and key in expected and recorded[key] != expected[key]:
            raise ValueError(f"{where}: drafter was trained for target {key}={recorded[key]!r}, "
                             f"but the target model has {key}={expected[key]!r}")


def _lm_head_rows(target_dir: Path, tcfg: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
    """``W_lm[rows]`` from the target's safetensors (one file or an index of shards); tied -> the embedding."""
    from safetensors import safe_open

    tied = bool(tcfg.get("tie_word_embeddings", False))
    names = ["model.embed_tokens.weight"] if tied else ["lm_head.weight"]
    index = target_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from e
        files = {n: target_dir / weight_map[n] for n in names if n in weight_map}
    else:
        single = target_dir / "model.safetensors"
        if not single.is_file():
            raise FileNotFoundError(f"{single}: missing (the target's weights; the LM head is read from them)")
        with safe_open(str(single), "pt") as f:
            files = {n: single for n in names if n in f.keys()}
    if not files:
        raise ValueError(f"{target_dir}: no {names[0]!r} in the target's safetensors "
                         f"(tie_word_embeddings={tied})")
    name, path = next(iter(files.items()))
    with safe_open(str(path), "pt") as f:
        weight = f.get_tensor(name)
    if weight.shape[0] != tcfg["vocab_size"]:
        raise ValueError(f"{path}: {name} has {weight.shape[0]} rows, config.json says vocab_size {tcfg['vocab_size']}")
    return weight[rows].contiguous()


def _check_feature_layers(layers: list[int], num_layers: int, where: Path) -> list[int]:
    out = []
    for i in layers:
        if not -num_layers <= i < num_layers:
            raise ValueError(f"{where}: feature_layers entry {i} is out of range for the {num_layers}-layer target")
        j = i % num_layers
        if j == num_layers - 1:
            raise ValueError(f"{where}: feature_layers entry {i} is the target's last layer; SGLang captures layer "
                             f"i's output at the input of layer i+1, so it cannot capture the last one")
        out.append(j)
    return out


# ---- writing ----------------------------------------------------------------------------------------------
def _write_atomically(out: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], overwrite: bool) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into a temporary sibling directory, then rename it to ``out``."""
    from safetensors.torch import save_file

    out = Path(out).expanduser()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: already exists (remove it, or pass overwrite=True / --force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif old is not None:
            old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---- ours -> EAGLE3 ---------------------------------------------------------------------------------------
def export_eagle3(src: str | os.PathLike, out: str | os.PathLike, *, target_model_dir: str | os.PathLike | None = None,
                  expect_target: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``src`` (our drafter checkpoint) as an SGLang EAGLE3 checkpoint at ``out``; returns ``out``.

    ``target_model_dir``: the target's HF directory or registered name (default: the name the drafter records,
    provisioned through :mod:`sglang_ext.models`); its LM head supplies ``lm_head.weight``.
    ``expect_target``: the identity to require (default: that of ``target_model_dir``, see :func:`check_target`).
    """
    src = Path(src).expanduser()
    meta = _read_config(src, "drafter checkpoint")
    cfg_path = src / "config.json"
    if meta.get("architecture") != OUR_ARCH:
        raise ValueError(f"{cfg_path}: architecture {meta.get('architecture')!r} is not an sglang-ext EAGLE drafter "
                         f"({OUR_ARCH!r})")
    required = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "feature_dim",
                "vocab_size", "feature_layers")
    for key in required:
        if key not in meta:
            raise ValueError(f"{cfg_path}: missing {key!r}")
    recorded = dict(meta.get("target") or {})
    if target_model_dir is None:
        if not recorded.get("name"):
            raise ValueError(f"{cfg_path}: records no target name; pass target_model_dir (--target-model-path)")
        target_model_dir = recorded["name"]
    tdir, tname = resolve_target(target_model_dir)
    tcfg = _read_config(tdir, "target model")
    expected = expect_target if expect_target is not None else target_identity_of(tdir, tname)
    check_target(recorded, expected, cfg_path)
    for key, ours in (("hidden_size", "hidden_size"), ("vocab_size", "vocab_size")):
        if tcfg.get(key) != meta[ours]:
            raise ValueError(f"{cfg_path}: {ours}={meta[ours]!r}, but {tdir / 'config.json'} has {key}={tcfg.get(key)!r}")
    layers = _check_feature_layers(list(meta["feature_layers"]), int(tcfg["num_hidden_layers"]), cfg_path)
    if meta["feature_dim"] != meta["hidden_size"] * len(layers):
        raise ValueError(f"{cfg_path}: feature_dim {meta['feature_dim']} != hidden_size x {len(layers)} feature layers")

    weights_path = _weights_file(src)
    state = _load_tensors(weights_path)
    missing = [k for k in WEIGHT_MAP if k not in state]
    if missing:
        raise ValueError(f"{weights_path}: missing {missing[0]!r}")
    unknown = sorted(set(state) - set(WEIGHT_MAP) - {"draft_vocab"})
    if unknown:
        raise ValueError(f"{weights_path}: unexpected tensor {unknown[0]!r}")
    vocab = int(meta["vocab_size"])
    draft_vocab = state.get("draft_vocab")
    if draft_vocab is None:
        draft_vocab = torch.arange(vocab)
    draft_vocab = draft_vocab.to(torch.long)
    if draft_vocab.ndim != 1 or (draft_vocab.numel() and (int(draft_vocab.min()) < 0 or int(draft_vocab.max()) >= vocab)):
        raise ValueError(f"{weights_path}: draft_vocab must be 1-D target ids in [0, {vocab})")
    if torch.unique(draft_vocab).numel() != draft_vocab.numel():
        raise ValueError(f"{weights_path}: draft_vocab repeats a token id")

    tensors = {WEIGHT_MAP[k]: state[k].to(torch.float32) for k in WEIGHT_MAP}
    tensors["lm_head.weight"] = _lm_head_rows(tdir, tcfg, draft_vocab).to(torch.float32)
    tensors["d2t"] = draft_vocab - torch.arange(draft_vocab.numel())
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[draft_vocab] = True
    tensors["t2d"] = t2d

    config: dict[str, Any] = {
        "architectures": [EAGLE3_ARCH], "model_type": "llama", "num_hidden_layers": 1,
        "hidden_size": meta["hidden_size"], "intermediate_size": meta["intermediate_size"],
        "num_attention_heads": meta["num_heads"], "num_key_value_heads": meta["num_kv_heads"],
        "head_dim": meta["head_dim"], "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "rms_norm_eps": meta.get("rms_norm_eps", 1e-5), "rope_theta": meta.get("rope_theta", 10000.0),
        "rope_scaling": None, "max_position_embeddings": tcfg.get("max_position_embeddings", 8192),
        "vocab_size": vocab, "draft_vocab_size": int(draft_vocab.numel()), "tie_word_embeddings": False,
        "bos_token_id": tcfg.get("bos_token_id"), "eos_token_id": tcfg.get("eos_token_id"),
        "pad_token_id": tcfg.get("pad_token_id"), "torch_dtype": "float32",
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": layers, "use_aux_hidden_state": True},
        "sglang_ext": {
            "format_version": FORMAT_VERSION, "source": str(src.resolve()), "source_config": meta,
            "source_dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()},
            "target": expected, "target_model_dir": str(Path(tdir).resolve()),
            "target_rope": tcfg.get("rope_parameters") or tcfg.get("rope_scaling"),
        },
    }
    return _write_atomically(Path(out), tensors, config, overwrite)


# ---- EAGLE3 -> ours ---------------------------------------------------------------------------------------
def _canonical_eagle3_name(name: str) -> str:
    name = name.removeprefix("model.")
    return "midlayer." + name.removeprefix("layers.0.") if name.startswith("layers.0.") else name


def import_eagle3(src: str | os.PathLike, out: str | os.PathLike, *, target_model_dir: str | os.PathLike | None = None,
                  overwrite: bool = False) -> Path:
    """Write an SGLang EAGLE3 checkpoint whose shapes fit :class:`EagleDraftModel` in our format; returns ``out``.

    ``draft_vocab = arange + d2t``. Our format takes the LM head from the target, so ``lm_head.weight`` must be
    the target's rows of the draft vocabulary: checked against ``target_model_dir`` when given (required for a
    checkpoint that this module did not export). A checkpoint exported by :func:`export_eagle3` comes back bit for
    bit (config and weights, in their original dtypes).
    """
    src = Path(src).expanduser()
    cfg = _read_config(src, "EAGLE3 checkpoint")
    cfg_path = src / "config.json"
    if EAGLE3_ARCH not in (cfg.get("architectures") or []):
        raise ValueError(f"{cfg_path}: architectures {cfg.get('architectures')!r} is not {EAGLE3_ARCH!r}")
    if cfg.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"{cfg_path}: num_hidden_layers={cfg.get('num_hidden_layers')!r}; our drafter has one layer")
    for flag in ("fc_norm", "use_aux_norm", "norm_before_fc", "target_hidden_size"):
        if cfg.get(flag) or (cfg.get("eagle_config") or {}).get(flag):
            raise ValueError(f"{cfg_path}: {flag!r} is set; our drafter has no such part")
    if cfg.get("tie_word_embeddings"):
        raise ValueError(f"{cfg_path}: tie_word_embeddings=true; expected an own draft LM head")
    ours = cfg.get("sglang_ext") or {}
    weights_path = _weights_file(src)
    raw = _load_tensors(weights_path)
    state = {_canonical_eagle3_name(k): v for k, v in raw.items()}
    state.pop("embed_tokens.weight", None)  # the target's embedding (shared at serve time; ours binds it too)
    back = {v: k for k, v in WEIGHT_MAP.items()}
    missing = [k for k in [*back, "d2t"] if k not in state]
    if missing:
        raise ValueError(f"{weights_path}: missing {missing[0]!r}")
    unknown = sorted(set(state) - set(back) - {"d2t", "t2d", "lm_head.weight"})
    if unknown:
        raise ValueError(f"{weights_path}: tensor {unknown[0]!r} has no counterpart in our drafter")

    d2t = state["d2t"].to(torch.long)
    draft_vocab = torch.arange(d2t.numel()) + d2t
    if "source_config" in ours:
        meta = dict(ours["source_config"])
    else:
        layers = list((cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") or [])
        if not layers:
            raise ValueError(f"{cfg_path}: missing 'eagle_config.eagle_aux_hidden_state_layer_ids'")
        d = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"{cfg_path}: rope type {rope.get('rope_type', rope.get('type'))!r}; our drafter "
                             "applies plain RoPE")
        full = d2t.numel() == int(cfg["vocab_size"]) and not bool(d2t.any())
        meta = {"architecture": OUR_ARCH, "hidden_size": d, "num_heads": heads,
                "num_kv_heads": int(cfg.get("num_key_value_heads", heads)),
                "head_dim": int(cfg.get("head_dim") or d // heads), "intermediate_size": int(cfg["intermediate_size"]),
                "feature_dim": d * len(layers), "vocab_size": int(cfg["vocab_size"]),
                "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-5)),
                "rope_theta": float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                "feature_layers": layers, "draft_vocab_size": None if full else int(d2t.numel()), "target": {}}
    if target_model_dir is not None:
        tdir, tname = resolve_target(target_model_dir)
        tcfg = _read_config(tdir, "target model")
        identity = target_identity_of(tdir, tname)
        check_target(meta.get("target") or {}, identity, cfg_path)
        if not meta.get("target"):
            meta["target"] = identity
        _check_feature_layers(list(meta["feature_layers"]), int(tcfg["num_hidden_layers"]), cfg_path)
        if "lm_head.weight" in state:
            want = _lm_head_rows(tdir, tcfg, draft_vocab).to(torch.float32)
            have = state["lm_head.weight"].to(torch.float32)
            if have.shape != want.shape or not torch.allclose(have, want, rtol=1e-2, atol=1e-3):
                raise ValueError(f"{weights_path}: lm_head.weight is not the target's LM head rows of the draft "
                                 "vocabulary (a separately trained head); our format cannot hold it")
    elif "source_config" not in ours:
        raise ValueError(f"{cfg_path}: not exported by sglang-ext; pass target_model_dir to check its LM head")

    dtypes = ours.get("source_dtypes") or {}
    out_state: dict[str, torch.Tensor] = {}
    for eagle_name, our_name in back.items():
        t = state[eagle_name]
        want = dtypes.get(our_name)
        out_state[our_name] = t.to(getattr(torch, want)) if want else t
    out_state["draft_vocab"] = draft_vocab

    # shape check: build the model from the config and load the state strictly
    from sglang_ext.core.drafters.eagle_model import EagleConfig, EagleDraftModel

    fields = EagleConfig.__dataclass_fields__
    try:
        model = EagleDraftModel(EagleConfig(**{k: v for k, v in meta.items() if k in fields}))
        model.load_state_dict({**model.state_dict(), **out_state}, strict=True)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{weights_path}: does not fit our drafter ({e})") from e
    return _write_atomically(Path(out), out_state, meta, overwrite)


__all__ = ["EAGLE3_ARCH", "OUR_ARCH", "WEIGHT_MAP", "check_target", "export_eagle3", "import_eagle3",
           "resolve_target", "target_identity_of"]
