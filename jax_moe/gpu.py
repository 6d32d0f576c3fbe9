"""The CUDA implementation of :func:`jax_moe.fused_moe`.

Data path (all on XLA's stream, no host synchronization)::

    jax_moe_routing        routing metadata                      (CuTe DSL kernel: one block,
                           or three launches over up to 32 blocks past 4096 slots; the
                           jitted JAX jax_moe.routing_metadata for > 256 local experts)
      -> jax_moe_moe_gemm1   gathered tokens x W13, fused SwiGLU   (CuTe DSL kernel)
      -> jax_moe_moe_gemm2   activations x W2, router weight        (CuTe DSL kernel)
      -> jax_moe_combine     each token's top_k rows in slot order  (CuTe DSL kernel; its
                           rows loaded together from two expected local rows per token)

Tactics are chosen at trace time: the problem key is built from the static
shapes, looked up in the caller's tactic table (or file), and a miss falls
back to :func:`jax_moe.kernels.moe_gemm_config.default_tactic`. GEMM1 and GEMM2
share the routing metadata, built for the larger of their two ``block_m`` (powers of
two, so one divides the other); the GEMM with the smaller row tile gets its
``tile_expert`` from :func:`jax_moe.routing_metadata.finer_tile_expert`.

``vmap``: the custom calls have no batching rule of their own; ``fused_moe``
under ``jax.vmap`` runs the batch members one after another (``sequential``),
which is correct but not fast. Fold a batch into the token axis instead.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax

from jax_moe import _ffi
from jax_moe.kernels.combine_config import combine_tactic
from jax_moe.prepare import PreparedMoEWeights, prepare
from jax_moe.routing_metadata import finer_tile_expert, padded_rows, routing_metadata
from jax_moe.tuning import ProblemKey, device_identity, lookup_tactic, shipped_table
from jax_moe.weights import MoEWeights

__all__ = [
    "check_supported",
    "fused_moe_cuda",
    "is_available",
    "metadata",
    "select_tactics",
    "uses_routing_kernel",
]

logger = logging.getLogger("jax_moe")

GEMM1_OP = "moe_gemm1"
GEMM2_OP = "moe_gemm2"
#: Size multiples the sm_90a GEMMs need (GEMM2 reduces over `intermediate` in 64-wide
#: steps and tiles `hidden` by up to 128 rows).
HIDDEN_MULTIPLE = 128
INTERMEDIATE_MULTIPLE = 64
#: Row tiles are the second grid dimension of the GEMMs (a CUDA limit of 65535).
MAX_ROW_TILES = 65535


def is_available() -> bool:
    """Whether the CUDA extension is built and importable (queries no device)."""
    return _ffi.is_available()


@functools.cache
def _log_once(message: str) -> None:
    logger.warning(message)


def check_supported(problem: Any) -> None:
    """Raises ``NotImplementedError`` for problems the sm_90a kernels cannot run."""
    if problem.dtype != "bfloat16":
        raise NotImplementedError(
            f"the CUDA kernels take bfloat16 hidden_states, got {problem.dtype}"
        )
    if problem.hidden % HIDDEN_MULTIPLE or problem.intermediate % INTERMEDIATE_MULTIPLE:
        raise NotImplementedError(
            f"the CUDA kernels need hidden % {HIDDEN_MULTIPLE} == 0 and intermediate % "
            f"{INTERMEDIATE_MULTIPLE} == 0, got hidden={problem.hidden}, "
            f"intermediate={problem.intermediate}"
        )


def _problem_key(op: str, problem: Any, arch: str) -> ProblemKey | None:
    try:
        return ProblemKey.for_call(
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
    except ValueError as error:  # e.g. local experts that do not divide num_experts
        _log_once(f"no tuned tactics for this layout ({error}); using the default tactics")
        return None


def select_tactics(
    problem: Any,
    tactics: Any = None,
    *,
    arch: str | None = None,
    device_name: str | None = None,
) -> tuple[Any, Any]:
    """The (GEMM1, GEMM2) tactics for a :class:`jax_moe.moe.MoEProblem`.

    A tuned table's entries win (``tactics=None``: the table shipped in the
    package for this device, if any); a miss takes the heuristic default. The two
    may differ in ``block_m`` (module docstring). Raises ``ValueError`` for a table
    whose entries are of the wrong family.
    """
    from jax_moe.kernels import moe_gemm_config

    if arch is None or device_name is None:
        device_name, arch = device_identity()
    if tactics is None:  # the table shipped for this device, if any
        tactics = shipped_table(device_name, arch)
    families = {
        GEMM1_OP: moe_gemm_config.MoeGemm1Sm90Tactic,
        GEMM2_OP: moe_gemm_config.MoeGemm2Sm90Tactic,
    }
    chosen, defaults = {}, {}
    for op, family in families.items():
        defaults[op] = moe_gemm_config.default_tactic(
            op,
            problem.num_tokens,
            problem.top_k,
            problem.num_local_experts,
            problem.hidden,
            problem.intermediate,
            num_experts=problem.num_experts,
        )
        key = _problem_key(op, problem, arch)
        if key is None:
            chosen[op] = defaults[op]
            continue
        tactic = lookup_tactic(tactics, key, lambda _, op=op: defaults[op], device_name=device_name)
        if not isinstance(tactic, family):
            raise ValueError(
                f"the tactic table holds {tactic} for {key}; expected a {family.family} tactic"
            )
        chosen[op] = tactic
    return chosen[GEMM1_OP], chosen[GEMM2_OP]


def uses_routing_kernel(problem: Any) -> bool:
    """Whether the routing metadata of ``problem`` comes from the CUDA kernel
    (``routing_sm90``: up to ``MAX_LOCAL_EXPERTS`` local experts, ids in int32)
    rather than the jitted JAX version (same result, a dozen small XLA kernels)."""
    from jax_moe.kernels.routing_config import MAX_LOCAL_EXPERTS

    return (
        "routing" in _ffi.kernel_variants()
        and problem.num_local_experts <= MAX_LOCAL_EXPERTS
        and problem.local_expert_offset + problem.num_local_experts < 2**31
    )


def metadata(topk_ids: jax.Array, problem: Any, block_m: int) -> Any:
    """The routing metadata of ``problem`` for row tiles of ``block_m``."""
    args = dict(
        num_local_experts=problem.num_local_experts,
        block_m=block_m,
        local_expert_offset=problem.local_expert_offset,
    )
    if uses_routing_kernel(problem):
        return _ffi.routing_metadata(topk_ids, **args)
    return routing_metadata(topk_ids, **args)


def fused_moe_cuda(
    hidden_states: jax.Array,
    weights: MoEWeights | PreparedMoEWeights,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    problem: Any,
    tactics: Any = None,
) -> jax.Array:
    """The GPU data path; arguments already validated by :func:`jax_moe.moe.validate_moe_args`."""
    check_supported(problem)
    if not is_available():
        raise NotImplementedError("the jax_moe CUDA extension is not built")
    gemm1, gemm2 = select_tactics(problem, tactics)
    # The metadata's row tile: the larger block_m (both are powers of two).
    block_m = max(gemm1.block_m, gemm2.block_m)
    finest = min(gemm1.block_m, gemm2.block_m)
    num_tiles = (
        padded_rows(problem.num_tokens * problem.top_k, problem.num_local_experts, block_m)
        // finest
    )
    if num_tiles > MAX_ROW_TILES:
        raise NotImplementedError(
            f"{num_tiles} row tiles of {finest} rows exceed the kernels' grid limit "
            f"of {MAX_ROW_TILES}; split the tokens into smaller calls"
        )
    if isinstance(weights, MoEWeights):
        _log_once(
            "fused_moe got logical MoEWeights on the GPU and repacks them on every call; "
            "pass jax_moe.prepare.prepare(weights) instead"
        )
        weights = prepare(weights)
    meta = metadata(topk_ids, problem, block_m)
    tiles = {block_m: meta.tile_expert}
    sorted_slots = meta.sorted_slots
    if finest != block_m:
        tiles[finest] = finer_tile_expert(meta.sorted_slots, meta.tile_expert, finest)
        # Computed before GEMM1 (which takes sorted_slots from the barrier), so that a
        # GEMM2 launched with programmatic dependent launch, which reads tile_expert
        # before waiting for the previous kernel, reads an array written two kernels back.
        tiles[finest], sorted_slots = jax.lax.optimization_barrier((tiles[finest], sorted_slots))
    act = _ffi.moe_gemm1(
        hidden_states,
        sorted_slots,
        tiles[gemm1.block_m],
        weights.w13_packed,
        weights.w13_scale,
        weights.w13_global,
        problem.top_k,
        variant=gemm1,
    )
    rows = _ffi.moe_gemm2(
        act,
        sorted_slots,
        tiles[gemm2.block_m],
        weights.w2_packed,
        weights.w2_scale,
        weights.w2_global,
        topk_weights.reshape(-1),
        variant=gemm2,
    )
    combine = combine_tactic(problem.top_k, problem.num_local_experts, problem.num_experts)
    return _ffi.combine(rows, meta.slot_row, problem.top_k, variant=combine)
