"""MoE GEMM1 for Hopper (sm_90a): gathered tokens x NVFP4 W13 with fused SwiGLU.

For every row ``r`` of row tile ``t`` with ``e = tile_expert[t] >= 0`` and
``s = sorted_slots[r] >= 0`` (the routing metadata of the GPU data path: slots
grouped by local expert, each expert's segment padded to ``block_m`` rows)::

    x = hidden[s // top_k, :]                                   (bf16, hidden)
    g = (x . W13[e, gate rows]^T) * gs13[e]                      (fp32)
    u = (x . W13[e, up rows]^T) * gs13[e]                        (fp32)
    act[r, :] = bf16(silu(g) * u)                                (one rounding)

Rows of an active tile whose slot is -1 (padding) are not written, nor are tiles
with ``tile_expert[t] < 0``: each row of ``act`` feeds only its own row of GEMM2's
output, and GEMM2 writes no padding row. Without split-K each thread writes 8
consecutive columns of a row at a time.

Kernel arguments (in order; shapes are dynamic, tile shapes compile-time):
  hidden        bf16  (num_tokens, hidden), row-major, hidden % 64 == 0, 16-byte aligned
  sorted_slots  int32 (m_pad,)
  tile_expert   int32 (m_pad // block_m,)
  w13_packed    uint8 (num_local_experts, 2 * intermediate, hidden // 2), prepared layout
  w13_scale     uint8 (num_local_experts, 2 * intermediate, hidden // 16), prepared scales
  w13_global    f32   (num_local_experts,)
  act           bf16  (m_pad, intermediate), output
  top_k         int32 scalar
  workspace     int32 (words,), stream-K only: arrival counters (zero at launch),
                then partial tiles (`stream_k_workspace_words`)
  num_ctas      int32 scalar, stream-K only: the grid's CTAs
  stream        CUstream

Prepared row order (see :mod:`jax_moe.prepare`): within each expert, prepared row
``16 * g + i`` is gate row ``8 * g + i`` for ``i < 8`` and up row ``8 * g + i - 8``
for ``i >= 8``, so every 16-row MMA tile holds matching gate and up rows and a CTA
of ``block_w`` prepared rows produces ``block_w / 2`` activation columns.

Requirements (promised by `export_spec`, checked by the caller): hidden % 64 == 0,
intermediate % 64 == 0, 16-byte aligned `hidden`, `w13_packed`, `w13_scale` and
`act`; `tile_expert` entries < num_local_experts and slots < num_tokens *
top_k (not checked by the kernel).

Grid: ``(2 * intermediate / block_w, m_pad / block_m, split_k)``, 128 threads (256 for
the two-warpgroup tiles); with
``split_k > 1`` the CTAs of one tile form a cluster and split the K loop.
With ``stream_k``, ``(num_ctas, 1, 1)``: each CTA runs its share of all tiles' K
steps (`SwapAbNvfp4GemmSm90.stream_k_run`); every CTA waits for the previous kernel
first.

Programmatic dependent launch (with `pdl`, see :mod:`jax_moe.kernels`): the
routing kernel right before writes `tile_expert` and `sorted_slots`, so every
CTA, active or not and in every split-K rank, executes `griddepcontrol.wait`
first (only index arithmetic precedes it), then `launch_dependents`, then reads
`tile_expert`. Its global writes (`act`) all follow the wait.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass.cute.runtime import make_fake_compact_tensor
from cutlass.memory import SmemAllocator

from jax_moe.kernels import pdl_enabled
from jax_moe.kernels.moe_gemm_config import MoeGemm1Sm90Tactic, gemm1_variants
from jax_moe.kernels.nvfp4_decode_sm90 import (
    DECODE_EXPONENT_SHIFT,
    SwapAbNvfp4GemmSm90,
    fake_routed_weight_args,
)

#: Activation columns per thread and pass of the epilogue (one 16-byte store).
SWIGLU_VECTOR = 8

__all__ = ["OP", "MoeGemm1Sm90", "export_spec", "variants"]

#: The FFI op of this module (target `jax_moe_moe_gemm1`).
OP = "moe_gemm1"


class MoeGemm1Sm90(SwapAbNvfp4GemmSm90):
    """GEMM1 kernel for one tactic; `cute.compile(MoeGemm1Sm90(t), *args)`.

    `pdl`: programmatic dependent launch (default: `jax_moe.kernels.pdl_enabled()`).
    """

    def __init__(self, tactic: MoeGemm1Sm90Tactic, pdl: bool | None = None):
        # The tactic's fields are the main loop's compile-time parameters, by name.
        super().__init__(**tactic.params(), pdl=pdl_enabled() if pdl is None else pdl)
        self.tactic = tactic

    @cute.jit
    def __call__(
        self,
        hidden: cute.Tensor,
        sorted_slots: cute.Tensor,
        tile_expert: cute.Tensor,
        w13_packed: cute.Tensor,
        w13_scale: cute.Tensor,
        w13_global: cute.Tensor,
        act: cute.Tensor,
        top_k: cutlass.Int32,
        workspace: cute.Tensor,
        num_ctas: cutlass.Int32,
        stream: cuda.CUstream,
    ):
        self.launch_kernel(
            (
                hidden,
                sorted_slots,
                tile_expert,
                w13_packed,
                w13_scale,
                w13_global,
                act,
                top_k,
                workspace,
                num_ctas,
            ),
            w13_packed,
            tile_expert,
            stream,
            num_ctas,
        )

    @cute.kernel
    def kernel(
        self,
        hidden: cute.Tensor,
        sorted_slots: cute.Tensor,
        tile_expert: cute.Tensor,
        w13_packed: cute.Tensor,
        w13_scale: cute.Tensor,
        w13_global: cute.Tensor,
        act: cute.Tensor,
        top_k: cutlass.Int32,
        workspace: cute.Tensor,
        num_ctas: cutlass.Int32,
        tiled_mma: cute.TiledMma,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        bid_w, bid_t, _ = cute.arch.block_idx()
        # Routing (the previous kernel) wrote tile_expert and sorted_slots.
        self.dependency_wait()
        self.launch_dependents()
        if cutlass.const_expr(self.stream_k > 0):
            self.stream_k_run(
                hidden,
                w13_packed,
                w13_scale,
                sorted_slots,
                tile_expert,
                workspace,
                num_ctas,
                tidx,
                tiled_mma,
                (act, w13_global, top_k),
            )
        else:
            expert = tile_expert[bid_t]
            if expert >= 0:
                smem = SmemAllocator()

                row0 = bid_t * self.block_m
                b_rows = self.tile_b_rows(sorted_slots, row0, tidx, (act, w13_global, top_k))

                s_c = self.mainloop(
                    hidden,
                    b_rows,
                    w13_packed,
                    w13_scale,
                    expert,
                    bid_w * self.block_w,
                    tidx,
                    smem,
                    tiled_mma,
                    rows=self.tile_rows(sorted_slots, row0),
                )

                # Epilogue: SwiGLU on (gate, up) pairs 8 rows apart in each 16-row group.
                global_scale = w13_global[expert] * cutlass.Float32(2.0**DECODE_EXPONENT_SHIFT)
                half = self.block_w // 2
                if cutlass.const_expr(self.split_k == 1):
                    self.swiglu_vector_epilogue(
                        s_c, sorted_slots, act, row0, bid_w, tidx, global_scale
                    )
                else:
                    col0 = bid_w * half
                    # With split-K the cluster's CTAs take turns over the output elements.
                    views = self.split_views(s_c)
                    rank = self.split_rank()
                    for it in cutlass.range_constexpr(self.block_m * half // self.num_threads):
                        if it % self.split_k == rank:
                            idx = it * self.num_threads + tidx
                            jj = idx % half
                            tok = idx // half
                            if sorted_slots[row0 + tok] >= 0:
                                q_gate = (jj // 8) * 16 + jj % 8
                                gate = self.split_value(views, q_gate, tok) * global_scale
                                up = self.split_value(views, q_gate + 8, tok) * global_scale
                                value = gate / (cutlass.Float32(1.0) + cute.math.exp(-gate)) * up
                                act[row0 + tok, col0 + jj] = value.to(cutlass.BFloat16)
                self.split_done()

    @cute.jit
    def tile_b_rows(self, sorted_slots: cute.Tensor, row0, tidx, out: tuple) -> cute.Tensor:
        """Each token chunk's source row in `hidden` for the row tile at `row0`: the
        token of its slot, or -1 for a padding row (a zero row on the register ring and
        wgmma; the cp.async ring of `cp_async` copies row 0 instead)."""
        _, _, top_k = out
        b_rows = cute.make_rmem_tensor((self.b_chunks,), cutlass.Int32)
        for c in cutlass.range_constexpr(self.b_chunks):
            local_row = (c * self.num_threads + tidx) // 8
            slot = sorted_slots[row0 + local_row]
            token = slot // top_k
            if slot < 0:
                token = cutlass.Int32(0 if self.cp_async else -1)
            b_rows[c] = token
        return b_rows

    @cute.jit
    def tile_epilogue(self, s_c, sorted_slots, row0, w_tile, expert, tidx, out: tuple):
        """Stream-K: the unsplit epilogue of one (row tile, weight tile) pair."""
        act, w13_global, _ = out
        global_scale = w13_global[expert] * cutlass.Float32(2.0**DECODE_EXPONENT_SHIFT)
        self.swiglu_vector_epilogue(s_c, sorted_slots, act, row0, w_tile, tidx, global_scale)

    @cute.jit
    def swiglu_vector_epilogue(
        self,
        s_c: cute.Tensor,
        sorted_slots: cute.Tensor,
        act: cute.Tensor,
        row0: cutlass.Int32,
        bid_w: cutlass.Int32,
        tidx: cutlass.Int32,
        global_scale: cutlass.Float32,
    ):
        """Writes the tile's activations, 8 columns (one 16-byte store) per thread and pass.

        Unit `g` of a row is the 16-row group `g` of `s_c` (gate rows `16 g .. 16 g + 7`,
        up rows `16 g + 8 ..`), i.e. activation columns `8 g .. 8 g + 7`. Two threads take
        the two units of one 32-byte output sector and consecutive pairs take consecutive
        rows, so the 16-byte shared-memory reads of a quarter warp hit distinct banks
        (`s_c` rows are `block_w + 4` words apart). Padding rows (slot -1) are not written.
        """
        vec = SWIGLU_VECTOR
        per_row = self.block_w // 16
        units = self.block_m * per_row
        for it in cutlass.range_constexpr((units + self.num_threads - 1) // self.num_threads):
            idx = it * self.num_threads + tidx
            if idx < units:
                tok = (idx // 2) % self.block_m
                g = (idx // (2 * self.block_m)) * 2 + idx % 2
                if sorted_slots[row0 + tok] >= 0:
                    gate = cute.make_rmem_tensor((vec,), cutlass.Float32)
                    up = cute.make_rmem_tensor((vec,), cutlass.Float32)
                    out = cute.make_rmem_tensor((vec,), cutlass.BFloat16)
                    column = s_c[None, tok]
                    cute.autovec_copy(cute.local_tile(column, (vec,), (2 * g,)), gate)
                    cute.autovec_copy(cute.local_tile(column, (vec,), (2 * g + 1,)), up)
                    for e in cutlass.range_constexpr(vec):
                        x = gate[e] * global_scale
                        u = up[e] * global_scale
                        value = x / (cutlass.Float32(1.0) + cute.math.exp(-x)) * u
                        out[e] = value.to(cutlass.BFloat16)
                    cute.autovec_copy(
                        out, cute.local_tile(act[row0 + tok, None], (vec,), (bid_w * per_row + g,))
                    )


def variants() -> list[MoeGemm1Sm90Tactic]:
    """The GEMM1 tactics exported ahead of time."""
    return gemm1_variants()


def export_spec(tactic: MoeGemm1Sm90Tactic):
    """`(jit_callable, fake_args)` such that `cute.compile(jit_callable, *fake_args)` works.

    Every problem size is dynamic, and every variant has the same C signature.
    The caller must check at run time what is promised here: hidden % 64 == 0,
    intermediate % 64 == 0 (so 2*intermediate % block_w == 0), and 16-byte
    aligned bases for `hidden`, `w13_packed`, `w13_scale` and `act`.
    """
    if not isinstance(tactic, MoeGemm1Sm90Tactic):
        raise TypeError(f"tactic={tactic!r}; expected a MoeGemm1Sm90Tactic")
    num_tokens = cute.sym_int()
    hidden = cute.sym_int(divisibility=64)
    m_pad = cute.sym_int()
    routed_weights = fake_routed_weight_args(m_pad)
    inter = cute.sym_int(divisibility=64)
    fake_args = (
        make_fake_compact_tensor(
            cutlass.BFloat16, (num_tokens, hidden), stride_order=(1, 0), assumed_align=16
        ),
        *routed_weights,
        make_fake_compact_tensor(
            cutlass.BFloat16, (m_pad, inter), stride_order=(1, 0), assumed_align=16
        ),
        cutlass.Int32(1),
        make_fake_compact_tensor(cutlass.Int32, (cute.sym_int(),), assumed_align=16),
        cutlass.Int32(1),
        cuda.CUstream(0),
    )
    return MoeGemm1Sm90(tactic), fake_args
