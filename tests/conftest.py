"""Shared test helpers: tolerances and GPU skips.

Tolerances live here and nowhere else: a comparison of a bf16-producing path
against the float32 reference allows the error of a few bf16 roundings of the
intermediate activations, measured relative to the output's scale.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

# Relative to max |expected|; one bf16 rounding is 2**-9 of a value.
_TOLERANCES = {
    "float32": 1e-5,
    "bfloat16": 2e-2,
    "float16": 5e-3,
}


def tolerance(dtype) -> float:
    """The relative tolerance for results of ``dtype`` compared with float32."""
    return _TOLERANCES[np.dtype(dtype).name]


def assert_close(actual, expected, dtype=None, *, rtol: float | None = None) -> None:
    """Asserts ``max|actual - expected| <= rtol * max(|expected|, tiny)``, elementwise finite."""
    actual = np.asarray(actual, dtype=np.float32)
    expected = np.asarray(expected, dtype=np.float32)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), "result has non-finite values"
    if rtol is None:
        rtol = tolerance(dtype if dtype is not None else actual.dtype)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    err = float(np.max(np.abs(actual - expected), initial=0.0))
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol:.1e} * scale {scale:.3e}"


@functools.cache
def gpu_reason() -> str | None:
    """Why GPU tests cannot run here, or None if they can."""
    try:
        if jax.default_backend() != "gpu":
            return "no CUDA GPU visible to JAX"
    except RuntimeError as e:  # no backend at all
        return f"no JAX backend: {e}"
    try:
        from jax_moe import gpu
    except ImportError as e:
        return f"jax_moe.gpu not importable: {e}"
    if not gpu.is_available():
        return "the jax_moe FFI extension is not built"
    return None


requires_gpu = pytest.mark.skipif(gpu_reason() is not None, reason=str(gpu_reason()))
