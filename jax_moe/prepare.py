"""Offline repack of logical NVFP4 MoE weights into the Hopper kernels' layout.

`prepare(weights)` turns :class:`jax_moe.weights.MoEWeights` (the checkpoint
layout, see :mod:`jax_moe.nvfp4`) into :class:`PreparedMoEWeights`, the byte
layout the sm_90a GEMM kernels (:mod:`jax_moe.kernels.moe_gemm1_sm90`,
:mod:`jax_moe.kernels.moe_gemm2_sm90`) read. It runs once, offline or at load
time, in plain JAX (jit-able), and `unprepare` gives back the same values.

Byte layout, layout version 5 (`PreparedMoEWeights.layout_version == 5`):

Code words (both matrices). Each row's packed bytes are read as little-endian
32-bit words of 8 elements (before tiling, word ``w`` holds elements ``8w .. 8w+7``
of the row, as in the logical layout), with their bits rearranged so that the
kernels decode the four pairs of elements with 9 bit operations per word. For pair
``p`` (0..3) of a word, its elements ``2p`` ("even") and ``2p+1`` ("odd") with e2m1
codes ``s e1 e0 m`` decode to the bf16x2 word ``(value_even, value_odd) * 2**-126``
(low half even) as::

    OR over (rotation, mask) in DECODE_TERMS[p]:  rotate_left(word, rotation) & mask

with ``DECODE_TERMS = (((0, 0x81C081C0),), ((4, 0x81C081C0),), ((10, 0x81C081C0),),
((6, 0x80C080C0), (30, 0x01000100)))``: each code's magnitude bits ``e1 e0 m`` land in
bf16 bits 8..6 of its half (the exponent's two low bits and the mantissa's top bit)
and its sign in bit 15, which reads as the e2m1 value times ``2**-126`` for every
code (``+-0.5`` become bf16 subnormals). `interleave_code_words` places every bit
where its term takes it from.

Scale bytes (both matrices). A block scale is stored as an unsigned 8-bit float
``u = E << 3 | M`` (5-bit exponent, 3-bit mantissa) with value
``2**(E - 10) * (1 + M/8)`` for ``u > 0`` and 0 for ``u == 0``; every e4m3 magnitude,
subnormals included, is one such byte (`SCALE_ENCODING`, `SCALE_DECODING`). The
kernels turn two of them into the bf16x2 ``(scale * 2**117)`` with one byte permute
and ``u * 16 + (234 << 7)`` per half: no float conversion. Two facts of the logical
format are moved into the codes so that this holds: the sign of a negative block
scale flips the signs of its 16 codes, and the codes of a block whose scale is zero
are zero (``u = 0`` then reads as a finite number times zero codes). Values are
unchanged (up to the sign of zero); NaN scales give unspecified values.

Tiles (both matrices, bytes and scales). The kernels read one 64-element K step
of 16 rows at a time straight into the A operand registers of ``mma.m16n8k16``,
so each expert's rows are cut into bands of 16 and each band is stored step by
step: band ``b`` (``16 * C`` bytes for rows of ``C`` bytes) holds the block of K
step ``s`` (``16 * c`` bytes: ``c = 32`` code bytes or ``4`` scale bytes per row) at
offset ``s * 16 * c``. Inside a block the bytes are in MMA fragment order: with
``lane = 4 * g + t`` (``g`` < 8, ``t`` < 4), the 16 code bytes at ``16 * lane`` are
four words, word ``kb`` (the step's ``kb``-th 16 columns) holding the bytes
``8 * kb + t`` and ``8 * kb + 4 + t`` of rows ``g`` and ``g + 8`` of the band, in the
order (row g, byte 8kb+t), (row g+8, same byte), (row g, byte 8kb+4+t),
(row g+8, same byte) before the bit rearrangement above. Its pairs are then the
fragment registers ``a0 .. a3`` of that lane: rows ``g, g+8, g, g+8`` at columns
``16kb + 2t (+1)``, ``16kb + 2t (+1)``, ``16kb + 8 + 2t (+1)``, ``16kb + 8 + 2t (+1)``.
The 8 scale bytes at ``8 * g`` are, for ``kb`` = 0..3, the scales of rows ``g`` and
``g + 8`` for the columns of ``kb``. A warp's loads of one step are one contiguous
512-byte block (scales 64 bytes). Arrays keep their logical shapes;
`tile_rows` / `untile_rows` convert.

``w13_packed``: ``uint8 (E, 2I, H/2)``; ``w13_scale``: ``uint8 (E, 2I, H/16)``
    The rows of each expert's W13 are interleaved in groups of 16: row ``16*g + i``
    (before tiling) holds logical gate row ``8*g + i`` for ``0 <= i < 8`` and logical
    up row ``I + 8*g + (i - 8)`` for ``8 <= i < 16`` (so ``I % 8 == 0``). Rows hold
    code words as above; scale byte ``j`` of a row (before tiling) is the block scale
    of elements ``16j .. 16j+15``, encoded as above; both are tiled. Each
    16-row MMA tile of GEMM1 thus holds eight gate rows and the matching eight up
    rows, and the SwiGLU epilogue pairs accumulator rows ``q`` and ``q + 8``.
``w13_global``: ``float32 (E,)``, the logical global scales, unchanged.
``w2_packed``: ``uint8 (E, H, I/2)``; ``w2_scale``: ``uint8 (E, H, I/16)``
    Logical row order; code words and scales as above; both tiled.
``w2_global``: ``float32 (E,)``, unchanged.

Shapes and dtypes are those of the logical format (uint8 for the scales). The
global scales are not adjusted (the kernels handle their internal power of two).
`unprepare` returns the same values; its bytes differ from the original only where
a scale was negative (returned positive, code signs flipped) or zero (codes zero).
`prepare` needs ``hidden`` and ``intermediate`` to be multiples of 64 (whole K
steps); the kernels also need ``hidden % 128 == 0`` (checked by the tactics).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe import nvfp4
from jax_moe.weights import MoEWeights

__all__ = [
    "DECODE_TERMS",
    "LAYOUT_VERSION",
    "PreparedMoEWeights",
    "SCALE_DECODING",
    "SCALE_ENCODING",
    "deinterleave_code_words",
    "fold_scale_signs",
    "gate_up_row_order",
    "interleave_code_words",
    "prepare",
    "tile_rows",
    "unprepare",
    "untile_rows",
]

#: Version of the byte layout documented above.
LAYOUT_VERSION = 5
#: Rows per tile band and elements per K step of the tiled byte order.
TILE_ROWS = 16
STEP_ELEMENTS = 64
_CODE_STEP_BYTES = STEP_ELEMENTS // 2
_SCALE_STEP_BYTES = STEP_ELEMENTS // 16
#: Per pair of a prepared code word, the (left rotation, mask) terms whose OR is the
#: bf16x2 pair `(value_even, value_odd) * 2**-126` (module docstring).
DECODE_TERMS = (
    ((0, 0x81C081C0),),
    ((4, 0x81C081C0),),
    ((10, 0x81C081C0),),
    ((6, 0x80C080C0), (30, 0x01000100)),
)
# bf16 bit of each e2m1 code bit (m, e0, e1, s) in the even (low) half of a pair.
_BF16_BIT = (6, 7, 8, 15)


def _code_bit_sources() -> tuple[tuple[int, int, int, int], ...]:
    """(pair, element parity, code bit, word bit) for each of the 32 bits of a word."""
    out = []
    for p, terms in enumerate(DECODE_TERMS):
        for parity in range(2):
            for bit, target in enumerate(_BF16_BIT):
                target += 16 * parity
                (rotation,) = [r for r, mask in terms if (mask >> target) & 1]
                out.append((p, parity, bit, (target - rotation) % 32))
    if sorted(source for *_, source in out) != list(range(32)):
        raise RuntimeError("DECODE_TERMS must place every word bit exactly once")
    return tuple(out)


_CODE_BIT_SOURCES = _code_bit_sources()


def _scale_tables() -> tuple[np.ndarray, np.ndarray]:
    """(encoding, decoding): e4m3 bits -> prepared scale byte of the magnitude, and back."""
    encoding = np.zeros(256, np.uint8)
    decoding = np.zeros(256, np.uint8)
    for bits in range(1, 128):
        exponent, mantissa = bits >> 3, bits & 7
        if exponent == 0:  # subnormal: mantissa/8 * 2**-6, normalized
            shift = 4 - mantissa.bit_length()
            exponent, mantissa = 1 - shift, (mantissa << shift) & 7
        code = ((exponent + 3) << 3) | mantissa  # 2**(e - 7) == 2**((e + 3) - 10)
        encoding[bits] = encoding[bits | 0x80] = code
        decoding[code] = bits
    return encoding, decoding


#: ``uint8 (256,)``: e4m3 bits -> prepared scale byte of the magnitude (module docstring).
#: ``uint8 (256,)``: prepared scale byte -> non-negative e4m3 bits (0 for unused bytes).
SCALE_ENCODING, SCALE_DECODING = _scale_tables()
#: bf16 bits of a prepared scale byte ``u`` times ``2**117`` are ``u * 16 + SCALE_BF16_BIAS``.
SCALE_BF16_BIAS = 234 << 7
#: Gate (and up) rows per 16-row group of prepared W13.
_HALF_GROUP = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PreparedMoEWeights:
    """NVFP4 MoE weights in the sm_90a kernel layout (see the module docstring).

    Attributes:
      w13_packed: ``uint8 (experts, 2 * intermediate, hidden // 2)``, gate/up rows interleaved.
      w13_scale: ``uint8 (experts, 2 * intermediate, hidden // 16)``, prepared scale bytes,
        same row order.
      w13_global: ``float32 (experts,)``.
      w2_packed: ``uint8 (experts, hidden, intermediate // 2)``.
      w2_scale: ``uint8 (experts, hidden, intermediate // 16)``, prepared scale bytes.
      w2_global: ``float32 (experts,)``.
      layout_version: static int, the byte layout version.
    """

    w13_packed: jax.Array
    w13_scale: jax.Array
    w13_global: jax.Array
    w2_packed: jax.Array
    w2_scale: jax.Array
    w2_global: jax.Array
    layout_version: int = dataclasses.field(default=LAYOUT_VERSION, metadata=dict(static=True))

    @property
    def num_experts(self) -> int:
        return self.w13_packed.shape[0]

    @property
    def hidden(self) -> int:
        return self.w13_packed.shape[2] * 2

    @property
    def intermediate(self) -> int:
        return self.w13_packed.shape[1] // 2


def gate_up_row_order(intermediate: int) -> np.ndarray:
    """``int64 (2 * intermediate,)``: logical W13 row of each prepared row.

    Raises ValueError unless ``intermediate`` is a positive multiple of 8.
    """
    if isinstance(intermediate, bool) or not isinstance(intermediate, (int, np.integer)):
        raise TypeError(f"intermediate={intermediate!r}; expected an int")
    if intermediate <= 0 or intermediate % _HALF_GROUP:
        raise ValueError(
            f"intermediate={intermediate}; expected a positive multiple of {_HALF_GROUP}"
        )
    groups = np.arange(intermediate // _HALF_GROUP)[:, None] * _HALF_GROUP
    lane = np.arange(_HALF_GROUP)[None, :]
    order = np.concatenate([groups + lane, intermediate + groups + lane], axis=1)
    return order.reshape(-1)


def interleave_code_words(words):
    """Logical code words -> prepared code words (see the module docstring).

    `words` is an integer array (numpy, JAX or any array type with bit operators)
    of non-negative 32-bit values: byte ``i`` of a word holds logical elements ``2i``
    (low nibble) and ``2i+1``. The result has the same type and shape.
    """
    out = words & 0
    for p, parity, bit, source in _CODE_BIT_SOURCES:
        logical = 8 * p + 4 * parity + bit
        out = out | (((words >> logical) & 1) << source)
    return out


def deinterleave_code_words(words):
    """The inverse of `interleave_code_words`."""
    out = words & 0
    for p, parity, bit, source in _CODE_BIT_SOURCES:
        logical = 8 * p + 4 * parity + bit
        out = out | (((words >> source) & 1) << logical)
    return out


def _tiled_shape(x, step_bytes: int) -> tuple[int, int, int]:
    """`x.shape` after checking it can be tiled with `step_bytes` (32 or 4)."""
    if step_bytes not in (_CODE_STEP_BYTES, _SCALE_STEP_BYTES):
        raise ValueError(f"step_bytes={step_bytes}; expected 32 (codes) or 4 (scales)")
    if len(x.shape) != 3 or x.shape[1] % TILE_ROWS or x.shape[2] % step_bytes:
        raise ValueError(
            f"shape {tuple(x.shape)}; expected (experts, rows, cols) with rows % {TILE_ROWS} "
            f"== 0 and cols % {step_bytes} == 0"
        )
    return tuple(x.shape)


def tile_rows(x, step_bytes: int):
    """Rows of `x` `(experts, rows, cols)` in the tiled fragment order (module docstring).

    `step_bytes` is the bytes of one row per K step: 32 for code bytes, 4 for scale
    bytes. Works on numpy, JAX and torch arrays (`reshape` and `swapaxes` only).
    """
    e, r, c = _tiled_shape(x, step_bytes)
    bands, steps = r // TILE_ROWS, c // step_bytes
    # (band, step, row half h, row g, ...) with rows i = 8 * h + g of the band.
    x = x.reshape(e, bands, 2, 8, steps, step_bytes).swapaxes(2, 4).swapaxes(3, 4)
    if step_bytes == _CODE_STEP_BYTES:
        # (..., h, g, kb, jh, t) with byte 8 * kb + 4 * jh + t -> (..., g, t, kb, jh, h).
        x = x.reshape(e, bands, steps, 2, 8, 4, 2, 4).swapaxes(3, 4).swapaxes(4, 7)
    else:  # scales: (..., h, g, kb) -> (..., g, kb, h).
        x = x.swapaxes(3, 4).swapaxes(4, 5)
    return x.reshape(e, r, c)


def untile_rows(x, step_bytes: int):
    """The inverse of `tile_rows`."""
    e, r, c = _tiled_shape(x, step_bytes)
    bands, steps = r // TILE_ROWS, c // step_bytes
    if step_bytes == _CODE_STEP_BYTES:
        x = x.reshape(e, bands, steps, 8, 4, 4, 2, 2).swapaxes(4, 7).swapaxes(3, 4)
    else:
        x = x.reshape(e, bands, steps, 8, 4, 2).swapaxes(4, 5).swapaxes(3, 4)
    x = x.reshape(e, bands, steps, 2, 8, step_bytes)
    return x.swapaxes(3, 4).swapaxes(2, 4).reshape(e, r, c)


def fold_scale_signs(packed, scale_bits):
    """Logical packed codes with the scales' signs and zeros folded in (module docstring).

    `packed` ``uint8 (..., cols // 2)`` and `scale_bits` ``uint8 (..., cols // 16)``
    (e4m3 bits): the 16 codes of a block with a negative scale get their signs
    flipped, those of a block with a zero scale become zero. Works on numpy, JAX and
    torch arrays.
    """
    blocks = packed.reshape(*packed.shape[:-1], scale_bits.shape[-1], 8)
    negative = (scale_bits >> 7)[..., None]
    nonzero = (((scale_bits & 0x7F) + 0x7F) >> 7)[..., None]
    return ((blocks ^ (negative * 0x88)) & (nonzero * 0xFF)).reshape(packed.shape)


def _map_code_words(packed: jax.Array, fn) -> jax.Array:
    """Applies `fn` to the little-endian uint32 words of a uint8 array's last axis."""
    if packed.shape[-1] % 4:
        raise ValueError(
            f"packed rows of {packed.shape[-1]} bytes; expected a multiple of 4 (cols % 8 == 0)"
        )
    b = packed.reshape(*packed.shape[:-1], packed.shape[-1] // 4, 4).astype(jnp.uint32)
    words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    words = fn(words)
    out = jnp.stack([(words >> (8 * i)) & 0xFF for i in range(4)], axis=-1)
    return out.astype(jnp.uint8).reshape(packed.shape)


def _scale_bits(scale: jax.Array) -> jax.Array:
    if scale.dtype == jnp.uint8:
        return scale
    if scale.dtype != jnp.float8_e4m3fn:
        raise TypeError(f"scale dtype {scale.dtype}; expected float8_e4m3fn")
    return jax.lax.bitcast_convert_type(scale, jnp.uint8)


def prepare(weights: MoEWeights) -> PreparedMoEWeights:
    """Repacks logical NVFP4 MoE weights into the sm_90a kernel layout (exact; `unprepare`)."""
    if not isinstance(weights, MoEWeights):
        raise TypeError(f"weights must be a MoEWeights, got {type(weights).__name__}")
    weights.check()
    for name, size in (("hidden", weights.hidden), ("intermediate", weights.intermediate)):
        if size % STEP_ELEMENTS:
            raise ValueError(
                f"{name}={size}; prepare needs a multiple of {STEP_ELEMENTS} (whole K steps)"
            )
    order = jnp.asarray(gate_up_row_order(weights.intermediate))
    w13, w2 = weights.w13, weights.w2
    encoding = jnp.asarray(SCALE_ENCODING)

    def packed(x: jax.Array, scale_bits: jax.Array) -> jax.Array:
        folded = fold_scale_signs(jnp.asarray(x, jnp.uint8), scale_bits)
        return _map_code_words(tile_rows(folded, _CODE_STEP_BYTES), interleave_code_words)

    def scales(scale_bits: jax.Array) -> jax.Array:
        return tile_rows(encoding[scale_bits], _SCALE_STEP_BYTES)

    w13_bits = jnp.take(_scale_bits(w13.scale), order, axis=1)
    w2_bits = _scale_bits(w2.scale)
    return PreparedMoEWeights(
        w13_packed=packed(jnp.take(w13.packed, order, axis=1), w13_bits),
        w13_scale=scales(w13_bits),
        w13_global=jnp.asarray(w13.global_scale, jnp.float32),
        w2_packed=packed(w2.packed, w2_bits),
        w2_scale=scales(w2_bits),
        w2_global=jnp.asarray(w2.global_scale, jnp.float32),
    )


def unprepare(prepared: PreparedMoEWeights) -> MoEWeights:
    """The logical `MoEWeights` of prepared weights (the values `prepare` was given).

    Scales come back non-negative, and the codes of zero-scale blocks as zeros
    (module docstring); every dequantized value is the original one (a zero may
    come back as +0 where it was -0).
    """
    if not isinstance(prepared, PreparedMoEWeights):
        raise TypeError(f"prepared must be a PreparedMoEWeights, got {type(prepared).__name__}")
    if prepared.layout_version != LAYOUT_VERSION:
        raise NotImplementedError(
            f"layout_version={prepared.layout_version}; this build reads {LAYOUT_VERSION}"
        )
    inverse = jnp.asarray(np.argsort(gate_up_row_order(prepared.intermediate)))

    def to_e4m3(bits: jax.Array) -> jax.Array:
        return jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fn)

    decoding = jnp.asarray(SCALE_DECODING)

    def packed(x: jax.Array) -> jax.Array:
        return untile_rows(_map_code_words(x, deinterleave_code_words), _CODE_STEP_BYTES)

    def scales(x: jax.Array) -> jax.Array:
        return to_e4m3(decoding[untile_rows(x, _SCALE_STEP_BYTES)])

    return MoEWeights(
        w13=nvfp4.Nvfp4Tensor(
            packed=jnp.take(packed(prepared.w13_packed), inverse, axis=1),
            scale=jnp.take(scales(prepared.w13_scale), inverse, axis=1),
            global_scale=prepared.w13_global,
        ),
        w2=nvfp4.Nvfp4Tensor(
            packed=packed(prepared.w2_packed),
            scale=scales(prepared.w2_scale),
            global_scale=prepared.w2_global,
        ),
    )
