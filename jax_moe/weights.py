"""MoE expert weights in the logical NVFP4 format.

``MoEWeights`` holds one rank's experts (the local experts under expert
parallelism):

``w13``: :class:`~jax_moe.nvfp4.Nvfp4Tensor` of logical shape
    ``(num_experts, 2 * intermediate, hidden)``. Rows ``0 .. I-1`` are the gate
    projection, rows ``I .. 2I-1`` the up projection; the activation is
    ``silu(x @ gate^T) * (x @ up^T)``.
``w2``: :class:`~jax_moe.nvfp4.Nvfp4Tensor` of logical shape
    ``(num_experts, hidden, intermediate)`` (the down projection).

Both are quantized along their last axis (the reduction axis of the matrix
products), with one global scale per expert.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_moe import nvfp4

__all__ = ["MoEWeights", "quantize_moe_weights"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEWeights:
    """NVFP4 expert weights: ``w13 (E, 2I, H)`` gate-then-up rows and ``w2 (E, H, I)``."""

    w13: nvfp4.Nvfp4Tensor
    w2: nvfp4.Nvfp4Tensor

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden(self) -> int:
        return self.w13.shape[2]

    @property
    def intermediate(self) -> int:
        return self.w13.shape[1] // 2

    def check(self, name: str = "weights") -> None:
        """Raises ``TypeError``/``ValueError`` if the weights are malformed or inconsistent."""
        for field in ("w13", "w2"):
            t = getattr(self, field)
            if not isinstance(t, nvfp4.Nvfp4Tensor):
                raise TypeError(f"{name}.{field} must be an Nvfp4Tensor, got {type(t).__name__}")
            t.check(f"{name}.{field}")
            if len(t.shape) != 3:
                raise ValueError(
                    f"{name}.{field} must be 3-D (experts, rows, cols), got shape {t.shape}"
                )
        e, two_i, h = self.w13.shape
        if two_i % 2:
            raise ValueError(f"{name}.w13 must have 2*intermediate rows, got {two_i}")
        want_w2 = (e, h, two_i // 2)
        if self.w2.shape != want_w2:
            raise ValueError(
                f"{name}.w2 must have logical shape (experts, hidden, intermediate) = "
                f"{want_w2} to match w13 {self.w13.shape}, got {self.w2.shape}"
            )


def quantize_moe_weights(w13: jax.Array, w2: jax.Array) -> MoEWeights:
    """Quantizes dense expert weights to NVFP4 with one global scale per expert.

    Args:
      w13: ``(num_experts, 2 * intermediate, hidden)`` float32/bfloat16, gate rows then up rows.
      w2: ``(num_experts, hidden, intermediate)`` float32/bfloat16.
    """
    w13 = jnp.asarray(w13)
    w2 = jnp.asarray(w2)
    if w13.ndim != 3:
        raise ValueError(f"w13 must be (experts, 2*intermediate, hidden), got shape {w13.shape}")
    if w2.ndim != 3:
        raise ValueError(f"w2 must be (experts, hidden, intermediate), got shape {w2.shape}")
    e, two_i, h = w13.shape
    if two_i % 2:
        raise ValueError(f"w13 must have an even number of rows (2*intermediate), got {two_i}")
    if w2.shape != (e, h, two_i // 2):
        raise ValueError(
            f"w2 must have shape (experts, hidden, intermediate) = {(e, h, two_i // 2)} "
            f"to match w13 {w13.shape}, got {w2.shape}"
        )
    for name, w in (("w13", w13), ("w2", w2)):
        if w.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {w.dtype}")
        if w.shape[-1] % nvfp4.BLOCK_SIZE:
            raise ValueError(
                f"{name}'s last dim must be a multiple of {nvfp4.BLOCK_SIZE}, got {w.shape}"
            )
    weights = MoEWeights(w13=nvfp4.quantize(w13), w2=nvfp4.quantize(w2))
    weights.check()
    return weights
