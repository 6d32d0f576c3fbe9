"""The float32 reference MoE layer, the oracle every implementation is tested against.

For each token ``n`` with hidden state ``x = hidden_states[n]`` (cast to
float32) and each of its slots ``j`` whose global expert id
``topk_ids[n, j]`` lies in the local range
``[local_expert_offset, local_expert_offset + num_local_experts)``::

    e       = topk_ids[n, j] - local_expert_offset
    gate_up = W13[e] @ x                      # (2 * intermediate,)
    act     = silu(gate_up[:I]) * gate_up[I:] # SwiGLU, (intermediate,)
    out[n] += topk_weights[n, j] * (W2[e] @ act)

with ``W13``/``W2`` the dequantized NVFP4 weights (float32, global scales
included). Slots whose expert is not local contribute nothing, so a token with
no local expert gets zeros (expert parallelism: another rank adds its share).

Everything is float32 with ``Precision.HIGHEST`` matrix products, so the
result does not depend on the backend's default matmul precision. The layer
loops over the local experts (``jax.lax.scan``), dequantizing one expert at a
time and skipping experts no token chose, so memory stays at one expert's
dense weights plus ``(num_tokens, 2 * intermediate)`` activations.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_moe import nvfp4
from jax_moe.weights import MoEWeights

__all__ = ["fused_moe", "local_slot_weights", "swiglu"]

_HIDDEN_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def swiglu(gate_up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` of ``gate_up = [gate, up]`` split in half along the last axis.

    Args:
      gate_up: ``(..., 2 * intermediate)``.

    Returns:
      ``(..., intermediate)`` in the dtype of ``gate_up``.
    """
    if gate_up.ndim < 1 or gate_up.shape[-1] % 2:
        raise ValueError(
            f"gate_up must have an even last dim (2 * intermediate), got shape {gate_up.shape}"
        )
    inter = gate_up.shape[-1] // 2
    return jax.nn.silu(gate_up[..., :inter]) * gate_up[..., inter:]


def local_slot_weights(
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    num_local_experts: int,
    local_expert_offset: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Maps global expert ids to this rank's local ids.

    Args:
      topk_ids: ``(num_tokens, top_k)`` integer global expert ids.
      topk_weights: ``(num_tokens, top_k)`` float router weights.
      num_local_experts: experts held by this rank.
      local_expert_offset: global id of the first local expert.

    Returns:
      ``local_ids`` int32 ``(num_tokens, top_k)``: ``topk_ids - local_expert_offset``
      for local slots, ``-1`` for the others; and ``weights`` float32
      ``(num_tokens, top_k)``: ``topk_weights`` for local slots, ``0`` for the others.
    """
    # Decide locality in the ids' own dtype: narrowing first could wrap an invalid
    # 64-bit id onto a local one.
    local_ids = topk_ids - local_expert_offset
    is_local = (local_ids >= 0) & (local_ids < num_local_experts)
    local_ids = jnp.where(is_local, local_ids, -1).astype(jnp.int32)
    weights = jnp.where(is_local, topk_weights.astype(jnp.float32), 0.0)
    return local_ids, weights


def _check_array(name: str, value: object) -> None:
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(value).__name__}")


def _check_inputs(
    hidden_states: jax.Array,
    weights: MoEWeights,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    num_local_experts: int | None,
    local_expert_offset: int,
) -> int:
    _check_array("hidden_states", hidden_states)
    if hidden_states.ndim != 2:
        raise ValueError(
            f"hidden_states must be (num_tokens, hidden), got shape {hidden_states.shape}"
        )
    if hidden_states.dtype not in _HIDDEN_DTYPES:
        raise TypeError(
            f"hidden_states must be float32, bfloat16 or float16, got {hidden_states.dtype}"
        )
    if not isinstance(weights, MoEWeights):
        raise TypeError(f"weights must be a jax_moe.MoEWeights, got {type(weights).__name__}")
    weights.check("weights")
    num_tokens, hidden = hidden_states.shape
    if weights.hidden != hidden:
        raise ValueError(
            f"hidden_states has hidden size {hidden} but weights have hidden size {weights.hidden}"
        )
    _check_array("topk_ids", topk_ids)
    _check_array("topk_weights", topk_weights)
    if topk_ids.ndim != 2 or topk_ids.shape[0] != num_tokens or topk_ids.shape[1] < 1:
        raise ValueError(
            f"topk_ids must be (num_tokens, top_k) with num_tokens={num_tokens} and "
            f"top_k >= 1, got shape {topk_ids.shape}"
        )
    if not jnp.issubdtype(topk_ids.dtype, jnp.integer):
        raise TypeError(f"topk_ids must be an integer array, got {topk_ids.dtype}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"topk_weights must have the shape of topk_ids {topk_ids.shape}, got "
            f"{topk_weights.shape}"
        )
    if not jnp.issubdtype(topk_weights.dtype, jnp.floating):
        raise TypeError(f"topk_weights must be a float array, got {topk_weights.dtype}")
    if num_local_experts is None:
        num_local_experts = weights.num_experts
    if isinstance(num_local_experts, bool) or not isinstance(num_local_experts, int):
        raise TypeError(
            f"num_local_experts must be a Python int, got {type(num_local_experts).__name__} "
            f"{num_local_experts!r}"
        )
    if num_local_experts != weights.num_experts:
        raise ValueError(
            f"num_local_experts={num_local_experts} but weights hold {weights.num_experts} "
            "experts; pass only the local experts' weights"
        )
    if isinstance(local_expert_offset, bool) or not isinstance(local_expert_offset, int):
        raise TypeError(
            "local_expert_offset must be a Python int, got "
            f"{type(local_expert_offset).__name__} {local_expert_offset!r}"
        )
    if local_expert_offset < 0:
        raise ValueError(f"local_expert_offset must be non-negative, got {local_expert_offset}")
    return num_local_experts


def _dot(a: jax.Array, b_t: jax.Array) -> jax.Array:
    """``a @ b_t.T`` in full float32."""
    return jnp.einsum("nk,mk->nm", a, b_t, precision=jax.lax.Precision.HIGHEST)


def _expert_weights(t: nvfp4.Nvfp4Tensor, e: jax.Array) -> jax.Array:
    """Dequantized float32 matrix of (local) expert ``e`` of a 3-D Nvfp4Tensor."""
    one = nvfp4.Nvfp4Tensor(packed=t.packed[e], scale=t.scale[e], global_scale=t.global_scale[e])
    return nvfp4.dequantize(one, jnp.float32)


def fused_moe(
    hidden_states: jax.Array,
    weights: MoEWeights,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    *,
    num_local_experts: int | None = None,
    local_expert_offset: int = 0,
) -> jax.Array:
    """The reference MoE layer in float32 (see the module docstring for the math).

    Args:
      hidden_states: ``(num_tokens, hidden)`` float32, bfloat16 or float16.
      weights: the local experts' :class:`~jax_moe.MoEWeights`
        (``num_local_experts`` of them).
      topk_ids: ``(num_tokens, top_k)`` integer global expert ids. Any value is
        allowed; ids outside the local range (including negative ones) select
        nothing on this rank.
      topk_weights: ``(num_tokens, top_k)`` float router weights.
      num_local_experts: experts held by this rank; defaults to, and must equal,
        ``weights.num_experts``.
      local_expert_offset: global id of the first local expert, ``>= 0``.

    Returns:
      ``float32 (num_tokens, hidden)``.
    """
    num_local = _check_inputs(
        hidden_states, weights, topk_ids, topk_weights, num_local_experts, local_expert_offset
    )
    return _fused_moe_values(
        hidden_states, weights, topk_ids, topk_weights, num_local, local_expert_offset
    )


@functools.partial(jax.jit, static_argnums=(4, 5))
def _fused_moe_values(
    hidden_states: jax.Array,
    weights: MoEWeights,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    num_local: int,
    local_expert_offset: int,
) -> jax.Array:
    """The arithmetic of :func:`fused_moe` on checked inputs, compiled once per shape."""
    x = hidden_states.astype(jnp.float32)
    local_ids, slot_weights = local_slot_weights(
        topk_ids, topk_weights, num_local, local_expert_offset
    )

    def add_expert(out: jax.Array, e: jax.Array) -> tuple[jax.Array, None]:
        chosen = local_ids == e  # (num_tokens, top_k)
        # A token that picks the same expert twice gets both weights.
        coef = jnp.sum(jnp.where(chosen, slot_weights, 0.0), axis=1)  # (num_tokens,)

        def compute(out: jax.Array) -> jax.Array:
            w13 = _expert_weights(weights.w13, e)  # (2I, H)
            w2 = _expert_weights(weights.w2, e)  # (H, I)
            act = swiglu(_dot(x, w13))  # (N, I)
            return out + coef[:, None] * _dot(act, w2)

        return jax.lax.cond(jnp.any(chosen), compute, lambda out: out, out), None

    out = jnp.zeros(x.shape, jnp.float32)
    out, _ = jax.lax.scan(add_expert, out, jnp.arange(num_local, dtype=jnp.int32))
    return out
