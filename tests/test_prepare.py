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
    SCALE_BF16_BIAS,
    SCALE_DECODING,
    SCALE_ENCODING,
    PreparedMoEWeights,
    deinterleave_code_words,
    fold_scale_signs,
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


def _decode_words(words: np.ndarray) -> np.ndarray:
    """float64 (..., 4, 2): the pairs of prepared code words as the kernels decode them.

    Pair p: the OR of `rotate_left(word, r) & mask` over DECODE_TERMS[p], read as two
    bf16 values (low half first) times 2**126.
    """
    words = words.astype(np.uint64)
    pairs = []
    for terms in DECODE_TERMS:
        bits = np.zeros_like(words)
        for rotation, mask in terms:
            rotated = ((words << rotation) | (words >> ((32 - rotation) % 32))) & 0xFFFFFFFF
            bits |= rotated & mask
        even = _bf16_bits_to_float((bits & 0xFFFF).astype(np.uint16))
        odd = _bf16_bits_to_float((bits >> 16).astype(np.uint16))
        pairs.append(np.stack([even, odd], axis=-1))
    return np.stack(pairs, axis=-2).astype(np.float64) * 2.0**126


def _kernel_scales(encoded: np.ndarray) -> np.ndarray:
    """float64 values of prepared scale bytes as the kernels convert them (bf16 * 2**-117)."""
    bits = encoded.astype(np.uint32) * 16 + SCALE_BF16_BIAS
    return _bf16_bits_to_float(bits.astype(np.uint16)).astype(np.float64) * 2.0**-117


def _kernel_values(packed: np.ndarray, scale: np.ndarray, global_scale: np.ndarray):
    """float32 (experts, rows, cols) weights of tiled prepared bytes, read as the kernels do.

    Follows the documented offsets: in the block of band b and K step s, the code
    word kb of lane 4g+t holds pairs (row g, g+8, g, g+8) x (columns 16kb+2t,
    16kb+2t, 16kb+8+2t, 16kb+8+2t) (+0, +1); scale byte 2kb+h of group g is the
    scale of row g+8h for those columns.
    """
    e, rows, row_bytes = packed.shape
    bands, steps = rows // 16, row_bytes // 32
    b = packed.reshape(e, bands, steps, 8, 4, 4, 4).astype(np.uint64)  # (.., g, t, kb, byte)
    words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    pairs = _decode_words(words)  # (e, bands, steps, g, t, kb, p, parity), p = 2*jh + h
    pairs = pairs.reshape(e, bands, steps, 8, 4, 4, 2, 2, 2)  # (.., g, t, kb, jh, h, parity)
    scales = _kernel_scales(scale.reshape(e, bands, steps, 8, 4, 2))  # (.., g, kb, h)
    values = pairs * scales[:, :, :, :, None, :, None, :, None]
    # -> (e, bands, h, g, steps, kb, jh, t, parity) = (e, rows, cols)
    values = values.transpose(0, 1, 7, 3, 2, 5, 6, 4, 8).reshape(e, rows, row_bytes * 2)
    # e2m1 * e4m3 is exact in float32; the global scale is applied in float32 as well.
    return values.astype(np.float32) * global_scale.astype(np.float32)[:, None, None]


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
            got = _decode_words(interleave_code_words(logical))
            want = np.tile(
                [E2M1[even & 7] * (-1) ** (even >> 3), E2M1[odd & 7] * (-1) ** (odd >> 3)], 4
            )
            np.testing.assert_array_equal(got.reshape(-1), want)


def test_every_scale_byte_converts_exactly():
    bits = np.arange(256, dtype=np.uint8)
    want = np.abs(bits.view(jnp.float8_e4m3fn).astype(np.float64))
    finite = ~np.isnan(want)
    encoded = SCALE_ENCODING[bits]
    got = _kernel_scales(encoded)
    nonzero = finite & (want != 0)
    np.testing.assert_array_equal(got[nonzero], want[nonzero])
    np.testing.assert_array_equal(encoded[finite & (want == 0)], 0)
    # Decoding gives back the non-negative bits (NaN included).
    np.testing.assert_array_equal(SCALE_DECODING[encoded], bits & 0x7F)
    assert encoded.max() < 256 and (encoded.astype(np.uint32) * 16 + SCALE_BF16_BIAS).max() < 0x7F80


def test_fold_scale_signs():
    packed = np.array([[0x12, 0x9A, 0x00, 0x77, 0x31, 0x08, 0x80, 0xFF] * 2], np.uint8)
    scale = np.array([[0xB8, 0x80]], np.uint8)  # -1.0, -0.0
    got = fold_scale_signs(packed, scale)
    np.testing.assert_array_equal(got[0, :8], packed[0, :8] ^ 0x88)
    np.testing.assert_array_equal(got[0, 8:], 0)
    np.testing.assert_array_equal(fold_scale_signs(packed, scale & 0x7F)[0, :8], packed[0, :8])


def test_prepare_matches_logical_dequantization(weights):
    prepared = prepare(weights)
    assert prepared.layout_version == LAYOUT_VERSION
    e, two_i, h = weights.w13.shape
    assert prepared.w13_packed.shape == (e, two_i, h // 2)
    assert prepared.w13_scale.shape == (e, two_i, h // 16)
    assert prepared.w13_scale.dtype == jnp.uint8
    assert prepared.w2_packed.shape == weights.w2.packed.shape
    want13 = np.asarray(nvfp4.dequantize(weights.w13), np.float32)
    got13 = _kernel_values(
        np.asarray(prepared.w13_packed),
        np.asarray(prepared.w13_scale),
        np.asarray(prepared.w13_global),
    )
    np.testing.assert_array_equal(got13, want13[:, gate_up_row_order(two_i // 2), :])
    want2 = np.asarray(nvfp4.dequantize(weights.w2), np.float32)
    got2 = _kernel_values(
        np.asarray(prepared.w2_packed),
        np.asarray(prepared.w2_scale),
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


def test_tile_rows_round_trip_and_fragment_offsets():
    x = np.arange(2 * 32 * 96, dtype=np.int32).reshape(2, 32, 96)
    for step_bytes in (4, 32):
        tiled = tile_rows(x, step_bytes)
        np.testing.assert_array_equal(untile_rows(tiled, step_bytes), x)
    # Spot checks of the documented offsets (expert 1, band 1, K step 2).
    flat = tile_rows(x, 32).reshape(2, -1)[1]
    block = 16 * 96 * 1 + 2 * 512
    for g, t, kb, j in ((0, 0, 0, 0), (3, 2, 1, 1), (7, 3, 3, 2), (5, 1, 2, 3)):
        row, col = 16 + g + 8 * (j % 2), 2 * 32 + 8 * kb + 4 * (j // 2) + t
        assert flat[block + 16 * (4 * g + t) + 4 * kb + j] == x[1, row, col]
    flat = tile_rows(x, 4).reshape(2, -1)[1]
    block = 16 * 96 * 1 + 2 * 64
    for g, kb, h in ((0, 0, 0), (6, 3, 1), (2, 1, 1)):
        assert flat[block + 8 * g + 2 * kb + h] == x[1, 16 + g + 8 * h, 2 * 4 + kb]
    with pytest.raises(ValueError, match="step_bytes"):
        tile_rows(x, 8)
    with pytest.raises(ValueError, match="rows % 16"):
        untile_rows(x[:, :24], 32)


def test_negative_and_zero_scales_keep_their_values(weights):
    # Flip some scales negative and zero others: prepare must keep every value.
    rng = np.random.default_rng(3)
    bits = np.asarray(weights.w2.scale).view(np.uint8).copy()
    bits[rng.random(bits.shape) < 0.3] |= 0x80
    bits[rng.random(bits.shape) < 0.1] &= 0x80
    w2 = nvfp4.Nvfp4Tensor(
        packed=weights.w2.packed,
        scale=jnp.asarray(bits.view(jnp.float8_e4m3fn)),
        global_scale=weights.w2.global_scale,
    )
    odd = MoEWeights(w13=weights.w13, w2=w2)
    prepared = prepare(odd)
    want = np.asarray(nvfp4.dequantize(w2), np.float32)
    got = _kernel_values(
        np.asarray(prepared.w2_packed),
        np.asarray(prepared.w2_scale),
        np.asarray(prepared.w2_global),
    )
    np.testing.assert_array_equal(got, want)
    back = np.asarray(nvfp4.dequantize(unprepare(prepared).w2), np.float32)
    np.testing.assert_array_equal(back, want)


@pytest.mark.parametrize("hidden, inter", [(96, 64), (128, 32)])
def test_prepare_rejects_partial_k_steps(hidden, inter):
    key1, key2 = jax.random.split(jax.random.key(0))
    w13 = jax.random.normal(key1, (1, 2 * inter, hidden), jnp.float32)
    w2 = jax.random.normal(key2, (1, hidden, inter), jnp.float32)
    with pytest.raises(ValueError, match="multiple of 64"):
        prepare(quantize_moe_weights(w13, w2))
