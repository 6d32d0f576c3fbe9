"""Shared pieces of the Hopper (sm_90a) NVFP4 MoE grouped GEMMs.

Both MoE GEMMs (:mod:`jax_moe.kernels.moe_gemm1_sm90`, :mod:`jax_moe.kernels.moe_gemm2_sm90`)
compute, for one row tile ``t`` of the routed token rows and one tile of weight
rows, the swap-AB product::

    acc[q, j] = sum_k  W[e, w0 + q, k] * B[t * block_m + j, k]      (fp32)

with the weight rows on the MMA M side (``block_w`` rows per CTA) and the token
rows on the MMA N side (``block_m`` rows, the routing row tile). ``e`` is the
local expert of the row tile (``tile_expert[t]``); tiles with ``e < 0`` exit at
once. Only the source of the token rows (``B``) and the epilogue differ between
the two GEMMs; this module holds everything else:

* exact NVFP4 -> bf16 decode (:func:`decode_word_pair`, :func:`e4m3x2_scales_bf16x2`,
  :func:`mul_bf16x2`),
* the CTA main loop (:class:`SwapAbNvfp4GemmSm90`), 128 threads (4 warps). Per
  64-wide K step every thread owns work units of 16 packed weight bytes (32 codes)
  plus their two e4m3 scales, and 16-byte chunks of token rows. They are loaded
  `stages` K steps ahead, either into a register ring (default) or through a
  cp.async shared-memory ring (`cp_async`). Each step the threads decode their
  weights exactly to bf16 into shared memory (one ``mul.rn.bf16x2`` per two
  elements), copy the token rows to shared memory, and the four warps run
  ``mma.sync.m16n8k16`` bf16 MMAs fed through ``ldmatrix``, accumulating in fp32.
  The fp32 tile is then staged in shared memory (``s_c[q, j]``) for the epilogue,
  which applies the global scale.

Exactness of the decode. A prepared code word (layout in :mod:`jax_moe.prepare`)
places the three magnitude bits ``e1 e0 m`` of an e2m1 code in bf16 bits 8..6 and
its sign in bit 15 (one rotation and mask per pair, two for the last pair of a
word), which reads as ``value * 2**-126`` for every code (codes ``+-0.5`` are bf16
subnormals). The two e4m3 block scales of a work unit are converted together,
exactly, to bf16 ``scale * 2**117`` (``cvt.rn.f16x2.e4m3x2``, then the f16 bits
re-biased as bf16; at most ``448 * 2**117 < 2**126``; e4m3 subnormals included).
Their bf16 product is ``value * scale * 2**-9``: at most 4 + 2 significant bits and
a magnitude in ``[2**-19, 5.25]``, so it is exact and normal. The epilogue
multiplies the global scale by ``2**9`` (:data:`DECODE_EXPONENT_SHIFT`), again
exactly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass._mlir.dialects import llvm
from cutlass.cute.runtime import make_fake_compact_tensor
from cutlass.cutlass_dsl import dsl_user_op

from jax_moe.kernels.moe_gemm_config import swap_ab_smem_bytes
from jax_moe.prepare import DECODE_TERMS, TILE_ROWS

__all__ = [
    "BLOCK_K",
    "DECODE_EXPONENT_SHIFT",
    "NUM_THREADS",
    "SMEM_PAD",
    "SwapAbNvfp4GemmSm90",
    "decode_word_pair",
    "e4m3x2_scales_bf16x2",
    "fake_routed_weight_args",
    "mul_bf16x2",
]

#: Reduction elements per main-loop step (4 e4m3 scales per weight row).
BLOCK_K = 64
#: Threads per CTA (4 warps).
NUM_THREADS = 128
#: bf16 elements of padding per shared-memory row (16 bytes: conflict-free ldmatrix).
SMEM_PAD = 8
#: The decoded bf16 weights are `value * 2**-DECODE_EXPONENT_SHIFT`; the epilogue
#: multiplies the global scale by `2**DECODE_EXPONENT_SHIFT` (exact).
DECODE_EXPONENT_SHIFT = 9


def _asm_u32(asm: str, *operands, loc=None, ip=None) -> cutlass.Uint32:
    """A side-effect-free PTX snippet with one 32-bit result and 32-bit operands."""
    result = llvm.inline_asm(
        cutlass.Uint32.mlir_type,
        [cutlass.Uint32(x).ir_value(loc=loc, ip=ip) for x in operands],
        asm,
        ",".join(["=r"] + ["r"] * len(operands)),
        loc=loc,
        ip=ip,
    )
    return cutlass.Uint32(result)


@dsl_user_op
def mul_bf16x2(a: cutlass.Uint32, b: cutlass.Uint32, *, loc=None, ip=None) -> cutlass.Uint32:
    """Packed bf16x2 product `a * b` (round to nearest even; subnormal inputs honoured)."""
    return _asm_u32("mul.rn.bf16x2 $0, $1, $2;", a, b, loc=loc, ip=ip)


@dsl_user_op
def rotate_left(x: cutlass.Uint32, amount: int, *, loc=None, ip=None) -> cutlass.Uint32:
    """`x` rotated left by the constant `amount` bits (one funnel shift)."""
    return _asm_u32(f"shf.l.wrap.b32 $0, $1, $1, {int(amount)};", x, loc=loc, ip=ip)


@dsl_user_op
def permute_bytes(x: cutlass.Uint32, selector: int, *, loc=None, ip=None) -> cutlass.Uint32:
    """`prmt.b32 x, x, selector`: bytes of `x` picked by the constant selector."""
    return _asm_u32(f"prmt.b32 $0, $1, $1, {int(selector)};", x, loc=loc, ip=ip)


@dsl_user_op
def e4m3x2_to_f16x2(x: cutlass.Uint32, *, loc=None, ip=None) -> cutlass.Uint32:
    """f16x2 of the two e4m3 bytes in the low 16 bits of `x` (byte 0 -> low half); exact."""
    asm = "{\n.reg .b16 lo, hi;\nmov.b32 {lo, hi}, $1;\ncvt.rn.f16x2.e4m3x2 $0, lo;\n}"
    return _asm_u32(asm, x, loc=loc, ip=ip)


@dsl_user_op
def load_dsmem_f32(address: cutlass.Int32, *, loc=None, ip=None) -> cutlass.Float32:
    """A float32 load from a `shared::cluster` address (another CTA's shared memory)."""
    result = llvm.inline_asm(
        cutlass.Float32.mlir_type,
        [cutlass.Int32(address).ir_value(loc=loc, ip=ip)],
        "ld.shared::cluster.f32 $0, [$1];",
        "=f,r",
        has_side_effects=True,
        loc=loc,
        ip=ip,
    )
    return cutlass.Float32(result)


def e4m3x2_scales_bf16x2(pair: cutlass.Uint32) -> cutlass.Uint32:
    """bf16x2 `(s0, s1) * 2**117` of the e4m3 bytes s0 (bits 0..7) and s1 (bits 8..15); exact."""
    return f16x2_scales_as_bf16x2(e4m3x2_to_f16x2(pair))


def f16x2_scales_as_bf16x2(x, u32=cutlass.Uint32):
    """bf16x2 `value * 2**117` of the two f16 halves of `x`, for e4m3 values; exact.

    Every e4m3 value is a normal f16 `2**(E-15) * 1.f` with at most 3 significant
    mantissa bits, so its bf16 bits times `2**117` are `((h & 0x7fff) >> 3) + (229 << 7)`
    plus the sign; zero stays zero (the mask). NaN inputs give unspecified values.
    `u32` makes the constants (`cutlass.Uint32` in kernels, `numpy.uint32` in tests).
    """
    rebiased = (((x >> 3) & u32(0x0FFF0FFF)) + u32(0x72807280)) | (x & u32(0x80008000))
    nonzero = ((x & u32(0x7FFF7FFF)) + u32(0x7FFF7FFF)) & u32(0x80008000)
    return rebiased & (nonzero | (nonzero - (nonzero >> u32(15))))


def decode_word_pair(word: cutlass.Uint32, pair: int) -> cutlass.Uint32:
    """bf16x2 `value * 2**-126` of elements (2*pair, 2*pair+1) of a prepared code word.

    The OR of `rotate_left(word, r) & mask` over `jax_moe.prepare.DECODE_TERMS[pair]`
    (layout version 3): magnitude bits land in bf16 bits 8..6 of each half (exponent
    low bits and top mantissa bit) and signs in bit 15, which is the e2m1 value times
    2**-126 for every code, subnormal codes included.
    """
    terms = [
        (rotate_left(word, rotation) if rotation else word) & cutlass.Uint32(mask)
        for rotation, mask in DECODE_TERMS[pair]
    ]
    result = terms[0]
    for term in terms[1:]:
        result = result | term
    return result


class _SmemMma(NamedTuple):
    """One thread's view of the CTA's MMAs over the shared-memory tiles (`_smem_mma`)."""

    acc: cute.Tensor  # fp32 accumulator fragment
    t_sc: cute.Tensor  # this thread's partition of `s_c`
    t_ra: cute.Tensor  # A (weight) and B (token) register fragments
    t_rb: cute.Tensor
    s2r_a: cute.TiledCopy  # ldmatrix copies into t_ra / t_rb
    s2r_b: cute.TiledCopy
    t_sa_view: cute.Tensor  # their source and destination views
    t_ra_view: cute.Tensor
    t_sb_view: cute.Tensor
    t_rb_view: cute.Tensor


class SwapAbNvfp4GemmSm90:
    """Swap-AB NVFP4 x bf16 grouped GEMM main loop; subclasses add B loads and the epilogue.

    Compile-time parameters:
      block_w: weight rows per CTA (MMA M side), a multiple of 64.
      block_m: token rows per CTA (MMA N side) = the routing row tile, a multiple of 16.
      warps_m, warps_n: warp grid (warps_m * warps_n == 4) over (block_w, block_m).
      stages: K steps loaded ahead (register ring depth, or cp.async ring depth).
      cp_async: stage raw weights and token rows through a cp.async shared-memory ring
        instead of registers.
      split_k: CTAs sharing one output tile, each over a contiguous range of K steps
        (1, 2, 4 or 8; register path only). They form a thread block cluster along
        the grid's z axis; `split_views` and `split_value` give the epilogue the sum
        of their fp32 tiles in rank order (read through distributed shared memory, so
        the result does not depend on timing), and `split_done` keeps every CTA's
        shared memory alive until the whole cluster has read it.

    Subclasses define a `@cute.kernel` method `kernel(*args, tiled_mma)`, launched by
    `launch_kernel`; it sets up each token chunk's source row (`b_rows`), calls
    `mainloop` and writes the output tile from the fp32 accumulators staged in
    shared memory as `s_c[q, j]` (`block_w x block_m`, weight row q, token row j).
    """

    def __init__(
        self,
        block_w: int,
        block_m: int,
        warps_m: int,
        warps_n: int,
        stages: int = 1,
        cp_async: bool = False,
        split_k: int = 1,
    ):
        if split_k not in (1, 2, 4, 8):
            raise ValueError(f"split_k={split_k}; expected 1, 2, 4 or 8")
        if split_k > 1 and cp_async:
            raise ValueError("split_k > 1 needs the register path (cp_async=False)")
        if warps_m * warps_n * 32 != NUM_THREADS:
            raise ValueError(f"warps_m * warps_n = {warps_m * warps_n}; expected 4")
        if block_w % (16 * warps_m) or block_w % 64:
            raise ValueError(f"block_w={block_w}; expected a multiple of 64 and of 16*warps_m")
        if block_m % (16 * warps_n):
            raise ValueError(f"block_m={block_m}; expected a multiple of 16*warps_n")
        if stages < (3 if cp_async else 1):
            raise ValueError(
                f"stages={stages}; expected >= 1 (register prefetch depth) or >= 3 (cp.async ring)"
            )
        self.stages = stages
        self.cp_async = cp_async
        self.split_k = split_k
        self.block_w = block_w
        self.block_m = block_m
        self.warps_m = warps_m
        self.warps_n = warps_n
        # Weight work units: (row, half of the 64-wide K step) = 16 packed bytes + 2 scales.
        self.w_units = block_w * 2 // NUM_THREADS
        # Token work units: 16-byte chunks (8 bf16) of a token row's 64-wide K step.
        self.b_chunks = max(1, block_m * (BLOCK_K // 8) // NUM_THREADS)
        if block_m * (BLOCK_K // 8) % NUM_THREADS:
            raise ValueError(f"block_m={block_m}; expected block_m * 8 to be a multiple of 128")

    # ------------------------------------------------------------------ layouts
    def smem_bytes(self) -> int:
        """Dynamic shared memory of one CTA (`_allocate_smem`)."""
        return swap_ab_smem_bytes(self.block_w, self.block_m, self.stages, self.cp_async)

    def _allocate_smem(self, smem):
        """(s_a, s_b, s_c, s_raw, s_scale); s_b has a trailing stage mode, s_raw/s_scale are
        None without the cp.async pipeline."""
        row = BLOCK_K + SMEM_PAD
        stages = self.stages if self.cp_async else 1
        s_a = smem.allocate_tensor(
            cutlass.BFloat16, cute.make_layout((self.block_w, BLOCK_K), stride=(row, 1)), 16
        )
        s_b = smem.allocate_tensor(
            cutlass.BFloat16,
            cute.make_layout((self.block_m, BLOCK_K, stages), stride=(row, 1, row * self.block_m)),
            16,
        )
        s_c = smem.allocate_tensor(
            cutlass.Float32,
            cute.make_layout((self.block_w, self.block_m), stride=(1, self.block_w + 4)),
            16,
        )
        s_raw = None
        s_scale = None
        if self.cp_async:
            s_raw = smem.allocate_tensor(
                cutlass.Uint8, cute.make_layout((self.block_w * 32, self.stages)), 16
            )
            s_scale = smem.allocate_tensor(
                cutlass.Uint8, cute.make_layout((self.block_w * 4, self.stages)), 16
            )
        return s_a, s_b, s_c, s_raw, s_scale

    def _tiled_mma(self):
        op = cute.nvgpu.warp.MmaF16BF16Op(cutlass.BFloat16, cutlass.Float32, (16, 8, 16))
        return cute.make_tiled_mma(
            op,
            cute.make_layout((self.warps_m, self.warps_n, 1)),
            permutation_mnk=(self.warps_m * 16, self.warps_n * 16, 16),
        )

    def _smem_mma(self, tiled_mma, tidx, s_a, s_b, s_c) -> _SmemMma:
        """This thread's MMA fragments, ldmatrix copies and zeroed fp32 accumulator.

        `s_b` is the token tile of `_allocate_smem`: one stage for the register
        path, all stages (trailing mode) with the cp.async ring.
        """
        thr_mma = tiled_mma.get_slice(tidx)
        t_sa = thr_mma.partition_A(s_a)
        t_sb = thr_mma.partition_B(s_b[None, None, 0] if self.cp_async else s_b)
        t_ra = tiled_mma.make_fragment_A(t_sa)
        t_rb = tiled_mma.make_fragment_B(t_sb)
        t_sc = thr_mma.partition_C(s_c)
        acc = tiled_mma.make_fragment_C(t_sc)
        acc.fill(0.0)
        ldmatrix = cute.make_copy_atom(
            cute.nvgpu.warp.LdMatrix8x8x16bOp(False, 4), cutlass.BFloat16
        )
        s2r_a = cute.make_tiled_copy_A(ldmatrix, tiled_mma)
        s2r_b = cute.make_tiled_copy_B(ldmatrix, tiled_mma)
        thr_s2r_a = s2r_a.get_slice(tidx)
        thr_s2r_b = s2r_b.get_slice(tidx)
        return _SmemMma(
            acc=acc,
            t_sc=t_sc,
            t_ra=t_ra,
            t_rb=t_rb,
            s2r_a=s2r_a,
            s2r_b=s2r_b,
            t_sa_view=thr_s2r_a.partition_S(s_a),
            t_ra_view=thr_s2r_a.retile(t_ra),
            t_sb_view=thr_s2r_b.partition_S(s_b),
            t_rb_view=thr_s2r_b.retile(t_rb),
        )

    @cute.jit
    def mma_k_step(self, tiled_mma: cute.TiledMma, mma: _SmemMma, stage: Any):
        """Accumulates one K step of `s_a` x `s_b` into `mma.acc` through ldmatrix and MMAs.

        `stage` is the cp.async ring stage of `s_b` (None for the register path).
        """
        for kb in cutlass.range_constexpr(cute.size(mma.t_ra, mode=[2])):
            cute.copy(mma.s2r_a, mma.t_sa_view[None, None, kb], mma.t_ra_view[None, None, kb])
            if cutlass.const_expr(self.cp_async):
                t_sb = mma.t_sb_view[None, None, kb, stage]
            else:
                t_sb = mma.t_sb_view[None, None, kb]
            cute.copy(mma.s2r_b, t_sb, mma.t_rb_view[None, None, kb])
            cute.gemm(
                tiled_mma, mma.acc, mma.t_ra[None, None, kb], mma.t_rb[None, None, kb], mma.acc
            )

    def launch_kernel(
        self,
        kernel_args: tuple,
        w_packed: cute.Tensor,
        tile_expert: cute.Tensor,
        stream: cuda.CUstream,
    ) -> None:
        """Launches `self.kernel(*kernel_args, tiled_mma)` on `stream`.

        Grid: `(w_packed.shape[1] / block_w, len(tile_expert), split_k)` CTAs of
        `NUM_THREADS` threads with `smem_bytes()` of dynamic shared memory; with
        `split_k > 1`, clusters of `(1, 1, split_k)`.
        """
        tiled_mma = self._tiled_mma()
        num_w_tiles = w_packed.shape[1] // self.block_w
        num_row_tiles = tile_expert.shape[0]
        if cutlass.const_expr(self.split_k > 1):
            self.kernel(*kernel_args, tiled_mma).launch(
                grid=(num_w_tiles, num_row_tiles, self.split_k),
                block=(NUM_THREADS, 1, 1),
                cluster=(1, 1, self.split_k),
                smem=self.smem_bytes(),
                stream=stream,
            )
        else:
            self.kernel(*kernel_args, tiled_mma).launch(
                grid=(num_w_tiles, num_row_tiles, 1),
                block=(NUM_THREADS, 1, 1),
                smem=self.smem_bytes(),
                stream=stream,
            )

    # ------------------------------------------------------------------ split-K epilogue
    def split_rank(self):
        """This CTA's K split (its rank in the cluster); 0 without split-K."""
        if cutlass.const_expr(self.split_k == 1):
            return cutlass.Int32(0)
        _, _, bid_z = cute.arch.block_idx()
        return bid_z

    def split_views(self, s_c: cute.Tensor) -> tuple:
        """`(s_c, bases)`: the local tile and the `shared::cluster` address of `s_c` in
        every CTA of the cluster, in rank order (no bases without split-K).

        Waits until every CTA of the cluster has finished its main loop.
        """
        if cutlass.const_expr(self.split_k == 1):
            return s_c, []
        cute.arch.cluster_arrive()
        cute.arch.cluster_wait()
        bases = [
            cute.arch.map_dsmem_ptr(s_c.iterator, rank).toint() for rank in range(self.split_k)
        ]
        return s_c, bases

    def split_value(self, views: tuple, q, j):
        """`sum over ranks of s_c[q, j]` of the cluster's CTAs, added in rank order (fp32)."""
        s_c, bases = views
        if cutlass.const_expr(len(bases) == 0):
            return s_c[q, j]
        offset = cute.crd2idx((q, j), s_c.layout) * 4
        value = load_dsmem_f32(bases[0] + offset)
        for rank in range(1, len(bases)):
            value = value + load_dsmem_f32(bases[rank] + offset)
        return value

    def split_done(self) -> None:
        """Cluster barrier after the epilogue: no CTA leaves while another reads its tile."""
        if cutlass.const_expr(self.split_k > 1):
            cute.arch.cluster_arrive()
            cute.arch.cluster_wait()

    # ------------------------------------------------------------------ main loop
    def weight_tiles(self, m_packed: cute.Tensor, m_scale: cute.Tensor, expert: cutlass.Int32):
        """(codes, scales) of `expert` viewed as `(step block, K step, 16-row band)`.

        The prepared arrays are tiled (:mod:`jax_moe.prepare`): band `b` stores its 16
        rows K step by K step, so one step of a band is a contiguous block of 512 code
        bytes (row `i` at `32 * i`) and 64 scale bytes (row `i` at `4 * i`).
        """
        row_bytes = m_packed.shape[2]
        scale_row_bytes = m_scale.shape[2]
        codes = cute.make_tensor(
            m_packed[expert, None, None].iterator,
            cute.make_layout(
                (TILE_ROWS * 32, row_bytes // 32, m_packed.shape[1] // TILE_ROWS),
                stride=(1, TILE_ROWS * 32, cute.assume(row_bytes * TILE_ROWS, divby=512)),
            ),
        )
        scales = cute.make_tensor(
            m_scale[expert, None, None].iterator,
            cute.make_layout(
                (TILE_ROWS * 4, scale_row_bytes // 4, m_scale.shape[1] // TILE_ROWS),
                stride=(1, TILE_ROWS * 4, cute.assume(scale_row_bytes * TILE_ROWS, divby=64)),
            ),
        )
        return codes, scales

    @cute.jit
    def load_w_step(
        self,
        tiles: tuple,
        w_row0: cutlass.Int32,
        k_step: cutlass.Int32,
        tidx: cutlass.Int32,
        r_packed: cute.Tensor,
        r_scale: cute.Tensor,
    ):
        """Loads this thread's packed weight bytes and scale bytes of one K step into registers.

        `tiles` is `weight_tiles(...)`. A unit is (row, half of the step): 16 code
        bytes and 2 scale bytes; a warp's units of one step are one contiguous block.
        """
        codes, scales = tiles
        for u in cutlass.range_constexpr(self.w_units):
            unit = u * NUM_THREADS + tidx
            row = w_row0 + unit // 2
            in_band = (row % TILE_ROWS) * 2 + unit % 2
            src = cute.local_tile(codes[None, k_step, row // TILE_ROWS], (16,), (in_band,))
            cute.autovec_copy(src, r_packed[None, u])
            ssrc = cute.local_tile(scales[None, k_step, row // TILE_ROWS], (2,), (in_band,))
            cute.autovec_copy(ssrc, r_scale[None, u])

    @cute.jit
    def decode_unit(
        self, words: cute.Tensor, scale_pair: cutlass.Uint32, decoded_words: cute.Tensor
    ):
        """Decodes one weight work unit to bf16x2 words, `e2m1 * e4m3 * 2**-DECODE_EXPONENT_SHIFT`.

        `words` holds the unit's 4 prepared code words (32 codes); `scale_pair` the
        e4m3 scales of its two 16-code groups (bits 0..7 and 8..15).
        """
        scales = e4m3x2_scales_bf16x2(scale_pair)
        for g in cutlass.range_constexpr(2):
            scale2 = permute_bytes(scales, 0x1010 if g == 0 else 0x3232)
            for w in cutlass.range_constexpr(2):
                word = words[g * 2 + w]
                for p in cutlass.range_constexpr(4):
                    decoded_words[g * 8 + w * 4 + p] = mul_bf16x2(decode_word_pair(word, p), scale2)

    @cute.jit
    def store_w_step(
        self,
        tidx: cutlass.Int32,
        r_packed: cute.Tensor,
        r_scale: cute.Tensor,
        s_a: cute.Tensor,
        r_decoded: cute.Tensor,
    ):
        """Decodes the registers of `load_w_step` to bf16 and stores them into `s_a`.

        Each decoded element is `e2m1 * e4m3 * 2**-DECODE_EXPONENT_SHIFT`, exact in bf16.
        """
        decoded_words = cute.recast_tensor(r_decoded, cutlass.Uint32)
        for u in cutlass.range_constexpr(self.w_units):
            unit = u * NUM_THREADS + tidx
            row = unit // 2
            half = unit % 2
            words = cute.recast_tensor(r_packed[None, u], cutlass.Uint32)
            scale_pair = cutlass.Uint32(r_scale[0, u]) | (cutlass.Uint32(r_scale[1, u]) << 8)
            self.decode_unit(words, scale_pair, decoded_words)
            dst = cute.local_tile(s_a[row, None], (32,), (half,))
            cute.autovec_copy(r_decoded, dst)

    @cute.jit
    def load_b_step(
        self,
        m_b: cute.Tensor,
        b_rows: cute.Tensor,
        k_step: cutlass.Int32,
        tidx: cutlass.Int32,
        r_b: cute.Tensor,
    ):
        """Loads this thread's 16-byte chunks of the token rows of one K step into registers.

        `b_rows[c]` is the source row of chunk `c` in `m_b`, or -1 for a zero row.
        """
        for c in cutlass.range_constexpr(self.b_chunks):
            chunk = c * NUM_THREADS + tidx
            col = chunk % (BLOCK_K // 8)
            src_row = b_rows[c]
            if src_row >= 0:
                src = cute.local_tile(m_b[src_row, None], (8,), (k_step * (BLOCK_K // 8) + col,))
                cute.autovec_copy(src, r_b[None, c])
            else:
                r_b[None, c].fill(0.0)

    @cute.jit
    def store_b_step(self, tidx: cutlass.Int32, r_b: cute.Tensor, s_b: cute.Tensor):
        for c in cutlass.range_constexpr(self.b_chunks):
            chunk = c * NUM_THREADS + tidx
            if chunk < self.block_m * (BLOCK_K // 8):
                row = chunk // (BLOCK_K // 8)
                col = chunk % (BLOCK_K // 8)
                dst = cute.local_tile(s_b[row, None], (8,), (col,))
                cute.autovec_copy(r_b[None, c], dst)

    @cute.jit
    def mainloop_registers(
        self,
        m_b: cute.Tensor,
        b_rows: cute.Tensor,
        m_packed: cute.Tensor,
        m_scale: cute.Tensor,
        expert: cutlass.Int32,
        w_row0: cutlass.Int32,
        tidx: cutlass.Int32,
        s_a: cute.Tensor,
        s_b: cute.Tensor,
        s_c: cute.Tensor,
        tiled_mma: cute.TiledMma,
    ):
        """Runs the K loop and leaves the fp32 tile in `s_c` (synchronized).

        With split-K, this CTA covers K steps `[k_begin, k_end)` of its rank; a rank
        past the end accumulates nothing (its tile is zero).
        """
        num_k_steps = m_packed.shape[2] // (BLOCK_K // 2)
        k_begin = cutlass.Int32(0)
        k_end = num_k_steps
        if cutlass.const_expr(self.split_k > 1):
            per_split = (num_k_steps + self.split_k - 1) // self.split_k
            k_begin = self.split_rank() * per_split
            k_end = cutlass.min(k_begin + per_split, num_k_steps)

        depth = self.stages
        r_packed = cute.make_rmem_tensor((16, self.w_units, depth), cutlass.Uint8)
        r_scale = cute.make_rmem_tensor((2, self.w_units, depth), cutlass.Uint8)
        r_decoded = cute.make_rmem_tensor((32,), cutlass.BFloat16)
        r_b = cute.make_rmem_tensor((8, self.b_chunks, depth), cutlass.BFloat16)

        mma = self._smem_mma(tiled_mma, tidx, s_a, s_b, s_c)
        tiles = self.weight_tiles(m_packed, m_scale, expert)

        # Register ring of `depth` K steps: step k lives in buffer k % depth; the loop is
        # unrolled by `depth` so every buffer index is a compile-time constant.
        for d in cutlass.range_constexpr(depth):
            first = cutlass.min(k_begin + d, num_k_steps - 1)
            self.load_w_step(
                tiles,
                w_row0,
                first,
                tidx,
                r_packed[None, None, d],
                r_scale[None, None, d],
            )
            self.load_b_step(m_b, b_rows, first, tidx, r_b[None, None, d])
        for k_group in cutlass.range(k_begin, k_end, depth, unroll=1):
            for d in cutlass.range_constexpr(depth):
                k_step = k_group + d
                if k_step < k_end:
                    cute.arch.sync_threads()
                    self.store_w_step(
                        tidx, r_packed[None, None, d], r_scale[None, None, d], s_a, r_decoded
                    )
                    self.store_b_step(tidx, r_b[None, None, d], s_b)
                    cute.arch.sync_threads()
                    ahead = cutlass.min(k_step + depth, num_k_steps - 1)
                    self.load_w_step(
                        tiles,
                        w_row0,
                        ahead,
                        tidx,
                        r_packed[None, None, d],
                        r_scale[None, None, d],
                    )
                    self.load_b_step(m_b, b_rows, ahead, tidx, r_b[None, None, d])
                    self.mma_k_step(tiled_mma, mma, None)

        cute.autovec_copy(mma.acc, mma.t_sc)
        cute.arch.sync_threads()

    @cute.jit
    def mainloop(self, m_b, b_rows, m_packed, m_scale, expert, w_row0, tidx, smem, tiled_mma):
        """Allocates shared memory, runs the K loop; returns `s_c` holding the fp32 tile."""
        s_a, s_b, s_c, s_raw, s_scale = self._allocate_smem(smem)
        if cutlass.const_expr(not self.cp_async):
            self.mainloop_registers(
                m_b,
                b_rows,
                m_packed,
                m_scale,
                expert,
                w_row0,
                tidx,
                s_a,
                s_b[None, None, 0],
                s_c,
                tiled_mma,
            )
        else:
            self.mainloop_cp_async(
                m_b,
                b_rows,
                m_packed,
                m_scale,
                expert,
                w_row0,
                tidx,
                s_a,
                s_b,
                s_c,
                s_raw,
                s_scale,
                tiled_mma,
            )
        return s_c

    @cute.jit
    def issue_step_cp_async(
        self,
        m_b,
        b_rows,
        tiles,
        w_row0,
        k_step,
        stage,
        tidx,
        s_b,
        s_raw,
        s_scale,
    ):
        """cp.async of one K step's raw weight bytes, scales and token rows into `stage`.

        `tiles` is `weight_tiles(...)` of the CTA's expert.
        """
        atom_w = cute.make_copy_atom(
            cute.nvgpu.cpasync.CopyG2SOp(cache_mode=cute.nvgpu.cpasync.LoadCacheMode.GLOBAL),
            cutlass.Uint8,
            num_bits_per_copy=128,
        )
        atom_s = cute.make_copy_atom(
            cute.nvgpu.cpasync.CopyG2SOp(), cutlass.Uint8, num_bits_per_copy=32
        )
        atom_b = cute.make_copy_atom(
            cute.nvgpu.cpasync.CopyG2SOp(cache_mode=cute.nvgpu.cpasync.LoadCacheMode.GLOBAL),
            cutlass.BFloat16,
            num_bits_per_copy=128,
        )
        codes, scales = tiles
        for u in cutlass.range_constexpr(self.w_units):
            unit = u * NUM_THREADS + tidx
            row = w_row0 + unit // 2
            in_band = (row % TILE_ROWS) * 2 + unit % 2
            src = cute.local_tile(codes[None, k_step, row // TILE_ROWS], (16,), (in_band,))
            dst = cute.local_tile(s_raw[None, stage], (16,), (unit,))
            cute.copy(atom_w, src, dst)
        if tidx < self.block_w:
            row = w_row0 + tidx
            ssrc = cute.local_tile(scales[None, k_step, row // TILE_ROWS], (4,), (row % TILE_ROWS,))
            sdst = cute.local_tile(s_scale[None, stage], (4,), (tidx,))
            cute.copy(atom_s, ssrc, sdst)
        for c in cutlass.range_constexpr(self.b_chunks):
            chunk = c * NUM_THREADS + tidx
            row = chunk // (BLOCK_K // 8)
            col = chunk % (BLOCK_K // 8)
            bsrc = cute.local_tile(m_b[b_rows[c], None], (8,), (k_step * (BLOCK_K // 8) + col,))
            bdst = cute.local_tile(s_b[row, None, stage], (8,), (col,))
            cute.copy(atom_b, bsrc, bdst)

    @cute.jit
    def decode_step_smem(self, tidx, stage, s_raw, s_scale, s_a, r_packed, r_decoded):
        """Decodes one staged K step of raw weights from shared memory into `s_a` (bf16)."""
        decoded_words = cute.recast_tensor(r_decoded, cutlass.Uint32)
        for u in cutlass.range_constexpr(self.w_units):
            unit = u * NUM_THREADS + tidx
            row = unit // 2
            half = unit % 2
            cute.autovec_copy(cute.local_tile(s_raw[None, stage], (16,), (unit,)), r_packed)
            words = cute.recast_tensor(r_packed, cutlass.Uint32)
            first = row * 4 + half * 2
            scale_pair = cutlass.Uint32(s_scale[first, stage]) | (
                cutlass.Uint32(s_scale[first + 1, stage]) << 8
            )
            self.decode_unit(words, scale_pair, decoded_words)
            dst = cute.local_tile(s_a[row, None], (32,), (half,))
            cute.autovec_copy(r_decoded, dst)

    @cute.jit
    def mainloop_cp_async(
        self,
        m_b: cute.Tensor,
        b_rows: cute.Tensor,
        m_packed: cute.Tensor,
        m_scale: cute.Tensor,
        expert: cutlass.Int32,
        w_row0: cutlass.Int32,
        tidx: cutlass.Int32,
        s_a: cute.Tensor,
        s_b: cute.Tensor,
        s_c: cute.Tensor,
        s_raw: cute.Tensor,
        s_scale: cute.Tensor,
        tiled_mma: cute.TiledMma,
    ):
        """K loop with a `stages`-deep cp.async ring of raw weights, scales and token rows.

        `b_rows[c]` must be a valid row of `m_b` for every chunk (callers clamp invalid
        rows to a real one; their results are never read).
        """
        num_k_steps = m_packed.shape[2] // (BLOCK_K // 2)
        r_packed = cute.make_rmem_tensor((16,), cutlass.Uint8)
        r_decoded = cute.make_rmem_tensor((32,), cutlass.BFloat16)

        mma = self._smem_mma(tiled_mma, tidx, s_a, s_b, s_c)
        tiles = self.weight_tiles(m_packed, m_scale, expert)

        for st in cutlass.range_constexpr(self.stages - 1):
            step = cutlass.min(st, num_k_steps - 1)
            self.issue_step_cp_async(
                m_b, b_rows, tiles, w_row0, step, st, tidx, s_b, s_raw, s_scale
            )
            cute.arch.cp_async_commit_group()

        for k_step in cutlass.range(num_k_steps, unroll=1):
            stage = k_step % self.stages
            cute.arch.cp_async_wait_group(self.stages - 2)
            cute.arch.sync_threads()
            next_step = cutlass.min(k_step + self.stages - 1, num_k_steps - 1)
            self.issue_step_cp_async(
                m_b,
                b_rows,
                tiles,
                w_row0,
                next_step,
                (k_step + self.stages - 1) % self.stages,
                tidx,
                s_b,
                s_raw,
                s_scale,
            )
            cute.arch.cp_async_commit_group()
            self.decode_step_smem(tidx, stage, s_raw, s_scale, s_a, r_packed, r_decoded)
            cute.arch.sync_threads()
            self.mma_k_step(tiled_mma, mma, stage)

        cute.arch.cp_async_wait_group(0)
        cute.autovec_copy(mma.acc, mma.t_sc)
        cute.arch.sync_threads()


def fake_routed_weight_args(m_pad: Any) -> tuple:
    """Fake `(sorted_slots, tile_expert, w_packed, w_scale, w_global)` for `export_spec`.

    Shapes (all dynamic): sorted_slots int32 `(m_pad,)`, tile_expert int32
    `(num_tiles,)`, w_packed uint8 `(experts, rows, k // 2)` and w_scale uint8
    `(experts, rows, k // 16)` row-major, w_global float32 `(experts,)`; rows % 128 == 0,
    k % 64 == 0, 16-byte aligned `w_packed`, 4-byte aligned `w_scale`.
    """
    num_tiles = cute.sym_int()
    experts = cute.sym_int()
    rows = cute.sym_int(divisibility=128)
    packed_cols = cute.sym_int(divisibility=32)
    scale_cols = cute.sym_int(divisibility=4)
    return (
        make_fake_compact_tensor(cutlass.Int32, (m_pad,), assumed_align=4),
        make_fake_compact_tensor(cutlass.Int32, (num_tiles,), assumed_align=4),
        make_fake_compact_tensor(
            cutlass.Uint8, (experts, rows, packed_cols), stride_order=(2, 1, 0), assumed_align=16
        ),
        make_fake_compact_tensor(
            cutlass.Uint8, (experts, rows, scale_cols), stride_order=(2, 1, 0), assumed_align=4
        ),
        make_fake_compact_tensor(cutlass.Float32, (experts,), assumed_align=4),
    )
