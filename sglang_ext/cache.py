"""Where the project keeps what it downloads or derives once (models, prompt sets, profiles, cost-model fits).

A module of its own, importing nothing heavy, so that the simulator can find the cache without importing the
model code (and torch with it).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SGLANG_EXT_CACHE`` or ``~/.cache/sglang-ext``."""
    return Path(os.environ.get("SGLANG_EXT_CACHE") or Path.home() / ".cache" / "sglang-ext").expanduser()
