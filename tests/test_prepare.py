"""CPU tests of `jax_moe.prepare`: the sm_90a kernel layout against the logical NVFP4 format."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_moe import nvfp4
from jax_moe.prepare import (
    DECODE_TERMS,
    LAYOUT_VERSION,
    PreparedMoEWeights,
    deinterleave_code_words,
    gate_up_row_order,
    interleave_code_words,
    prepare,
    tile_rows,
    unprepare,
    untile_rows,
)
from jax_moe.weights import MoEWeights, quantize_moe_weights

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


def _bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _kernel_decode(packed: np.ndarray, scale_bits: np.ndarray, global_scale: np.ndarray):
    """float64 (..., rows, cols) values of prepared packed bytes, decoded as the kernel does.

    Pair p of a word: the OR of `rotate_left(word, r) & mask` over DECODE_TERMS[p], read
    as two bf16 values times 2**126; each block of 16 times its e4m3 scale.
    """
    b = packed.astype(np.uint64).reshape(*packed.shape[:-1], -1, 4)
    words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    pairs = []
    for terms in DECODE_TERMS:
        bits = np.zeros_like(words)
        for rotation, mask in terms:
            rotated = ((words << rotation) | (words >> ((32 - rotation) % 32))) & 0xFFFFFFFF
            bits |= rotated & mask
        even = _bf16_bits_to_float((bits & 0xFFFF).astype(np.uint16))
        odd = _bf16_bits_to_float((bits >> 16).astype(np.uint16))
        pairs.append(np.stack([even, odd], axis=-1))
    values = np.stack(pairs, axis=-2).reshape(*packed.shape[:-1], -1).astype(np.float64)
    values *= 2.0**126
    scales = scale_bits.view(jnp.float8_e4m3fn).astype(np.float64)
    values = values * np.repeat(scales, 16, axis=-1)[..., : values.shape[-1]]
    # e2m1 * e4m3 is exact in float32; the global scale is applied in float32 as well.
    return values.astype(np.float32) * global_scale.astype(np.float32)[:, None, None]


def _rows_as_kernel_reads(tiled: np.ndarray, step_bytes: int) -> np.ndarray:
    """Row-major `(experts, rows, cols)` bytes gathered from tiled bytes by the documented
    offsets: byte j of K step s of row 16*b + i is at 16*cols*b + 16*c*s + c*i + j (c =
    step_bytes).
    """
    e, rows, cols = tiled.shape
    r = np.arange(rows)[:, None]
    c = np.arange(cols)[None, :]
    b, i = r // 16, r % 16
    step, j = c // step_bytes, c % step_bytes
    flat = 16 * cols * b + 16 * step_bytes * step + step_bytes * i + j
    return tiled.reshape(e, -1)[:, flat]


@pytest.fixture(scope="module")
def weights() -> MoEWeights:
    key1, key2 = jax.random.split(jax.random.key(7))
    experts, hidden, inter = 3, 128, 64
    w13 = jax.random.normal(key1, (experts, 2 * inter, hidden), jnp.float32)
    w2 = jax.random.normal(key2, (experts, hidden, inter), jnp.float32) * 3.0
    return quantize_moe_weights(w13, w2)


def test_gate_up_row_order_interleaves_groups_of_eight():
    order = gate_up_row_order(24)
    assert sorted(order.tolist()) == list(range(48))
    np.testing.assert_array_equal(order[:16], [*range(8), *range(24, 32)])
    np.testing.assert_array_equal(order[16:32], [*range(8, 16), *range(32, 40)])


@pytest.mark.parametrize("bad", [0, 12, -8])
def test_gate_up_row_order_rejects_bad_intermediate(bad):
    with pytest.raises(ValueError, match="intermediate"):
        gate_up_row_order(bad)


def test_code_words_round_trip():
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, size=4096, dtype=np.uint64)
    np.testing.assert_array_equal(deinterleave_code_words(interleave_code_words(words)), words)
    np.testing.assert_array_equal(interleave_code_words(deinterleave_code_words(words)), words)


def test_every_code_decodes_exactly():
    # One word per (even code, odd code) pair in every pair slot.
    for even in range(16):
        for odd in range(16):
            byte = even | (odd << 4)
            logical = np.array([byte * 0x01010101], np.uint64)
            packed = np.frombuffer(
                np.asarray(interleave_code_words(logical), np.uint32).tobytes(), np.uint8
            ).reshape(1, 1, 4)
            got = _kernel_decode(packed, np.full((1, 1, 1), 0x38, np.uint8), np.ones(1))[..., :8]
            want = np.tile(
                [E2M1[even & 7] * (-1) ** (even >> 3), E2M1[odd & 7] * (-1) ** (odd >> 3)], 4
            )
            np.testing.assert_array_equal(got.reshape(-1), want)


def test_prepare_matches_logical_dequantization(weights):
    prepared = prepare(weights)
    assert prepared.layout_version == LAYOUT_VERSION
    e, two_i, h = weights.w13.shape
    assert prepared.w13_packed.shape == (e, two_i, h // 2)
    assert prepared.w13_scale.shape == (e, two_i, h // 16)
    assert prepared.w13_scale.dtype == jnp.uint8
    assert prepared.w2_packed.shape == weights.w2.packed.shape
    want13 = np.asarray(nvfp4.dequantize(weights.w13), np.float32)
    got13 = _kernel_decode(
        _rows_as_kernel_reads(np.asarray(prepared.w13_packed), 32),
        _rows_as_kernel_reads(np.asarray(prepared.w13_scale), 4),
        np.asarray(prepared.w13_global),
    )
    np.testing.assert_array_equal(got13, want13[:, gate_up_row_order(two_i // 2), :])
    want2 = np.asarray(nvfp4.dequantize(weights.w2), np.float32)
    got2 = _kernel_decode(
        _rows_as_kernel_reads(np.asarray(prepared.w2_packed), 32),
        _rows_as_kernel_reads(np.asarray(prepared.w2_scale), 4),
        np.asarray(prepared.w2_global),
    )
    np.testing.assert_array_equal(got2, want2)


def test_unprepare_round_trip(weights):
    back = unprepare(prepare(weights))
    for name in ("w13", "w2"):
        a, b = getattr(weights, name), getattr(back, name)
        np.testing.assert_array_equal(np.asarray(a.packed), np.asarray(b.packed))
        np.testing.assert_array_equal(
            np.asarray(a.scale).view(np.uint8), np.asarray(b.scale).view(np.uint8)
        )
        np.testing.assert_array_equal(np.asarray(a.global_scale), np.asarray(b.global_scale))


def test_prepare_is_jittable_pytree(weights):
    prepared = jax.jit(prepare)(weights)
    leaves, treedef = jax.tree_util.tree_flatten(prepared)
    assert len(leaves) == 6
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, PreparedMoEWeights)
    assert rebuilt.intermediate == weights.intermediate and rebuilt.hidden == weights.hidden


def test_prepare_rejects_wrong_type():
    with pytest.raises(TypeError, match="MoEWeights"):
        prepare({"w13": None})


def test_tile_rows_round_trip():
    x = np.arange(2 * 32 * 96, dtype=np.int32).reshape(2, 32, 96)
    for step_bytes in (4, 32):
        tiled = tile_rows(x, step_bytes)
        np.testing.assert_array_equal(_rows_as_kernel_reads(tiled, step_bytes), x)
        np.testing.assert_array_equal(untile_rows(tiled, step_bytes), x)


@pytest.mark.parametrize("hidden, inter", [(96, 64), (128, 32)])
def test_prepare_rejects_partial_k_steps(hidden, inter):
    key1, key2 = jax.random.split(jax.random.key(0))
    w13 = jax.random.normal(key1, (1, 2 * inter, hidden), jnp.float32)
    w2 = jax.random.normal(key2, (1, hidden, inter), jnp.float32)
    with pytest.raises(ValueError, match="multiple of 64"):
        prepare(quantize_moe_weights(w13, w2))
