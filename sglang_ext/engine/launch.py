"""Build a reference :class:`Engine` from SGLang-named command-line flags.

The flags keep SGLang 0.5.23's names and meanings (``--model-path``, ``--speculative-algorithm``,
``--speculative-num-steps`` ...), so a launch line written for ``python -m sglang.launch_server`` works here
with the same speculative settings. Defaults differ where SGLang's are GPU-sized; the help texts say so.

Errors name the flag that caused them (:class:`LaunchError`), and every check that needs no model runs
before the model loads, so a typo costs milliseconds, not a model load.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sglang_ext.flags import FlagError, add_policy_args, online_config_from_args, parse_param
from sglang_ext.flags import add_online_args as add_online_flags
from sglang_ext.flags import policy_from_args as flag_policy_from_args

if TYPE_CHECKING:  # the engine imports torch: keep `sglang-ext --help` fast
    from .engine import Engine

ALGORITHMS = ("NONE", "NGRAM", "EAGLE", "EAGLE3")
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: CPU defaults (SGLang auto-picks (3, 1, 4) for EAGLE on a GPU; a CPU verify forward grows with every node).
DEFAULT_EAGLE_STEPS = 2
DEFAULT_NGRAM_STEPS = 4
DEFAULT_MAX_RUNNING = 8
DEFAULT_CONTEXT_CAP = 4096  # the engine's default: the model's max positions, capped here


class LaunchError(FlagError):
    """A flag (or flag combination) the engine cannot start with; the message names the flag."""


# ---- flags --------------------------------------------------------------------------------------------
def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def normalize_algorithm(name: str | None) -> str:
    """Upper-case like SGLang; ``None``/empty mean NONE. EAGLE and EAGLE3 both select our EAGLE-style drafter."""
    if not name:
        return "NONE"
    upper = name.strip().upper()
    if upper not in ALGORITHMS:
        raise LaunchError(f"--speculative-algorithm {name!r}: this engine supports {', '.join(ALGORITHMS)} "
                          f"(case-insensitive)")
    return upper


def _algorithm_arg(text: str) -> str:
    try:
        return normalize_algorithm(text)
    except LaunchError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add the engine flags (SGLang 0.5.23 names) to ``parser``."""
    g = parser.add_argument_group("engine (SGLang flag names)")
    g.add_argument("--model-path", default="smollm2-135m", metavar="NAME|DIR",
                   help="a registered model name (`sglang-ext models list`; fetched on first use) or a local Hugging Face "
                        "directory with config.json (default: smollm2-135m)")
    g.add_argument("--speculative-algorithm", type=_algorithm_arg, default="NONE", metavar="{NONE,NGRAM,EAGLE,EAGLE3}",
                   help="NGRAM: prompt-lookup drafter; EAGLE / EAGLE3: the EAGLE-style feature drafter from "
                        "--speculative-draft-model-path (both names select it; the checkpoint's feature layers decide "
                        "EAGLE-1 vs EAGLE-3 style). Case-insensitive. Default NONE (plain decoding)")
    g.add_argument("--speculative-draft-model-path", "--speculative-draft-model", dest="speculative_draft_model_path", metavar="DIR",
                   help="directory of an sglang-ext EAGLE drafter checkpoint (config.json + model.safetensors) trained "
                        "for this target; required for EAGLE/EAGLE3")
    g.add_argument("--speculative-num-steps", type=int_at_least(1), metavar="N",
                   help=f"draft depth per step. Default: {DEFAULT_EAGLE_STEPS} for EAGLE (SGLang picks 3 on a GPU; "
                        f"on CPU each extra node costs verify time), {DEFAULT_NGRAM_STEPS} for NGRAM (drafting is free); "
                        "with only --speculative-num-draft-tokens given and topk 1, num_draft_tokens - 1")
    g.add_argument("--speculative-eagle-topk", type=int_at_least(1), metavar="K",
                   help="branching per draft level: 1 = chain (default, SGLang's default too), > 1 = EAGLE-2 dynamic "
                        "tree (EAGLE only; the n-gram drafter proposes chains)")
    g.add_argument("--speculative-num-draft-tokens", type=int_at_least(2), metavar="N",
                   help="tree node budget including the root. With topk 1 it is forced to num_steps + 1 as in SGLang; "
                        "with topk > 1 the default is the full tree, topk * num_steps + 1")
    g.add_argument("--speculative-ngram-min-match-window-size", type=int_at_least(1), default=1, metavar="N",
                   help="NGRAM: shortest suffix n-gram to look up (name from earlier SGLang releases; 0.5.23's trie "
                        "drafter has no equivalent). Default 1")
    g.add_argument("--speculative-ngram-max-match-window-size", type=int_at_least(1), default=3, metavar="N",
                   help="NGRAM: longest suffix n-gram to look up, tried first (default 3)")
    g.add_argument("--max-running-requests", type=int_at_least(1), default=DEFAULT_MAX_RUNNING, metavar="N",
                   help=f"maximum batch size; further requests wait (default {DEFAULT_MAX_RUNNING}; SGLang uses 48 "
                        "with EAGLE on a GPU)")
    g.add_argument("--context-length", type=int_at_least(2), metavar="N",
                   help=f"prompt + new tokens per request (default: the model's max positions, capped at "
                        f"{DEFAULT_CONTEXT_CAP}); the KV cache is sized for max-running-requests of these")
    g.add_argument("--max-total-tokens", type=int_at_least(1), metavar="N",
                   help="the KV pool in tokens (SGLang's meaning). The cache here is a rectangle of slots, each holding "
                        "one request's full context (--context-length + draft nodes + 1 positions), so the pool fits "
                        "N // that many requests: --max-running-requests is lowered to fit (a note says so) and a "
                        "pool smaller than one request is an error. With --mem-fraction-static too, the smaller pool "
                        "wins, as in SGLang. Default: no cap (max-running-requests slots)")
    g.add_argument("--mem-fraction-static", type=_fraction, metavar="F",
                   help="fraction of device memory for weights + KV pool (SGLang's meaning; 0 < F < 1): the pool gets "
                        "F x total memory (host RAM on CPU, the GPU's on CUDA) minus the target and drafter weights, "
                        "and --max-running-requests is lowered to the slots that fit. Default: unset (the cache is "
                        "sized by --max-running-requests alone; on CPU its pages are committed only when used)")
    g.add_argument("--chunked-prefill-size", type=int, default=512, metavar="N",
                   help="prefill prompts in chunks of this many tokens (default 512; <= 0: whole prompt at once)")
    g.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights and KV cache dtype (default float32; 'auto' means float32 here: CPU half precision "
                        "is slow and changes greedy outputs)")
    add_policy_args(g)
    add_online_args(parser)
    g.add_argument("--random-seed", type=int, metavar="SEED",
                   help="seed for requests that bring none (each request then gets seed + its arrival index), "
                        "so sampled outputs repeat across runs; default: fresh randomness")


def add_online_args(parser: argparse.ArgumentParser) -> None:
    """``--online-learning`` and its ``--online-*`` flags (:mod:`sglang_ext.flags`, shared with the SGLang plugin)."""
    add_online_flags(parser.add_argument_group("online drafter adaptation (TIDE / OnlineSpec; EAGLE only)"))


def online_from_args(args: argparse.Namespace, engine) -> Any:
    """Start online adaptation for ``engine`` when ``--online-learning`` is given (None otherwise)."""
    if not getattr(args, "online_learning", False):
        return None
    import tempfile

    from sglang_ext.online import OnlineLearning

    if engine.drafter is None or not engine.drafter.needs_features:
        raise LaunchError("--online-learning needs --speculative-algorithm EAGLE (a feature drafter to train)")
    try:
        config = online_config_from_args(args) or {}
    except FlagError as e:
        raise LaunchError(str(e)) from e
    handoff = args.online_handoff_dir or tempfile.mkdtemp(prefix="sglang-ext-online-")
    model = engine.drafter.model
    try:
        online = OnlineLearning(model, engine.target.embed_tokens.weight, engine.target.lm_head.weight, handoff, config,
                                expect_target=model.config.target)
    except ValueError as e:
        raise LaunchError(f"--online-*: {e}") from e
    engine.attach_online(online.start())
    return online


# ---- speculative settings -------------------------------------------------------------------------------
@dataclass
class SpecSettings:
    algorithm: str
    num_steps: int
    topk: int
    num_draft_tokens: int | None
    notes: list[str] = field(default_factory=list)


def resolve_speculative(algorithm: str | None, num_steps: int | None = None, topk: int | None = None,
                        num_draft_tokens: int | None = None) -> SpecSettings:
    """SGLang's rules for (steps, topk, draft tokens), with our CPU defaults; errors name the flag."""
    algo = normalize_algorithm(algorithm)
    notes: list[str] = []
    for flag, value, low in (("--speculative-num-steps", num_steps, 1), ("--speculative-eagle-topk", topk, 1),
                             ("--speculative-num-draft-tokens", num_draft_tokens, 2)):
        if value is not None and value < low:
            raise LaunchError(f"{flag} {value}: must be >= {low}")
    if algo == "NONE":
        if any(v is not None for v in (num_steps, topk, num_draft_tokens)):
            notes.append("speculative flags ignored: --speculative-algorithm is NONE")
        return SpecSettings("NONE", 0, 1, None, notes)
    if algo == "NGRAM" and topk not in (None, 1):
        raise LaunchError(f"--speculative-eagle-topk {topk}: the NGRAM drafter proposes chains; use 1 or EAGLE")
    k = topk or 1
    default_steps = DEFAULT_NGRAM_STEPS if algo == "NGRAM" else DEFAULT_EAGLE_STEPS
    if num_steps is None:
        steps = num_draft_tokens - 1 if (num_draft_tokens is not None and k == 1) else default_steps
    else:
        steps = num_steps
    if k == 1:
        if num_draft_tokens is not None and num_draft_tokens != steps + 1:
            notes.append(f"--speculative-num-draft-tokens {num_draft_tokens} set to num_steps + 1 = {steps + 1} "
                         "(a chain has no other size; SGLang does the same)")
        budget: int | None = steps + 1
    else:
        full = k * steps + 1
        if num_draft_tokens is not None and num_draft_tokens > full:
            raise LaunchError(f"--speculative-num-draft-tokens {num_draft_tokens}: a tree of topk {k} and "
                              f"{steps} steps has at most {full} nodes")
        budget = num_draft_tokens or full
    return SpecSettings(algo, steps, k, budget, notes)


# ---- loading ------------------------------------------------------------------------------------------
def _torch_dtype(name: str):
    import torch

    return torch.float32 if name in ("auto", "float32") else getattr(torch, name)


def load_target(model_path: str, dtype: str = "float32"):
    """``(model, tokenizer, name, seconds)`` for a registered name or a local HF directory."""
    from sglang_ext.models import MODELS, load_model
    from sglang_ext.models.provision import ModelFetchError, model_dir

    dt = "float32" if dtype == "auto" else dtype
    if model_path in MODELS:
        try:
            model, tokenizer, seconds = load_model(model_path, dtype=dt)
        except ModelFetchError as e:
            raise LaunchError(f"--model-path {model_path}: {e}") from e
        return model, tokenizer, model_path, seconds
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise LaunchError(f"--model-path {model_path!r}: neither a registered model ({', '.join(sorted(MODELS))}) "
                          "nor a directory")
    if not (path / "config.json").is_file():
        raise LaunchError(f"--model-path {model_path}: no config.json in that directory (not a Hugging Face model)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dt)).eval()
    except Exception as e:  # transformers raises many types for a bad directory
        raise LaunchError(f"--model-path {model_path}: cannot load ({type(e).__name__}: {e})") from e
    # a checkpoint's target identity uses the registered name: map the cache directory of one back to it
    resolved = path.resolve()
    name = next((n for n in MODELS if model_dir(n).resolve() == resolved), resolved.name)
    return model, tokenizer, name, time.perf_counter() - t0


def check_draft_path(path: str | None) -> Path:
    """The cheap checks on a drafter directory (run before the target loads)."""
    flag = "--speculative-draft-model-path"
    if not path:
        raise LaunchError(f"{flag} is required with --speculative-algorithm EAGLE/EAGLE3 (a drafter checkpoint "
                          "directory trained for this target)")
    d = Path(path).expanduser()
    if not d.is_dir():
        raise LaunchError(f"{flag} {path}: no such directory")
    for name in ("config.json", "model.safetensors"):
        if not (d / name).is_file():
            raise LaunchError(f"{flag} {path}: no {name} (not an sglang-ext drafter checkpoint)")
    return d


def load_draft_model(path: str | None, target_name: str, target_config):
    """Load a drafter checkpoint (EAGLE-style or SpecBlock) for this target; every failure names ``--speculative-draft-model-path``."""
    from sglang_ext.core.drafters.checkpoint import load_draft_model as load_checkpoint
    from sglang_ext.core.drafters.eagle_model import target_identity

    flag = "--speculative-draft-model-path"
    d = check_draft_path(path)
    try:
        return load_checkpoint(d, expect_target=target_identity(target_name, target_config))
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:  # bad JSON, wrong target, bad tensors
        raise LaunchError(f"{flag} {path}: {e}") from e


def eos_ids(model, tokenizer) -> tuple[int, ...]:
    """EOS ids from the generation config, the model config and the tokenizer (chat models often differ)."""
    ids: list[int] = []
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(src, "eos_token_id", None) if src is not None else None
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    tok = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if isinstance(tok, int) and tok not in ids:
        ids.append(tok)
    return tuple(ids)


# ---- KV cache sizing --------------------------------------------------------------------------------------
GIB = 1 << 30


def check_sizing_flags(max_total_tokens: int | None, mem_fraction_static: float | None) -> None:
    """The model-free checks on ``--max-total-tokens`` / ``--mem-fraction-static`` (errors name the flag)."""
    if max_total_tokens is not None and (isinstance(max_total_tokens, bool) or not isinstance(max_total_tokens, int)
                                         or max_total_tokens < 1):
        raise LaunchError(f"--max-total-tokens {max_total_tokens}: must be an integer >= 1")
    if mem_fraction_static is not None and not 0.0 < float(mem_fraction_static) < 1.0:
        raise LaunchError(f"--mem-fraction-static {mem_fraction_static}: must be between 0 and 1 (exclusive)")


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype) -> int:
    """Keys and values of every layer for one position: ``layers * 2 * kv_heads * head_dim * element size``."""
    import torch

    return num_layers * 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def device_memory_bytes(device) -> int:
    """Total memory of ``device``: the GPU's (``torch.cuda.mem_get_info``) on CUDA; host RAM otherwise (MemTotal
    from /proc/meminfo, lowered to a cgroup v2 ``memory.max`` limit when one is set; psutil or sysconf elsewhere)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if total is None:
        try:
            import psutil

            total = int(psutil.virtual_memory().total)
        except ImportError:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def weight_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of ``modules`` (and an EAGLE drafter's bound tensors), each storage once."""
    import torch

    seen: set[int] = set()
    total = 0
    for m in modules:
        if m is None:
            continue
        tensors = list(m.parameters()) + list(m.buffers())
        bound = (getattr(m, "embed_weight", None), getattr(m, "lm_weight", None))  # EagleDraftModel.bind_target
        tensors += [t for t in bound if isinstance(t, torch.Tensor)]
        for t in tensors:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


@dataclass
class KVPlan:
    """How many slots the cache gets and why (:func:`plan_kv_cache`)."""
    slots: int
    positions_per_slot: int  # target cache positions per slot: context + draft nodes + 1
    max_total_tokens: int  # slots * positions_per_slot: the target pool in tokens
    sized_by: str  # the flag that set ``slots``
    notes: list[str] = field(default_factory=list)
    memory_total_bytes: int | None = None  # --mem-fraction-static only
    weight_bytes: int | None = None


def plan_kv_cache(*, max_running_requests: int, context_length: int, positions_per_slot: int, bytes_per_token: int,
                  draft_positions_per_slot: int = 0, draft_bytes_per_token: int = 0, max_total_tokens: int | None = None,
                  mem_fraction_static: float | None = None, memory_total_bytes: int | None = None,
                  weight_bytes_total: int = 0) -> KVPlan:
    """SGLang's pool sizing adapted to a slot cache (every slot holds one request's whole context).

    ``--mem-fraction-static F``: the pool gets ``F * memory_total_bytes - weight_bytes_total`` bytes; each slot costs
    its target positions plus the drafter's own cache, so the pool in (target) tokens is that budget over the cost
    of one token with the drafter's share included. ``--max-total-tokens N`` caps the pool (the smaller of the two
    wins, as in SGLang). Slots are ``min(max_running_requests, pool // positions_per_slot)``; none is an error.
    """
    check_sizing_flags(max_total_tokens, mem_fraction_static)
    R, C, P = max_running_requests, context_length, positions_per_slot
    slot_bytes = P * bytes_per_token + draft_positions_per_slot * draft_bytes_per_token
    notes: list[str] = []
    pool: int | None = None
    flag = "--max-running-requests"
    if mem_fraction_static is not None:
        if memory_total_bytes is None:
            raise ValueError("mem_fraction_static needs memory_total_bytes")
        F = mem_fraction_static
        budget = int(F * memory_total_bytes) - weight_bytes_total
        what = (f"--mem-fraction-static {F}: {F} x {memory_total_bytes / GIB:.2f} GiB total - "
                f"{weight_bytes_total / GIB:.2f} GiB of weights")
        if budget < slot_bytes:
            raise LaunchError(f"{what} = {budget / GIB:.3f} GiB for the KV cache, less than one request needs "
                              f"({slot_bytes / GIB:.3f} GiB: {P} positions for --context-length {C}"
                              f"{' plus the drafter cache' if draft_bytes_per_token else ''}); raise --mem-fraction-static "
                              "or lower --context-length")
        pool = budget * P // slot_bytes
        flag = "--mem-fraction-static"
        if max_total_tokens is not None:
            if max_total_tokens < pool:
                notes.append(f"--max-total-tokens {max_total_tokens} caps the --mem-fraction-static {F} pool of "
                             f"{pool} tokens (the smaller wins, as in SGLang)")
                pool, flag = max_total_tokens, "--max-total-tokens"
            else:
                notes.append(f"--max-total-tokens {max_total_tokens} is larger than the --mem-fraction-static {F} pool "
                             f"of {pool} tokens; using {pool} (SGLang does the same)")
    elif max_total_tokens is not None:
        pool, flag = max_total_tokens, "--max-total-tokens"
    if pool is None:
        slots = R
    else:
        fit = pool // P
        if fit < 1:  # only --max-total-tokens gets here: a budget under one slot failed above
            raise LaunchError(f"--max-total-tokens {max_total_tokens}: one request needs {P} cache positions "
                              f"(--context-length {C} + {P - C} for draft nodes and scratch), so the pool fits no "
                              f"request; raise --max-total-tokens to at least {P} or lower --context-length")
        slots = min(R, fit)
        if slots < R:
            source = (f"--max-total-tokens {pool}" if flag == "--max-total-tokens"
                      else f"--mem-fraction-static {mem_fraction_static} ({pool} tokens)")
            notes.append(f"{source} fits {slots} request{'s' if slots != 1 else ''} of context {C}; max running "
                         f"requests lowered from {R} to {slots}")
        else:
            flag = "--max-running-requests"
    return KVPlan(slots, P, slots * P, flag, notes,
                  memory_total_bytes if mem_fraction_static is not None else None,
                  weight_bytes_total if mem_fraction_static is not None else None)


def kv_cache_report(engine, plan: KVPlan) -> dict[str, Any]:
    """``info["kv_cache"]``: the caches the engine actually allocated (target, and the drafter's when it has one)."""
    from sglang_ext.core.kv_cache import LAZY_ENV

    cache = engine.cache
    st = cache.storage  # [2, layers, slots, kv heads, positions, head dim]
    report: dict[str, Any] = {
        "dtype": str(st.dtype).removeprefix("torch."), "layers": len(cache.keys),
        "kv_heads": int(st.shape[3]), "head_dim": int(st.shape[-1]),
        "bytes_per_token": kv_bytes_per_token(len(cache.keys), int(st.shape[3]), int(st.shape[-1]), st.dtype),
        "slots": cache.num_slots, "positions_per_slot": cache.max_len, "max_total_tokens": cache.num_slots * cache.max_len,
        "target_bytes": cache.nbytes(), "draft": None, "sized_by": plan.sized_by,
        "allocation": "lazy" if cache.device.type == "cpu" and os.environ.get(LAZY_ENV, "1") != "0" else "eager",
    }
    total = cache.nbytes()
    dcache = getattr(engine.drafter, "cache", None)
    if dcache is not None and hasattr(dcache, "nbytes"):
        st = dcache.storage
        report["draft"] = {
            "layers": len(dcache.keys), "kv_heads": int(st.shape[3]), "head_dim": int(st.shape[-1]),
            "bytes_per_token": kv_bytes_per_token(len(dcache.keys), int(st.shape[3]), int(st.shape[-1]), st.dtype),
            "slots": dcache.num_slots, "positions_per_slot": dcache.max_len, "bytes": dcache.nbytes(),
        }
        total += dcache.nbytes()
    report["total_bytes"] = total
    report["total_gib"] = round(total / GIB, 4)
    if plan.memory_total_bytes is not None:
        report["memory_total_bytes"] = plan.memory_total_bytes
        report["weight_bytes"] = plan.weight_bytes
    return report


def kv_cache_note(report: dict[str, Any]) -> str:
    def per_token(r):
        layers = f"{r['layers']} layer{'s' if r['layers'] != 1 else ''}"
        return f"{layers} x 2 x {r['kv_heads']} KV heads x {r['head_dim']} head dim = {r['bytes_per_token']:,} B/token"

    text = (f"KV cache: {report['dtype']}, {per_token(report)}; {report['slots']} slots x "
            f"{report['positions_per_slot']} positions = {report['max_total_tokens']:,} max total tokens")
    d = report["draft"]
    if d is not None:
        text += f"; drafter cache {per_token(d)}, {d['slots']} slots x {d['positions_per_slot']} positions"
    text += f"; {report['total_gib']:.3f} GiB reserved"
    if report["allocation"] == "lazy":
        text += " (CPU pages are committed on first use: resident memory follows the positions in use)"
    return text


# ---- assembling -----------------------------------------------------------------------------------------
def build_engine_from_parts(model, tokenizer, algorithm: str | None = "NONE", *, num_steps: int | None = None,
                            topk: int | None = None, num_draft_tokens: int | None = None, draft_model=None,
                            max_running_requests: int = DEFAULT_MAX_RUNNING, context_length: int | None = None,
                            prefill_chunk: int = 512, ngram_min: int = 1, ngram_max: int = 3,
                            eos_token_ids: tuple[int, ...] | None = None, model_name: str = "model",
                            policy=None, max_total_tokens: int | None = None,
                            mem_fraction_static: float | None = None) -> tuple[Engine, dict[str, Any]]:
    """An engine around an in-memory HF Llama (tests, notebooks); ``draft_model`` is an unbound
    feature-drafter model (EAGLE-style or SpecBlock).

    Returns ``(engine, info)`` where ``info`` holds the resolved settings under SGLang's server-args names, the
    KV pool size (``max_total_tokens``) and the cache report (``kv_cache``, also a line in ``notes``).
    ``max_total_tokens`` / ``mem_fraction_static`` may lower ``max_running_requests`` (:func:`plan_kv_cache`).
    """
    from sglang_ext.core.drafters.checkpoint import (
        drafter_cache_layers,
        drafter_scratch,
        make_feature_drafter,
    )
    from sglang_ext.core.drafters.ngram import NgramDrafter

    from .engine import Engine, EngineConfig
    from .target import TargetModel

    spec = resolve_speculative(algorithm, num_steps, topk, num_draft_tokens)
    if max_running_requests < 1:
        raise LaunchError(f"--max-running-requests {max_running_requests}: must be >= 1")
    check_sizing_flags(max_total_tokens, mem_fraction_static)
    max_pos = int(model.config.max_position_embeddings)
    if context_length is None:
        context = min(max_pos, DEFAULT_CONTEXT_CAP)
    elif context_length > max_pos:
        raise LaunchError(f"--context-length {context_length}: the model has {max_pos} positions")
    else:
        context = context_length
    drafter = None
    feature_layers: tuple[int, ...] = ()
    if spec.algorithm == "NGRAM":
        if ngram_min > ngram_max:
            raise LaunchError(f"--speculative-ngram-min-match-window-size {ngram_min} exceeds "
                              f"--speculative-ngram-max-match-window-size {ngram_max}")
        drafter = NgramDrafter(max_ngram=ngram_max, min_ngram=ngram_min)
    elif spec.algorithm in ("EAGLE", "EAGLE3"):
        if draft_model is None:
            raise LaunchError("--speculative-draft-model-path is required with --speculative-algorithm "
                              f"{spec.algorithm}")
        feature_layers = tuple(draft_model.config.feature_layers)
    try:
        target = TargetModel(model, feature_layers=feature_layers, name=model_name)
    except ValueError as e:
        flag = "--speculative-draft-model-path" if feature_layers else "--model-path"
        raise LaunchError(f"{flag}: {e}") from e
    if draft_model is not None and spec.algorithm in ("EAGLE", "EAGLE3"):
        try:
            draft_model = draft_model.to(target.dtype)
            draft_model.bind_target(target.embed_tokens.weight, target.lm_head.weight)
        except ValueError as e:
            raise LaunchError(f"--speculative-draft-model-path: {e}") from e
    # ---- KV cache size: slots of (context + tree nodes + 1) target positions (Engine.__init__), plus the drafter's
    eagle = draft_model is not None and spec.algorithm in ("EAGLE", "EAGLE3")
    tree_nodes = max((spec.num_draft_tokens or 0) if spec.topk > 1 else 0, spec.topk * spec.num_steps + 1) \
        if spec.algorithm != "NONE" else 1
    # the drafter's cache holds committed pairs plus this step's scratch nodes; a batched absorb of pending pairs
    # writes every row padded to the longest pending run (a newly admitted prompt) after its own length, so a
    # long-running request beside a fresh long prompt needs up to twice the context
    max_blocks = 2
    if eagle and spec.topk == 1 and hasattr(draft_model.config, "block_size"):  # SpecBlock chains: enough blocks
        max_blocks = max(2, -(-spec.num_steps // draft_model.config.block_size))
    draft_len = 2 * context + drafter_scratch(draft_model, spec.num_steps, spec.topk, max_blocks) if eagle else 0
    plan = plan_kv_cache(
        max_running_requests=max_running_requests, context_length=context, positions_per_slot=context + tree_nodes + 1,
        bytes_per_token=kv_bytes_per_token(target.num_layers, target.num_kv_heads, target.head_dim, target.dtype),
        draft_positions_per_slot=draft_len,
        draft_bytes_per_token=kv_bytes_per_token(drafter_cache_layers(draft_model), draft_model.config.num_kv_heads, draft_model.config.head_dim,
                                                 target.dtype) if eagle else 0,
        max_total_tokens=max_total_tokens, mem_fraction_static=mem_fraction_static,
        memory_total_bytes=device_memory_bytes(target.device) if mem_fraction_static is not None else None,
        weight_bytes_total=weight_bytes(model, draft_model if eagle else None) if mem_fraction_static is not None else 0)
    max_running_requests = plan.slots
    spec.notes.extend(plan.notes)
    if eagle:
        drafter = make_feature_drafter(draft_model, num_slots=max_running_requests, max_len=draft_len, topk=spec.topk,
                                       num_draft_tokens=spec.num_draft_tokens if spec.topk > 1 else None,
                                       max_blocks=max_blocks)
    config = EngineConfig(max_batch_size=max_running_requests, context_length=context, num_steps=spec.num_steps,
                          topk=spec.topk, num_draft_tokens=spec.num_draft_tokens if spec.topk > 1 else None,
                          prefill_chunk=prefill_chunk if prefill_chunk > 0 else context,
                          eos_token_ids=tuple(eos_token_ids) if eos_token_ids is not None else eos_ids(model, tokenizer),
                          policy=policy)
    engine = Engine(target, drafter, config, tokenizer=tokenizer)
    info: dict[str, Any] = {
        "model_path": model_name, "served_model_name": model_name,
        "speculative_algorithm": None if spec.algorithm == "NONE" else spec.algorithm,
        "speculative_num_steps": spec.num_steps or None, "speculative_eagle_topk": spec.topk if spec.num_steps else None,
        "speculative_num_draft_tokens": spec.num_draft_tokens,
        "speculative_ngram_min_match_window_size": ngram_min if spec.algorithm == "NGRAM" else None,
        "speculative_ngram_max_match_window_size": ngram_max if spec.algorithm == "NGRAM" else None,
        "feature_layers": list(target.feature_layers) or None,
        "max_running_requests": max_running_requests, "context_length": context,
        "chunked_prefill_size": config.prefill_chunk, "dtype": str(target.dtype).removeprefix("torch."),
        "eos_token_ids": list(config.eos_token_ids), "notes": spec.notes,
        "speculative_policy": getattr(engine.policy, "name", None),
        "speculative_policy_params": dict(engine.policy.config) if engine.policy is not None else None,
    }
    if policy is not None and engine.policy is None:
        spec.notes.append(f"--speculative-policy {policy.name} ignored: speculation is off")
    info["kv_cache"] = kv_cache_report(engine, plan)
    info["max_total_tokens"] = info["kv_cache"]["max_total_tokens"]
    info["mem_fraction_static"] = mem_fraction_static
    spec.notes.append(kv_cache_note(info["kv_cache"]))
    return engine, info


def _parse_param(text: str) -> tuple[str, Any]:
    try:
        return parse_param(text)
    except FlagError as e:
        raise LaunchError(str(e)) from e


def policy_from_args(args: argparse.Namespace):
    """The policy named by ``--speculative-policy`` / ``--speculative-policy-config`` / ``--speculative-policy-param``
    (None when none is asked for); errors name the flag or the config file (:mod:`sglang_ext.flags`)."""
    try:
        return flag_policy_from_args(args)
    except FlagError as e:
        raise LaunchError(str(e)) from e


def build_engine(args: argparse.Namespace):
    """``(engine, tokenizer, info)`` from :func:`add_engine_args` flags: checks flags, loads model and drafter."""
    spec = resolve_speculative(args.speculative_algorithm, args.speculative_num_steps, args.speculative_eagle_topk,
                               args.speculative_num_draft_tokens)  # flag errors before any loading
    if spec.algorithm in ("EAGLE", "EAGLE3"):
        if not args.speculative_draft_model_path:
            raise LaunchError(f"--speculative-draft-model-path is required with --speculative-algorithm "
                              f"{spec.algorithm} (a drafter checkpoint directory trained for this target)")
        check_draft_path(args.speculative_draft_model_path)
    if args.speculative_draft_model_path and spec.algorithm not in ("EAGLE", "EAGLE3"):
        spec.notes.append("--speculative-draft-model-path ignored: only EAGLE/EAGLE3 use a draft model")
    if spec.algorithm == "NGRAM" and (args.speculative_ngram_min_match_window_size
                                      > args.speculative_ngram_max_match_window_size):
        raise LaunchError(f"--speculative-ngram-min-match-window-size {args.speculative_ngram_min_match_window_size} "
                          f"exceeds --speculative-ngram-max-match-window-size {args.speculative_ngram_max_match_window_size}")
    check_sizing_flags(getattr(args, "max_total_tokens", None), getattr(args, "mem_fraction_static", None))
    policy = policy_from_args(args)
    if args.random_seed is not None:
        import torch

        torch.manual_seed(args.random_seed)
    model, tokenizer, name, seconds = load_target(args.model_path, args.dtype)
    draft_model = None
    t0 = time.perf_counter()
    if spec.algorithm in ("EAGLE", "EAGLE3"):
        draft_model = load_draft_model(args.speculative_draft_model_path, name, model.config)
    engine, info = build_engine_from_parts(
        model, tokenizer, spec.algorithm, num_steps=args.speculative_num_steps, topk=args.speculative_eagle_topk,
        num_draft_tokens=args.speculative_num_draft_tokens, draft_model=draft_model,
        max_running_requests=args.max_running_requests, context_length=args.context_length,
        prefill_chunk=args.chunked_prefill_size, ngram_min=args.speculative_ngram_min_match_window_size,
        ngram_max=args.speculative_ngram_max_match_window_size, model_name=name, policy=policy,
        max_total_tokens=getattr(args, "max_total_tokens", None),
        mem_fraction_static=getattr(args, "mem_fraction_static", None),
    )
    online = online_from_args(args, engine)
    info["online_learning"] = online.config if online is not None else None
    info["notes"] = spec.notes + [n for n in info["notes"] if n not in spec.notes]
    info.update(model_path=args.model_path, served_model_name=name, random_seed=args.random_seed,
                speculative_draft_model_path=args.speculative_draft_model_path, load_seconds=round(seconds, 3),
                draft_load_seconds=round(time.perf_counter() - t0, 3) if draft_model is not None else None)
    return engine, tokenizer, info


__all__ = ["ALGORITHMS", "KVPlan", "LaunchError", "SpecSettings", "add_engine_args", "build_engine",
           "build_engine_from_parts", "check_draft_path", "check_sizing_flags", "device_memory_bytes", "eos_ids",
           "kv_bytes_per_token", "kv_cache_note", "kv_cache_report", "load_draft_model", "load_target",
           "normalize_algorithm", "plan_kv_cache", "policy_from_args", "resolve_speculative", "weight_bytes"]
