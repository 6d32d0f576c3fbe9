"""Combine kernel for Hopper (sm_90a), written in the CuTe DSL.

Computes, for every token `n` and column `c`,

    out[n, c] = bf16( sum_{j = 0 .. top_k-1, in order} float32(y[slot_row[n*top_k + j], c]) )

where slots with `slot_row < 0` (experts on other ranks) contribute nothing.
The sum runs in float32 starting from +0.0 in slot order and is rounded to
bf16 once, so the result is deterministic and bitwise reproducible (no atomics).
Rows `slot_row >= m_pad` are treated like -1, so a corrupt index cannot read
out of bounds.

Operands (row-major, dense):
  y:        bf16    `(m_pad, hidden)`, 16-byte aligned; `hidden % 8 == 0`.
  slot_row: int32   `(num_tokens * top_k,)`.
  out:      bf16    `(num_tokens, hidden)`, 16-byte aligned.
  top_k:    int32 scalar (runtime).

Layout of the work: one thread owns `vector` (8) consecutive columns of one
token, reads them with one 16-byte load per contributing row and writes them
with one 16-byte store; a block of `threads` threads spans `threads * vector`
columns; the grid is `(num_tokens, ceil(hidden / (threads * vector)))`. Every
load and store of a warp is contiguous and coalesced.

Latency (`batch`): a thread first loads its token's first `PREFETCH_SLOTS`
entries of `slot_row`, then issues the y loads of all of them (predicated on
the row), then adds all of them in slot order, +0.0 for a slot without a row:
two memory latencies per token instead of two per row, at the cost of
`PREFETCH_SLOTS` adds per token whatever its local rows (for tokens with many
local rows). Without `batch` it reads one slot and its row after the other.
Slots past `PREFETCH_SLOTS` are read one after another either way.

Programmatic dependent launch (with `pdl`, see :mod:`jax_moe.kernels`): `y` is
the output of GEMM2, the kernel right before, and `out` may reuse memory an
earlier kernel still reads, so every thread executes `griddepcontrol.wait`
after its `slot_row` loads and before its first read of `y` and its store, then
issues `launch_dependents`. `slot_row` was written by the routing kernel, which
has completed once this grid runs (every GEMM1 CTA waited for it before GEMM2
could start), and is read from L2, never from a possibly stale L1 line.

`variants()` and `export_spec()` follow the kernel-module interface of
`jax_moe.kernels` (ahead-of-time export). Importing this module needs the
CuTe DSL (`nvidia-cutlass-dsl`); the tactics live in the DSL-free
`jax_moe.kernels.combine_config`.
"""

from __future__ import annotations

from typing import Any

import cutlass
import cutlass.cute as cute
from cuda.bindings import driver as cuda
from cutlass.cute.runtime import make_fake_compact_tensor

from jax_moe.kernels import pdl_enabled
from jax_moe.kernels.combine_config import COMBINE_SM90_TACTICS, CombineSm90Tactic
from jax_moe.kernels.nvfp4_decode_sm90 import load_global_cg_i32

__all__ = ["OP", "PREFETCH_SLOTS", "export_spec", "make_combine", "variants"]

# The FFI op this module implements (target `jax_moe_combine`).
OP = "combine"
# slot_row entries per token loaded first (before griddepcontrol.wait with PDL), and
# y rows loaded before the first add.
PREFETCH_SLOTS = 8


def make_combine(tactic: CombineSm90Tactic, pdl: bool | None = None):
    """The `@cute.jit` host function of the combine kernel for `tactic`.

    Signature: `combine(y, slot_row, out, top_k: Int32, stream: CUstream)`. `pdl`:
    programmatic dependent launch (default: `jax_moe.kernels.pdl_enabled()`).
    """
    use_pdl = pdl_enabled() if pdl is None else bool(pdl)
    threads = tactic.threads
    vector = tactic.vector
    batch = tactic.batch

    @cute.kernel
    def combine_kernel(
        y_tiles: cute.Tensor,  # ((1, vector), (m_pad, hidden / vector))
        slot_row: cute.Tensor,  # (num_tokens * top_k,)
        out_tiles: cute.Tensor,  # ((1, vector), (num_tokens, hidden / vector))
        top_k: cutlass.Int32,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        token, column_block, _ = cute.arch.block_idx()
        column = column_block * threads + tidx
        num_rows = cute.size(y_tiles, mode=[1, 0])
        # The token's first PREFETCH_SLOTS rows (-1: none): with `batch`, loaded
        # before any y row; one at a time otherwise, except ahead of the PDL wait.
        early = PREFETCH_SLOTS if cutlass.const_expr(batch or use_pdl) else 0
        rows = cute.make_rmem_tensor((PREFETCH_SLOTS,), cutlass.Int32)
        for j in cutlass.range_constexpr(early):
            rows[j] = -1
            if j < top_k:
                row = cutlass.Int32(-1)
                if cutlass.const_expr(use_pdl):
                    # From L2, before the wait: routing's slot_row is complete,
                    # GEMM2's y is not.
                    row = load_global_cg_i32(slot_row, token * top_k + j)
                else:
                    row = slot_row[token * top_k + j]
                if row < num_rows:
                    rows[j] = row
        if cutlass.const_expr(use_pdl):
            cute.arch.griddepcontrol_wait()
            cute.arch.griddepcontrol_launch_dependents()
        if column < cute.size(out_tiles, mode=[1, 1]):
            acc = cute.make_rmem_tensor(((1, vector),), cutlass.Float32)
            acc.fill(0.0)
            if cutlass.const_expr(batch):
                # Every slot adds its row or +0.0, which leaves the float32 sum unchanged
                # bit for bit (it starts at +0.0 and never becomes -0.0). Unconditional
                # adds keep the loads free of the adds' branches: they are all issued
                # first (predicated), then added in slot order.
                values = cute.make_rmem_tensor(((1, vector), PREFETCH_SLOTS), cutlass.BFloat16)
                values.fill(0.0)
                for j in cutlass.range_constexpr(PREFETCH_SLOTS):
                    if rows[j] >= 0:
                        values[(None, j)].store(y_tiles[(None, (rows[j], column))].load())
                for j in cutlass.range_constexpr(PREFETCH_SLOTS):
                    acc.store(acc.load() + values[(None, j)].load().to(cutlass.Float32))
            else:
                for j in cutlass.range_constexpr(early):
                    if rows[j] >= 0:
                        row_values = y_tiles[(None, (rows[j], column))].load()
                        acc.store(acc.load() + row_values.to(cutlass.Float32))
            for later in cutlass.range(early, top_k):
                row = slot_row[token * top_k + later]
                if row >= 0:
                    if row < num_rows:
                        row_values = y_tiles[(None, (row, column))].load()
                        acc.store(acc.load() + row_values.to(cutlass.Float32))
            out_tiles[(None, (token, column))].store(acc.load().to(cutlass.BFloat16))

    @cute.jit
    def combine(
        y: cute.Tensor,
        slot_row: cute.Tensor,
        out: cute.Tensor,
        top_k: cutlass.Int32,
        stream: cuda.CUstream,
    ):
        y_tiles = cute.zipped_divide(y, (1, vector))
        out_tiles = cute.zipped_divide(out, (1, vector))
        num_tokens = cute.size(out, mode=[0])
        column_blocks = cute.ceil_div(cute.size(out_tiles, mode=[1, 1]), threads)
        combine_kernel(y_tiles, slot_row, out_tiles, top_k).launch(
            grid=(num_tokens, column_blocks, 1),
            block=(threads, 1, 1),
            stream=stream,
            use_pdl=use_pdl,
        )

    return combine


def variants() -> list[CombineSm90Tactic]:
    """Every tactic compiled ahead of time, in table order."""
    return list(COMBINE_SM90_TACTICS)


def export_spec(variant: CombineSm90Tactic) -> tuple[Any, tuple[Any, ...]]:
    """`(cute_jit_fn, fake_args)` for `cute.compile`.

    All sizes are dynamic: `m_pad`, `num_tokens * top_k` and `num_tokens` are
    32-bit, `hidden` is 32-bit with divisibility `variant.vector` (the FFI
    handler checks it), row strides are 64-bit. `y` and `out` are assumed
    16-byte aligned (checked by the handler).
    """
    m_pad = cute.sym_int(symbol="m_pad")
    hidden = cute.sym_int(divisibility=variant.vector, symbol="hidden")
    num_slots = cute.sym_int(symbol="num_slots")
    num_tokens = cute.sym_int(symbol="num_tokens")
    y = make_fake_compact_tensor(
        cutlass.BFloat16, (m_pad, hidden), stride_order=(1, 0), assumed_align=16
    )
    slot_row = make_fake_compact_tensor(cutlass.Int32, (num_slots,), assumed_align=4)
    out = make_fake_compact_tensor(
        cutlass.BFloat16, (num_tokens, hidden), stride_order=(1, 0), assumed_align=16
    )
    return make_combine(variant), (y, slot_row, out, cutlass.Int32(1), cuda.CUstream(0))
