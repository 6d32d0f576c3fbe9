"""Routing-metadata kernel for Hopper (sm_90a), written in the CuTe DSL.

Builds, in one launch of one thread block, the three arrays of
`jax_moe.routing_metadata` (see its module docstring for the contract):
`sorted_slots` (local slots grouped by local expert, ascending slot order inside
an expert, each expert's segment padded with -1 to a multiple of `block_m`),
`tile_expert` (the local expert of each row tile, -1 past the used tiles) and
`slot_row` (the row of each slot, -1 for non-local slots). The result is the
same, bit for bit, as the jitted JAX version, which takes a dozen small XLA
kernels (a sort, scatters, cumulative sums) where this takes one.

Work split: the `threads / 32` warps own contiguous, equal ranges of slots
(multiples of 32). Shared memory holds one row of `max_local_experts`
counters per warp.

1. Count: each warp walks its range 32 slots at a time; `match.any` groups
   the lanes that hold the same expert, and the lowest lane of each group adds
   the group's size to the warp's counter of that expert. `unroll` chunks of
   expert ids are loaded before they are processed, so several loads are in
   flight per lane.
2. Segments: one thread per expert sums the expert's counters over the warps and rounds
   the total up to `block_m`; warp 0 turns these into segment starts (an
   exclusive prefix sum, 8 experts per lane and a shuffle scan); that thread
   then replaces its counters by the first row of each warp's share, and every
   thread fills `tile_expert` by a binary search over the segment ends.
3. Place: each warp walks its range again in the same order; a slot's row is
   its warp's next row of its expert plus the number of lower lanes with the
   same expert, and the group's lowest lane advances the counter.

Ranges, chunks and lanes are visited in ascending slot order, so the order
inside an expert is ascending, as the contract requires; nothing depends on
timing. `sorted_slots` is filled with -1 first (padding rows stay -1).

Programmatic dependent launch (with `pdl`, see :mod:`jax_moe.kernels`): this
kernel is the first of the layer. Every thread executes `griddepcontrol.wait`
before anything else (the previous kernel on the stream may still be writing
`topk_ids` or reading memory this kernel's outputs reuse), then
`launch_dependents`, so GEMM1's CTAs can be resident while the metadata is
built; GEMM1 waits for this kernel before it reads any of it.

`variants()` and `export_spec()` follow the kernel-module interface of
`jax_moe.kernels`. Importing this module needs the CuTe DSL; the tactics live
in the DSL-free `jax_moe.kernels.routing_config`.
"""

from __future__ import annotations

from typing import Any

import cutlass
import cutlass.cute as cute
from cuda.bindings import driver as cuda
from cutlass.cute.runtime import make_fake_compact_tensor
from cutlass.memory import SmemAllocator

from jax_moe.kernels import pdl_enabled
from jax_moe.kernels.routing_config import ROUTING_SM90_TACTICS, RoutingSm90Tactic

__all__ = ["OP", "export_spec", "make_routing", "smem_bytes", "variants"]

# The FFI op this module implements (target `jax_moe_routing`).
OP = "routing"
_FULL_MASK = 0xFFFFFFFF
# Experts per lane in warp 0's prefix sum (max_local_experts / 32).
_SCAN_PER_LANE = 8


def smem_bytes(tactic: RoutingSm90Tactic) -> int:
    """Shared memory of the block: the per-warp counters and the segment starts."""
    counters = tactic.max_local_experts * tactic.warps * 4
    starts = (tactic.max_local_experts + 1) * 4
    return counters + starts + 64  # + alignment slack of the two allocations


def make_routing(tactic: RoutingSm90Tactic, pdl: bool | None = None):
    """The `@cute.jit` host function of the routing kernel for `tactic`.

    Signature: `routing(topk_ids, sorted_slots, tile_expert, slot_row, num_local:
    Int32, block_m: Int32, offset: Int32, stream: CUstream)`. `pdl`: programmatic
    dependent launch (default: `jax_moe.kernels.pdl_enabled()`).
    """
    use_pdl = pdl_enabled() if pdl is None else bool(pdl)
    threads = tactic.threads
    warps = tactic.warps
    unroll = tactic.unroll
    max_local = tactic.max_local_experts
    if max_local != 32 * _SCAN_PER_LANE:
        raise ValueError(f"max_local_experts={max_local}; the prefix sum needs 256")
    search_steps = max_local.bit_length() + 1  # bisection over max_local + 1 entries

    @cute.kernel
    def routing_kernel(
        topk_ids: cute.Tensor,  # (num_slots,) int32 global expert ids
        sorted_slots: cute.Tensor,  # (m_pad,)
        tile_expert: cute.Tensor,  # (m_pad / block_m,)
        slot_row: cute.Tensor,  # (num_slots,)
        num_local: cutlass.Int32,
        block_m: cutlass.Int32,
        offset: cutlass.Int32,
    ):
        if cutlass.const_expr(use_pdl):
            cute.arch.griddepcontrol_wait()
            cute.arch.griddepcontrol_launch_dependents()
        tid, _, _ = cute.arch.thread_idx()
        warp = tid // 32
        lane = tid % 32
        smem = SmemAllocator()
        # counters[e, w]: warp w's count of expert e, later its next row of expert e.
        counters = smem.allocate_tensor(
            cutlass.Int32, cute.make_layout((max_local, warps), stride=(1, max_local)), 16
        )
        # starts[e]: first row of expert e's segment; starts[max_local]: rows used.
        starts = smem.allocate_tensor(cutlass.Int32, cute.make_layout((max_local + 1,)), 16)

        num_slots = cute.size(topk_ids)
        m_pad = cute.size(sorted_slots)
        num_tiles = cute.size(tile_expert)
        # Each warp's range: a multiple of 32 slots.
        per_warp = (num_slots + warps * 32 - 1) // (warps * 32) * 32
        begin = warp * per_warp
        end = cutlass.min(begin + per_warp, num_slots)
        num_chunks = per_warp // 32
        below = cute.arch.lanemask_lt()

        for e in cutlass.range(tid, max_local, threads, unroll=1):
            for w in cutlass.range_constexpr(warps):
                counters[e, w] = 0
        for p in cutlass.range(tid, m_pad, threads, unroll=1):
            sorted_slots[p] = -1
        cute.arch.sync_threads()

        # 1. Count and 3. Place walk the same chunks in the same order. Bucket: the
        # local expert, num_local for a non-local slot, num_local + 1 past the range.
        buckets = cute.make_rmem_tensor((unroll,), cutlass.Int32)
        for phase in cutlass.range_constexpr(2):
            if cutlass.const_expr(phase == 1):
                # 2. Segments: padded totals, then their exclusive prefix sum.
                for e in cutlass.range(tid, max_local, threads, unroll=1):
                    total = cutlass.Int32(0)
                    if e < num_local:
                        for w in cutlass.range_constexpr(warps):
                            total = total + counters[e, w]
                    starts[e] = (total + block_m - 1) // block_m * block_m
                cute.arch.sync_threads()
                if warp == 0:
                    running = cutlass.Int32(0)
                    for i in cutlass.range_constexpr(_SCAN_PER_LANE):
                        running = running + starts[lane * _SCAN_PER_LANE + i]
                    inclusive = running
                    for shift in cutlass.range_constexpr(5):
                        other = cute.arch.shuffle_sync_up(inclusive, 1 << shift)
                        if lane >= (1 << shift):
                            inclusive = inclusive + other
                    start = inclusive - running
                    cute.arch.sync_warp()  # every lane has read its padded totals
                    for i in cutlass.range_constexpr(_SCAN_PER_LANE):
                        padded = starts[lane * _SCAN_PER_LANE + i]
                        starts[lane * _SCAN_PER_LANE + i] = start
                        start = start + padded
                    if lane == 31:
                        starts[max_local] = start
                cute.arch.sync_threads()
                for e in cutlass.range(tid, num_local, threads, unroll=1):
                    row = starts[e]
                    for w in cutlass.range_constexpr(warps):
                        count = counters[e, w]
                        counters[e, w] = row
                        row = row + count
                # tile_expert[t]: the number of experts whose segment ends at or before the
                # tile's first row (segment ends are starts[e + 1]), -1 when that is num_local.
                for t in cutlass.range(tid, num_tiles, threads, unroll=1):
                    first_row = t * block_m
                    lo = cutlass.Int32(0)
                    hi = num_local
                    for _ in cutlass.range_constexpr(search_steps):
                        if lo < hi:
                            mid = (lo + hi) // 2
                            if starts[mid + 1] <= first_row:
                                lo = mid + 1
                            else:
                                hi = mid
                    owner = cutlass.Int32(-1)
                    if lo < num_local:
                        owner = lo
                    tile_expert[t] = owner
                cute.arch.sync_threads()
            for group in cutlass.range(0, num_chunks, unroll, unroll=1):
                for u in cutlass.range_constexpr(unroll):
                    slot = begin + (group + u) * 32 + lane
                    bucket = num_local + 1
                    if slot < end:
                        expert = topk_ids[slot] - offset
                        bucket = num_local
                        if expert >= 0:
                            if expert < num_local:
                                bucket = expert
                    buckets[u] = bucket
                for u in cutlass.range_constexpr(unroll):
                    slot = begin + (group + u) * 32 + lane
                    bucket = buckets[u]
                    peers = cute.arch.match_sync(_FULL_MASK, bucket)
                    if cutlass.const_expr(phase == 1):
                        if bucket < num_local:
                            row = counters[bucket, warp] + cute.arch.popc(peers & below)
                            sorted_slots[row] = slot
                            slot_row[slot] = row
                        if bucket == num_local:
                            slot_row[slot] = -1
                        cute.arch.sync_warp()  # every lane has read the counter
                    if bucket < num_local:
                        if (peers & below) == 0:
                            counters[bucket, warp] = counters[bucket, warp] + cute.arch.popc(peers)
                    cute.arch.sync_warp()
            if cutlass.const_expr(phase == 0):
                cute.arch.sync_threads()

    @cute.jit
    def routing(
        topk_ids: cute.Tensor,
        sorted_slots: cute.Tensor,
        tile_expert: cute.Tensor,
        slot_row: cute.Tensor,
        num_local: cutlass.Int32,
        block_m: cutlass.Int32,
        offset: cutlass.Int32,
        stream: cuda.CUstream,
    ):
        routing_kernel(
            topk_ids, sorted_slots, tile_expert, slot_row, num_local, block_m, offset
        ).launch(
            grid=(1, 1, 1),
            block=(threads, 1, 1),
            smem=smem_bytes(tactic),
            stream=stream,
            use_pdl=use_pdl,
        )

    return routing


def variants() -> list[RoutingSm90Tactic]:
    """Every tactic compiled ahead of time, in table order."""
    return list(ROUTING_SM90_TACTICS)


def export_spec(variant: RoutingSm90Tactic) -> tuple[Any, tuple[Any, ...]]:
    """`(cute_jit_fn, fake_args)` for `cute.compile`.

    All sizes are dynamic 32-bit: `num_slots` (of `topk_ids` and `slot_row`; the
    FFI handler checks they agree), `m_pad` and the tile count (checked against
    `num_slots`, the local experts and `block_m` by the handler).
    """
    if not isinstance(variant, RoutingSm90Tactic):
        raise TypeError(f"variant={variant!r}; expected a RoutingSm90Tactic")
    num_slots = cute.sym_int(symbol="num_slots")
    num_slots_out = cute.sym_int(symbol="num_slots_out")
    m_pad = cute.sym_int(symbol="m_pad")
    num_tiles = cute.sym_int(symbol="num_tiles")
    topk_ids = make_fake_compact_tensor(cutlass.Int32, (num_slots,), assumed_align=4)
    sorted_slots = make_fake_compact_tensor(cutlass.Int32, (m_pad,), assumed_align=4)
    tile_expert = make_fake_compact_tensor(cutlass.Int32, (num_tiles,), assumed_align=4)
    slot_row = make_fake_compact_tensor(cutlass.Int32, (num_slots_out,), assumed_align=4)
    scalars = (cutlass.Int32(1), cutlass.Int32(1), cutlass.Int32(0))
    return make_routing(variant), (
        topk_ids,
        sorted_slots,
        tile_expert,
        slot_row,
        *scalars,
        cuda.CUstream(0),
    )
