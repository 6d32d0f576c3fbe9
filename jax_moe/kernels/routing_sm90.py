"""Routing-metadata kernel for Hopper (sm_90a), written in the CuTe DSL.

Builds the three arrays of `jax_moe.routing_metadata` (see its module docstring
for the contract): `sorted_slots` (local slots grouped by local expert,
ascending slot order inside an expert, each expert's segment padded with -1 to a
multiple of `block_m`), `tile_expert` (the local expert of each row tile, -1
past the used tiles) and `slot_row` (the row of each slot, -1 for non-local
slots). The result is the same, bit for bit, as the jitted JAX version, which
takes a dozen small XLA kernels (a sort, scatters, cumulative sums).

One block (`tactic.blocks == 1`, one launch): the `threads / 32` warps own
contiguous, equal ranges of slots (multiples of 32). Shared memory holds one row
of `max_local_experts` counters per warp.

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

Many blocks (`tactic.blocks > 1`, three launches): the slots are cut into
`num_blocks <= tactic.blocks` ranges of `per_block` slots (a multiple of
`warps * 32 * unroll`, at least `max_local_experts`), the last range taking the
remainder (less than two ranges), so up to 65536 slots (32 ranges of 2048) a block
walks between one and two ranges of 2048 slots, and past that `num_slots / 32`
rounded up to 2048. The one-block walk grew with the slots (146 us for 65536 slots
on an H200).

1. Count kernel (`num_blocks` blocks): each block counts its range as in step 1
   and writes its total of each local expert into the first `num_local` entries
   of its own range of `slot_row` (scratch space: step 3 overwrites the whole
   range); it also fills `sorted_slots` with -1.
2. Segments kernel (one block): loads every block's counts into shared memory,
   computes the segment starts as in step 2, writes `tile_expert`, and replaces
   each block's count of expert `e` by the block's first row of `e` (the start
   plus the counts of the lower blocks).
3. Place kernel (`num_blocks` blocks): each block reads its first rows into
   shared memory, counts its range again per warp, turns the counts into each
   warp's first rows, and places its slots as in step 3.

With fewer slots than two ranges (`num_blocks == 1`) the count kernel runs the
one-block algorithm and the other two return at once.

Ranges, blocks, chunks and lanes are visited in ascending slot order, so the
order inside an expert is ascending, as the contract requires; nothing depends
on timing. `sorted_slots` is filled with -1 first (padding rows stay -1).

Programmatic dependent launch (with `pdl`, see :mod:`jax_moe.kernels`): this
kernel (the first of the three) is the first of the layer. Every thread of
each kernel executes `griddepcontrol.wait` before anything else (the previous
kernel on the stream may still be writing `topk_ids` or reading memory this
kernel's outputs reuse), then `launch_dependents`, so the next kernel's CTAs can
be resident while the metadata is built; GEMM1 waits for the (last) routing
kernel before it reads any of it, and that one completes after the others.

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
    """Shared memory of a block of the one-block, count and place kernels: the
    per-warp counters and the segment starts (the block's bases)."""
    counters = tactic.max_local_experts * tactic.warps * 4
    starts = (tactic.max_local_experts + 1) * 4
    return counters + starts + 64  # + alignment slack of the two allocations


def segments_smem_bytes(tactic: RoutingSm90Tactic) -> int:
    """Shared memory of the segments kernel (multi-block tactics): every block's
    counts and the segment starts."""
    counts = tactic.max_local_experts * tactic.blocks * 4
    starts = (tactic.max_local_experts + 1) * 4
    return counts + starts + 64


def make_routing(tactic: RoutingSm90Tactic, pdl: bool | None = None):
    """The `@cute.jit` host function of the routing kernel(s) for `tactic`.

    Signature: `routing(topk_ids, sorted_slots, tile_expert, slot_row, num_local:
    Int32, block_m: Int32, offset: Int32, stream: CUstream)`. `pdl`: programmatic
    dependent launch (default: `jax_moe.kernels.pdl_enabled()`). One launch for a
    one-block tactic, three (count, segments, place) for a multi-block one.
    """
    use_pdl = pdl_enabled() if pdl is None else bool(pdl)
    threads = tactic.threads
    warps = tactic.warps
    unroll = tactic.unroll
    max_local = tactic.max_local_experts
    max_blocks = tactic.blocks
    # Slots the warps of a block walk in one group of `unroll` chunks: the granule of
    # a multi-block tactic's per-block ranges (at least max_local, see the docstring).
    group_slots = warps * 32 * unroll
    if max_local != 32 * _SCAN_PER_LANE:
        raise ValueError(f"max_local_experts={max_local}; the prefix sum needs 256")
    if max_blocks > 1 and group_slots < max_local:
        raise ValueError(f"{tactic}: a block range of {group_slots} slots < {max_local}")
    search_steps = max_local.bit_length() + 1  # bisection over max_local + 1 entries

    def make_walk(place: bool):
        """Walk of the slots `[first, last)` by the block's warps (count or place)."""

        @cute.jit
        def walk(
            topk_ids: cute.Tensor,
            sorted_slots: cute.Tensor,
            slot_row: cute.Tensor,
            counters: cute.Tensor,
            first: cutlass.Int32,
            last: cutlass.Int32,
            num_local: cutlass.Int32,
            offset: cutlass.Int32,
        ):
            tid, _, _ = cute.arch.thread_idx()
            warp = tid // 32
            lane = tid % 32
            below = cute.arch.lanemask_lt()
            # Each warp's range: a multiple of 32 slots.
            per_warp = (last - first + warps * 32 - 1) // (warps * 32) * 32
            begin = first + warp * per_warp
            end = cutlass.min(begin + per_warp, last)
            num_chunks = per_warp // 32
            # Bucket: the local expert, num_local for a non-local slot, num_local + 1
            # past the range.
            buckets = cute.make_rmem_tensor((unroll,), cutlass.Int32)
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
                    if cutlass.const_expr(place):
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

        return walk

    count_walk = make_walk(place=False)
    place_walk = make_walk(place=True)

    @cute.jit
    def clear_counters(counters: cute.Tensor):
        tid, _, _ = cute.arch.thread_idx()
        for e in cutlass.range(tid, max_local, threads, unroll=1):
            for w in cutlass.range_constexpr(warps):
                counters[e, w] = 0

    @cute.jit
    def warp_rows(counters: cute.Tensor, bases: cute.Tensor, num_local: cutlass.Int32):
        """Replaces each warp's count of expert e by its first row of e: `bases[e]`
        plus the counts of the lower warps."""
        tid, _, _ = cute.arch.thread_idx()
        for e in cutlass.range(tid, num_local, threads, unroll=1):
            row = bases[e]
            for w in cutlass.range_constexpr(warps):
                count = counters[e, w]
                counters[e, w] = row
                row = row + count

    @cute.jit
    def segment_starts(starts: cute.Tensor):
        """Warp 0 turns the padded totals `starts[0 .. max_local)` into their exclusive
        prefix sum and writes the rows used to `starts[max_local]` (then a barrier)."""
        tid, _, _ = cute.arch.thread_idx()
        warp = tid // 32
        lane = tid % 32
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

    @cute.jit
    def fill_tiles(
        starts: cute.Tensor,
        tile_expert: cute.Tensor,
        num_local: cutlass.Int32,
        block_m: cutlass.Int32,
    ):
        """tile_expert[t]: the number of experts whose segment ends at or before the
        tile's first row (segment ends are starts[e + 1]), -1 when that is num_local."""
        tid, _, _ = cute.arch.thread_idx()
        for t in cutlass.range(tid, cute.size(tile_expert), threads, unroll=1):
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

    @cute.jit
    def one_block(
        topk_ids: cute.Tensor,
        sorted_slots: cute.Tensor,
        tile_expert: cute.Tensor,
        slot_row: cute.Tensor,
        counters: cute.Tensor,
        starts: cute.Tensor,
        num_local: cutlass.Int32,
        block_m: cutlass.Int32,
        offset: cutlass.Int32,
    ):
        """The whole metadata in one thread block (module docstring, steps 1-3)."""
        tid, _, _ = cute.arch.thread_idx()
        num_slots = cute.size(topk_ids)
        clear_counters(counters)
        for p in cutlass.range(tid, cute.size(sorted_slots), threads, unroll=1):
            sorted_slots[p] = -1
        cute.arch.sync_threads()
        count_walk(topk_ids, sorted_slots, slot_row, counters, 0, num_slots, num_local, offset)
        cute.arch.sync_threads()
        # Segments: padded totals, their exclusive prefix sum, each warp's first rows.
        for e in cutlass.range(tid, max_local, threads, unroll=1):
            total = cutlass.Int32(0)
            if e < num_local:
                for w in cutlass.range_constexpr(warps):
                    total = total + counters[e, w]
            starts[e] = (total + block_m - 1) // block_m * block_m
        cute.arch.sync_threads()
        segment_starts(starts)
        warp_rows(counters, starts, num_local)
        fill_tiles(starts, tile_expert, num_local, block_m)
        cute.arch.sync_threads()
        place_walk(topk_ids, sorted_slots, slot_row, counters, 0, num_slots, num_local, offset)

    def allocate(smem):
        # counters[e, w]: warp w's count of expert e, later its next row of expert e.
        counters = smem.allocate_tensor(
            cutlass.Int32, cute.make_layout((max_local, warps), stride=(1, max_local)), 16
        )
        # starts[e]: first row of expert e's segment (of the block's share of it in the
        # place kernel); starts[max_local]: rows used.
        starts = smem.allocate_tensor(cutlass.Int32, cute.make_layout((max_local + 1,)), 16)
        return counters, starts

    def dependency_wait():
        if cutlass.const_expr(use_pdl):
            cute.arch.griddepcontrol_wait()
            cute.arch.griddepcontrol_launch_dependents()

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
        dependency_wait()
        outputs = (sorted_slots, tile_expert, slot_row)
        one_block(topk_ids, *outputs, *allocate(SmemAllocator()), num_local, block_m, offset)

    @cute.jit
    def block_range(per_block: cutlass.Int32, num_blocks: cutlass.Int32, num_slots: cutlass.Int32):
        """Slots `[first, last)` of this block: `per_block` each, the rest to the last."""
        bid, _, _ = cute.arch.block_idx()
        first = bid * per_block
        last = first + per_block
        if bid == num_blocks - 1:
            last = num_slots
        return first, last

    @cute.kernel
    def count_kernel(
        topk_ids: cute.Tensor,
        sorted_slots: cute.Tensor,
        tile_expert: cute.Tensor,
        slot_row: cute.Tensor,
        num_local: cutlass.Int32,
        block_m: cutlass.Int32,
        offset: cutlass.Int32,
        per_block: cutlass.Int32,
        num_blocks: cutlass.Int32,
    ):
        dependency_wait()
        counters, starts = allocate(SmemAllocator())
        if num_blocks == 1:
            outputs = (sorted_slots, tile_expert, slot_row)
            one_block(topk_ids, *outputs, counters, starts, num_local, block_m, offset)
        else:
            tid, _, _ = cute.arch.thread_idx()
            bid, _, _ = cute.arch.block_idx()
            first, last = block_range(per_block, num_blocks, cute.size(topk_ids))
            clear_counters(counters)
            m_pad = cute.size(sorted_slots)
            for p in cutlass.range(bid * threads + tid, m_pad, num_blocks * threads, unroll=1):
                sorted_slots[p] = -1
            cute.arch.sync_threads()
            count_walk(topk_ids, sorted_slots, slot_row, counters, first, last, num_local, offset)
            cute.arch.sync_threads()
            # The block's count of each expert, kept in its own range of slot_row.
            for e in cutlass.range(tid, num_local, threads, unroll=1):
                total = cutlass.Int32(0)
                for w in cutlass.range_constexpr(warps):
                    total = total + counters[e, w]
                slot_row[first + e] = total

    @cute.kernel
    def segments_kernel(
        tile_expert: cute.Tensor,
        slot_row: cute.Tensor,
        num_local: cutlass.Int32,
        block_m: cutlass.Int32,
        per_block: cutlass.Int32,
        num_blocks: cutlass.Int32,
    ):
        dependency_wait()
        smem = SmemAllocator()
        # counts[e, b]: block b's count of expert e.
        counts = smem.allocate_tensor(
            cutlass.Int32, cute.make_layout((max_local, max_blocks), stride=(1, max_local)), 16
        )
        starts = smem.allocate_tensor(cutlass.Int32, cute.make_layout((max_local + 1,)), 16)
        if num_blocks > 1:
            tid, _, _ = cute.arch.thread_idx()
            for i in cutlass.range(tid, num_blocks * num_local, threads, unroll=1):
                b = i // num_local
                e = i - b * num_local
                counts[e, b] = slot_row[b * per_block + e]
            cute.arch.sync_threads()
            for e in cutlass.range(tid, max_local, threads, unroll=1):
                total = cutlass.Int32(0)
                if e < num_local:
                    for b in cutlass.range(num_blocks, unroll=1):
                        total = total + counts[e, b]
                starts[e] = (total + block_m - 1) // block_m * block_m
            cute.arch.sync_threads()
            segment_starts(starts)
            # Each block's first row of each expert replaces its count.
            for e in cutlass.range(tid, num_local, threads, unroll=1):
                row = starts[e]
                for b in cutlass.range(num_blocks, unroll=1):
                    count = counts[e, b]
                    slot_row[b * per_block + e] = row
                    row = row + count
            fill_tiles(starts, tile_expert, num_local, block_m)

    @cute.kernel
    def place_kernel(
        topk_ids: cute.Tensor,
        sorted_slots: cute.Tensor,
        slot_row: cute.Tensor,
        num_local: cutlass.Int32,
        offset: cutlass.Int32,
        per_block: cutlass.Int32,
        num_blocks: cutlass.Int32,
    ):
        dependency_wait()
        counters, starts = allocate(SmemAllocator())
        if num_blocks > 1:
            tid, _, _ = cute.arch.thread_idx()
            first, last = block_range(per_block, num_blocks, cute.size(topk_ids))
            for e in cutlass.range(tid, num_local, threads, unroll=1):
                starts[e] = slot_row[first + e]  # read before this block overwrites them
            clear_counters(counters)
            cute.arch.sync_threads()
            count_walk(topk_ids, sorted_slots, slot_row, counters, first, last, num_local, offset)
            cute.arch.sync_threads()
            warp_rows(counters, starts, num_local)
            cute.arch.sync_threads()
            place_walk(topk_ids, sorted_slots, slot_row, counters, first, last, num_local, offset)

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
        if cutlass.const_expr(max_blocks == 1):
            routing_kernel(
                topk_ids, sorted_slots, tile_expert, slot_row, num_local, block_m, offset
            ).launch(
                grid=(1, 1, 1),
                block=(threads, 1, 1),
                smem=smem_bytes(tactic),
                stream=stream,
                use_pdl=use_pdl,
            )
        else:
            # Ranges of whole groups, at most max_blocks of them; the last block takes
            # the remainder (so every range holds at least group_slots >= max_local).
            num_slots = cute.size(topk_ids)
            per_block = ((num_slots - 1) // (max_blocks * group_slots) + 1) * group_slots
            num_blocks = cutlass.max(num_slots // per_block, 1)
            count_kernel(
                topk_ids,
                sorted_slots,
                tile_expert,
                slot_row,
                num_local,
                block_m,
                offset,
                per_block,
                num_blocks,
            ).launch(
                grid=(num_blocks, 1, 1),
                block=(threads, 1, 1),
                smem=smem_bytes(tactic),
                stream=stream,
                use_pdl=use_pdl,
            )
            segments_kernel(
                tile_expert, slot_row, num_local, block_m, per_block, num_blocks
            ).launch(
                grid=(1, 1, 1),
                block=(threads, 1, 1),
                smem=segments_smem_bytes(tactic),
                stream=stream,
                use_pdl=use_pdl,
            )
            place_kernel(
                topk_ids, sorted_slots, slot_row, num_local, offset, per_block, num_blocks
            ).launch(
                grid=(num_blocks, 1, 1),
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
