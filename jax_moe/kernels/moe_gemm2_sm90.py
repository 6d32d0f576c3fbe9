"""MoE GEMM2 for Hopper (sm_90a): activations x NVFP4 W2, router weight in the epilogue.

For every row ``r`` of row tile ``t`` with ``e = tile_expert[t] >= 0`` and
``s = sorted_slots[r] >= 0``::

    y[r, :] = bf16(topk_weights[s] * (act[r, :] . W2[e]^T) * gs2[e])  (fp32 math, one rounding)

Rows of an active tile whose slot is -1 (padding) are not written, nor are tiles
with ``tile_expert[t] < 0``: the combine reads only rows that hold a slot. Padding
rows of ``act`` may hold anything (GEMM1 does not write them): the register path
reads them as zero rows, the wgmma and cp.async paths copy them, and each feeds only
its own output row, which is not written. Without split-K each thread writes eight
consecutive columns of a row at a time.

Kernel arguments (in order; shapes are dynamic, tile shapes compile-time):
  act           bf16  (m_pad, intermediate), row-major, intermediate % 64 == 0, 16-byte aligned
  sorted_slots  int32 (m_pad,)
  tile_expert   int32 (m_pad // block_m,)
  w2_packed     uint8 (num_local_experts, hidden, intermediate // 2)
  w2_scale      uint8 (num_local_experts, hidden, intermediate // 16), prepared scale bytes
  w2_global     f32   (num_local_experts,)
  topk_weights  f32   (num_tokens * top_k,)
  y             bf16  (m_pad, hidden), output
  workspace     int32 (words,), stream-K only: arrival counters (zero at launch),
                then partial tiles (`stream_k_workspace_words`)
  num_ctas      int32 scalar, stream-K only: the grid's CTAs
  stream        CUstream

W2 keeps the logical row order; its code words are in the prepared layout (see
:mod:`jax_moe.prepare`).

Requirements (promised by `export_spec`, checked by the caller): intermediate % 64
== 0, hidden % 128 == 0, 16-byte aligned `act`, `w2_packed`, `w2_scale`
and `y`; `tile_expert` entries < num_local_experts and slots < len(topk_weights)
(not checked by the kernel). The output is bf16: each row is one expert's weighted
contribution, rounded once; the combine adds a token's rows in float32.

Grid: ``(hidden / block_w, m_pad / block_m, split_k)``, 128 threads (256 for the
two-warpgroup tiles); with ``split_k > 1``
the CTAs of one tile form a cluster and split the K loop.
With ``stream_k``, ``(num_ctas, 1, 1)``: each CTA runs its share of all tiles' K
steps (`SwapAbNvfp4GemmSm90.stream_k_run`); every CTA waits for the previous kernel
first.

Programmatic dependent launch (with `pdl`, see :mod:`jax_moe.kernels`): this
kernel starts only once every GEMM1 CTA has waited for the routing kernel and
triggered (or exited), so routing's `tile_expert` is complete and is read before
the wait (from L2, `ld.global.cg`), as are the weights (inputs of the layer). An
active CTA (every rank of a split-K cluster) loads its first `stages` K steps of
weights, then executes `griddepcontrol.wait` (GEMM1's `act` is complete and
visible), then `launch_dependents`, then reads `act`, `sorted_slots` and
`topk_weights` and writes `y`. An inactive CTA (``tile_expert[t] < 0``) writes
nothing and exits without waiting, except those of the first row tile's first
weight tile (inactive only when no slot is local): they wait before exiting, so
at least one CTA waits and the grid never completes before GEMM1.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass.cute.runtime import make_fake_compact_tensor
from cutlass.memory import SmemAllocator

from jax_moe.kernels import pdl_enabled
from jax_moe.kernels.moe_gemm_config import MoeGemm2Sm90Tactic, gemm2_variants
from jax_moe.kernels.nvfp4_decode_sm90 import (
    DECODE_EXPONENT_SHIFT,
    SwapAbNvfp4GemmSm90,
    fake_routed_weight_args,
)

#: Output columns per thread and pass of the epilogue (one 16-byte bf16 store).
EPILOGUE_VECTOR = 8

__all__ = ["OP", "MoeGemm2Sm90", "export_spec", "variants"]

#: The FFI op of this module (target `jax_moe_moe_gemm2`).
OP = "moe_gemm2"


class MoeGemm2Sm90(SwapAbNvfp4GemmSm90):
    """GEMM2 kernel for one tactic; `cute.compile(MoeGemm2Sm90(t), *args)`.

    `pdl`: programmatic dependent launch (default: `jax_moe.kernels.pdl_enabled()`).
    """

    def __init__(self, tactic: MoeGemm2Sm90Tactic, pdl: bool | None = None):
        # The tactic's fields are the main loop's compile-time parameters, by name.
        super().__init__(**tactic.params(), pdl=pdl_enabled() if pdl is None else pdl)
        self.tactic = tactic

    @cute.jit
    def __call__(
        self,
        act: cute.Tensor,
        sorted_slots: cute.Tensor,
        tile_expert: cute.Tensor,
        w2_packed: cute.Tensor,
        w2_scale: cute.Tensor,
        w2_global: cute.Tensor,
        topk_weights: cute.Tensor,
        y: cute.Tensor,
        workspace: cute.Tensor,
        num_ctas: cutlass.Int32,
        stream: cuda.CUstream,
    ):
        self.launch_kernel(
            (
                act,
                sorted_slots,
                tile_expert,
                w2_packed,
                w2_scale,
                w2_global,
                topk_weights,
                y,
                workspace,
                num_ctas,
            ),
            w2_packed,
            tile_expert,
            stream,
            num_ctas,
        )

    @cute.kernel
    def kernel(
        self,
        act: cute.Tensor,
        sorted_slots: cute.Tensor,
        tile_expert: cute.Tensor,
        w2_packed: cute.Tensor,
        w2_scale: cute.Tensor,
        w2_global: cute.Tensor,
        topk_weights: cute.Tensor,
        y: cute.Tensor,
        workspace: cute.Tensor,
        num_ctas: cutlass.Int32,
        tiled_mma: cute.TiledMma,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        bid_w, bid_t, _ = cute.arch.block_idx()
        out = (topk_weights, y, w2_global)
        if cutlass.const_expr(self.stream_k > 0):
            # Every CTA reads the whole tile list and GEMM1's act: wait first.
            self.dependency_wait()
            self.launch_dependents()
            self.stream_k_run(
                act,
                w2_packed,
                w2_scale,
                sorted_slots,
                tile_expert,
                workspace,
                num_ctas,
                tidx,
                tiled_mma,
                out,
            )
        else:
            # Written by routing, two kernels back: complete once this grid runs.
            expert = self.read_before_wait(tile_expert, bid_t)
            if cutlass.const_expr(self.pdl):
                if expert < 0:
                    if bid_t + bid_w == 0:
                        # Keeps the grid from completing before GEMM1 when no tile is active.
                        self.dependency_wait()
            if expert >= 0:
                smem = SmemAllocator()

                row0 = bid_t * self.block_m
                b_rows = self.tile_b_rows(sorted_slots, row0, tidx, out)
                s_c = self.mainloop(
                    act,
                    b_rows,
                    w2_packed,
                    w2_scale,
                    expert,
                    bid_w * self.block_w,
                    tidx,
                    smem,
                    tiled_mma,
                    wait_before_tokens=True,  # waits for GEMM1's act after the first weights
                    rows=self.tile_rows(sorted_slots, row0, before_wait=True),
                )

                if cutlass.const_expr(self.split_k == 1):
                    self.tile_epilogue(s_c, sorted_slots, row0, bid_w, expert, tidx, out)
                else:
                    # With split-K the cluster's CTAs take turns over the output elements.
                    global_scale = w2_global[expert] * cutlass.Float32(2.0**DECODE_EXPONENT_SHIFT)
                    views = self.split_views(s_c)
                    rank = self.split_rank()
                    col0 = bid_w * self.block_w
                    for it in cutlass.range_constexpr(
                        self.block_m * self.block_w // self.num_threads
                    ):
                        if it % self.split_k == rank:
                            idx = it * self.num_threads + tidx
                            q = idx % self.block_w
                            tok = idx // self.block_w
                            slot = sorted_slots[row0 + tok]
                            if slot >= 0:
                                weight = topk_weights[slot] * global_scale
                                value = self.split_value(views, q, tok) * weight
                                y[row0 + tok, col0 + q] = value.to(cutlass.BFloat16)
                self.split_done()

    @cute.jit
    def tile_b_rows(self, sorted_slots: cute.Tensor, row0, tidx, out: tuple) -> cute.Tensor:
        """Each token chunk's source row in `act` for the row tile at `row0`."""
        b_rows = cute.make_rmem_tensor((self.b_chunks,), cutlass.Int32)
        for c in cutlass.range_constexpr(self.b_chunks):
            row = row0 + (c * self.num_threads + tidx) // 8
            if cutlass.const_expr(not self.wgmma and not self.cp_async):
                # Register path: padding rows (slot -1, not written by GEMM1) are zero
                # rows, never loaded. The wgmma and cp.async paths copy them: a
                # padding row feeds only its own output row, which is not written,
                # and deciding per chunk which rows to skip keeps those loads and
                # predicates live through the wgmma K loop (64 x 128 tile: 128 ->
                # 157 registers, 3 instead of 4 CTAs per SM).
                if self.read_before_wait(sorted_slots, row) < 0:
                    row = cutlass.Int32(-1)
            b_rows[c] = row
        return b_rows

    @cute.jit
    def tile_epilogue(self, s_c, sorted_slots, row0, w_tile, expert, tidx, out: tuple):
        """Writes one (row tile, weight tile) pair from its unsplit fp32 tile: eight
        consecutive columns of one row per thread and pass (two 16-byte shared-memory
        reads, `s_c` being column-contiguous, and one 16-byte store); padding rows
        (slot -1) are not written."""
        topk_weights, y, w2_global = out
        global_scale = w2_global[expert] * cutlass.Float32(2.0**DECODE_EXPONENT_SHIFT)
        vec = EPILOGUE_VECTOR
        per_row = self.block_w // vec
        for it in cutlass.range_constexpr(
            (self.block_m * per_row + self.num_threads - 1) // self.num_threads
        ):
            idx = it * self.num_threads + tidx
            tok = idx // per_row
            if tok < self.block_m:
                slot = sorted_slots[row0 + tok]
                if slot >= 0:
                    weight = topk_weights[slot] * global_scale
                    values = cute.make_rmem_tensor((vec,), cutlass.Float32)
                    cute.autovec_copy(
                        cute.local_tile(s_c[None, tok], (vec,), (idx % per_row,)), values
                    )
                    result = cute.make_rmem_tensor((vec,), cutlass.BFloat16)
                    for e in cutlass.range_constexpr(vec):
                        result[e] = (values[e] * weight).to(cutlass.BFloat16)
                    cute.autovec_copy(
                        result,
                        cute.local_tile(
                            y[row0 + tok, None], (vec,), (w_tile * per_row + idx % per_row,)
                        ),
                    )


def variants() -> list[MoeGemm2Sm90Tactic]:
    """The GEMM2 tactics exported ahead of time."""
    return gemm2_variants()


def export_spec(tactic: MoeGemm2Sm90Tactic):
    """`(jit_callable, fake_args)` such that `cute.compile(jit_callable, *fake_args)` works.

    Every problem size is dynamic, and every variant has the same C signature.
    The caller must check at run time what is promised here: intermediate % 64 == 0,
    hidden % 128 == 0 (so hidden % block_w == 0), and 16-byte aligned bases for
    `act`, `w2_packed`, `w2_scale` and `y`.
    """
    if not isinstance(tactic, MoeGemm2Sm90Tactic):
        raise TypeError(f"tactic={tactic!r}; expected a MoeGemm2Sm90Tactic")
    m_pad = cute.sym_int()
    inter = cute.sym_int(divisibility=64)
    routed_weights = fake_routed_weight_args(m_pad)
    slots = cute.sym_int()
    hidden = cute.sym_int(divisibility=128)
    fake_args = (
        make_fake_compact_tensor(
            cutlass.BFloat16, (m_pad, inter), stride_order=(1, 0), assumed_align=16
        ),
        *routed_weights,
        make_fake_compact_tensor(cutlass.Float32, (slots,), assumed_align=4),
        make_fake_compact_tensor(
            cutlass.BFloat16, (m_pad, hidden), stride_order=(1, 0), assumed_align=16
        ),
        make_fake_compact_tensor(cutlass.Int32, (cute.sym_int(),), assumed_align=16),
        cutlass.Int32(1),
        cuda.CUstream(0),
    )
    return MoeGemm2Sm90(tactic), fake_args
