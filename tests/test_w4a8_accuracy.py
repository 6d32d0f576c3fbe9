"""CPU tests of the W4A8 accuracy emulation in `benchmarks/w4a8_accuracy.py`."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_moe import models

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "w4a8_accuracy.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("w4a8_accuracy", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_row_quantization_is_e4m3_with_a_row_scale(study):
    x = jax.random.normal(jax.random.key(0), (8, 256), jnp.float32) * jnp.arange(1, 9)[:, None]
    q = np.asarray(study.quantize_rows_e4m3(x))
    x = np.asarray(x)
    amax = np.abs(x).max(axis=1, keepdims=True)
    # Each row's largest element maps to 448 exactly; the others keep 3 mantissa bits
    # (relative error <= 2**-4 above e4m3's normal range, absolute below it).
    np.testing.assert_allclose(np.abs(q).max(axis=1), amax[:, 0], rtol=1e-6)
    bound = np.maximum(np.abs(x) * 2.0**-4, amax / 448 * 2.0**-10)
    assert np.all(np.abs(q - x) <= bound * (1 + 1e-6))
    assert np.any(q != x)
    np.testing.assert_array_equal(np.asarray(study.quantize_rows_e4m3(jnp.zeros((2, 4)))), 0)


def test_weight_rounding_shifts_by_a_power_of_two(study):
    # Values already on the e4m3 grid after the shift come back unchanged.
    grid = jnp.array([[1.0, -1.5, 0.375, 448.0]]) * 2.0**5
    np.testing.assert_array_equal(np.asarray(study.round_weights_e4m3(grid)), np.asarray(grid))
    w = jax.random.normal(jax.random.key(1), (64, 64), jnp.float32) * 1e-3
    r = np.asarray(study.round_weights_e4m3(w))
    w = np.asarray(w)
    assert np.all(np.abs(r - w) <= np.abs(w) * 2.0**-4 + np.abs(w).max() * 2.0**-18)


def test_modes_against_the_reference(study):
    config = models.get_preset("tiny")
    errors = study.measure(config, ep=2, num_tokens=16, seed=0, outliers=False)
    assert set(errors) == {"nvfp4", *study.MODES}
    # bf16 activations only round between the GEMMs; e4m3 costs more, rounding the
    # weights as well more again.
    assert errors["w4a16"].rms < 5e-3
    assert errors["w4a16"].rms < errors["w4a8"].rms < 0.1
    assert errors["w4a8"].rms < errors["w4a8_w8"].rms < 0.15
    with pytest.raises(ValueError, match="mode"):
        study.layer_outputs(jnp.zeros((1, 256)), None, None, jnp.zeros((1, 4)), mode="w8a8")
