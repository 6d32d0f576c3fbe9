"""Offline repack of logical NVFP4 MoE weights into the Hopper kernels' layout.

`prepare(weights)` turns :class:`jax_moe.weights.MoEWeights` (the checkpoint
layout, see :mod:`jax_moe.nvfp4`) into :class:`PreparedMoEWeights`, the byte
layout the sm_90a GEMM kernels (:mod:`jax_moe.kernels.moe_gemm1_sm90`,
:mod:`jax_moe.kernels.moe_gemm2_sm90`) read. It runs once, offline or at load
time, in plain JAX (jit-able) and is exactly invertible (`unprepare`).

Byte layout, layout version 4 (`PreparedMoEWeights.layout_version == 4`):

Code words (both matrices). Each row's packed bytes are read as little-endian
32-bit words; word ``w`` holds the 8 elements ``8w .. 8w+7`` of the row, as in
the logical layout, but with its bits rearranged so that the kernels decode the
four pairs of elements with 9 bit operations per word. For pair ``p`` (0..3) of
the word, elements ``8w+2p`` ("even") and ``8w+2p+1`` ("odd") with e2m1 codes
``s e1 e0 m`` decode to the bf16x2 word ``(value_even, value_odd) * 2**-126``
(low half even) as::

    OR over (rotation, mask) in DECODE_TERMS[p]:  rotate_left(word, rotation) & mask

with ``DECODE_TERMS = (((0, 0x81C081C0),), ((4, 0x81C081C0),), ((10, 0x81C081C0),),
((6, 0x80C080C0), (30, 0x01000100)))``: each code's magnitude bits ``e1 e0 m`` land in
bf16 bits 8..6 of its half (the exponent's two low bits and the mantissa's top bit)
and its sign in bit 15, which reads as the e2m1 value times ``2**-126`` for every
code (``+-0.5`` become bf16 subnormals). `interleave_code_words` places every bit
where its term takes it from.

Tiles (both matrices, bytes and scales). The kernels read one 64-element K step
of 16 rows at a time, so each expert's rows are cut into bands of 16 and each band
is stored step by step: the bytes of band ``b`` (``16 * C`` of them for rows of
``C`` bytes) hold, for K step ``s`` and row ``i`` of the band, the ``c`` bytes of
that row's step (``c = 32`` code bytes or ``4`` scale bytes) at offset
``s * 16 * c + i * c``. A warp's 16-byte loads of one step then read one
contiguous 512-byte block (64 bytes of scales) instead of 16 rows far apart.
Arrays keep their logical shapes; `tile_rows` / `untile_rows` convert.

``w13_packed``: ``uint8 (E, 2I, H/2)``; ``w13_scale``: ``uint8 (E, 2I, H/16)``
    The rows of each expert's W13 are interleaved in groups of 16: row ``16*g + i``
    (before tiling) holds logical gate row ``8*g + i`` for ``0 <= i < 8`` and logical
    up row ``I + 8*g + (i - 8)`` for ``8 <= i < 16`` (so ``I % 8 == 0``). Rows hold
    code words as above; scale byte ``j`` of a row is the raw float8_e4m3fn bit
    pattern of the block scale of elements ``16j .. 16j+15``; both are tiled. Each
    16-row MMA tile of GEMM1 thus holds eight gate rows and the matching eight up
    rows, and the SwiGLU epilogue pairs accumulator rows ``q`` and ``q + 8``.
``w13_global``: ``float32 (E,)``, the logical global scales, unchanged.
``w2_packed``: ``uint8 (E, H, I/2)``; ``w2_scale``: ``uint8 (E, H, I/16)``
    Logical row order; code words as above; scales as raw e4m3 bits; both tiled.
``w2_global``: ``float32 (E,)``, unchanged.

Shapes and dtypes are those of the logical format (uint8 for the scales). The
global scales are not adjusted (the kernels handle their internal power of two).
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
    "deinterleave_code_words",
    "gate_up_row_order",
    "interleave_code_words",
    "prepare",
    "tile_rows",
    "unprepare",
    "untile_rows",
]

#: Version of the byte layout documented above.
LAYOUT_VERSION = 4
#: Rows per tile band and elements per K step of the tiled byte order.
TILE_ROWS = 16
STEP_ELEMENTS = 64
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
#: Gate (and up) rows per 16-row group of prepared W13.
_HALF_GROUP = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PreparedMoEWeights:
    """NVFP4 MoE weights in the sm_90a kernel layout (see the module docstring).

    Attributes:
      w13_packed: ``uint8 (experts, 2 * intermediate, hidden // 2)``, gate/up rows interleaved.
      w13_scale: ``uint8 (experts, 2 * intermediate, hidden // 16)``, e4m3 bits, same row order.
      w13_global: ``float32 (experts,)``.
      w2_packed: ``uint8 (experts, hidden, intermediate // 2)``.
      w2_scale: ``uint8 (experts, hidden, intermediate // 16)``, e4m3 bits.
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


def tile_rows(x, step_bytes: int):
    """Rows of `x` `(experts, rows, cols)` in the tiled byte order (module docstring).

    `step_bytes` is the bytes of one row per K step (32 for code bytes, 4 for scale
    bytes). Works on numpy, JAX and torch arrays (`reshape` and `swapaxes` only).
    """
    e, r, c = x.shape
    return (
        x.reshape(e, r // TILE_ROWS, TILE_ROWS, c // step_bytes, step_bytes)
        .swapaxes(2, 3)
        .reshape(e, r, c)
    )


def untile_rows(x, step_bytes: int):
    """The inverse of `tile_rows`."""
    e, r, c = x.shape
    return (
        x.reshape(e, r // TILE_ROWS, c // step_bytes, TILE_ROWS, step_bytes)
        .swapaxes(2, 3)
        .reshape(e, r, c)
    )


_CODE_STEP_BYTES = STEP_ELEMENTS // 2
_SCALE_STEP_BYTES = STEP_ELEMENTS // 16


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
    """Repacks logical NVFP4 MoE weights into the sm_90a kernel layout (exact, invertible)."""
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

    def packed(x: jax.Array) -> jax.Array:
        return tile_rows(_map_code_words(x, interleave_code_words), _CODE_STEP_BYTES)

    def scales(x: jax.Array) -> jax.Array:
        return tile_rows(_scale_bits(x), _SCALE_STEP_BYTES)

    return PreparedMoEWeights(
        w13_packed=packed(jnp.take(w13.packed, order, axis=1)),
        w13_scale=scales(jnp.take(_scale_bits(w13.scale), order, axis=1)),
        w13_global=jnp.asarray(w13.global_scale, jnp.float32),
        w2_packed=packed(jnp.asarray(w2.packed, jnp.uint8)),
        w2_scale=scales(w2.scale),
        w2_global=jnp.asarray(w2.global_scale, jnp.float32),
    )


def unprepare(prepared: PreparedMoEWeights) -> MoEWeights:
    """The inverse of `prepare`: the logical `MoEWeights` of prepared weights."""
    if not isinstance(prepared, PreparedMoEWeights):
        raise TypeError(f"prepared must be a PreparedMoEWeights, got {type(prepared).__name__}")
    if prepared.layout_version != LAYOUT_VERSION:
        raise NotImplementedError(
            f"layout_version={prepared.layout_version}; this build reads {LAYOUT_VERSION}"
        )
    inverse = jnp.asarray(np.argsort(gate_up_row_order(prepared.intermediate)))

    def to_e4m3(bits: jax.Array) -> jax.Array:
        return jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fn)

    def packed(x: jax.Array) -> jax.Array:
        return _map_code_words(untile_rows(x, _CODE_STEP_BYTES), deinterleave_code_words)

    def scales(x: jax.Array) -> jax.Array:
        return to_e4m3(untile_rows(x, _SCALE_STEP_BYTES))

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
