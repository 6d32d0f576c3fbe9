"""The CUDA implementation of :func:`jax_moe.fused_moe`.

Data path (all on XLA's stream, no host synchronization)::

    routing metadata (jitted JAX, jax_moe.routing_metadata)
      -> jax_moe_moe_gemm1   gathered tokens x W13, fused SwiGLU   (CuTe DSL kernel)
      -> jax_moe_moe_gemm2   activations x W2, router weight        (CuTe DSL kernel)
      -> jax_moe_combine     each token's top_k rows in slot order  (CuTe DSL kernel)

Tactics are chosen at trace time: the problem key is built from the static
shapes, looked up in the caller's tactic table (or file), and a miss falls
back to :func:`jax_moe.kernels.moe_gemm_config.default_tactic`. GEMM1 and GEMM2
must use the same ``block_m`` (they share the routing metadata).

``vmap``: the custom calls have no batching rule of their own; ``fused_moe``
under ``jax.vmap`` runs the batch members one after another (``sequential``),
which is correct but not fast. Fold a batch into the token axis instead.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp

from jax_moe import _ffi
from jax_moe.prepare import PreparedMoEWeights, prepare
from jax_moe.routing_metadata import routing_metadata
from jax_moe.tuning import ProblemKey, device_identity, lookup_tactic
from jax_moe.weights import MoEWeights

__all__ = ["fused_moe_cuda", "is_available", "select_tactics"]

logger = logging.getLogger("jax_moe")

GEMM1_OP = "moe_gemm1"
GEMM2_OP = "moe_gemm2"


def is_available() -> bool:
    """Whether the CUDA extension is built and importable (queries no device)."""
    return _ffi.is_available()


@functools.cache
def _log_once(message: str) -> None:
    logger.warning(message)


def select_tactics(problem: Any, tactics: Any = None, *, arch: str | None = None,
                   device_name: str | None = None) -> tuple[Any, Any]:
    """The (GEMM1, GEMM2) tactics for a :class:`jax_moe.moe.MoEProblem`.

    Raises ``NotImplementedError`` if the kernels do not support the problem
    and ``ValueError`` if a tuned table holds an invalid or inconsistent pair.
    """
    from jax_moe.kernels import moe_gemm_config

    if arch is None or device_name is None:
        device_name, arch = device_identity()
    chosen = []
    for op in (GEMM1_OP, GEMM2_OP):
        key = ProblemKey.for_call(
            op,
            arch,
            problem.hidden,
            problem.intermediate,
            problem.num_experts,
            problem.num_local_experts,
            problem.top_k,
            problem.dtype,
            problem.num_tokens,
        )

        def default(p: ProblemKey, op: str = op) -> Any:
            return moe_gemm_config.default_tactic(
                op,
                problem.num_tokens,
                p.top_k,
                p.num_local_experts,
                p.hidden,
                p.intermediate,
                num_experts=p.num_experts,
            )

        chosen.append(lookup_tactic(tactics, key, default, device_name=device_name))
    gemm1, gemm2 = chosen
    if gemm1.block_m != gemm2.block_m:
        raise ValueError(
            f"GEMM1 tactic {gemm1} and GEMM2 tactic {gemm2} must share block_m "
            "(they share the routing metadata)"
        )
    return gemm1, gemm2


def fused_moe_cuda(
    hidden_states: jax.Array,
    weights: MoEWeights | PreparedMoEWeights,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    problem: Any,
    tactics: Any = None,
) -> jax.Array:
    """The GPU data path; arguments already validated by :func:`jax_moe.moe.validate_moe_args`."""
    if hidden_states.dtype != jnp.bfloat16:
        raise NotImplementedError(
            f"the CUDA kernels take bfloat16 hidden_states, got {hidden_states.dtype}"
        )
    if not is_available():
        raise NotImplementedError("the jax_moe CUDA extension is not built")
    gemm1, gemm2 = select_tactics(problem, tactics)
    if isinstance(weights, MoEWeights):
        _log_once(
            "fused_moe got logical MoEWeights on the GPU and repacks them on every call; "
            "pass jax_moe.prepare.prepare(weights) instead"
        )
        weights = prepare(weights)
    meta = routing_metadata(
        topk_ids,
        num_local_experts=problem.num_local_experts,
        block_m=gemm1.block_m,
        local_expert_offset=problem.local_expert_offset,
    )
    act = _ffi.moe_gemm1(
        hidden_states,
        meta.sorted_slots,
        meta.tile_expert,
        weights.w13_packed,
        weights.w13_scale,
        weights.w13_global,
        problem.top_k,
        variant=gemm1,
    )
    rows = _ffi.moe_gemm2(
        act,
        meta.sorted_slots,
        meta.tile_expert,
        weights.w2_packed,
        weights.w2_scale,
        weights.w2_global,
        topk_weights.reshape(-1),
        variant=gemm2,
    )
    return _ffi.combine(rows, meta.slot_row, problem.top_k)
