"""NVFP4: 4-bit floating-point weights with two-level scaling.

This is the logical format of NVIDIA ModelOpt NVFP4 checkpoints; every other
layout in jax_moe (kernel layouts, see :mod:`jax_moe.prepare`) is derived from
it.

A tensor ``x`` of shape ``(*batch, rows, cols)`` is stored as three arrays:

``packed``: ``uint8 (*batch, rows, cols // 2)``
    Two E2M1 codes per byte along the last axis. Element ``2*i`` of a row is in
    the low nibble (bits 0..3) of byte ``i``; element ``2*i + 1`` is in the
    high nibble (bits 4..7).
``scale``: ``float8_e4m3fn (*batch, rows, cols // 16)``
    One block scale per 16 consecutive elements along the last axis (the
    reduction axis of the matrix products that consume it).
``global_scale``: ``float32 (*batch)``
    One dequantization multiplier per matrix (for MoE weights: per expert).
    A 1-D input has a scalar global scale.

An E2M1 code is 4 bits ``s e1 e0 m``: bit 3 is the sign, the three low bits
select the magnitude from :data:`E2M1_VALUES` = 0, 0.5, 1, 1.5, 2, 3, 4, 6.
The value of element ``j`` of a row is::

    E2M1[code_j] * float(scale[j // 16]) * global_scale

Quantization (:func:`quantize`) follows the ModelOpt convention:

* ``global_scale = amax(|x|) / (448 * 6)`` over each matrix (448 is the
  largest e4m3 value, 6 the largest e2m1 value); a matrix of zeros gets 1.0.
* ``scale = e4m3(block_amax / 6 / global_scale)`` rounded to nearest even and
  clamped to 448.
* each element is divided by ``float(scale) * global_scale`` (a float32
  product) and the exact quotient is rounded to the nearest E2M1 value, ties
  to the even code, saturating at 6. A block
  whose scale is 0 stores zeros. The sign bit is the sign of the input, so a
  small negative value that rounds to zero is stored as code 8 (-0).

Non-finite values: :func:`quantize` rejects NaN and infinity with a
``ValueError`` when its input is concrete (eager mode). Inside ``jax.jit`` the
values cannot be inspected; a non-finite input then gives NaN block scales, so
the dequantized block is NaN rather than a silently wrong finite number.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BLOCK_SIZE",
    "E2M1_VALUES",
    "E4M3_MAX",
    "E2M1_MAX",
    "Nvfp4Tensor",
    "quantize",
    "dequantize",
    "decode_e2m1",
]

#: Elements that share one e4m3 block scale.
BLOCK_SIZE = 16
#: The eight non-negative E2M1 values, indexed by the 3 magnitude bits of a code.
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
#: Largest finite float8_e4m3fn value.
E4M3_MAX = 448.0
#: Largest E2M1 magnitude.
E2M1_MAX = 6.0

# Rounding thresholds between neighbouring E2M1 magnitudes (midpoints).
_MIDPOINTS = (E2M1_VALUES[:-1] + E2M1_VALUES[1:]) / 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Nvfp4Tensor:
    """An NVFP4-quantized tensor in the logical (checkpoint) layout.

    Attributes:
      packed: ``uint8 (*batch, rows, cols // 2)``, two codes per byte, low nibble first.
      scale: ``float8_e4m3fn (*batch, rows, cols // 16)`` block scales.
      global_scale: ``float32 (*batch)`` per-matrix dequantization multiplier.
    """

    packed: jax.Array
    scale: jax.Array
    global_scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (unpacked) shape ``(*batch, rows, cols)``."""
        return (*self.packed.shape[:-1], self.packed.shape[-1] * 2)

    @property
    def nbytes(self) -> int:
        """Bytes of packed codes, block scales and global scales together."""
        return int(
            np.prod(self.packed.shape)
            + np.prod(self.scale.shape)
            + 4 * np.prod(self.global_scale.shape)
        )

    def check(self, name: str = "tensor") -> None:
        """Raises ``TypeError``/``ValueError`` if the three arrays are inconsistent."""
        if self.packed.dtype != jnp.uint8:
            raise TypeError(f"{name}.packed must be uint8, got {self.packed.dtype}")
        if self.scale.dtype != jnp.float8_e4m3fn:
            raise TypeError(f"{name}.scale must be float8_e4m3fn, got {self.scale.dtype}")
        if self.global_scale.dtype != jnp.float32:
            raise TypeError(f"{name}.global_scale must be float32, got {self.global_scale.dtype}")
        cols = self.packed.shape[-1] * 2 if self.packed.ndim else 0
        want_scale = (*self.packed.shape[:-1], cols // BLOCK_SIZE)
        if self.packed.ndim < 1 or cols % BLOCK_SIZE:
            raise ValueError(
                f"{name}.packed must have a last dim of cols/2 with cols a multiple of "
                f"{BLOCK_SIZE}, got shape {self.packed.shape}"
            )
        if tuple(self.scale.shape) != want_scale:
            raise ValueError(
                f"{name}.scale must have shape {want_scale} for packed shape "
                f"{self.packed.shape}, got {self.scale.shape}"
            )
        want_global = _batch_shape(self.shape)
        if tuple(self.global_scale.shape) != want_global:
            raise ValueError(
                f"{name}.global_scale must have shape {want_global}, got {self.global_scale.shape}"
            )


def _batch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[:-2]) if len(shape) >= 2 else ()


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _round_to_e2m1(a: jax.Array, denom: jax.Array) -> jax.Array:
    """Magnitude code (0..7) of the E2M1 value nearest to ``a / denom``; ties to even, saturating.

    ``a >= 0``; a block with ``denom == 0`` gets code 0. The quotient is
    compared with each midpoint exactly, without dividing: ``denom`` is split
    into ``hi + lo`` (12 significant bits each), so ``mid * hi`` and
    ``mid * lo`` are exact and ``a > mid * denom`` is decided as
    ``a - mid * hi > mid * lo`` (the subtraction is exact whenever the two
    sides are close). A floating-point division would not do: XLA's CPU
    backend divides vectors with an approximate reciprocal, which breaks
    exact ties.
    """
    bits = jax.lax.bitcast_convert_type(denom, jnp.uint32)
    hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
    lo = denom - hi
    code = jnp.zeros(a.shape, jnp.uint8)
    for i, mid in enumerate(_MIDPOINTS):
        upper_is_even = (i + 1) % 2 == 0
        rest = a - mid * hi
        up = (rest > mid * lo) | ((rest == mid * lo) if upper_is_even else False)
        code = code + up.astype(jnp.uint8)
    return jnp.where(denom > 0, code, jnp.uint8(0))


def quantize(x: jax.Array, global_scale: jax.Array | float | None = None) -> Nvfp4Tensor:
    """Quantizes ``x`` to NVFP4 along its last axis.

    Args:
      x: ``(*batch, rows, cols)`` (or ``(cols,)``) float32, bfloat16 or float16,
        ``cols`` a multiple of 16, finite.
      global_scale: the per-matrix dequantization multiplier, broadcastable to
        ``(*batch)``; by default ``amax / (448 * 6)`` of each matrix.

    Returns:
      The :class:`Nvfp4Tensor`.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype not in (
        jnp.float32,
        jnp.bfloat16,
        jnp.float16,
    ):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] % BLOCK_SIZE or x.shape[-1] == 0:
        raise ValueError(
            f"x must have a last dim that is a positive multiple of {BLOCK_SIZE}, "
            f"got shape {x.shape}"
        )
    if _is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("x contains NaN or infinity; NVFP4 can only hold finite values")
    batch = _batch_shape(x.shape)
    if global_scale is None:
        return _quantize_values(x, None)
    gs = jnp.asarray(global_scale, jnp.float32)
    if not jnp.issubdtype(gs.dtype, jnp.floating):
        raise TypeError(f"global_scale must be a float, got {gs.dtype}")
    try:
        gs = jnp.broadcast_to(gs, batch)
    except ValueError:
        raise ValueError(
            f"global_scale of shape {gs.shape} does not broadcast to the batch shape {batch}"
        ) from None
    if _is_concrete(gs) and not bool(jnp.all((gs > 0) & jnp.isfinite(gs))):
        raise ValueError("global_scale must be positive and finite")
    return _quantize_values(x, gs)


@jax.jit
def _quantize_values(x: jax.Array, global_scale: jax.Array | None) -> Nvfp4Tensor:
    """The arithmetic of :func:`quantize` on checked inputs, compiled once per shape."""
    xf = x.astype(jnp.float32)
    batch = _batch_shape(x.shape)
    if global_scale is None:
        amax = jnp.max(jnp.abs(xf), axis=(-2, -1)) if x.ndim >= 2 else jnp.max(jnp.abs(xf))
        gs = amax / (E4M3_MAX * E2M1_MAX)
        gs = jnp.where(gs > 0, gs, jnp.float32(1.0))
    else:
        gs = global_scale.astype(jnp.float32)
    gs_b = gs.reshape(batch + (1,) * min(x.ndim, 2))

    blocks = xf.reshape(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    block_amax = jnp.max(jnp.abs(blocks), axis=-1)
    scale_f = jnp.minimum(block_amax / E2M1_MAX / gs_b, E4M3_MAX)
    # Non-finite inputs under jit: a NaN scale keeps them visible (an infinity
    # would otherwise be clamped to a finite, saturated block).
    scale_f = jnp.where(jnp.isfinite(block_amax), scale_f, jnp.nan)
    scale = scale_f.astype(jnp.float8_e4m3fn)

    denom = scale.astype(jnp.float32)[..., None] * gs_b[..., None]
    code = _round_to_e2m1(jnp.abs(blocks), denom)
    code = code | (jnp.signbit(blocks).astype(jnp.uint8) << 3)
    code = code.reshape(x.shape)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return Nvfp4Tensor(packed=packed.astype(jnp.uint8), scale=scale, global_scale=gs)


def decode_e2m1(packed: jax.Array) -> jax.Array:
    """Unpacks ``uint8 (..., cols // 2)`` into signed E2M1 values ``float32 (..., cols)``."""
    if packed.dtype != jnp.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    codes = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(
        *packed.shape[:-1], packed.shape[-1] * 2
    )
    mag = jnp.asarray(E2M1_VALUES)[codes & 0x7]
    return jnp.where((codes & 0x8) != 0, -mag, mag)


def dequantize(t: Nvfp4Tensor, dtype: Any = jnp.float32) -> jax.Array:
    """Returns the tensor's values ``(*batch, rows, cols)`` in ``dtype``.

    Computed in float32 as ``(E2M1[code] * scale) * global_scale`` (the first
    product is exact), then cast once to ``dtype``.
    """
    if not isinstance(t, Nvfp4Tensor):
        raise TypeError(f"t must be an Nvfp4Tensor, got {type(t).__name__}")
    t.check("t")
    return _dequantize_values(t, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize_values(t: Nvfp4Tensor, dtype: Any) -> jax.Array:
    """The arithmetic of :func:`dequantize` on a checked tensor, compiled once per shape."""
    values = decode_e2m1(t.packed)
    scale = jnp.repeat(t.scale.astype(jnp.float32), BLOCK_SIZE, axis=-1)
    gs = t.global_scale.reshape(t.global_scale.shape + (1,) * min(values.ndim, 2))
    return ((values * scale) * gs).astype(dtype)
