"""On-disk cache of a target's features and final hidden states, so drafters train without re-running the target.

Training a drafter on CPU is dominated by the target's forward passes; several drafters (different architectures,
same budget) can share one pass. :meth:`FeatureCache.build` runs the target once over a corpus and stores, per
sequence, its tokens, the chosen layers' outputs and the final normed hidden state (float16). The hidden state,
not the distribution, is stored because ``d`` is far smaller than the vocabulary; :meth:`FeatureCache.batch`
applies the LM-head rows of the draft vocabulary, so one cache serves any draft vocabulary.

Layout of ``directory``::

    index.json                   meta (see ``build``) + "shards": [{"name", "sequences", "lengths"}, ...]
    shard_00000.tokens.npy       int32   [N]     the shard's sequences concatenated (no padding)
    shard_00000.features.npy     float16 [N, F]
    shard_00000.hidden.npy       float16 [N, d]

One shard per target batch, each file written under a temporary name and renamed, and ``index.json`` rewritten
(atomically) after each shard: a shard is finished iff the index lists it, so an interrupted build resumes.
Sequence ``i`` of the cache is sequence ``i`` of the corpus given to ``build`` (the byte budget drops a tail).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sglang_ext.core.buckets import length_buckets
from sglang_ext.core.drafters.eagle_model import target_identity

FORMAT = "sglang-ext-feature-cache"
VERSION = 1
INDEX = "index.json"
ARRAYS = ("tokens", "features", "hidden")
_SHARD_FILE = re.compile(r"^shard_\d+\.(tokens|features|hidden)\.npy(\.tmp)?$")
_FP16_MAX = float(np.finfo(np.float16).max)
# a resumed build must agree on these (batch_tokens may differ: it only changes how the rest is grouped)
_BUILD_KEYS = ("format", "version", "target", "feature_layers", "feature_dim", "hidden_size", "sequences_digest",
               "max_bytes")


class FeatureCacheError(ValueError):
    """A cache directory that cannot be used as asked; the message names the directory or file at fault."""


def sequences_digest(sequences: Sequence[Sequence[int]]) -> str:
    """sha256 over the sequences (each length-prefixed), to tell one corpus from another."""
    h = hashlib.sha256()
    for s in sequences:
        a = np.asarray(s, dtype=np.int64)
        h.update(np.int64(len(a)).tobytes())
        h.update(a.tobytes())
    return h.hexdigest()


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _read_index(directory: Path) -> dict:
    path = directory / INDEX
    if not path.is_file():
        raise FeatureCacheError(f"{path}: no feature cache index (build one with FeatureCache.build)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FeatureCacheError(f"{path}: corrupt feature cache index ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("shards"), list):
        raise FeatureCacheError(f"{path}: not a {FORMAT} index")
    if meta.get("version") != VERSION:
        raise FeatureCacheError(f"{path}: cache format version {meta.get('version')!r}, this code reads {VERSION}")
    return meta


def _shard_path(directory: Path, name: str, array: str) -> Path:
    return directory / f"shard_{name}.{array}.npy"


class FeatureCache:
    """On-disk cache of a target's per-position features and final hidden states for a corpus (float16)."""

    def __init__(self, directory: Path, meta: dict) -> None:
        """Use :meth:`open` (or :meth:`build`); this indexes a validated ``meta``."""
        self.directory = directory
        self.meta = meta
        n = meta["num_sequences"]
        self._where: list[tuple[int, int, int] | None] = [None] * n  # sequence -> (shard, row offset, length)
        for k, shard in enumerate(meta["shards"]):
            off = 0
            for i, length in zip(shard["sequences"], shard["lengths"]):
                if not 0 <= i < n or self._where[i] is not None:
                    raise FeatureCacheError(f"{directory / INDEX}: shard {shard['name']} lists sequence {i} "
                                            "out of range or twice")
                self._where[i] = (k, off, length)
                off += length
        missing = [i for i, w in enumerate(self._where) if w is None]
        if missing:
            raise FeatureCacheError(f"{directory / INDEX}: {len(missing)} sequences in no shard (first: {missing[0]})")
        self._open: OrderedDict[int, tuple[np.ndarray, ...]] = OrderedDict()  # LRU of memory-mapped shards

    # ------------------------------------------------------------------ building
    @staticmethod
    def build(target, sequences: Sequence[Sequence[int]], directory: str | Path, *, target_name: str,
              max_bytes: int = 8 * 2**30, batch_tokens: int = 4096, progress: bool = True, log=print) -> "FeatureCache":
        """Run the target once over ``sequences`` and store what drafter training needs from it.

        Batches are length-bucketed (about ``batch_tokens`` padded tokens each), run without grad. Bounded: the
        corpus is kept up to the first sequence whose bytes would exceed ``max_bytes`` (the rest is dropped and
        counted in meta). Resumable: finished shards of an earlier run on the same inputs are kept; a directory
        holding a cache of another target, feature-layer set, corpus or budget raises :class:`FeatureCacheError`.
        """
        directory = Path(directory)
        if not target.feature_layers:
            raise ValueError("the target has no feature layers; call target.set_feature_layers(...) first")
        seqs = [[int(t) for t in s] for s in sequences]
        for i, s in enumerate(seqs):
            if not s:
                raise ValueError(f"sequence {i} is empty")
            if len(s) > target.max_positions:
                raise ValueError(f"sequence {i} has {len(s)} tokens, more than the target's {target.max_positions} positions")
        F, d = target.feature_dim, target.hidden_size
        per_token = 4 + 2 * (F + d)
        kept, total = 0, 0
        for s in seqs:
            if total + len(s) * per_token > max_bytes:
                break
            total += len(s) * per_token
            kept += 1
        meta = {"format": FORMAT, "version": VERSION, "target": target_identity(target_name, target.config),
                "feature_layers": list(target.feature_layers), "feature_dim": F, "hidden_size": d,
                "target_dtype": str(target.dtype).removeprefix("torch."), "num_sequences": kept,
                "num_tokens": sum(len(s) for s in seqs[:kept]), "bytes": total, "max_bytes": int(max_bytes),
                "input_sequences": len(seqs), "dropped_sequences": len(seqs) - kept,
                "sequences_digest": sequences_digest(seqs), "complete": False, "shards": []}
        if kept < len(seqs):
            log(f"feature cache {directory}: the {max_bytes} byte budget keeps {kept} of {len(seqs)} sequences "
                f"({len(seqs) - kept} dropped)")

        directory.mkdir(parents=True, exist_ok=True)
        if (directory / INDEX).exists():
            old = _read_index(directory)
            for key in _BUILD_KEYS:
                if old.get(key) != meta[key]:
                    raise FeatureCacheError(f"{directory}: holds a feature cache made for another {key} "
                                            f"({old.get(key)!r}, now {meta[key]!r}); use another directory or delete it")
            intact = all(_shard_path(directory, sh["name"], a).is_file() for sh in old["shards"] for a in ARRAYS)
            if old.get("complete") and intact:  # finished: open it without rewriting (trainers may share one cache)
                return FeatureCache.open(directory)
            for shard in old["shards"]:  # keep the finished shards whose files are all there
                if all(_shard_path(directory, shard["name"], a).is_file() for a in ARRAYS):
                    meta["shards"].append(shard)
                else:
                    log(f"feature cache {directory}: shard {shard['name']} has missing files; recomputing it")
            if meta["shards"]:
                log(f"feature cache {directory}: resuming, {len(meta['shards'])} shards already done")
        names = {s["name"] for s in meta["shards"]}
        for p in directory.iterdir():  # leftovers of an interrupted write
            m = _SHARD_FILE.match(p.name)
            if m and p.name.split(".")[0].removeprefix("shard_") not in names:
                p.unlink()

        done = {i for s in meta["shards"] for i in s["sequences"]}
        todo = [i for i in range(kept) if i not in done]
        groups = [[todo[j] for j in g] for g in length_buckets([len(seqs[i]) for i in todo], batch_tokens)]
        next_id = max((int(n) for n in names), default=-1) + 1
        _atomic_write_json(directory / INDEX, meta)

        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("[bold]feature-cache"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                      TimeRemainingColumn(), disable=not progress) as bar:
            task = bar.add_task("cache", total=meta["num_tokens"], completed=sum(len(seqs[i]) for i in done))
            runner = _Runner(target)
            for k, group in enumerate(groups):
                name = f"{next_id + k:05d}"
                arrays = runner([seqs[i] for i in group])
                for a, arr in zip(ARRAYS, arrays):
                    _atomic_save(_shard_path(directory, name, a), arr)
                meta["shards"].append({"name": name, "sequences": group, "lengths": [len(seqs[i]) for i in group]})
                _atomic_write_json(directory / INDEX, meta)
                bar.update(task, advance=len(arrays[0]))
        meta["complete"] = True
        _atomic_write_json(directory / INDEX, meta)
        log(f"feature cache {directory}: {kept} sequences, {meta['num_tokens']} tokens, {total / 2**20:.1f} MiB")
        return FeatureCache.open(directory)

    # ------------------------------------------------------------------ reading
    @staticmethod
    def open(directory: str | Path, expect: dict | None = None) -> "FeatureCache":
        """Open a finished cache; every ``expect`` key must match meta (a dict value: each of its keys)."""
        directory = Path(directory)
        meta = _read_index(directory)
        if not meta.get("complete"):
            raise FeatureCacheError(f"{directory}: feature cache build was interrupted; run build again to finish it")
        for key, want in (expect or {}).items():
            have = meta.get(key)
            if isinstance(want, dict) and isinstance(have, dict):
                for sub, w in want.items():
                    if have.get(sub) != w:
                        raise FeatureCacheError(f"{directory}: feature cache has {key}.{sub}={have.get(sub)!r}, "
                                                f"expected {w!r}")
            elif (list(want) if isinstance(want, tuple) else want) != have:
                raise FeatureCacheError(f"{directory}: feature cache has {key}={have!r}, expected {want!r}")
        for shard in meta["shards"]:
            for a in ARRAYS:
                if not _shard_path(directory, shard["name"], a).is_file():
                    raise FeatureCacheError(f"{_shard_path(directory, shard['name'], a)}: shard file missing")
        return FeatureCache(directory, meta)

    def __len__(self) -> int:
        return len(self._where)

    @property
    def lengths(self) -> list[int]:
        return [w[2] for w in self._where]

    def _shard(self, k: int) -> tuple[np.ndarray, ...]:
        """Memory-mapped (tokens, features, hidden) of shard ``k``, checked against the index on first use."""
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        shard = self.meta["shards"][k]
        n = sum(shard["lengths"])
        shapes = {"tokens": ((n,), np.int32), "features": ((n, self.meta["feature_dim"]), np.float16),
                  "hidden": ((n, self.meta["hidden_size"]), np.float16)}
        arrays = []
        for a in ARRAYS:
            path = _shard_path(self.directory, shard["name"], a)
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise FeatureCacheError(f"{path}: unreadable shard file ({e})") from e
            if (arr.shape, arr.dtype) != shapes[a]:
                raise FeatureCacheError(f"{path}: shard file has shape {arr.shape} {arr.dtype}, "
                                        f"the index says {shapes[a][0]} {np.dtype(shapes[a][1])}")
            arrays.append(arr)
        self._open[k] = tuple(arrays)
        if len(self._open) > 64:  # bound open mappings (each holds a file descriptor)
            self._open.popitem(last=False)
        return self._open[k]

    def _rows(self, i: int, array: int) -> np.ndarray:
        k, off, n = self._where[i]
        return self._shard(k)[array][off:off + n]

    def sequence(self, i: int) -> list[int]:
        return self._rows(i, 0).tolist()

    def batch(self, indices: Sequence[int], lm_rows: torch.Tensor, device="cpu", pad_id: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded (tokens [B,S] long, valid [B,S] bool, features [B,S,F] float32, logp [B,S,V_d] float32), as
        :class:`~sglang_ext.training.drafter.TargetTeacher` gives them: logp = log_softmax(hidden @ lm_rows.T)
        in float32 (``lm_rows [V_d, d]``: the LM-head rows of the draft vocabulary). Padding: zeros, valid False."""
        B, S = len(indices), max(self._where[i][2] for i in indices)
        tokens = np.full((B, S), pad_id, dtype=np.int64)
        valid = np.zeros((B, S), dtype=bool)
        feats = np.zeros((B, S, self.meta["feature_dim"]), dtype=np.float16)
        hidden = np.zeros((B, S, self.meta["hidden_size"]), dtype=np.float16)
        for b, i in enumerate(indices):
            n = self._where[i][2]
            tokens[b, :n] = self._rows(i, 0)
            valid[b, :n] = True
            feats[b, :n] = self._rows(i, 1)
            hidden[b, :n] = self._rows(i, 2)
        device = torch.device(device)
        valid_t = torch.from_numpy(valid).to(device)
        h = torch.from_numpy(hidden).to(device)[valid_t].float()
        rows = torch.log_softmax(h @ lm_rows.to(device=device, dtype=torch.float32).T, dim=-1)
        logp = torch.zeros(B, S, lm_rows.shape[0], dtype=torch.float32, device=device)
        logp[valid_t] = rows
        return (torch.from_numpy(tokens).to(device), valid_t, torch.from_numpy(feats).to(device).float(), logp)


class _Runner:
    """The target over one padded batch (as TargetTeacher runs it) → flat int32 tokens, float16 features, hidden."""

    def __init__(self, target) -> None:
        self.target, self.cache = target, None

    @torch.inference_mode()
    def __call__(self, seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = self.target
        B, S = len(seqs), max(len(s) for s in seqs)
        tokens = torch.zeros(B, S, dtype=torch.long)
        valid = torch.zeros(B, S, dtype=torch.bool)
        for b, s in enumerate(seqs):
            tokens[b, :len(s)] = torch.tensor(s)
            valid[b, :len(s)] = True
        if self.cache is None or self.cache.num_slots < B or self.cache.max_len < S:
            self.cache = t.new_cache(B, S)
        self.cache.lengths.zero_()
        visible = torch.ones(S, S, dtype=torch.bool, device=t.device).tril().expand(B, S, S)
        depths = torch.arange(S, device=t.device).expand(B, S)
        out = t.forward(self.cache, tokens.to(t.device), visible, depths, hidden_only=True)
        valid = valid.to(t.device)

        def half(x: torch.Tensor) -> np.ndarray:  # clamp: an outlier beyond float16's range must not become inf
            return x[valid].float().clamp(-_FP16_MAX, _FP16_MAX).half().cpu().numpy()

        flat = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
        return flat, half(out.features), half(out.hidden)
