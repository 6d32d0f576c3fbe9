"""The public MoE layer: :func:`fused_moe`.

``fused_moe`` validates its arguments at trace time, then runs one of two
implementations:

``"xla"``
    Pure JAX, runs on every backend: dequantize the NVFP4 weights to bf16
    once per call (``e2m1 * e4m3`` is exact in bf16), group the token slots by
    local expert and run two ``jax.lax.ragged_dot_general`` products with
    float32 accumulation, SwiGLU between them, global scales and router weights
    in float32, and a fixed-order sum over each token's ``top_k`` slots.
``"cuda"``
    The CuTe DSL kernels behind XLA FFI custom calls (see :mod:`jax_moe.gpu`),
    with tactics chosen at trace time.

By default ``"cuda"`` is used when JAX's default backend is a CUDA GPU and the
compiled extension is present, ``"xla"`` otherwise; a problem the kernels do
not support (e.g. float32 hidden states, unaligned sizes) also falls back to
``"xla"``, with a warning logged once. Asking for ``implementation="cuda"``
explicitly raises ``NotImplementedError`` instead.

Expert ids are checked against ``[0, num_experts)`` when ``topk_ids`` is
concrete; under ``jax.jit`` they cannot be, and ids outside the local range
(including invalid ones) contribute nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe import nvfp4
from jax_moe.weights import MoEWeights

__all__ = ["MoEProblem", "fused_moe", "validate_moe_args"]

logger = logging.getLogger("jax_moe")

_IMPLEMENTATIONS = ("xla", "cuda")
_HIDDEN_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class MoEProblem:
    """Static description of one ``fused_moe`` call (known at trace time)."""

    num_tokens: int
    hidden: int
    intermediate: int
    top_k: int
    num_experts: int
    num_local_experts: int
    local_expert_offset: int
    dtype: str


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def validate_moe_args(
    hidden_states: jax.Array,
    weights: Any,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    *,
    num_local_experts: int | None = None,
    local_expert_offset: int = 0,
    num_experts: int | None = None,
) -> MoEProblem:
    """Checks the arguments of :func:`fused_moe` and returns the static problem.

    Raises ``TypeError``/``ValueError`` naming the offending argument.
    """
    if not hasattr(hidden_states, "shape") or not hasattr(hidden_states, "dtype"):
        raise TypeError(f"hidden_states must be an array, got {type(hidden_states).__name__}")
    if hidden_states.ndim != 2:
        raise ValueError(
            f"hidden_states must be (num_tokens, hidden), got shape {hidden_states.shape}"
        )
    if hidden_states.dtype not in _HIDDEN_DTYPES:
        raise TypeError(
            f"hidden_states must be bfloat16, float16 or float32, got {hidden_states.dtype}"
        )
    _check_weights(weights)
    n, h = hidden_states.shape
    if weights.hidden != h:
        raise ValueError(
            f"hidden_states has hidden size {h} but weights have hidden size {weights.hidden}"
        )
    for name, arr in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(arr).__name__}")
        if arr.ndim != 2 or arr.shape[0] != n:
            raise ValueError(
                f"{name} must be (num_tokens, top_k) with num_tokens={n}, got shape {arr.shape}"
            )
    if not jnp.issubdtype(topk_ids.dtype, jnp.integer):
        raise TypeError(f"topk_ids must be an integer array, got {topk_ids.dtype}")
    if not jnp.issubdtype(topk_weights.dtype, jnp.floating):
        raise TypeError(f"topk_weights must be a float array, got {topk_weights.dtype}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights shape {topk_weights.shape} must equal topk_ids shape {topk_ids.shape}"
        )
    top_k = topk_ids.shape[1]
    if top_k < 1:
        raise ValueError("topk_ids must have at least one column (top_k >= 1)")

    if num_local_experts is None:
        num_local_experts = weights.num_experts
    num_local_experts = _as_int("num_local_experts", num_local_experts)
    local_expert_offset = _as_int("local_expert_offset", local_expert_offset)
    if num_experts is not None:
        num_experts = _as_int("num_experts", num_experts)
    if num_local_experts < 1:
        raise ValueError(f"num_local_experts must be a positive int, got {num_local_experts!r}")
    if num_local_experts != weights.num_experts:
        raise ValueError(
            f"num_local_experts={num_local_experts} but weights hold {weights.num_experts} "
            "experts; pass only the local experts' weights"
        )
    if local_expert_offset < 0:
        raise ValueError(
            f"local_expert_offset must be a non-negative int, got {local_expert_offset!r}"
        )
    if num_experts is None:
        num_experts = local_expert_offset + num_local_experts
    if num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if local_expert_offset + num_local_experts > num_experts:
        raise ValueError(
            f"local experts [{local_expert_offset}, {local_expert_offset + num_local_experts}) "
            f"exceed num_experts={num_experts}"
        )
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
    if h % nvfp4.BLOCK_SIZE or weights.intermediate % nvfp4.BLOCK_SIZE:
        raise ValueError(
            f"hidden ({h}) and intermediate ({weights.intermediate}) must be multiples of "
            f"{nvfp4.BLOCK_SIZE}"
        )
    if _is_concrete(topk_ids) and topk_ids.size:
        lo, hi = int(jnp.min(topk_ids)), int(jnp.max(topk_ids))
        if lo < 0 or hi >= num_experts:
            raise ValueError(
                f"topk_ids must lie in [0, num_experts={num_experts}), got values in [{lo}, {hi}]"
            )
    return MoEProblem(
        num_tokens=n,
        hidden=h,
        intermediate=weights.intermediate,
        top_k=top_k,
        num_experts=num_experts,
        num_local_experts=num_local_experts,
        local_expert_offset=local_expert_offset,
        dtype=jnp.dtype(hidden_states.dtype).name,
    )


def _as_int(name: str, value: Any) -> int:
    """``value`` as a Python int (numpy integers accepted); TypeError for bools and others."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def _check_weights(weights: Any) -> None:
    """Type and shape checks of logical or prepared weights; names the bad field."""
    from jax_moe.prepare import LAYOUT_VERSION, PreparedMoEWeights

    if isinstance(weights, MoEWeights):
        weights.check("weights")
        return
    if not isinstance(weights, PreparedMoEWeights):
        raise TypeError(
            "weights must be a jax_moe.MoEWeights or jax_moe.prepare.PreparedMoEWeights, got "
            f"{type(weights).__name__}"
        )
    if weights.layout_version != LAYOUT_VERSION:
        raise NotImplementedError(
            f"weights have prepared layout version {weights.layout_version}; this build "
            f"reads version {LAYOUT_VERSION} (prepare them again from MoEWeights)"
        )
    e, h, i = weights.num_experts, weights.hidden, weights.intermediate
    block = nvfp4.BLOCK_SIZE
    want = {
        "w13_packed": ((e, 2 * i, h // 2), jnp.uint8),
        "w13_scale": ((e, 2 * i, h // block), jnp.uint8),
        "w13_global": ((e,), jnp.float32),
        "w2_packed": ((e, h, i // 2), jnp.uint8),
        "w2_scale": ((e, h, i // block), jnp.uint8),
        "w2_global": ((e,), jnp.float32),
    }
    for field, (shape, dtype) in want.items():
        arr = getattr(weights, field)
        if arr.dtype != dtype:
            raise TypeError(f"weights.{field} must be {jnp.dtype(dtype).name}, got {arr.dtype}")
        if tuple(arr.shape) != shape:
            raise ValueError(
                f"weights.{field} must have shape {shape} (experts={e}, hidden={h}, "
                f"intermediate={i}), got {arr.shape}"
            )


def _default_implementation() -> str:
    if jax.default_backend() != "gpu":
        return "xla"
    from jax_moe import gpu

    return "cuda" if gpu.is_available() else "xla"


def fused_moe(
    hidden_states: jax.Array,
    weights: MoEWeights,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    *,
    num_local_experts: int | None = None,
    local_expert_offset: int = 0,
    num_experts: int | None = None,
    tactics: Any = None,
    implementation: str | None = None,
) -> jax.Array:
    """Mixture-of-Experts layer with NVFP4 expert weights.

    ``out[n] = sum_j topk_weights[n, j] * W2[e] @ (silu(W1[e] @ x[n]) * (W3[e] @ x[n]))``
    with ``e = topk_ids[n, j] - local_expert_offset`` over the slots ``j`` whose
    expert is local; other slots contribute nothing (expert parallelism).

    Args:
      hidden_states: ``(num_tokens, hidden)`` bfloat16, float16 or float32.
      weights: the local experts' :class:`MoEWeights` (``num_local_experts`` of
        them), or the same prepared for the GPU kernels with
        :func:`jax_moe.prepare.prepare` (do that once, at load time).
      topk_ids: ``(num_tokens, top_k)`` integer global expert ids.
      topk_weights: ``(num_tokens, top_k)`` float router weights.
      num_local_experts: experts held by this rank; defaults to
        ``weights.num_experts`` and must equal it.
      local_expert_offset: global id of the first local expert.
      num_experts: global number of experts (for id checks and tactic lookup);
        defaults to ``local_expert_offset + num_local_experts``.
      tactics: a :class:`jax_moe.tuning.TacticTable`, a path to a tactic file,
        or ``None``: the table shipped in the package for this GPU if there is one
        (none ships yet), else the heuristic defaults (GPU only).
      implementation: ``"xla"``, ``"cuda"`` or ``None`` (automatic).

    Returns:
      ``(num_tokens, hidden)`` in the dtype of ``hidden_states``.
    """
    problem = validate_moe_args(
        hidden_states,
        weights,
        topk_ids,
        topk_weights,
        num_local_experts=num_local_experts,
        local_expert_offset=local_expert_offset,
        num_experts=num_experts,
    )
    if tactics is not None:
        from jax_moe import tuning

        if isinstance(tactics, (str, os.PathLike)):
            # Loaded (once, cached) on every platform, so a corrupt file is an
            # error everywhere, not only where its tactics would be used.
            tactics = tuning.load_tactic_table(tactics)
        elif not isinstance(tactics, tuning.TacticTable):
            raise TypeError(
                f"tactics must be a TacticTable, a path or None, got {type(tactics).__name__}"
            )
    impl = implementation if implementation is not None else _default_implementation()
    if impl not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {impl!r}")
    topk_weights = topk_weights.astype(jnp.float32)
    if impl == "cuda":
        # The routing metadata decides locality in the ids' own dtype, so ids outside
        # [0, num_experts) (only possible under jit) are simply not local there.
        from jax_moe import gpu

        try:
            return gpu.fused_moe_cuda(
                hidden_states, weights, topk_ids, topk_weights, problem, tactics
            )
        except NotImplementedError as error:
            if implementation is not None:
                raise
            _log_fallback_once(str(error))
    # Ids outside [0, num_experts) become -1, "not local", before narrowing to int32
    # so that no 64-bit id can wrap onto a valid one.
    valid = (topk_ids >= 0) & (topk_ids < problem.num_experts)
    topk_ids = jnp.where(valid, topk_ids, -1).astype(jnp.int32)
    if not isinstance(weights, MoEWeights):
        from jax_moe.prepare import unprepare

        weights = unprepare(weights)
    return _fused_moe_xla(hidden_states, weights, topk_ids, topk_weights, problem)


@functools.cache
def _log_fallback_once(reason: str) -> None:
    logger.warning("fused_moe: using the xla implementation: %s", reason)


def _dequantize_unscaled(t: nvfp4.Nvfp4Tensor, dtype: Any) -> jax.Array:
    """``E2M1[code] * scale`` (exact in bf16), without the global scale."""
    values = nvfp4.decode_e2m1(t.packed)
    scale = jnp.repeat(t.scale.astype(jnp.float32), nvfp4.BLOCK_SIZE, axis=-1)
    return (values * scale).astype(dtype)


_RAGGED_NT = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2,)), ((), ())),
    lhs_ragged_dimensions=(0,),
    rhs_group_dimensions=(0,),
)


def _fused_moe_xla(
    hidden_states: jax.Array,
    weights: MoEWeights,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    problem: MoEProblem,
) -> jax.Array:
    n, k, num_local = problem.num_tokens, problem.top_k, problem.num_local_experts
    inter = problem.intermediate
    # e2m1 * e4m3 (at most 2688, at least 2**-10) is exact in bf16 and in float16.
    compute = hidden_states.dtype

    ids = topk_ids.reshape(-1) - problem.local_expert_offset
    local = (ids >= 0) & (ids < num_local)
    group = jnp.where(local, ids, num_local)  # non-local slots sort last
    order = jnp.argsort(group, stable=True)
    group_sizes = jnp.bincount(group, length=num_local + 1)[:num_local].astype(jnp.int32)
    sorted_group = group[order]
    sorted_local = sorted_group < num_local
    expert = jnp.where(sorted_local, sorted_group, 0)

    x = hidden_states.astype(compute)[order // k]
    w13 = _dequantize_unscaled(weights.w13, compute)
    w2 = _dequantize_unscaled(weights.w2, compute)

    # float32 inputs get float32 products (not TF32 on GPUs).
    precision = jax.lax.Precision.HIGHEST if compute == jnp.float32 else None
    gate_up = jax.lax.ragged_dot_general(
        x, w13, group_sizes, _RAGGED_NT, precision=precision, preferred_element_type=jnp.float32
    )
    gate_up = gate_up * weights.w13.global_scale[expert][:, None]
    act = jax.nn.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    down = jax.lax.ragged_dot_general(
        act.astype(compute),
        w2,
        group_sizes,
        _RAGGED_NT,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    row_scale = jnp.where(
        sorted_local,
        weights.w2.global_scale[expert] * topk_weights.reshape(-1)[order],
        0.0,
    )
    down = down * row_scale[:, None]
    # Back to slot order, then a fixed-order sum over each token's slots.
    per_slot = jnp.zeros_like(down).at[order].set(down, unique_indices=True)
    out = per_slot.reshape(n, k, problem.hidden).sum(axis=1)
    return out.astype(hidden_states.dtype)
