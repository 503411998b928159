"""The lossless core: pure torch, no server, no SGLang, no SimPy. Every host imports it; it imports no host.

The verification names below load on first use (PEP 562), so a host that needs only the torch-free parts (the
simulator: costs, policies, signals) does not pay torch's import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "verify_chain": ".chain", "verify_chain_tree": ".chain",
    "greedy_verify_fn": ".greedy", "verify_greedy_chain": ".greedy", "verify_greedy_tree": ".greedy",
    "NonFiniteLogitsError": ".processing", "SamplingParams": ".processing", "process_logits": ".processing",
    "RandomSource": ".random_source", "ScriptedRandomSource": ".random_source", "TorchRandomSource": ".random_source",
    "SCHEMES": ".tree", "DraftTree": ".tree", "VerifyResult": ".tree",
    "InvalidDraftError": ".tree_verify", "verify_tree": ".tree_verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
