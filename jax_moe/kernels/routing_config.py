"""Tactics of the routing-metadata kernel (`routing_sm90`), importable without the CuTe DSL.

The kernel builds the routing metadata of `jax_moe.routing_metadata` (the
contract there: `sorted_slots`, `tile_expert`, `slot_row`), bit for bit the
same as the jitted JAX version: in one launch of one thread block for few
slots, in three launches over up to 32 blocks for many. It keeps a row of
per-expert counters per warp in shared memory, so it serves up to
`MAX_LOCAL_EXPERTS` local experts; more fall back to the JAX version.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

from jax_moe.tactic import Tactic, register_tactic_family

if TYPE_CHECKING:
    from jax_moe.tuning.problem import ProblemKey

__all__ = [
    "DEFAULT_ROUTING_SM90_TACTIC",
    "MAX_LOCAL_EXPERTS",
    "MULTI_BLOCK_ROUTING_SLOTS",
    "ROUTING_SM90_TACTICS",
    "RoutingSm90Tactic",
    "SMALL_ROUTING_SLOTS",
    "routing_tactic",
]

#: Local experts the kernel's shared-memory counters cover.
MAX_LOCAL_EXPERTS = 256
_THREADS = (128, 256, 1024)
_UNROLLS = (8,)
_BLOCKS = (1, 32)


@register_tactic_family
@dataclasses.dataclass(frozen=True)
class RoutingSm90Tactic(Tactic):
    """Launch shape of the routing-metadata kernel.

    Attributes:
      threads: threads per block (128, 256 or 1024: 4, 8 or 32 warps, each
        owning a contiguous range of the block's slots). Fewer warps have less
        shared memory to clear and fewer counters per expert to sum, more warps
        walk long slot lists in parallel.
      unroll: 32-slot chunks whose expert ids a warp loads before it processes
        them one after another (loads in flight per lane).
      max_local_experts: local experts the shared-memory counters cover (the
        FFI handler reads this field to reject larger slices).
      blocks: 1 for the one-block kernel; more for three launches (count,
        segments, place) over up to that many blocks, each walking its own range
        of slots (`routing_sm90`'s docstring).
    """

    family: ClassVar[str] = "routing_sm90"
    threads: int = 1024
    unroll: int = 8
    max_local_experts: int = MAX_LOCAL_EXPERTS
    blocks: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threads not in _THREADS:
            raise ValueError(
                f"RoutingSm90Tactic.threads={self.threads}; expected one of {_THREADS}"
            )
        if self.unroll not in _UNROLLS:
            raise ValueError(f"RoutingSm90Tactic.unroll={self.unroll}; expected one of {_UNROLLS}")
        if self.blocks not in _BLOCKS:
            raise ValueError(f"RoutingSm90Tactic.blocks={self.blocks}; expected one of {_BLOCKS}")
        if self.max_local_experts != MAX_LOCAL_EXPERTS:
            raise ValueError(
                f"RoutingSm90Tactic.max_local_experts={self.max_local_experts}; expected "
                f"{MAX_LOCAL_EXPERTS}"
            )

    @property
    def warps(self) -> int:
        return self.threads // 32

    def check(self, problem: ProblemKey) -> None:
        if problem.arch not in ("sm_90", "sm_90a"):
            raise NotImplementedError(
                f"routing_sm90 runs on sm_90a; problem arch is {problem.arch!r}"
            )
        if problem.num_local_experts > self.max_local_experts:
            raise NotImplementedError(
                f"routing_sm90 serves up to {self.max_local_experts} local experts, got "
                f"{problem.num_local_experts}"
            )


# Every tactic the exporter compiles, in table order (a tactic's position is its id).
ROUTING_SM90_TACTICS: tuple[RoutingSm90Tactic, ...] = (
    RoutingSm90Tactic(threads=1024),
    RoutingSm90Tactic(threads=128),
    RoutingSm90Tactic(threads=256, blocks=32),
)

DEFAULT_ROUTING_SM90_TACTIC = ROUTING_SM90_TACTICS[0]
#: Up to this many slots `routing_tactic` picks the 4-warp block.
SMALL_ROUTING_SLOTS = 1024
#: Past this many slots `routing_tactic` picks the multi-block tactic.
MULTI_BLOCK_ROUTING_SLOTS = 4096


def routing_tactic(num_slots: int) -> RoutingSm90Tactic:
    """The tactic for `num_slots` slots: one block of 4 warps for few slots (each
    walks at most 8 chunks of 32), of 32 warps up to `MULTI_BLOCK_ROUTING_SLOTS`,
    else the multi-block tactic."""
    if num_slots <= SMALL_ROUTING_SLOTS:
        return ROUTING_SM90_TACTICS[1]
    if num_slots <= MULTI_BLOCK_ROUTING_SLOTS:
        return ROUTING_SM90_TACTICS[0]
    return ROUTING_SM90_TACTICS[2]
