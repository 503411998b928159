"""Versioned drafter checkpoints in a directory: the trainer publishes, the server picks up.

Layout::

    DIR/v000007/{model.safetensors, config.json}   one complete checkpoint per version (``save`` of either architecture)
    DIR/LATEST                                      the newest complete version number, as text

Atomicity (POSIX rename): a version is written into a hidden temp directory beside it and renamed into place
as a whole, so ``v000007/`` either does not exist or is complete; ``LATEST`` is then replaced by writing a temp
file and ``os.replace``-ing it, so a reader sees the old number or the new one, never a torn write, and the
version it names is already complete. A reader's check is one small file read (:func:`latest_version`).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from sglang_ext.core.drafters.checkpoint import FeatureDraftModel

LATEST = "LATEST"
_VERSION = re.compile(r"^v(\d{6,})$")


def version_dir(directory: str | Path, version: int) -> Path:
    return Path(directory) / f"v{version:06d}"


def versions(directory: str | Path) -> list[int]:
    """Complete versions present, ascending."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _VERSION.match(p.name)))


def latest_version(directory: str | Path) -> int | None:
    """The version ``LATEST`` names, or None before the first publish (one small read; no directory scan)."""
    try:
        text = (Path(directory) / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(model: FeatureDraftModel, directory: str | Path, extra: dict | None = None) -> int:
    """Write ``model`` as the next version and point ``LATEST`` at it; returns the version number."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save(tmp, extra=extra)
        for name in ("model.safetensors", "config.json"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        while True:  # another publisher may take a number first: take the next free one
            have = versions(d)
            v = (have[-1] if have else 0) + 1
            try:
                os.rename(tmp, version_dir(d, v))  # fails if the target exists (non-empty directory)
                break
            except OSError:
                if not version_dir(d, v).exists():
                    raise
        _fsync_dir(d)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _set_latest(d, v)
    return v


def _set_latest(d: Path, v: int) -> None:
    tmp = d / f".{LATEST}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(f"{v}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / LATEST)
    _fsync_dir(d)


def load_version(directory: str | Path, version: int, expect_target: dict | None = None) -> FeatureDraftModel:
    """Load one version, of either architecture (refusing a checkpoint made for another target); unbound: call
    ``bind_target``."""
    from sglang_ext.core.drafters.checkpoint import load_draft_model

    return load_draft_model(version_dir(directory, version), expect_target=expect_target)


def prune(directory: str | Path, keep: int = 4) -> list[int]:
    """Delete all but the newest ``keep`` versions (never the one ``LATEST`` names); returns those removed."""
    d = Path(directory)
    latest = latest_version(d)
    have = versions(d)
    removed = []
    for v in have[:-keep] if keep > 0 else have:
        if v == latest:
            continue
        shutil.rmtree(version_dir(d, v), ignore_errors=True)
        removed.append(v)
    return removed


__all__ = ["LATEST", "latest_version", "load_version", "prune", "publish", "version_dir", "versions"]
