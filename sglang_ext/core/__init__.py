"""The lossless core: pure torch, no server, no SGLang, no SimPy. Every host imports it; it imports no host."""

from .chain import verify_chain, verify_chain_tree
from .greedy import greedy_verify_fn, verify_greedy_chain, verify_greedy_tree
from .processing import NonFiniteLogitsError, SamplingParams, process_logits
from .random_source import RandomSource, ScriptedRandomSource, TorchRandomSource
from .tree import SCHEMES, DraftTree, VerifyResult
from .tree_verify import InvalidDraftError, verify_tree

__all__ = [
    "SCHEMES", "DraftTree", "InvalidDraftError", "NonFiniteLogitsError", "RandomSource", "SamplingParams",
    "ScriptedRandomSource", "TorchRandomSource", "VerifyResult", "greedy_verify_fn", "process_logits",
    "verify_chain", "verify_chain_tree", "verify_greedy_chain", "verify_greedy_tree", "verify_tree",
]
