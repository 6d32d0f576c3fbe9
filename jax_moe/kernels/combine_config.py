"""Tactics of the combine kernel (`combine_sm90`), importable without the CuTe DSL.

The combine step sums each token's `top_k` expert rows in slot order:

    out[n, :] = bf16(sum_{j < top_k} (r >= 0 ? y[r, :] : 0)),  r = slot_row[n*top_k + j]

with float32 accumulation, where `y` is the `(m_pad, hidden)` bf16 output
of GEMM2 and `slot_row` the `(num_tokens * top_k,)` int32 row of each slot
(-1 for slots whose expert is not local).

One CUDA thread owns `vector` consecutive columns of one token: it reads
`vector` bf16 values (`vector * 2` bytes, one 16-byte load) from each of the
token's rows and writes `vector` bf16 values with one 16-byte store. A block
of `threads` threads covers `threads * vector` columns of one token; the grid
is `(num_tokens, ceil(hidden / (threads * vector)))`. With `batch` a thread
loads all of its token's rows (up to 8) before it adds them (more memory
requests in flight, an add per slot whether it has a row or not); without,
one row after the other.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

from jax_moe.tactic import Tactic, register_tactic_family

if TYPE_CHECKING:
    from jax_moe.tuning.problem import ProblemKey

__all__ = [
    "BATCH_LOCAL_ROWS",
    "COMBINE_SM90_TACTICS",
    "CombineSm90Tactic",
    "DEFAULT_COMBINE_SM90_TACTIC",
    "combine_tactic",
]

_THREADS = (64, 128, 256, 512)
_VECTORS = (8,)


@register_tactic_family
@dataclasses.dataclass(frozen=True)
class CombineSm90Tactic(Tactic):
    """Launch shape of the combine kernel.

    Attributes:
      threads: threads per block, one of 64, 128, 256, 512.
      vector: columns per thread; 8 (one 16-byte bf16 load per row, one
        16-byte bf16 store). `hidden` must be a multiple of it.
      batch: load a token's first 8 rows before adding them, adding +0.0 for
        slots without a row (for tokens with several local rows); without it the
        rows are read and added one after another (for about one local row per
        token, where most slots have none).
    """

    family: ClassVar[str] = "combine_sm90"
    threads: int
    vector: int = 8
    batch: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threads not in _THREADS:
            raise ValueError(
                f"CombineSm90Tactic.threads={self.threads}; expected one of {_THREADS}"
            )
        if self.vector not in _VECTORS:
            raise ValueError(f"CombineSm90Tactic.vector={self.vector}; expected one of {_VECTORS}")

    def check(self, problem: ProblemKey) -> None:
        if problem.arch not in ("sm_90", "sm_90a"):
            raise NotImplementedError(
                f"combine_sm90 runs on sm_90a; problem arch is {problem.arch!r}"
            )
        if problem.hidden % self.vector:
            raise ValueError(
                f"hidden={problem.hidden} is not a multiple of the combine vector width "
                f"{self.vector}"
            )


# Every tactic the exporter compiles, in table order (a tactic's position is its id).
COMBINE_SM90_TACTICS: tuple[CombineSm90Tactic, ...] = (
    CombineSm90Tactic(threads=128),
    CombineSm90Tactic(threads=256),
    CombineSm90Tactic(threads=128, batch=True),
    CombineSm90Tactic(threads=256, batch=True),
)

DEFAULT_COMBINE_SM90_TACTIC = COMBINE_SM90_TACTICS[0]
#: Expected local rows per token (`top_k * num_local_experts / num_experts`) from
#: which `combine_tactic` picks the batched tactic.
BATCH_LOCAL_ROWS = 2.0


def combine_tactic(top_k: int, num_local_experts: int, num_experts: int) -> CombineSm90Tactic:
    """The combine tactic of a layer: batched loads when a token is expected to have
    `BATCH_LOCAL_ROWS` or more local rows (a uniform routing's share of its `top_k`),
    one row at a time otherwise (the batched tactic adds a value for each of a token's
    first 8 slots, +0.0 where there is no row)."""
    batch = top_k * num_local_experts >= BATCH_LOCAL_ROWS * num_experts
    return CombineSm90Tactic(threads=128, batch=batch)
