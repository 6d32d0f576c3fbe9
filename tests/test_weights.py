"""Tests of MoEWeights, quantize_moe_weights and the random weights of model presets."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe
from jax_moe import models, nvfp4


def dense_weights(seed, experts=3, hidden=64, inter=32, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    w13 = rng.normal(size=(experts, 2 * inter, hidden)) * np.exp(rng.normal(size=(experts, 1, 1)))
    w2 = rng.normal(size=(experts, hidden, inter)) / np.sqrt(inter)
    return jnp.asarray(w13, dtype), jnp.asarray(w2, dtype)


def assert_same_tensor(a: nvfp4.Nvfp4Tensor, b: nvfp4.Nvfp4Tensor) -> None:
    np.testing.assert_array_equal(np.asarray(a.packed), np.asarray(b.packed))
    np.testing.assert_array_equal(
        np.asarray(a.scale).view(np.uint8), np.asarray(b.scale).view(np.uint8)
    )
    np.testing.assert_array_equal(np.asarray(a.global_scale), np.asarray(b.global_scale))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantize_moe_weights_layout(dtype):
    w13, w2 = dense_weights(0, dtype=dtype)
    weights = jax_moe.quantize_moe_weights(w13, w2)
    assert isinstance(weights, jax_moe.MoEWeights)
    assert (weights.num_experts, weights.hidden, weights.intermediate) == (3, 64, 32)
    assert weights.w13.shape == (3, 64, 64) and weights.w2.shape == (3, 64, 32)
    assert weights.w13.global_scale.shape == (3,) and weights.w2.global_scale.shape == (3,)
    # Exactly the per-expert NVFP4 quantization of each matrix.
    assert_same_tensor(weights.w13, nvfp4.quantize(w13))
    assert_same_tensor(weights.w2, nvfp4.quantize(w2))
    for e in range(3):
        one = jax.tree.map(lambda a, e=e: a[e], weights.w13)
        assert_same_tensor(one, nvfp4.quantize(w13[e], one.global_scale))
    # Gate rows stay first, up rows second: quantization is row-local.
    gate_only = nvfp4.quantize(w13[:, :32], weights.w13.global_scale)
    np.testing.assert_array_equal(
        np.asarray(gate_only.packed), np.asarray(weights.w13.packed[:, :32])
    )


def test_dequantized_weights_are_close_to_the_dense_ones():
    w13, w2 = dense_weights(1)
    weights = jax_moe.quantize_moe_weights(w13, w2)
    for dense, q in ((w13, weights.w13), (w2, weights.w2)):
        dense = np.asarray(dense)
        deq = np.asarray(nvfp4.dequantize(q))
        block_amax = np.repeat(np.abs(dense).reshape(*dense.shape[:-1], -1, 16).max(-1), 16, -1)
        assert np.all(np.abs(deq - dense) <= block_amax * (1 + 2**-4) / 6 * (1 + 1e-6))
        rel = np.linalg.norm(deq - dense) / np.linalg.norm(dense)
        assert 0.0 < rel < 0.15


def test_weights_are_a_frozen_pytree():
    weights = jax_moe.quantize_moe_weights(*dense_weights(2))
    leaves, treedef = jax.tree.flatten(weights)
    assert len(leaves) == 6
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert_same_tensor(rebuilt.w13, weights.w13)
    with pytest.raises(dataclasses.FrozenInstanceError):
        weights.w13 = weights.w2
    # Passes through jit as an argument and a result.
    out = jax.jit(lambda w: w)(weights)
    assert isinstance(out, jax_moe.MoEWeights)
    assert_same_tensor(out.w2, weights.w2)
    sliced = jax.tree.map(lambda a: a[1:], weights)
    assert sliced.num_experts == 2
    sliced.check()


@pytest.mark.parametrize(
    ("w13_shape", "w2_shape", "match"),
    [
        ((64, 32), (3, 32, 32), "w13 must be"),
        ((3, 64, 32), (32, 32), "w2 must be"),
        ((3, 63, 32), (3, 32, 31), "even number of rows"),
        ((3, 64, 32), (3, 32, 16), "w2 must have shape"),
        ((3, 64, 32), (2, 32, 32), "w2 must have shape"),
        ((3, 64, 24), (3, 24, 32), "w13's last dim must be a multiple of 16"),
        ((3, 48, 32), (3, 32, 24), "w2's last dim must be a multiple of 16"),
    ],
)
def test_quantize_moe_weights_shape_errors(w13_shape, w2_shape, match):
    with pytest.raises(ValueError, match=match):
        jax_moe.quantize_moe_weights(jnp.ones(w13_shape), jnp.ones(w2_shape))


def test_quantize_moe_weights_dtype_errors():
    with pytest.raises(TypeError, match="w13 must be float32, bfloat16 or float16"):
        jax_moe.quantize_moe_weights(jnp.ones((2, 64, 32), jnp.int32), jnp.ones((2, 32, 32)))
    with pytest.raises(TypeError, match="w2 must be float32, bfloat16 or float16"):
        jax_moe.quantize_moe_weights(jnp.ones((2, 64, 32)), jnp.ones((2, 32, 32), jnp.int8))


def test_quantize_moe_weights_rejects_non_finite():
    w13, w2 = dense_weights(3)
    with pytest.raises(ValueError, match="NaN or infinity"):
        jax_moe.quantize_moe_weights(w13.at[1, 2, 3].set(jnp.nan), w2)


def test_check_errors():
    weights = jax_moe.quantize_moe_weights(*dense_weights(4))
    with pytest.raises(TypeError, match="weights.w13 must be an Nvfp4Tensor"):
        jax_moe.MoEWeights(w13=weights.w13.packed, w2=weights.w2).check()
    with pytest.raises(ValueError, match="weights.w2 must have logical shape"):
        jax_moe.MoEWeights(w13=weights.w13, w2=jax.tree.map(lambda a: a[:2], weights.w2)).check()
    flat = jax.tree.map(lambda a: a[0], weights.w13)
    with pytest.raises(ValueError, match="must be 3-D"):
        jax_moe.MoEWeights(w13=flat, w2=weights.w2).check()
    bad_scale = dataclasses.replace(weights.w2, scale=weights.w2.scale.astype(jnp.float32))
    with pytest.raises(TypeError, match="weights.w2.scale must be float8_e4m3fn"):
        jax_moe.MoEWeights(w13=weights.w13, w2=bad_scale).check()


# --- random weights of presets ---


def test_random_moe_weights_slices_match_the_whole_layer():
    cfg = models.get_preset("tiny")
    key = jax.random.key(5)
    whole = models.random_moe_weights(key, cfg)
    assert whole.num_experts == cfg.num_experts
    assert (whole.hidden, whole.intermediate) == (cfg.hidden, cfg.intermediate)
    part = models.random_moe_weights(key, cfg, num_local_experts=2, local_expert_offset=4)
    assert part.num_experts == 2
    for name in ("w13", "w2"):
        assert_same_tensor(
            getattr(part, name), jax.tree.map(lambda a: a[4:6], getattr(whole, name))
        )
    # Different experts and different keys give different weights.
    assert not np.array_equal(np.asarray(whole.w13.packed[0]), np.asarray(whole.w13.packed[1]))
    other = models.random_moe_weights(jax.random.key(6), cfg, 2)
    assert not np.array_equal(np.asarray(other.w13.packed[0]), np.asarray(whole.w13.packed[0]))


def test_random_moe_weights_scale():
    cfg = models.MoEConfig(name="small", num_experts=2, top_k=1, hidden=256, intermediate=64)
    weights = models.random_moe_weights(jax.random.key(7), cfg, dtype=jnp.float32)
    w13 = np.asarray(nvfp4.dequantize(weights.w13))
    w2 = np.asarray(nvfp4.dequantize(weights.w2))
    np.testing.assert_allclose(w13.std(), 1 / np.sqrt(256), rtol=0.1)
    np.testing.assert_allclose(w2.std(), 1 / np.sqrt(64), rtol=0.1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_local_experts=0), ValueError, "num_local_experts"),
        (dict(num_local_experts=4, local_expert_offset=6), ValueError, "exceed"),
        (dict(local_expert_offset=-1), ValueError, "local_expert_offset"),
        (dict(dtype=jnp.int32), TypeError, "dtype"),
    ],
)
def test_random_moe_weights_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        models.random_moe_weights(jax.random.key(0), models.get_preset("tiny"), **kwargs)
