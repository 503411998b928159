"""pytest plugin (registered through the ``pytest11`` entry point): the ``lossless_checker`` fixture.

Usage in any project that installs sglang-ext::

    def test_my_kernel_is_lossless(lossless_checker):
        lossless_checker.exact(my_verify_fn, scheme="topk", branching=(2, 1))   # exact, to 1e-12
        lossless_checker.monte_carlo(my_gpu_verify_fn, scheme="chain", branching=(1, 1, 1))
"""

from __future__ import annotations

import pytest


class LosslessChecker:
    """Thin front for :mod:`sglang_ext.core.lossless` with toy defaults (vocab 4, temperature 1)."""

    def case(self, scheme: str = "chain", branching: tuple[int, ...] = (1, 1), vocab_size: int = 4,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, num_tokens: int | None = None,
             seed: int = 0, **kwargs):
        from sglang_ext.core.lossless import LosslessCase, ToyModel, TreeSpec
        from sglang_ext.core.processing import SamplingParams

        return LosslessCase(
            target=ToyModel(vocab_size, seed=2 * seed + 1, zero_fraction=0.15),
            draft=ToyModel(vocab_size, seed=2 * seed + 2),
            spec=TreeSpec(scheme, tuple(branching)),
            target_params=SamplingParams(temperature, top_p, top_k),
            num_tokens=num_tokens or len(branching) + 1,
            **kwargs,
        )

    def exact(self, verify_fn, tol: float = 1e-12, **case_kwargs):
        from sglang_ext.core.lossless import check_lossless_exact

        return check_lossless_exact(verify_fn, self.case(**case_kwargs), tol=tol)

    def monte_carlo(self, verify_fn, samples: int = 20_000, seed: int = 0, significance: float = 1e-3, **case_kwargs):
        from sglang_ext.core.lossless import check_lossless_monte_carlo

        return check_lossless_monte_carlo(verify_fn, self.case(**case_kwargs), samples, seed, significance)


@pytest.fixture
def lossless_checker() -> LosslessChecker:
    return LosslessChecker()
