"""The end-to-end checks of ``tests/test_sglang_e2e.py`` on a CUDA machine with SGLang's real kernels.

Run with ``pytest -m sglang_gpu tests/test_sglang_gpu.py`` where SGLang 0.5.23 and a CUDA GPU are present; skipped
elsewhere (this project's CI machines have no GPU).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (SGLang's real kernels)", allow_module_level=True)
pytest.importorskip("sglang")

from test_sglang_e2e import (  # noqa: E402,F401  (the same tests, with the GPU launcher below)
    eagle3_dir,
    plain,
    target_dir,
    test_eagle3_with_converted_drafter_is_identical_to_plain,
    test_eagle3_with_policy_and_online_learning,
    test_ngram_is_identical_to_plain,
    test_plugin_loads_in_every_server_process,
)

from sglang_ext.testing.sglang_cpu.launcher import SGLangGPUServer  # noqa: E402

pytestmark = [pytest.mark.sglang_gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def server_cls():
    return SGLangGPUServer
