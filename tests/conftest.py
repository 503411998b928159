"""Shared fixtures. The lossless checker fixture itself ships in ``sglang_ext.testing`` (a pytest plugin)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: Set (to anything but "", "0", "false", "no") by ``.ci/run``: missing provisioning is then a failure, not a skip.
REQUIRE_MODEL_ENV = "SGLANG_EXT_REQUIRE_MODEL"


def model_required() -> bool:
    return os.environ.get(REQUIRE_MODEL_ENV, "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    """Skip because something provisioned (the real model, its tokenizer, the shipped drafter) is missing, unless
    ``SGLANG_EXT_REQUIRE_MODEL`` is set: in CI, where ``.ci/run`` provisions everything, a skip would hide that the
    tests never ran, so it fails instead. Use it for provisioning only; optional extras (CUDA, data outside the
    repository) keep plain ``pytest.skip``."""
    if model_required():
        pytest.fail(f"{reason} [{REQUIRE_MODEL_ENV} is set: provisioning is required, so this fails instead of "
                    "skipping]", pytrace=False)
    pytest.skip(reason)


def require_module(name: str):
    """``pytest.importorskip`` for an optional extra (``sglang``), but a failure when ``SGLANG_EXT_REQUIRE_MODEL``
    is set: ``.ci/run`` installs every extra, so a missing one there means the tests never ran."""
    if model_required():
        import importlib

        try:
            return importlib.import_module(name)
        except ImportError as e:
            pytest.fail(f"{name} does not import ({e}) [{REQUIRE_MODEL_ENV} is set: every extra is required]",
                        pytrace=False)
    return pytest.importorskip(name)


def require_model(name: str = "smollm2-135m", what: str = "") -> None:
    """``skip_or_fail`` unless model ``name`` is provisioned in the cache (``SGLANG_EXT_CACHE``)."""
    from sglang_ext.models.provision import is_provisioned

    if not is_provisioned(name):
        skip_or_fail(f"{name}{' ' + what if what else ''} not provisioned (`sglang-ext models fetch {name}`)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the project root (real prompts and traces; never copied into the project)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA
