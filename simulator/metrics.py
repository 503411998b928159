"""Moved: the format lives in :mod:`sglang_ext.formats.results` (shared by the engine and the simulator). This name stays
an alias of that very module, so ``simulator.metrics`` imports keep working."""

import sys

from sglang_ext.formats import results as _module

sys.modules[__name__] = _module
