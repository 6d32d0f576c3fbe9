"""Tests of the NVFP4 format: exact decoding, round trips, rounding, bounds and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_moe import nvfp4

# --- independent decoders (from the bit layouts, not from the library's tables) ---


def e2m1_from_bits(code: np.ndarray) -> np.ndarray:
    """Float value of 4-bit E2M1 codes ``s e1 e0 m`` (exponent bias 1, one subnormal)."""
    code = np.asarray(code, np.int64)
    sign = np.where(code & 0x8, -1.0, 1.0)
    exponent = (code >> 1) & 0x3
    mantissa = code & 0x1
    magnitude = np.where(
        exponent == 0, 0.5 * mantissa, 2.0 ** (exponent - 1) * (1.0 + 0.5 * mantissa)
    )
    return sign * magnitude


def e4m3fn_from_bits(byte: np.ndarray) -> np.ndarray:
    """Float value of float8_e4m3fn bytes (bias 7, no infinities, S.1111.111 is NaN)."""
    byte = np.asarray(byte, np.int64)
    sign = np.where(byte & 0x80, -1.0, 1.0)
    exponent = (byte >> 3) & 0xF
    mantissa = byte & 0x7
    magnitude = np.where(
        exponent == 0,
        2.0**-6 * (mantissa / 8.0),
        2.0 ** (exponent - 7) * (1.0 + mantissa / 8.0),
    )
    magnitude = np.where((exponent == 0xF) & (mantissa == 0x7), np.nan, magnitude)
    return sign * magnitude


def decode_numpy(t: nvfp4.Nvfp4Tensor) -> np.ndarray:
    """Element-by-element float64 decode of the three arrays of ``t``."""
    packed = np.asarray(t.packed).astype(np.int64)
    scale_bytes = np.asarray(t.scale).view(np.uint8)
    global_scale = np.asarray(t.global_scale, np.float64)
    cols = packed.shape[-1] * 2
    j = np.arange(cols)
    byte = packed[..., j // 2]
    code = np.where(j % 2 == 1, byte >> 4, byte & 0xF)
    scale = e4m3fn_from_bits(scale_bytes[..., j // 16])
    matrix_axes = (1,) * min(packed.ndim, 2)  # global_scale broadcast over (rows, cols)
    return e2m1_from_bits(code) * scale * global_scale.reshape(global_scale.shape + matrix_axes)


def random_matrix(seed: int, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Heavy-tailed random values, so blocks get very different scales."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df=3, size=shape) * np.exp(rng.normal(size=shape[:-1] + (1,)))
    return jnp.asarray(x.astype(np.float32)).astype(dtype)


def assert_same_tensor(a: nvfp4.Nvfp4Tensor, b: nvfp4.Nvfp4Tensor) -> None:
    np.testing.assert_array_equal(np.asarray(a.packed), np.asarray(b.packed))
    np.testing.assert_array_equal(
        np.asarray(a.scale).view(np.uint8), np.asarray(b.scale).view(np.uint8)
    )
    np.testing.assert_array_equal(
        np.asarray(a.global_scale).view(np.uint32), np.asarray(b.global_scale).view(np.uint32)
    )


def make_tensor(packed, scale_bytes, global_scale) -> nvfp4.Nvfp4Tensor:
    return nvfp4.Nvfp4Tensor(
        packed=jnp.asarray(np.asarray(packed, np.uint8)),
        scale=jnp.asarray(np.asarray(scale_bytes, np.uint8).view(ml_dtypes.float8_e4m3fn)),
        global_scale=jnp.asarray(global_scale, jnp.float32),
    )


# --- exact decoding ---


def test_e2m1_values_are_the_format_magnitudes():
    np.testing.assert_array_equal(nvfp4.E2M1_VALUES, [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    np.testing.assert_array_equal(nvfp4.E2M1_VALUES, e2m1_from_bits(np.arange(8)))
    assert nvfp4.E2M1_VALUES.dtype == np.float32


def test_every_code_pair_decodes_exactly():
    # All 256 bytes: every (low, high) pair of codes, with unit scales.
    packed = np.arange(256, dtype=np.uint8)[None, :]
    scale = np.full((1, 512 // 16), 0x38, np.uint8)  # e4m3 1.0
    values = np.asarray(nvfp4.dequantize(make_tensor(packed, scale, 1.0)))
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(1, 512)
    expected = e2m1_from_bits(codes)
    np.testing.assert_array_equal(values, expected)
    # The sign bit is kept on zero: code 8 is -0.0.
    np.testing.assert_array_equal(np.signbit(values), (codes & 0x8) != 0)


def test_every_code_times_every_scale_is_exact():
    # 16 codes x every finite e4m3 scale byte (both signs), times a power-of-two global scale.
    scale_bytes = np.array([b for b in range(256) if (b & 0x7F) != 0x7F], np.uint8)
    codes = np.tile(np.arange(16, dtype=np.uint8), (scale_bytes.size, 1))  # one block per row
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    t = make_tensor(packed, scale_bytes[:, None], 2.0**-5)
    values = np.asarray(nvfp4.dequantize(t))
    expected = e2m1_from_bits(codes) * e4m3fn_from_bits(scale_bytes)[:, None] * 2.0**-5
    np.testing.assert_array_equal(values, expected.astype(np.float32))


@pytest.mark.parametrize("shape", [(48,), (5, 32), (2, 3, 64)])
def test_dequantize_matches_independent_decode_of_random_bytes(shape):
    rng = np.random.default_rng(sum(shape))
    packed = rng.integers(0, 256, size=(*shape[:-1], shape[-1] // 2), dtype=np.uint8)
    scale = rng.integers(0, 0x7F, size=(*shape[:-1], shape[-1] // 16), dtype=np.uint8)
    global_scale = rng.uniform(0.5, 2.0, size=shape[:-2]).astype(np.float32)
    t = make_tensor(packed, scale, global_scale)
    np.testing.assert_allclose(np.asarray(nvfp4.dequantize(t)), decode_numpy(t), rtol=2**-23)


def test_dequantize_of_quantized_data_matches_independent_decode():
    t = nvfp4.quantize(random_matrix(1, (3, 4, 48)))
    np.testing.assert_allclose(np.asarray(nvfp4.dequantize(t)), decode_numpy(t), rtol=2**-23)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dequantize_dtype_is_one_rounding_of_float32(dtype):
    t = nvfp4.quantize(random_matrix(2, (4, 64)))
    low = nvfp4.dequantize(t, dtype)
    assert low.dtype == dtype
    np.testing.assert_array_equal(
        np.asarray(low.astype(jnp.float32)),
        np.asarray(nvfp4.dequantize(t).astype(dtype).astype(jnp.float32)),
    )


# --- quantization ---


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", [(64,), (8, 48), (3, 5, 32)])
def test_quantize_dequantize_round_trip_is_bitwise(shape, dtype):
    t = nvfp4.quantize(random_matrix(3, shape, dtype))
    assert t.shape == shape
    assert t.packed.shape == (*shape[:-1], shape[-1] // 2)
    assert t.scale.shape == (*shape[:-1], shape[-1] // 16)
    assert t.global_scale.shape == shape[:-2]
    assert_same_tensor(nvfp4.quantize(nvfp4.dequantize(t), t.global_scale), t)


def test_global_scale_default_is_amax_over_448_times_6():
    x = random_matrix(4, (3, 8, 32))
    t = nvfp4.quantize(x)
    amax = np.max(np.abs(np.asarray(x)), axis=(1, 2))
    # Float32 division up to rounding (XLA's CPU backend may be 1 ulp off).
    np.testing.assert_allclose(np.asarray(t.global_scale), amax / np.float32(2688.0), rtol=2**-22)
    # The block holding each matrix's amax gets the largest scale, 448.
    assert np.all(np.max(np.asarray(t.scale, np.float32), axis=(1, 2)) == 448.0)


def test_quantize_matches_independent_rounding():
    x = np.asarray(random_matrix(5, (6, 64)))
    t = nvfp4.quantize(jnp.asarray(x))
    gs = np.float32(np.asarray(t.global_scale))
    blocks = x.reshape(6, 4, 16)
    block_amax = np.max(np.abs(blocks), axis=-1)
    scale_f = np.minimum(block_amax / np.float32(6.0) / gs, np.float32(448.0))
    expected_scale = scale_f.astype(ml_dtypes.float8_e4m3fn)  # round to nearest even
    np.testing.assert_array_equal(np.asarray(t.scale).view(np.uint8), expected_scale.view(np.uint8))
    # Each element's code is the nearest E2M1 value of x / (scale * gs), clamped to 6.
    denom = expected_scale.astype(np.float32)[..., None] * gs
    scaled = np.abs(blocks) / denom
    grid = e2m1_from_bits(np.arange(8))
    distance = np.abs(scaled[..., None] - grid)
    codes = np.asarray(nvfp4.dequantize(t)).reshape(6, 4, 16) / denom
    chosen = np.abs(np.abs(codes)[..., None] - grid).argmin(-1)
    chosen_distance = np.take_along_axis(distance, chosen[..., None], -1)[..., 0]
    np.testing.assert_array_equal(chosen_distance, distance.min(-1))
    np.testing.assert_array_equal(np.signbit(codes), np.signbit(blocks))


@pytest.mark.parametrize("shape", [(256,), (16, 128), (4, 8, 64)])
def test_quantization_error_bound(shape):
    x = np.asarray(random_matrix(6, shape), np.float64)
    t = nvfp4.quantize(jnp.asarray(x, jnp.float32))
    deq = np.asarray(nvfp4.dequantize(t), np.float64)
    unit = np.repeat(np.asarray(t.scale, np.float64), 16, axis=-1) * np.asarray(
        t.global_scale, np.float64
    ).reshape(shape[:-2] + (1,) * min(len(shape), 2))
    scaled = np.abs(x) / unit
    error = np.abs(x - deq) / unit
    # Inside the grid: at most half the gap between neighbouring E2M1 values.
    half_gap = np.select([scaled <= 2, scaled <= 4], [0.25, 0.5], 1.0)
    inside = scaled <= 6
    assert np.all(error[inside] <= half_gap[inside] * (1 + 1e-6))
    # Beyond 6 (scale rounded down): saturated at 6, off by at most e4m3's rounding.
    np.testing.assert_allclose(np.abs(deq[~inside]), 6 * unit[~inside], rtol=1e-6)
    assert np.all(scaled[~inside] <= 6 * (1 + 2**-4) * (1 + 1e-6))
    # Relative to each block's amax: at most (1 + 2**-4) / 6.
    blocks = np.abs(x).reshape(*shape[:-1], -1, 16).max(-1)
    block_amax = np.repeat(blocks, 16, axis=-1)
    assert np.all(np.abs(x - deq) <= block_amax * (1 + 2**-4) / 6 * (1 + 1e-6))


@pytest.mark.parametrize(
    ("global_scale", "block_scale"),
    [(1.0, 1.0), (3.0, 10.0), (5.0, 1.5), (9.0, 0.875), (0.375, 3.25), (2.0**-10, 448.0)],
)
def test_ties_round_to_even_code(global_scale, block_scale):
    # x = value * block_scale * global_scale exactly, so x / (scale * gs) hits each midpoint.
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    even = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    above = [m + 2**-8 for m in mids]
    above_rounded = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    below = [m - 2**-8 for m in mids]
    below_rounded = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    units = np.array(
        [6.0] + mids + [-m for m in mids] + [-6.0] + above + [6.0] + below + [-6.0], np.float64
    )
    expected = [6.0] + even + [-e for e in even] + [-6.0] + above_rounded + [6.0]
    expected += below_rounded + [-6.0]
    unit = np.float32(np.float32(block_scale) * np.float32(global_scale))
    x = (units * np.float64(unit)).astype(np.float32)
    assert np.all(x.astype(np.float64) == units * np.float64(unit))  # exactly on the grid
    for quantize in (nvfp4.quantize, jax.jit(nvfp4.quantize)):
        t = quantize(jnp.asarray(x), global_scale)
        np.testing.assert_array_equal(np.asarray(t.scale, np.float32), block_scale)
        codes = np.asarray(nvfp4.dequantize(t), np.float64) / np.float64(unit)
        np.testing.assert_array_equal(codes, expected)


def test_saturation():
    # Block scale rounds down (6.2 / 6 -> e4m3 1.0): 6.2 saturates at 6.
    x = np.linspace(-1.0, 1.0, 16).astype(np.float32)
    x[3] = 6.2
    t = nvfp4.quantize(jnp.asarray(x), global_scale=1.0)
    assert float(t.scale[0]) == 1.0
    assert float(nvfp4.dequantize(t)[3]) == 6.0
    # Block scale clamped at 448 by a small global scale: every element saturates.
    x = np.full(16, -1000.0, np.float32)
    t = nvfp4.quantize(jnp.asarray(x), global_scale=0.1)
    assert float(t.scale[0]) == 448.0
    np.testing.assert_array_equal(
        np.asarray(nvfp4.dequantize(t)), np.float32(-6.0) * np.float32(448.0) * np.float32(0.1)
    )


def test_zero_blocks_and_negative_zero():
    x = np.zeros((2, 32), np.float32)
    x[1, 16:] = np.linspace(0.5, 3.0, 16)
    x[1, 17] = -1e-6  # rounds to zero, keeps its sign
    t = nvfp4.quantize(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(t.scale, np.float32)[:, 0], [0.0, 0.0])
    deq = np.asarray(nvfp4.dequantize(t))
    np.testing.assert_array_equal(deq[:, :16], 0.0)
    assert deq[1, 17] == 0.0 and np.signbit(deq[1, 17])
    assert (int(t.packed[1, 8]) >> 4) == 0x8
    # An all-zero matrix gets global scale 1.
    t0 = nvfp4.quantize(jnp.zeros((4, 16), jnp.float32))
    assert float(t0.global_scale) == 1.0
    np.testing.assert_array_equal(np.asarray(nvfp4.dequantize(t0)), 0.0)


def test_global_scale_argument():
    x = random_matrix(7, (3, 4, 32))
    # A scalar broadcasts to every matrix.
    t = nvfp4.quantize(x, 0.01)
    np.testing.assert_array_equal(np.asarray(t.global_scale), np.full(3, 0.01, np.float32))
    # Per-matrix scales give the same bytes as quantizing each matrix alone.
    gs = np.array([0.01, 0.02, 0.005], np.float32)
    t = nvfp4.quantize(x, jnp.asarray(gs))
    for i in range(3):
        assert_same_tensor(jax.tree.map(lambda a, i=i: a[i], t), nvfp4.quantize(x[i], float(gs[i])))
    # The default equals passing the default explicitly.
    default = nvfp4.quantize(x)
    assert_same_tensor(nvfp4.quantize(x, default.global_scale), default)


def test_batch_dims_quantize_each_matrix_independently():
    x = random_matrix(8, (2, 3, 4, 32))
    t = nvfp4.quantize(x)
    assert t.global_scale.shape == (2, 3)
    for i, j in np.ndindex(2, 3):
        # With the batch's global scale each matrix quantizes to the same bytes alone...
        one = jax.tree.map(lambda a, i=i, j=j: a[i, j], t)
        assert_same_tensor(nvfp4.quantize(x[i, j], one.global_scale), one)
        # ...and its default global scale is its own amax / 2688 (to float32 rounding:
        # XLA's CPU backend divides vectors with an approximate reciprocal).
        np.testing.assert_allclose(
            float(one.global_scale), float(jnp.max(jnp.abs(x[i, j]))) / 2688.0, rtol=2**-22
        )


def test_jit_matches_eager_bitwise():
    x = random_matrix(9, (2, 8, 64), jnp.bfloat16)
    eager = nvfp4.quantize(x)
    jitted = jax.jit(nvfp4.quantize)(x)
    assert_same_tensor(jitted, eager)
    gs = jnp.asarray([0.003, 0.004], jnp.float32)
    assert_same_tensor(jax.jit(nvfp4.quantize)(x, gs), nvfp4.quantize(x, gs))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(nvfp4.dequantize)(eager)), np.asarray(nvfp4.dequantize(eager))
    )


def test_tensor_is_a_pytree():
    t = nvfp4.quantize(random_matrix(10, (2, 4, 32)))
    leaves, treedef = jax.tree.flatten(t)
    assert len(leaves) == 3
    assert_same_tensor(jax.tree.unflatten(treedef, leaves), t)
    assert t.nbytes == 2 * 4 * 16 + 2 * 4 * 2 + 4 * 2


# --- non-finite values ---


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_rejected_eagerly(bad):
    x = np.ones((2, 32), np.float32)
    x[1, 5] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        nvfp4.quantize(jnp.asarray(x))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_under_jit_gives_nan_block(bad):
    x = np.array(random_matrix(11, (2, 32)))
    clean = nvfp4.dequantize(nvfp4.quantize(jnp.asarray(x), 0.01))
    x[1, 5] = bad
    deq = np.asarray(jax.jit(lambda x: nvfp4.dequantize(nvfp4.quantize(x, 0.01)))(x))
    assert np.all(np.isnan(deq[1, :16]))
    mask = np.ones_like(deq, bool)
    mask[1, :16] = False
    np.testing.assert_array_equal(deq[mask], np.asarray(clean)[mask])
    # With the default global scale the whole matrix is NaN or the block is.
    deq = np.asarray(jax.jit(lambda x: nvfp4.dequantize(nvfp4.quantize(x)))(x))
    assert np.all(np.isnan(deq[1, :16]))


# --- errors ---


@pytest.mark.parametrize("shape", [(8,), (4, 24), (2, 3, 17), (4, 0), ()])
def test_quantize_rejects_bad_last_dim(shape):
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.quantize(jnp.ones(shape, jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_, jnp.complex64])
def test_quantize_rejects_bad_dtype(dtype):
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        nvfp4.quantize(jnp.ones((2, 32), dtype))


@pytest.mark.parametrize("gs", [0.0, -1.0, np.inf, np.nan])
def test_quantize_rejects_bad_global_scale_value(gs):
    with pytest.raises(ValueError, match="global_scale must be positive and finite"):
        nvfp4.quantize(jnp.ones((2, 32), jnp.float32), gs)


def test_quantize_rejects_global_scale_of_wrong_shape():
    with pytest.raises(ValueError, match="does not broadcast"):
        nvfp4.quantize(jnp.ones((3, 2, 32), jnp.float32), jnp.ones(2, jnp.float32))


def test_dequantize_rejects_non_tensor():
    with pytest.raises(TypeError, match="Nvfp4Tensor"):
        nvfp4.dequantize(jnp.ones((2, 16), jnp.uint8))


def test_dequantize_rejects_inconsistent_tensors():
    t = nvfp4.quantize(random_matrix(12, (2, 4, 32)))
    with pytest.raises(TypeError, match="packed must be uint8"):
        nvfp4.dequantize(nvfp4.Nvfp4Tensor(t.packed.astype(jnp.int8), t.scale, t.global_scale))
    with pytest.raises(TypeError, match="scale must be float8_e4m3fn"):
        nvfp4.dequantize(nvfp4.Nvfp4Tensor(t.packed, t.scale.astype(jnp.float32), t.global_scale))
    with pytest.raises(TypeError, match="global_scale must be float32"):
        nvfp4.dequantize(nvfp4.Nvfp4Tensor(t.packed, t.scale, t.global_scale.astype(jnp.bfloat16)))
    with pytest.raises(ValueError, match="scale must have shape"):
        nvfp4.dequantize(nvfp4.Nvfp4Tensor(t.packed, t.scale[..., :1], t.global_scale))
    with pytest.raises(ValueError, match="global_scale must have shape"):
        nvfp4.dequantize(nvfp4.Nvfp4Tensor(t.packed, t.scale, t.global_scale[:1]))
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.dequantize(nvfp4.Nvfp4Tensor(t.packed[..., :4], t.scale[..., :1], t.global_scale))


def test_decode_e2m1_rejects_non_uint8():
    with pytest.raises(TypeError, match="packed must be uint8"):
        nvfp4.decode_e2m1(jnp.ones((2, 8), jnp.int32))
