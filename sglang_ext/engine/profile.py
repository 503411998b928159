r"""``sglang-ext profile``: measured costs of the reference engine, written as a profile JSON.

Four costs, each the **median** wall time of ``repeats`` calls after ``warmup`` untimed ones (with
``torch.cuda.synchronize()`` around every call on a GPU). The repeats are interleaved: ``repeats`` passes over
the whole grid, each in a fresh shuffled order, so load from other processes (a shared CPU) spreads over many
points as one bad sample each instead of ruining one point (:func:`time_points`):

* **target**: one :meth:`TargetModel.forward` over ``B`` requests of ``t`` new nodes each (a verify step: the
  root plus ``t - 1`` draft nodes; a tree of ``t`` nodes costs what a chain of ``t`` does, the shapes are the
  same) on a :class:`SlotKVCache` already holding ``context_len`` committed positions per request. Full logits
  for every node, exactly the engine's verify forward; the cache is filled without timing it.
* **prefill**: one prefill chunk of ``tokens`` prompt tokens for one request after ``context_len`` committed
  ones: the engine's ``_prefill`` forward (causal mask, no LM head).
* **draft**: one :meth:`EagleDrafter.draft` call proposing a chain of ``depth`` tokens for ``B`` requests
  (absorb the pending committed pair, then ``depth`` LM-head reads and ``depth - 1`` layer forwards) on a
  drafter cache of ``draft_context_len`` committed pairs: the engine's draft phase.
* **train**: one optimiser step of the drafter on ``N`` tokens: the training-time-test loss of
  :mod:`sglang_ext.training.drafter` (``ttt_steps`` unrolled draft steps), backward, gradient clipping and AdamW,
  in float32 as the trainer runs. The target's teacher forward is *not* included (it is a target forward of
  ``N`` tokens; the ``target`` table prices it).

Costs do not depend on weight values, so ``--random-weights`` builds the architecture from its config with
random weights: that is how a GPU profile of a real architecture is measured without the weights
(``--random-weights --config llama-3.1-8b.config.json``), with no network. The output format is documented in
``traces/profiles/README.md`` and read by :func:`sglang_ext.core.costs.load_profile`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sglang_ext.engine.launch import int_at_least

PROFILE_FORMAT = "sglang-ext-profile/1"
PARTS = ("target", "prefill", "draft", "train")


@dataclass
class ProfileGrid:
    """What to measure. ``draft_context_len`` ``None``: the middle of ``context_lens``."""

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    tokens: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    context_lens: tuple[int, ...] = (128, 512, 1024)
    prefill_tokens: tuple[int, ...] = (16, 64, 256, 512)
    prefill_context_lens: tuple[int, ...] = (0, 512)
    draft_depths: tuple[int, ...] = (1, 2, 4)
    draft_context_len: int | None = None
    train_tokens: tuple[int, ...] = (256, 512, 1024)
    train_seq_len: int = 256
    ttt_steps: int = 3
    repeats: int = 5
    warmup: int = 2
    parts: tuple[str, ...] = PARTS

    def resolved_draft_context(self) -> int:
        if self.draft_context_len is not None:
            return self.draft_context_len
        ctx = sorted(self.context_lens)
        return ctx[len(ctx) // 2]

    def count(self) -> int:
        """Timed calls in all (points x repeats)."""
        n = 0
        if "target" in self.parts:
            n += len(self.batch_sizes) * len(self.tokens) * len(self.context_lens) * self.repeats
        if "prefill" in self.parts:
            n += len(self.prefill_tokens) * len(self.prefill_context_lens) * self.repeats
        if "draft" in self.parts:
            n += len(self.batch_sizes) * len(self.draft_depths) * self.repeats
        if "train" in self.parts:
            n += len(self.train_tokens) * self.repeats
        return n


# ---- timing ---------------------------------------------------------------------------------------------
def _sync_fn(device) -> Callable[[], None]:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


@dataclass
class Point:
    """One grid point: ``fn()`` is timed; ``setup()`` runs before every call, untimed; ``row`` gets the results."""

    row: dict
    fn: Callable[[], Any]
    setup: Callable[[], Any] | None = None
    label: str = ""
    times: list[float] = field(default_factory=list)


def time_points(points: Sequence[Point], warmup: int, repeats: int, sync: Callable[[], None],
                advance: Callable[[str], None], seed: int = 0) -> list[dict]:
    r"""Time every point ``repeats`` times, **interleaved**: ``repeats`` passes over the grid, each in a fresh
    shuffled order, so a burst of load from another process lands on one sample of many points rather than on
    every sample of one point. Each point gets ``warmup`` untimed calls right before its first timed one.

    Row fields: ``seconds`` = median of the samples; ``min_seconds`` / ``max_seconds`` their range.
    """
    import random
    import time as _t

    rng = random.Random(seed)
    order = list(range(len(points)))
    for rep in range(max(1, repeats)):
        rng.shuffle(order)
        for i in order:
            pt = points[i]
            for _ in range(warmup if rep == 0 else 0):
                if pt.setup is not None:
                    pt.setup()
                pt.fn()
            if pt.setup is not None:
                pt.setup()
            sync()
            t0 = _t.perf_counter()
            pt.fn()
            sync()
            pt.times.append(_t.perf_counter() - t0)
            advance(f"{pt.label}: {pt.times[-1] * 1e3:.1f} ms")
    rows = []
    for pt in points:
        pt.row.update(seconds=float(statistics.median(pt.times)), min_seconds=float(min(pt.times)),
                      max_seconds=float(max(pt.times)))
        rows.append(pt.row)
    return rows


# ---- models -----------------------------------------------------------------------------------------------
def torch_dtype(name: str, device: str):
    """``auto``: float32 on CPU (half precision is slow there), bfloat16 on a GPU."""
    import torch

    if name == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    return getattr(torch, name)


def config_from_dict(cfg: dict):
    """A transformers config from a ``config.json`` dict (``model_type`` defaults to llama)."""
    from transformers import AutoConfig

    d = dict(cfg)
    model_type = d.pop("model_type", "llama")
    for key in ("transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"):
        d.pop(key, None)
    return AutoConfig.for_model(model_type, **d)


def random_model(config, dtype, device: str, seed: int = 0):
    """A causal LM of ``config``'s architecture with random weights, built directly on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def read_config_file(path: str | Path) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read ({e})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path}: invalid JSON ({e})") from e
    if not isinstance(data, dict) or "hidden_size" not in data:
        raise ValueError(f"--config {path}: not a model config (a JSON object with hidden_size, num_hidden_layers, ...)")
    return data


def default_feature_layers(num_layers: int) -> list[int]:
    """EAGLE-3's low / middle / high layers (SmolLM2's 30 layers give 2, 15, 27, as the shipped drafter uses)."""
    if num_layers < 3:
        return list(range(num_layers))
    return sorted({min(2, num_layers - 1), num_layers // 2, max(0, num_layers - 3)})


def random_drafter(target, feature_layers: Sequence[int] | None = None, draft_vocab_size: int | None = 16384,
                   drafter_config: dict | None = None, seed: int = 0):
    """A freshly initialised EAGLE-style drafter for ``target`` (a :class:`TargetModel`), bound to its embedding/head.

    ``drafter_config`` (a checkpoint's ``config.json``) fixes feature layers and draft vocabulary size; otherwise
    EAGLE-3 defaults: :func:`default_feature_layers` and a ``draft_vocab_size`` vocabulary (None or >= the target's:
    the full vocabulary).
    """
    import torch

    from sglang_ext.core.drafters.eagle_model import EagleConfig, EagleDraftModel

    if drafter_config is not None:
        feature_layers = drafter_config.get("feature_layers") or feature_layers
        draft_vocab_size = drafter_config.get("draft_vocab_size", draft_vocab_size)
    layers = list(feature_layers) if feature_layers else default_feature_layers(target.num_layers)
    vocab = draft_vocab_size if draft_vocab_size and draft_vocab_size < target.vocab_size else None
    torch.manual_seed(seed)
    cfg = EagleConfig.for_target(target.config, layers, vocab)
    model = EagleDraftModel(cfg)
    if vocab is not None:
        model.set_draft_vocab(torch.arange(vocab))
    return model.to(device=target.device, dtype=target.dtype).bind_target(target.embed_tokens.weight, target.lm_head.weight)


# ---- measurements -------------------------------------------------------------------------------------------
def measure_target(target, grid: ProfileGrid, advance: Callable[[str], None], seed: int = 0) -> list[dict]:
    """``target`` entries: one verify forward per (batch, tokens per request, context length)."""
    import torch

    dev = target.device
    sync = _sync_fn(dev)
    max_b, max_t, max_ctx = max(grid.batch_sizes), max(grid.tokens), max(grid.context_lens)
    cache = target.new_cache(max_b, max_ctx + max_t + 1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    cache.storage.normal_()  # committed K/V "of the context": values do not change the cost; filled once, untimed
    points = []
    for ctx in grid.context_lens:
        for B in grid.batch_sizes:
            for t in grid.tokens:
                ids = torch.randint(0, target.vocab_size, (B, t), generator=gen)
                visible = torch.ones(t, t, dtype=torch.bool).tril().expand(B, t, t)
                depths = torch.arange(t).expand(B, t)

                def setup(B=B, ctx=ctx):
                    cache.lengths[:B] = ctx

                def fn(ids=ids, visible=visible, depths=depths):
                    target.forward(cache, ids, visible, depths)

                points.append(Point({"batch_size": B, "tokens_per_request": t, "context_len": ctx}, fn, setup,
                                    f"target B={B} t={t} ctx={ctx}"))
    return time_points(points, grid.warmup, grid.repeats, sync, advance, seed)


def measure_prefill(target, grid: ProfileGrid, advance: Callable[[str], None], seed: int = 0) -> list[dict]:
    """``prefill`` entries: one prefill chunk of ``tokens`` prompt tokens for one request after ``context_len``
    committed ones (the engine's ``_prefill`` forward: causal mask, no logits, features when a drafter reads them)."""
    import torch

    sync = _sync_fn(target.device)
    cache = target.new_cache(1, max(grid.prefill_context_lens) + max(grid.prefill_tokens) + 1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    cache.storage.normal_()
    points = []
    for ctx in grid.prefill_context_lens:
        for P in grid.prefill_tokens:
            ids = torch.randint(0, target.vocab_size, (1, P), generator=gen)
            visible = torch.ones(P, P, dtype=torch.bool).tril().unsqueeze(0)
            depths = torch.arange(P).unsqueeze(0)
            no_logits = torch.zeros(1, P, dtype=torch.bool)

            def setup(ctx=ctx):
                cache.lengths[0] = ctx

            def fn(ids=ids, visible=visible, depths=depths, no_logits=no_logits):
                target.forward(cache, ids, visible, depths, logits_for=no_logits)

            points.append(Point({"tokens": P, "context_len": ctx}, fn, setup, f"prefill {P} tokens ctx={ctx}"))
    return time_points(points, grid.warmup, grid.repeats, sync, advance, seed)


def measure_draft(target, draft_model, grid: ProfileGrid, advance: Callable[[str], None], seed: int = 0) -> list[dict]:
    """``draft`` entries: one chain draft of ``depth`` tokens for ``B`` requests (the engine's draft phase)."""
    import torch

    from sglang_ext.core.drafters.base import DraftRequest
    from sglang_ext.core.drafters.eagle import EagleDrafter

    dev = target.device
    sync = _sync_fn(dev)
    ctx = grid.resolved_draft_context()
    max_b, max_d = max(grid.batch_sizes), max(grid.draft_depths)
    drafter = EagleDrafter(draft_model, num_slots=max_b, max_len=ctx + max_d + 4)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    drafter.cache.storage.normal_()
    feat_dim = draft_model.config.feature_dim
    feature = torch.randn(1, feat_dim, generator=gen).to(device=dev, dtype=draft_model.fc.weight.dtype)
    points = []
    for B in grid.batch_sizes:
        for depth in grid.draft_depths:
            reqs = [DraftRequest(slot=b, tokens=[int(torch.randint(0, target.vocab_size, (1,), generator=gen))],
                                 num_steps=depth, greedy=True) for b in range(B)]

            def setup(B=B):
                # as after a verify step: ``ctx`` committed pairs and one pending pair per request
                drafter.cache.lengths[:B] = ctx
                for b in range(B):
                    drafter.pending[b] = ([], [])
                    drafter.observe(b, feature, [b + 1])

            points.append(Point({"batch_size": B, "depth": depth, "context_len": ctx}, lambda reqs=reqs: drafter.draft(reqs),
                                setup, f"draft B={B} depth={depth}"))
    return time_points(points, grid.warmup, grid.repeats, sync, advance, seed)


def measure_train(target, draft_model, grid: ProfileGrid, advance: Callable[[str], None], seed: int = 0) -> list[dict]:
    """``train`` entries: one AdamW step of a float32 copy of the drafter on ``N`` tokens (TTT loss, clip 0.5)."""
    import copy

    import torch

    from sglang_ext.core.drafters.eagle_model import EagleDraftModel
    from sglang_ext.training.drafter import ttt_loss

    dev = target.device
    sync = _sync_fn(dev)
    model = EagleDraftModel(copy.deepcopy(draft_model.config))  # a float32 copy, without the bound target tensors
    model.draft_vocab = draft_model.draft_vocab.detach().clone()
    model.load_state_dict({k: v.detach().float() if v.is_floating_point() else v for k, v in draft_model.state_dict().items()})
    model = model.to(device=dev, dtype=torch.float32)
    model.bind_target(target.embed_tokens.weight.float(), target.lm_head.weight.float())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    vd = int(model.draft_vocab.numel())
    points = []
    for n in grid.train_tokens:
        S = max(3, min(n, grid.train_seq_len))
        B = max(1, round(n / S))
        tokens = torch.randint(0, target.vocab_size, (B, S), generator=gen).to(dev)
        feats = torch.randn(B, S, model.config.feature_dim, device=dev)  # made on the device: GBs at GPU sizes
        logp = torch.log_softmax(torch.randn(B, S, vd, device=dev), dim=-1)
        valid = torch.ones(B, S, dtype=torch.bool, device=dev)

        def step(feats=feats, tokens=tokens, logp=logp, valid=valid):
            loss, _ = ttt_loss(model, feats, tokens, logp, valid, grid.ttt_steps, 0.8)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()

        points.append(Point({"tokens": B * S, "batch_size": B, "seq_len": S}, step, None, f"train {B}x{S} tokens"))
    return time_points(points, grid.warmup, grid.repeats, sync, advance, seed)


# ---- metadata ---------------------------------------------------------------------------------------------
def hardware_meta(device: str) -> dict:
    """CPU model and cores (always), GPU name and memory on a GPU, torch threads."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    hw: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform()}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        hw.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
        hw["summary"] = f"{props.name} ({hw['gpu_memory_gib']} GiB)"
    else:
        hw["summary"] = f"{cpu}, {os.cpu_count()} cores, {hw['torch_threads']} torch threads"
    return hw


def architecture_summary(config) -> dict:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "rope_theta")
    out = {}
    for k in keys:
        v = getattr(config, k, None)
        if v is not None:
            out[k] = v
    if "rope_theta" not in out:
        rope = getattr(config, "rope_parameters", None) or {}
        if "rope_theta" in rope:
            out["rope_theta"] = rope["rope_theta"]
    return out


def run_profile(model, *, name: str, grid: ProfileGrid | None = None, draft_model=None, drafter_source: str = "random",
                random_weights: bool = False, command: str = "", progress: bool = True, seed: int = 0,
                log: Callable[[str], None] | None = None) -> dict:
    """Profile ``model`` (a HF Llama-style causal LM, on its device and dtype) and return the profile dict.

    ``draft_model``: an :class:`EagleDraftModel` (bound or not); ``None`` with ``draft`` or ``train`` in
    ``grid.parts`` means a freshly initialised drafter of the default EAGLE-3 architecture.
    """
    import torch
    import transformers
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    import sglang_ext

    from .target import TargetModel

    grid = grid or ProfileGrid()
    bad = [p for p in grid.parts if p not in PARTS]
    if bad:
        raise ValueError(f"--parts: unknown {bad}; choose from {', '.join(PARTS)}")
    needs_drafter = "draft" in grid.parts or "train" in grid.parts
    target = TargetModel(model, name=name)
    if needs_drafter:
        if draft_model is None:
            draft_model = random_drafter(target, seed=seed)
            drafter_source = "random (default EAGLE-3 architecture)"
        draft_model = draft_model.to(device=target.device, dtype=target.dtype)
        draft_model.bind_target(target.embed_tokens.weight, target.lm_head.weight)
        target.set_feature_layers(tuple(draft_model.config.feature_layers))  # the engine computes them per forward
    device = str(target.device)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t_start = time.perf_counter()
    out: dict[str, Any] = {"format": PROFILE_FORMAT, "meta": {}, "target": [], "prefill": [], "draft": [], "train": []}
    with Progress(TextColumn("[bold]profile"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), disable=not progress) as bar:
        task = bar.add_task("profile", total=grid.count(), info="")

        def advance(info: str) -> None:
            bar.update(task, advance=1, info=info)

        if "target" in grid.parts:
            out["target"] = measure_target(target, grid, advance, seed)
        if "prefill" in grid.parts:
            out["prefill"] = measure_prefill(target, grid, advance, seed)
        if "draft" in grid.parts:
            out["draft"] = measure_draft(target, draft_model, grid, advance, seed)
        if "train" in grid.parts:
            out["train"] = measure_train(target, draft_model, grid, advance, seed)
    cfg = model.config
    meta: dict[str, Any] = {
        "hardware": hardware_meta(device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sglang_ext": sglang_ext.__version__, "python": platform.python_version()},
        "model": name,
        "architecture": architecture_summary(cfg),
        "dtype": str(target.dtype).removeprefix("torch."),
        "device": device,
        "random_weights": bool(random_weights),
        "date": started,
        "command": command,
        "engine": {"fast_forward": bool(target.use_fast_forward), "logits": "full (every node)",
                   "feature_layers": list(target.feature_layers)},
        "timing": {"statistic": "median", "order": "interleaved passes, shuffled", "repeats": grid.repeats, "warmup": grid.warmup,
                   "profile_seconds": round(time.perf_counter() - t_start, 2)},
        "grid": {"batch_sizes": list(grid.batch_sizes), "tokens": list(grid.tokens),
                 "context_lens": list(grid.context_lens), "prefill_tokens": list(grid.prefill_tokens),
                 "prefill_context_lens": list(grid.prefill_context_lens), "draft_depths": list(grid.draft_depths),
                 "draft_context_len": grid.resolved_draft_context(), "train_tokens": list(grid.train_tokens),
                 "parts": list(grid.parts)},
    }
    if needs_drafter:
        c = draft_model.config
        meta["drafter"] = {"source": drafter_source, "kind": "eagle", "topk": 1, "hidden_size": c.hidden_size,
                           "feature_layers": list(c.feature_layers), "draft_vocab_size": int(draft_model.draft_vocab.numel()),
                           "intermediate_size": c.intermediate_size}
        meta["train"] = {"optimizer": "AdamW", "dtype": "float32", "ttt_steps": grid.ttt_steps,
                         "includes_teacher_forward": False, "seq_len": grid.train_seq_len}
    out["meta"] = meta
    if log is not None:
        log(f"timed {grid.count()} calls in {meta['timing']['profile_seconds']:.1f} s")
    return out


# ---- command line -----------------------------------------------------------------------------------------
def _int_list(flag: str, minimum: int = 1):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected comma-separated integers such as 1,2,4") from None
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: every entry must be >= {minimum}")
        return values

    parse.__name__ = "int list"
    return parse


def _int_list0(flag: str):
    return _int_list(flag, 0)


_positive_int = int_at_least(1)


def register(sub) -> None:
    p = sub.add_parser("profile", help="measure target forward / drafter / trainer-step costs into a profile JSON",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default="smollm2-135m", metavar="NAME|DIR",
                   help="registered model name or local HF directory (as `sglang-ext serve`); with --random-weights "
                        "only its config.json is read (default: smollm2-135m)")
    p.add_argument("--config", metavar="FILE", help="with --random-weights: architecture from this config.json "
                                                     "(e.g. traces/profiles/llama-3.1-8b.config.json); needs no model files")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights of the model's architecture (costs do not depend on weight values)")
    p.add_argument("--name", help="model name recorded in the profile (default: registry name / directory / config file stem)")
    p.add_argument("--speculative-draft-model-path", "--draft-model-path", dest="draft_model_path", metavar="DIR",
                   help="EAGLE drafter checkpoint (default: drafters/<model>-eagle in this repo if present, else a fresh "
                        "random drafter of the EAGLE-3 default architecture); with --random-weights only its config is used")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="target + drafter dtype (auto: float32 on cpu, bfloat16 on cuda); training is float32")
    p.add_argument("--batch-sizes", type=_int_list("--batch-sizes"), default=(1, 2, 4, 8))
    p.add_argument("--tokens", type=_int_list("--tokens"), default=(1, 2, 3, 4, 6, 8),
                   help="new tokens per request in one verify forward, root and tree nodes included")
    p.add_argument("--context-lens", type=_int_list("--context-lens"), default=(128, 512, 1024))
    p.add_argument("--prefill-tokens", type=_int_list("--prefill-tokens"), default=(16, 64, 256, 512),
                   help="prompt tokens per prefill chunk (the engine prefills in chunks of --chunked-prefill-size, 512)")
    p.add_argument("--prefill-context-lens", type=_int_list0("--prefill-context-lens"), default=(0, 512),
                   help="committed tokens before the chunk (0: a prompt's first chunk)")
    p.add_argument("--draft-depths", type=_int_list("--draft-depths"), default=(1, 2, 4))
    p.add_argument("--feature-layers", type=_int_list("--feature-layers"), default=None,
                   help="random drafter without a checkpoint: target layers it reads (default: EAGLE-3 low, middle, high)")
    p.add_argument("--draft-vocab-size", type=_positive_int, default=16384,
                   help="random drafter without a checkpoint: draft vocabulary (default 16384, the shipped drafter's; "
                        "EAGLE-3 uses 32000 for Llama-3.1-8B; >= the target's vocabulary: full)")
    p.add_argument("--draft-context-len", type=_positive_int, default=None, help="committed pairs in the drafter cache (default: middle context length)")
    p.add_argument("--train-tokens", type=_int_list("--train-tokens"), default=(256, 512, 1024))
    p.add_argument("--train-seq-len", type=_positive_int, default=256)
    p.add_argument("--ttt-steps", type=_positive_int, default=3)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--repeats", type=_positive_int, default=5)
    p.add_argument("--warmup", type=int_at_least(0), default=2)
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-o", "--output", type=Path, default=Path("profile.json"))
    p.set_defaults(func=cmd_profile)


def _command_line(args: argparse.Namespace) -> str:
    """The command, rebuilt from the parsed flags (stable whichever way the CLI was invoked)."""
    import shlex

    parts = ["sglang-ext", "profile"]
    if not args.config:
        parts += ["--model-path", args.model_path]
    if args.random_weights:
        parts.append("--random-weights")
    if args.config:
        parts += ["--config", args.config]
    if args.draft_model_path:
        parts += ["--draft-model-path", args.draft_model_path]
    if args.feature_layers:
        parts += ["--feature-layers", ",".join(map(str, args.feature_layers))]
    if args.draft_vocab_size != 16384:
        parts += ["--draft-vocab-size", str(args.draft_vocab_size)]
    parts += ["--device", args.device, "--dtype", args.dtype]
    for flag, v in (("--batch-sizes", args.batch_sizes), ("--tokens", args.tokens), ("--context-lens", args.context_lens),
                    ("--prefill-tokens", args.prefill_tokens), ("--prefill-context-lens", args.prefill_context_lens),
                    ("--draft-depths", args.draft_depths), ("--train-tokens", args.train_tokens)):
        parts += [flag, ",".join(map(str, v))]
    parts += ["--parts", args.parts, "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    parts += ["-o", str(args.output)]
    return shlex.join(parts)


def _load_model(args, dtype, device: str):
    """``(model, name)`` following the flags; every error names its flag (ValueError)."""
    from sglang_ext.models import MODELS
    from sglang_ext.models.provision import model_dir

    if args.random_weights:
        if args.config:
            cfg_dict = read_config_file(args.config)
            name = args.name or Path(args.config).name.removesuffix(".json").removesuffix(".config")
        else:
            d = model_dir(args.model_path) if args.model_path in MODELS else Path(args.model_path).expanduser()
            if not (d / "config.json").is_file():
                raise ValueError(f"--model-path {args.model_path}: no config.json at {d} (not provisioned?); "
                                 "give the architecture with --config FILE")
            cfg_dict = read_config_file(d / "config.json")
            name = args.name or (args.model_path if args.model_path in MODELS else d.resolve().name)
        return random_model(config_from_dict(cfg_dict), dtype, device, args.seed), name
    if args.config:
        raise ValueError("--config needs --random-weights (a config alone has no weights)")
    from .launch import LaunchError, load_target

    try:
        model, _, name, _ = load_target(args.model_path, str(dtype).removeprefix("torch."))
    except LaunchError as e:
        raise ValueError(str(e)) from e
    return model.to(device).eval(), args.name or name


def _load_drafter(args, target_name: str, model):
    """``(draft_model, source)``: the checkpoint, or (``--random-weights``) its architecture with fresh weights;
    without a checkpoint (none given, none shipped for this model) a random one of the EAGLE-3 architecture.
    """
    from sglang_ext.core.drafters.eagle_model import EagleDraftModel

    from .target import TargetModel

    path, shown = args.draft_model_path, args.draft_model_path
    if path is None:
        repo = Path(__file__).resolve().parents[2]
        cand = repo / "drafters" / f"{target_name}-eagle"
        if (cand / "config.json").is_file():
            path, shown = str(cand), f"drafters/{target_name}-eagle (shipped)"
    if path is None:
        drafter = random_drafter(TargetModel(model), args.feature_layers, args.draft_vocab_size, seed=args.seed)
        return drafter, f"random (EAGLE-3 architecture, draft vocabulary {int(drafter.draft_vocab.numel())})"
    if args.random_weights:
        try:
            cfg = json.loads((Path(path) / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--draft-model-path {path}: cannot read config.json ({e})") from e
        return random_drafter(TargetModel(model), drafter_config=cfg, seed=args.seed), f"random weights, architecture of {shown}"
    try:
        return EagleDraftModel.load(path), f"checkpoint {shown}"
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise ValueError(f"--draft-model-path {path}: {e}") from e


def cmd_profile(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    console, err = Console(), Console(stderr=True)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if not parts or any(p not in PARTS for p in parts):
        err.print(f"[red]error:[/red] --parts {args.parts!r}: choose from {', '.join(PARTS)}")
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        err.print(f"[red]error:[/red] --device {args.device}: CUDA is not available here")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch_dtype(args.dtype, args.device)
    grid = ProfileGrid(batch_sizes=args.batch_sizes, tokens=args.tokens, context_lens=args.context_lens,
                       prefill_tokens=args.prefill_tokens, prefill_context_lens=args.prefill_context_lens,
                       draft_depths=args.draft_depths, draft_context_len=args.draft_context_len,
                       train_tokens=args.train_tokens, train_seq_len=args.train_seq_len, ttt_steps=args.ttt_steps,
                       repeats=args.repeats, warmup=args.warmup, parts=parts)
    try:
        model, name = _load_model(args, dtype, args.device)
        draft_model, source = (None, "none")
        if "draft" in parts or "train" in parts:
            draft_model, source = _load_drafter(args, name, model)
        max_pos = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        if "target" in parts and max(grid.context_lens) + max(grid.tokens) + 1 > max_pos:
            raise ValueError(f"--context-lens: {max(grid.context_lens)} + {max(grid.tokens)} tokens exceed the model's "
                             f"{max_pos} positions")
        if "prefill" in parts and max(grid.prefill_context_lens) + max(grid.prefill_tokens) + 1 > max_pos:
            raise ValueError(f"--prefill-context-lens: {max(grid.prefill_context_lens)} + {max(grid.prefill_tokens)} "
                             f"tokens exceed the model's {max_pos} positions")
        profile = run_profile(model, name=name, grid=grid, draft_model=draft_model, drafter_source=source,
                              random_weights=args.random_weights, command=_command_line(args),
                              progress=not args.no_progress, seed=args.seed)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text(json.dumps(profile, indent=1) + "\n")
    tmp.replace(args.output)
    console.print(summary_line(profile))
    console.print(f"wrote {args.output}")
    return 0


def summary_line(profile: dict) -> str:
    """Headline numbers: decode forward at batch 1 / max batch, draft step, train step."""
    t = profile["target"]
    bits = [f"{profile['meta']['model']} on {profile['meta']['hardware']['summary']}"]
    if t:
        ctx = min(r["context_len"] for r in t)
        dec = {r["batch_size"]: r["seconds"] for r in t if r["tokens_per_request"] == 1 and r["context_len"] == ctx}
        if dec:
            bits.append(f"decode forward (ctx {ctx}): " + ", ".join(f"B={b} {s * 1e3:.1f} ms" for b, s in sorted(dec.items())))
    if profile["prefill"]:
        r = max((r for r in profile["prefill"] if r["context_len"] == min(x["context_len"] for x in profile["prefill"])),
                key=lambda r: r["tokens"])
        bits.append(f"prefill {r['tokens']} tokens: {r['seconds'] * 1e3:.0f} ms")
    if profile["draft"]:
        d1 = [r for r in profile["draft"] if r.get("depth", 1) == min(x.get("depth", 1) for x in profile["draft"])]
        r = min(d1, key=lambda r: r["batch_size"])
        bits.append(f"draft B={r['batch_size']} depth {r.get('depth', 1)}: {r['seconds'] * 1e3:.1f} ms")
    if profile["train"]:
        r = max(profile["train"], key=lambda r: r["tokens"])
        bits.append(f"train step {r['tokens']} tokens: {r['seconds'] * 1e3:.0f} ms")
    return "; ".join(bits)


__all__ = ["PROFILE_FORMAT", "ProfileGrid", "config_from_dict", "default_feature_layers", "hardware_meta", "measure_draft",
           "measure_prefill", "measure_target", "measure_train", "random_drafter", "random_model", "register", "run_profile", "time_points"]
