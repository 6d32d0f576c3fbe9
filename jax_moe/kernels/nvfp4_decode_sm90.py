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

* exact NVFP4 -> bf16 decode (:func:`decode_word_pair`, :func:`scale_bf16x2`,
  :func:`mul_bf16x2_half`),
* the CTA main loop (:class:`SwapAbNvfp4GemmSm90`), 128 threads (4 warps; 8 in the
  two-warpgroup wgmma tiles) running
  ``mma.sync.m16n8k16`` bf16 MMAs with fp32 accumulators. The weights never touch
  shared memory: the prepared layout stores each 16-row band K step by K step in
  the MMA's A-fragment order, so per 64-wide K step and 16-row tile a lane loads
  16 code bytes (its four fragment words) and 8 scale bytes, and decodes them
  straight into its A registers (one ``mul.rn.bf16x2`` per two elements). The
  token rows (B) are loaded in 16-byte chunks, stored to a double-buffered
  shared-memory tile and read by ``ldmatrix``. Weights and tokens are loaded
  `stages` K steps ahead, into a register ring (default) or through a cp.async
  shared-memory ring (`cp_async`; with `bulk`, the weights arrive by bulk copies of
  several K steps each, `mainloop_bulk`). The fp32 tile is then staged in shared memory
  (``s_c[q, j]``) for the epilogue, which applies the global scale.
* programmatic dependent launch (`pdl`, see :mod:`jax_moe.kernels`): the kernels
  launch with the programmatic-stream-serialization attribute, and
  :meth:`SwapAbNvfp4GemmSm90.dependency_wait` / :meth:`~SwapAbNvfp4GemmSm90.launch_dependents`
  emit ``griddepcontrol.wait`` / ``griddepcontrol.launch_dependents``. With
  ``mainloop(..., wait_before_tokens=True)`` the main loop loads its first
  `stages` K steps of weights, then waits (and triggers), then loads the token
  rows: the weights are inputs of the layer, the token rows the previous kernel's
  output.

Exactness of the decode. A prepared code word (layout in :mod:`jax_moe.prepare`)
places the three magnitude bits ``e1 e0 m`` of an e2m1 code in bf16 bits 8..6 and
its sign in bit 15 (one rotation and mask per pair, two for the last pair of a
word), which reads as ``value * 2**-126`` for every code (codes ``+-0.5`` are bf16
subnormals). A prepared scale byte (an unsigned 5-bit-exponent float) spread into
both halves of a word by one byte permute and turned into bf16 bits by
``u * 16 + (234 << 7)`` is ``scale * 2**117`` exactly, e4m3 subnormals included (at
most ``448 * 2**117 < 2**126``). Their bf16 product is ``value * scale * 2**-9``: at
most 4 + 2 significant bits and a magnitude in ``[2**-19, 5.25]``, so it is exact
and normal (blocks with a zero scale have zero codes). The epilogue multiplies
the global scale by ``2**9`` (:data:`DECODE_EXPONENT_SHIFT`), again exactly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass._mlir.dialects import llvm
from cutlass.cute.nvgpu import warpgroup
from cutlass.cute.runtime import make_fake_compact_tensor
from cutlass.cutlass_dsl import dsl_user_op
from cutlass.memory import SmemAllocator

from jax_moe.kernels.moe_gemm_config import (
    BULK_STEPS,
    BULK_TOKEN_STAGES,
    PREFETCH_STEPS,
    STREAM_K_MAX_TILES,
    TOKEN_STEPS,
    WGMMA_SMEM_ALIGN,
    swap_ab_smem_bytes,
)
from jax_moe.prepare import DECODE_TERMS, SCALE_BF16_BIAS, TILE_ROWS

__all__ = [
    "BLOCK_K",
    "DECODE_EXPONENT_SHIFT",
    "NUM_THREADS",
    "SMEM_PAD",
    "SwapAbNvfp4GemmSm90",
    "decode_word_pair",
    "fake_routed_weight_args",
    "load_global_cg_i32",
    "mul_bf16x2_half",
    "scale_bf16x2",
]

#: Reduction elements per main-loop step (4 e4m3 scales per weight row).
BLOCK_K = 64
#: Threads per CTA (4 warps; the two-warpgroup wgmma tiles have twice as many).
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
def mul_bf16x2_half(
    a: cutlass.Uint32, b: cutlass.Uint32, half: int, *, loc=None, ip=None
) -> cutlass.Uint32:
    """Packed bf16x2 product `a * (b_h, b_h)` of `a` and half `half` of `b` (0: bits
    0..15), round to nearest even, subnormal inputs honoured. ptxas folds the
    broadcast into the multiply's operand selector (`HMUL2 ..., R.H0_H0`)."""
    pack = "{lo, lo}" if int(half) == 0 else "{hi, hi}"
    return _asm_u32(
        "{ .reg .b16 lo, hi; .reg .b32 s; mov.b32 {lo, hi}, $2; "
        f"mov.b32 s, {pack}; mul.rn.bf16x2 $0, $1, s; }}",
        a,
        b,
        loc=loc,
        ip=ip,
    )


@dsl_user_op
def rotate_left(x: cutlass.Uint32, amount: int, *, loc=None, ip=None) -> cutlass.Uint32:
    """`x` rotated left by the constant `amount` bits (one funnel shift)."""
    return _asm_u32(f"shf.l.wrap.b32 $0, $1, $1, {int(amount)};", x, loc=loc, ip=ip)


@dsl_user_op
def spread_bytes(x: cutlass.Uint32, low: int, high: int, *, loc=None, ip=None) -> cutlass.Uint32:
    """Byte `low` of `x` in bits 0..7 and byte `high` in bits 16..23, zeros elsewhere
    (one `prmt.b32`)."""
    selector = 0x4040 | (int(high) << 8) | int(low)
    return _asm_u32(f"prmt.b32 $0, $1, 0, {selector};", x, loc=loc, ip=ip)


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


@dsl_user_op
def bulk_copy_g2s(
    dst: cute.Pointer, src: cute.Pointer, size, bar: cute.Pointer, *, loc=None, ip=None
) -> None:
    """`cp.async.bulk` of `size` bytes (a multiple of 16, both addresses 16-byte
    aligned) from global `src` to shared `dst`, completing as transaction bytes on
    the mbarrier `bar`."""
    operands = [
        dst.toint(loc=loc, ip=ip).ir_value(loc=loc, ip=ip),
        src.toint(loc=loc, ip=ip).ir_value(loc=loc, ip=ip),
        cutlass.Int32(size).ir_value(loc=loc, ip=ip),
        bar.toint(loc=loc, ip=ip).ir_value(loc=loc, ip=ip),
    ]
    llvm.inline_asm(
        res=None,
        operands_=operands,
        asm_string=(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes "
            "[$0], [$1], $2, [$3];"
        ),
        constraints="r,l,r,r,~{memory}",
        has_side_effects=True,
        asm_dialect=llvm.AsmDialect.AD_ATT,
        loc=loc,
        ip=ip,
    )


@dsl_user_op
def prefetch_l2(src: cute.Pointer, size: int, *, loc=None, ip=None) -> None:
    """`cp.async.bulk.prefetch.L2` of `size` bytes (a multiple of 16, 16-byte aligned)
    of global memory at `src`: a hint, nothing waits for it."""
    llvm.inline_asm(
        res=None,
        operands_=[src.toint(loc=loc, ip=ip).ir_value(loc=loc, ip=ip)],
        asm_string=f"cp.async.bulk.prefetch.L2.global [$0], {int(size)};",
        constraints="l",
        has_side_effects=True,
        asm_dialect=llvm.AsmDialect.AD_ATT,
        loc=loc,
        ip=ip,
    )


def load_global_cg_i32(tensor: cute.Tensor, index) -> cutlass.Int32:
    """`tensor[index]` of a global int32 tensor read with `ld.global.cg` (L2, not L1).

    For reads before `griddepcontrol.wait` of data written by a kernel that has
    completed (see :mod:`jax_moe.kernels`): L2 holds its writes, an SM's L1 might
    still hold a line cached before them.
    """
    address = tensor.iterator + cute.crd2idx(index, tensor.layout)
    return cute.arch.load(address.llvm_ptr, cutlass.Int32, cop="cg")


def scale_bf16x2(spread, u32=cutlass.Uint32):
    """bf16x2 `(scale_0, scale_1) * 2**117` of two prepared scale bytes.

    `spread` holds one byte in bits 0..7 and the other in bits 16..23
    (`spread_bytes`); a prepared byte `E << 3 | M` (:mod:`jax_moe.prepare`) shifted to
    bits 4..11 is the bf16 exponent `E` and mantissa `M`, so adding `234 << 7` gives
    `2**(E + 107) * (1 + M/8)`, which is the scale times `2**117` (byte 0, the zero
    scale, gives a finite value; its codes are zero). `decode_a` converts the scales
    of a fragment's two rows at once and multiplies each code pair by one half
    (`mul_bf16x2_half`). `u32` makes the constants (`cutlass.Uint32` in kernels,
    `numpy.uint32` in tests).
    """
    return spread * u32(16) + u32(SCALE_BF16_BIAS * 0x10001)


def shift_for_mask(rotation: int, mask: int) -> tuple[str, int]:
    """How `decode_word_pair` computes `rotate_left(word, rotation) & mask`: `("none",
    0)`, a plain `("left", rotation)` or `("right", 32 - rotation)` shift when `mask`
    keeps bits of only that part of the rotation (bits `rotation..31` come from the left
    shift, bits `0..rotation-1` from the right one), else `("rotate", rotation)`. The
    bits under `mask` are the same; a plain shift leaves ptxas free to issue it on the
    FMA pipe (`IMAD.SHL`) instead of the busier ALU pipe, which the funnel shift of
    `rotate_left` always takes."""
    rotation %= 32
    if rotation == 0:
        return "none", 0
    low = (1 << rotation) - 1
    if not mask & low:
        return "left", rotation
    if not mask & ~low & 0xFFFFFFFF:
        return "right", 32 - rotation
    return "rotate", rotation


def _rotate_for_mask(word: cutlass.Uint32, rotation: int, mask: int) -> cutlass.Uint32:
    kind, amount = shift_for_mask(rotation, mask)
    if kind == "none":
        return word
    if kind == "left":
        return word << cutlass.Uint32(amount)
    if kind == "right":
        return word >> cutlass.Uint32(amount)
    return rotate_left(word, amount)


def decode_word_pair(word: cutlass.Uint32, pair: int) -> cutlass.Uint32:
    """bf16x2 `value * 2**-126` of elements (2*pair, 2*pair+1) of a prepared code word.

    The OR of `rotate_left(word, r) & mask` over `jax_moe.prepare.DECODE_TERMS[pair]`
    (layout version 3; each rotation as `shift_for_mask` says): magnitude bits land in
    bf16 bits 8..6 of each half (exponent low bits and top mantissa bit) and signs in
    bit 15, which is the e2m1 value times 2**-126 for every code, subnormal codes
    included.
    """
    terms = [
        _rotate_for_mask(word, rotation, mask) & cutlass.Uint32(mask)
        for rotation, mask in DECODE_TERMS[pair]
    ]
    result = terms[0]
    for term in terms[1:]:
        result = result | term
    return result


class _Fragments(NamedTuple):
    """One thread's MMA operands and accumulator (`_fragments`)."""

    acc: cute.Tensor  # fp32 accumulator fragment
    t_sc: cute.Tensor  # this thread's partition of `s_c`
    t_ra: cute.Tensor  # A (weight) fragment ((2, 2, 2), mma_m, 4), decoded from registers
    t_rb: cute.Tensor  # B (token) fragment, loaded by ldmatrix
    s2r_b: cute.TiledCopy
    t_sb_view: cute.Tensor  # ldmatrix source view of `s_b` (trailing stage mode)
    t_rb_view: cute.Tensor


class SwapAbNvfp4GemmSm90:
    """Swap-AB NVFP4 x bf16 grouped GEMM main loop; subclasses add B loads and the epilogue.

    Compile-time parameters:
      block_w: weight rows per CTA (MMA M side), a multiple of 64.
      block_m: token rows per CTA (MMA N side) = the routing row tile, a multiple of 16.
      warps_m, warps_n: warp grid over (block_w, block_m): 4 warps (`4 x 1`, `2 x 2`),
        or `8 x 1` with `wgmma` (two warpgroups, 256 threads, each multiplying 64 of
        every 128 weight rows against the shared token tile).
      stages: K steps loaded ahead (register ring depth, or cp.async ring depth).
      cp_async: stage raw weights and token rows through a cp.async shared-memory ring
        instead of registers.
      split_k: CTAs sharing one output tile, each over a contiguous range of K steps
        (1, 2, 4 or 8; register path only). They form a thread block cluster along
        the grid's z axis; `split_views` and `split_value` give the epilogue the sum
        of their fp32 tiles in rank order (read through distributed shared memory, so
        the result does not depend on timing), and `split_done` keeps every CTA's
        shared memory alive until the whole cluster has read it.
      pdl: launch with programmatic dependent launch and emit the `griddepcontrol`
        instructions of `dependency_wait` and `launch_dependents` (no-ops when False).
      wgmma: run the MMAs as warpgroup MMAs (`wgmma.mma_async.m64nNk16`, N =
        `block_m`) with A from registers and B from shared memory, instead of
        `mma.sync.m16n8k16` with B by `ldmatrix` (`4 x 1` or `8 x 1` warps, register
        path only).
        A warp's A fragment of a 64-row wgmma tile is its 16-row band in the same
        register order as the `mma.sync` A fragment, so the decode is shared. The
        token rows are copied by cp.async into a 128-byte-swizzled ring (the wgmma
        K-major layout) of `stages + 1` steps and read by the MMA itself: no register
        ring of token rows and no `ldmatrix` (`mainloop_wgmma`).
      bulk: with `cp_async` and `4 x 1` warps, K steps per bulk copy (0: off). The
        weights and scales stream through a shared-memory ring of `stages` slots of
        `bulk` K steps each, filled by `cp.async.bulk` copies (one per 16-row band
        for the codes and one for the scales, each warp copying its own bands) that
        complete on one mbarrier per slot; the token rows go through a 3-stage
        cp.async ring (`mainloop_bulk`). Split-K is allowed.
      prefetch: with the `mma.sync` register path, K steps ahead (0: off) at which
        each warp asks L2 for its bands' weight and scale bytes
        (`cp.async.bulk.prefetch.L2`, one lane per band and array) while the register
        ring loads `stages` steps ahead: more bytes in flight from DRAM without more
        registers (`prefetch_l2_step`).
      overlap: with `wgmma`, overlap each K step's decode with the previous step's
        MMAs: one commit group per 16 columns, each slice's A registers rewritten
        once the previous step's MMAs of that slice are done (`wgmma.wait_group 3`),
        and a token ring of `stages + 2` steps (`mma_k_step`).
      tail_m: with `wgmma` (0: off), rows of the narrowest MMA: a tile whose routed rows
        fit in `j * tail_m` rows (its segment's last tile) runs the K loop with
        `m64n(j tail_m)k16` MMAs and copies only those token rows, instead of
        multiplying `block_m` rows of which the rest are padding. One K loop is
        compiled per multiple of `tail_m` up to `block_m`; the kernel picks one per
        tile (`tile_rows`).
      mbarriers: with `wgmma` (unsplit, no `overlap`), guard the token ring's stages
        with two mbarriers each instead of one CTA barrier per K step: "full" (every
        thread's copies of the stage have landed: `cp.async.mbarrier.arrive.noinc`)
        and "empty" (every warp's MMAs reading it are done). The ring is one stage
        deeper (`stages + 2`), so the stage refilled at a K step was read two steps
        back and a warpgroup waits only for the copies it reads and for the other
        one to have left the step before last (`mainloop_wgmma`).
      stream_k: CTAs per SM of a stream-K grid (0: off; `mma.sync` register path,
        16-row tiles, no split). The grid is `num_ctas` CTAs (a kernel argument, the
        FFI passes `stream_k` times the SMs); the work units are the K steps of every
        (active row tile, weight tile) pair, row tile major, and CTA `c` runs the
        contiguous `c`-th of `num_ctas` equal shares (`stream_k_share`), so each SM
        streams the same weight bytes however many experts are active. A tile whose
        K loop one CTA runs whole is written at once; a tile split between CTAs is
        written by the last of them to arrive (an arrival counter per tile in the
        workspace), which adds the partial fp32 tiles from the workspace in the order
        of their K ranges: the sum does not depend on timing. No CTA waits for
        another, so the result does not depend on how many CTAs are resident.
      token_steps: K steps of token rows per cp.async group and CTA barrier (0: off;
        `mma.sync` register path, 4 x 1 warps, a multiple of `stages`):
        `mainloop_token_ring`.

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
        pdl: bool = False,
        wgmma: bool = False,
        overlap: bool = False,
        bulk: int = 0,
        prefetch: int = 0,
        tail_m: int = 0,
        mbarriers: bool = False,
        stream_k: int = 0,
        token_steps: int = 0,
    ):
        for name, flag in (
            ("pdl", pdl),
            ("wgmma", wgmma),
            ("overlap", overlap),
            ("mbarriers", mbarriers),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}={flag!r}; expected a bool")
        if isinstance(bulk, bool) or bulk not in (0, *BULK_STEPS):
            raise ValueError(f"bulk={bulk!r}; expected 0 (off) or K steps per copy in {BULK_STEPS}")
        if isinstance(prefetch, bool) or prefetch not in (0, *PREFETCH_STEPS):
            raise ValueError(f"prefetch={prefetch!r}; expected 0 (off) or one of {PREFETCH_STEPS}")
        if prefetch and (cp_async or wgmma):
            raise ValueError("prefetch needs the mma.sync register path (cp_async=wgmma=False)")
        if prefetch and prefetch <= stages:
            raise ValueError(f"prefetch={prefetch} must exceed stages={stages}")
        if bulk and (not cp_async or (warps_m, warps_n) != (4, 1)):
            raise ValueError(
                "bulk needs the shared-memory ring (cp_async=True) and 4 x 1 warps; got "
                f"cp_async={cp_async}, warps=({warps_m}, {warps_n})"
            )
        if overlap and (not wgmma or split_k != 1):
            raise ValueError(
                f"overlap needs wgmma and split_k=1; got wgmma={wgmma}, split_k={split_k}"
            )
        if wgmma and (cp_async or (warps_m, warps_n) not in ((4, 1), (8, 1))):
            raise ValueError(
                "wgmma needs the register path (cp_async=False) and 4 x 1 or 8 x 1 warps "
                f"(one or two warpgroups over the weight rows); got cp_async={cp_async}, "
                f"warps=({warps_m}, {warps_n})"
            )
        if split_k not in (1, 2, 4, 8):
            raise ValueError(f"split_k={split_k}; expected 1, 2, 4 or 8")
        if tail_m and (
            tail_m < 0
            or not wgmma
            or split_k != 1
            or overlap
            or tail_m >= block_m
            or block_m % tail_m
            or tail_m * (BLOCK_K // 8) % (32 * warps_m * warps_n)
        ):
            raise ValueError(
                f"tail_m={tail_m}: needs wgmma without split_k or overlap, and a divisor "
                f"of block_m={block_m} below it whose token chunks per K step are a "
                "multiple of the threads"
            )
        if mbarriers and (not wgmma or split_k != 1 or overlap):
            raise ValueError(
                f"mbarriers needs wgmma without split_k or overlap; got wgmma={wgmma}, "
                f"split_k={split_k}, overlap={overlap}"
            )
        if split_k > 1 and cp_async and not bulk:
            raise ValueError("split_k > 1 needs the register path or the bulk-copy ring")
        if stream_k and (
            stream_k < 0
            or block_m != 16
            or (warps_m, warps_n) != (4, 1)
            or wgmma
            or cp_async
            or split_k != 1
            or prefetch
        ):
            raise ValueError(
                f"stream_k={stream_k}: needs the mma.sync register path with 16-row tiles, "
                "4 x 1 warps, no split_k and no prefetch"
            )
        if token_steps and (
            token_steps not in TOKEN_STEPS
            or wgmma
            or cp_async
            or stream_k
            or prefetch
            or (warps_m, warps_n) != (4, 1)
            or token_steps % stages
        ):
            raise ValueError(
                f"token_steps={token_steps}: needs the mma.sync register path with 4 x 1 warps, "
                f"no stream_k or prefetch, one of {TOKEN_STEPS} and a multiple of stages"
            )
        if warps_m * warps_n * 32 != NUM_THREADS and not (wgmma and (warps_m, warps_n) == (8, 1)):
            raise ValueError(
                f"warps_m * warps_n = {warps_m * warps_n}; expected 4 (or 8 x 1 with wgmma)"
            )
        if block_w % (16 * warps_m) or block_w % 64:
            raise ValueError(f"block_w={block_w}; expected a multiple of 64 and of 16*warps_m")
        if block_m % (16 * warps_n):
            raise ValueError(f"block_m={block_m}; expected a multiple of 16*warps_n")
        if stages < (2 if bulk else 3 if cp_async else 1):
            raise ValueError(
                f"stages={stages}; expected >= 1 (register prefetch depth), >= 3 (cp.async "
                "ring) or >= 2 (bulk-copy slots)"
            )
        self.stages = stages
        self.cp_async = cp_async
        self.pdl = pdl
        self.wgmma = wgmma
        self.overlap = overlap
        self.bulk = bulk
        self.prefetch = prefetch
        self.tail_m = tail_m
        self.mbarriers = mbarriers
        self.stream_k = stream_k
        self.token_steps = token_steps
        self.split_k = split_k
        self.block_w = block_w
        self.block_m = block_m
        self.warps_m = warps_m
        self.warps_n = warps_n
        # Threads of a CTA: one warpgroup, or two with `8 x 1` wgmma warps.
        self.num_threads = 32 * warps_m * warps_n
        # 16-byte cp.async copies of one K step's packed weight bytes per thread.
        self.w_units = block_w * 2 // self.num_threads
        # 16-row MMA tiles of weights per warp (the A fragments' M mode).
        self.mma_m = block_w // (16 * warps_m)
        # Stages of the shared-memory token tile: double-buffered with register
        # prefetch (one barrier per K step), the ring depth with cp.async.
        self.b_stages = stages if cp_async else 2
        if bulk:
            self.b_stages = BULK_TOKEN_STAGES
        if token_steps:
            # Two groups of `token_steps` K steps: one being read, one being filled.
            self.b_stages = 2 * token_steps
        if wgmma:
            # Token rows: a cp.async ring one step deeper than the weights' lookahead
            # (two with `overlap`: the previous step's MMAs may still read its stage;
            # two with `mbarriers`: the other warpgroup may still read it).
            self.b_stages = stages + (2 if overlap or mbarriers else 1)
        # Token work units: 16-byte chunks (8 bf16) of a token row's 64-wide K step.
        self.b_chunks = max(1, block_m * (BLOCK_K // 8) // self.num_threads)
        if block_m * (BLOCK_K // 8) % self.num_threads:
            raise ValueError(
                f"block_m={block_m}; expected block_m * 8 to be a multiple of {self.num_threads}"
            )

    # ------------------------------------------------------------------ layouts
    def smem_bytes(self) -> int:
        """Dynamic shared memory of one CTA (`_allocate_smem`)."""
        return swap_ab_smem_bytes(
            self.block_w,
            self.block_m,
            self.stages,
            self.cp_async,
            self.wgmma,
            self.overlap,
            self.bulk,
            self.mbarriers,
            self.stream_k,
            self.token_steps,
        )

    def _allocate_smem(self, smem):
        """(s_b, s_c, s_raw, s_scale, bars); s_b has a trailing stage mode (`b_stages`),
        s_raw/s_scale are None without the cp.async pipeline (with `bulk`, each stage
        holds `bulk` K steps), `bars` None without `bulk` or `mbarriers` (one mbarrier
        per weight slot with `bulk`; with `mbarriers`, the token ring's "full"
        mbarriers, one per stage, then its "empty" ones)."""
        c_layout = cute.make_layout((self.block_w, self.block_m), stride=(1, self.block_w + 4))
        if cutlass.const_expr(self.wgmma):
            # K-major, 128-byte swizzle (one 64-wide K step of a token row is 128 bytes).
            atom = warpgroup.make_smem_layout_atom(
                warpgroup.SmemLayoutAtomKind.K_SW128, cutlass.BFloat16
            )
            layout = cute.tile_to_shape(
                atom, (self.block_m, BLOCK_K, self.b_stages), order=(0, 1, 2)
            )
            # The fp32 tile is written only after the K loop of `mainloop_wgmma`, when
            # the token ring is dead: both share one buffer.
            base = smem.allocate(
                max(cute.cosize(layout.outer) * 2, cute.cosize(c_layout) * 4), WGMMA_SMEM_ALIGN
            )
            s_b = cute.make_tensor(
                cute.recast_ptr(base, layout.inner, dtype=cutlass.BFloat16), layout.outer
            )
            s_c = cute.make_tensor(cute.recast_ptr(base, dtype=cutlass.Float32), c_layout)
        elif cutlass.const_expr(self.token_steps > 0):
            # The fp32 tile is written only after the K loop (`mainloop_token_ring`), when
            # the token ring is dead: both share one buffer.
            row = BLOCK_K + SMEM_PAD
            layout = cute.make_layout(
                (self.block_m, BLOCK_K, self.b_stages), stride=(row, 1, row * self.block_m)
            )
            base = smem.allocate(max(cute.cosize(layout) * 2, cute.cosize(c_layout) * 4), 16)
            s_b = cute.make_tensor(cute.recast_ptr(base, dtype=cutlass.BFloat16), layout)
            s_c = cute.make_tensor(cute.recast_ptr(base, dtype=cutlass.Float32), c_layout)
        else:
            row = BLOCK_K + SMEM_PAD
            s_b = smem.allocate_tensor(
                cutlass.BFloat16,
                cute.make_layout(
                    (self.block_m, BLOCK_K, self.b_stages), stride=(row, 1, row * self.block_m)
                ),
                16,
            )
            s_c = smem.allocate_tensor(cutlass.Float32, c_layout, 16)
        s_raw = None
        s_scale = None
        bars = None
        if self.cp_async:
            steps = max(1, self.bulk)
            s_raw = smem.allocate_tensor(
                cutlass.Uint8, cute.make_layout((self.block_w * 32 * steps, self.stages)), 16
            )
            s_scale = smem.allocate_tensor(
                cutlass.Uint8, cute.make_layout((self.block_w * 4 * steps, self.stages)), 16
            )
        if self.bulk:
            bars = smem.allocate_array(cutlass.Int64, self.stages, byte_alignment=8)
        if self.mbarriers:
            bars = smem.allocate_array(cutlass.Int64, 2 * self.b_stages, byte_alignment=8)
        return s_b, s_c, s_raw, s_scale, bars

    def _tiled_mma(self, rows: int = 0):
        """The tiled MMA; with `wgmma`, over `rows` token rows (default `block_m`)."""
        if cutlass.const_expr(self.wgmma):
            op = warpgroup.MmaF16BF16Op(
                cutlass.BFloat16,
                cutlass.Float32,
                (64, rows or self.block_m, 16),
                warpgroup.OperandSource.RMEM,
                cute.nvgpu.OperandMajorMode.K,
                cute.nvgpu.OperandMajorMode.K,
            )
            # One 64-row MMA atom per warpgroup along the weight rows.
            return cute.make_tiled_mma(cute.make_mma_atom(op), (self.warps_m // 4, 1, 1))
        op = cute.nvgpu.warp.MmaF16BF16Op(cutlass.BFloat16, cutlass.Float32, (16, 8, 16))
        return cute.make_tiled_mma(
            op,
            cute.make_layout((self.warps_m, self.warps_n, 1)),
            permutation_mnk=(self.warps_m * 16, self.warps_n * 16, 16),
        )

    def _fragments(self, tiled_mma, tidx, s_b, s_c) -> _Fragments:
        """This thread's MMA fragments, the ldmatrix copy of B and a zeroed fp32 accumulator."""
        thr_mma = tiled_mma.get_slice(tidx)
        a_shape = tiled_mma.partition_shape_A((self.block_w, BLOCK_K))
        t_ra = tiled_mma.make_fragment_A(a_shape)
        t_sc = thr_mma.partition_C(s_c)
        acc = tiled_mma.make_fragment_C(t_sc)
        acc.fill(0.0)
        if cutlass.const_expr(self.wgmma):
            # B: shared-memory descriptors of every stage.
            tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
            return _Fragments(
                acc=acc,
                t_sc=t_sc,
                t_ra=t_ra,
                t_rb=tiled_mma.make_fragment_B(thr_mma.partition_B(s_b)),
                s2r_b=None,
                t_sb_view=None,
                t_rb_view=None,
            )
        t_rb = tiled_mma.make_fragment_B(thr_mma.partition_B(s_b[None, None, 0]))
        ldmatrix = cute.make_copy_atom(
            cute.nvgpu.warp.LdMatrix8x8x16bOp(False, 4), cutlass.BFloat16
        )
        s2r_b = cute.make_tiled_copy_B(ldmatrix, tiled_mma)
        thr_s2r_b = s2r_b.get_slice(tidx)
        return _Fragments(
            acc=acc,
            t_sc=t_sc,
            t_ra=t_ra,
            t_rb=t_rb,
            s2r_b=s2r_b,
            t_sb_view=thr_s2r_b.partition_S(s_b),
            t_rb_view=thr_s2r_b.retile(t_rb),
        )

    @cute.jit
    def decode_a(self, r_codes: cute.Tensor, r_scales: cute.Tensor, t_ra: cute.Tensor, kb: int):
        """Decodes the A fragments of the K step's 16 columns `kb` into `t_ra[None, None, kb]`.

        `r_codes` `(16, mma_m)` and `r_scales` `(8, mma_m)` hold this lane's bytes of
        each 16-row tile (`load_a_step`): code word `kb` is the fragment's four bf16x2
        registers (rows g, g+8, g, g+8), scale bytes `2kb` and `2kb+1` the scales of
        rows g and g+8, converted together (one `spread_bytes` and one `scale_bf16x2`
        per code word) and applied half by half (`mul_bf16x2_half`). Each element is
        `e2m1 * e4m3 * 2**-DECODE_EXPONENT_SHIFT`, exact.
        """
        for mi in cutlass.range_constexpr(self.mma_m):
            word = cute.recast_tensor(r_codes[None, mi], cutlass.Uint32)[kb]
            scale_word = cute.recast_tensor(r_scales[None, mi], cutlass.Uint32)[kb // 2]
            row_scales = scale_bf16x2(spread_bytes(scale_word, 2 * (kb % 2), 2 * (kb % 2) + 1))
            dst = cute.recast_tensor(t_ra[None, mi, kb], cutlass.Uint32)
            for p in cutlass.range_constexpr(4):
                dst[p] = mul_bf16x2_half(decode_word_pair(word, p), row_scales, p % 2)

    @cute.jit
    def wgmma_slice(self, tiled_mma: cute.TiledMma, frags: _Fragments, kb: int, stage: Any):
        """Issues the warpgroup MMAs of columns `16 kb .. 16 kb + 15` of a K step: the
        decoded A registers of slice `kb` times stage `stage` of the token ring."""
        cute.gemm(
            tiled_mma,
            frags.acc,
            frags.t_ra[None, None, kb],
            frags.t_rb[None, None, kb, stage],
            frags.acc,
        )

    @cute.jit
    def mma_k_step(
        self,
        tiled_mma: cute.TiledMma,
        frags: _Fragments,
        r_codes: cute.Tensor,
        r_scales: cute.Tensor,
        stage: Any,
    ):
        """Accumulates one K step into `frags.acc`: per 16 columns, the token fragments
        by ldmatrix from stage `stage` of `s_b`, the weight fragments decoded from
        registers (`decode_a`), then the MMAs.

        With `wgmma` (the caller has waited for the previous step's MMAs, which read
        the A registers about to be rewritten): decodes the K step's four A fragments,
        then issues four warpgroup MMAs per 64-row tile reading stage `stage` of `s_b`
        as one commit group. (Two A buffers, decoding one step while the other's MMAs
        run, make ptxas serialize the MMAs: its C7513 warning.)

        With `overlap` (the caller has not waited): per 16 columns, wait until at most
        3 commit groups are pending, so the previous step's MMAs of these columns (4
        groups back) are done and their A registers free, decode them, then issue
        this slice's MMAs as its own commit group; the decode of a slice runs while
        the previous step's later slices and this step's earlier ones multiply.
        """
        if cutlass.const_expr(self.overlap):
            t_ra = frags.t_ra
            for kb in cutlass.range_constexpr(BLOCK_K // 16):
                warpgroup.wait_group(BLOCK_K // 16 - 1)
                self.decode_a(r_codes, r_scales, t_ra, kb)
                warpgroup.fence()
                self.wgmma_slice(tiled_mma, frags, kb, stage)
                warpgroup.commit_group()
            return
        if cutlass.const_expr(self.wgmma):
            t_ra = frags.t_ra
            for kb in cutlass.range_constexpr(BLOCK_K // 16):
                self.decode_a(r_codes, r_scales, t_ra, kb)
            warpgroup.fence()
            for kb in cutlass.range_constexpr(BLOCK_K // 16):
                self.wgmma_slice(tiled_mma, frags, kb, stage)
            warpgroup.commit_group()
            return
        for kb in cutlass.range_constexpr(BLOCK_K // 16):
            cute.copy(
                frags.s2r_b,
                frags.t_sb_view[None, None, kb, stage],
                frags.t_rb_view[None, None, kb],
            )
            self.decode_a(r_codes, r_scales, frags.t_ra, kb)
            cute.gemm(
                tiled_mma,
                frags.acc,
                frags.t_ra[None, None, kb],
                frags.t_rb[None, None, kb],
                frags.acc,
            )

    def launch_kernel(
        self,
        kernel_args: tuple,
        w_packed: cute.Tensor,
        tile_expert: cute.Tensor,
        stream: cuda.CUstream,
        num_ctas: cutlass.Int32,
    ) -> None:
        """Launches `self.kernel(*kernel_args, tiled_mma)` on `stream`.

        Grid: `(w_packed.shape[1] / block_w, len(tile_expert), split_k)` CTAs of
        `num_threads` threads with `smem_bytes()` of dynamic shared memory; with
        `split_k > 1`, clusters of `(1, 1, split_k)`; with `stream_k`, `(num_ctas, 1, 1)`
        (`num_ctas` is ignored otherwise). With `pdl`, the launch allows
        programmatic stream serialization (the kernel may start before the previous
        one on the stream has finished; it must call `dependency_wait`).
        """
        tiled_mma = self._tiled_mma()
        num_w_tiles = w_packed.shape[1] // self.block_w
        num_row_tiles = tile_expert.shape[0]
        if cutlass.const_expr(self.split_k > 1):
            self.kernel(*kernel_args, tiled_mma).launch(
                grid=(num_w_tiles, num_row_tiles, self.split_k),
                block=(self.num_threads, 1, 1),
                cluster=(1, 1, self.split_k),
                smem=self.smem_bytes(),
                stream=stream,
                use_pdl=self.pdl,
            )
        elif cutlass.const_expr(self.stream_k > 0):
            # `stream_k` CTAs must fit on an SM at once: ptxas caps the registers.
            self.kernel(*kernel_args, tiled_mma).launch(
                grid=(num_ctas, 1, 1),
                block=(self.num_threads, 1, 1),
                smem=self.smem_bytes(),
                stream=stream,
                use_pdl=self.pdl,
                min_blocks_per_mp=self.stream_k,
                preferred_smem_carveout=100,
            )
        else:
            self.kernel(*kernel_args, tiled_mma).launch(
                grid=(num_w_tiles, num_row_tiles, 1),
                block=(self.num_threads, 1, 1),
                smem=self.smem_bytes(),
                stream=stream,
                use_pdl=self.pdl,
            )

    # ------------------------------------------------------------------ dependent launch
    def dependency_wait(self) -> None:
        """`griddepcontrol.wait` with `pdl`: blocks until the previous kernel on the stream
        has completed and its writes are visible (returns at once without a PDL launch).
        Must precede every read of the previous kernel's output and every global write."""
        if cutlass.const_expr(self.pdl):
            cute.arch.griddepcontrol_wait()

    def read_before_wait(self, tensor: cute.Tensor, index) -> cutlass.Int32:
        """`tensor[index]` (int32) for a read before `dependency_wait` of data written by a
        kernel that has completed once this one runs (two or more kernels back).

        With `pdl` the load is `ld.global.cg`: it reads L2, where the finished kernel's
        writes are, and never an L1 line cached before them. Without `pdl`, a plain read.
        """
        if cutlass.const_expr(self.pdl):
            return load_global_cg_i32(tensor, index)
        return tensor[index]

    def launch_dependents(self) -> None:
        """`griddepcontrol.launch_dependents` with `pdl`: the next kernel may start once every
        CTA has issued it or exited. Issued only after `dependency_wait`."""
        if cutlass.const_expr(self.pdl):
            cute.arch.griddepcontrol_launch_dependents()

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

    # ------------------------------------------------------------------ stream-K
    def stream_k_smem(self, smem) -> tuple:
        """`(s_list, s_warp)`: the list of active row tiles (`STREAM_K_MAX_TILES` int32)
        and one int32 per warp."""
        s_list = smem.allocate_tensor(cutlass.Int32, cute.make_layout((STREAM_K_MAX_TILES,)), 16)
        s_warp = smem.allocate_tensor(cutlass.Int32, cute.make_layout((8,)), 16)
        return s_list, s_warp

    @cute.jit
    def stream_k_tiles(
        self, tile_expert: cute.Tensor, s_list: cute.Tensor, s_warp: cute.Tensor, tidx
    ) -> cutlass.Int32:
        """Lists the row tiles `t` with `tile_expert[t] >= 0` in ascending order in
        `s_list` and returns their number (in every thread; synchronized)."""
        n = tile_expert.shape[0]
        lane = tidx % 32
        warp = tidx // 32
        count = cutlass.Int32(0)
        for base in cutlass.range(0, n, self.num_threads, unroll=1):
            i = base + tidx
            expert = cutlass.Int32(-1)
            if i < n:
                expert = tile_expert[i]
            mask = cute.arch.vote_ballot_sync(expert >= 0)
            if lane == 0:
                s_warp[warp] = cute.arch.popc(mask)
            cute.arch.sync_threads()
            before = count
            total = count
            for w in cutlass.range_constexpr(self.num_threads // 32):
                in_warp = s_warp[w]
                if w < warp:
                    before = before + in_warp
                total = total + in_warp
            if expert >= 0:
                below = mask & ((cutlass.Int32(1) << lane) - cutlass.Int32(1))
                position = before + cute.arch.popc(below)
                if position < STREAM_K_MAX_TILES:
                    s_list[position] = i
            count = total
            cute.arch.sync_threads()
        return count

    def stream_k_share(self, cta, units, ctas) -> tuple:
        """`(begin, end)`: the work units of CTA `cta` when `units` are cut into `ctas`
        contiguous shares whose sizes differ by at most one (the larger ones first)."""
        base = units // ctas
        rem = units - base * ctas
        begin = cta * base + cutlass.min(cta, rem)
        end = (cta + 1) * base + cutlass.min(cta + 1, rem)
        return begin, end

    @cute.jit
    def stream_k_owner(self, unit, units, ctas) -> cutlass.Int32:
        """The CTA whose share (`stream_k_share`, `units >= ctas`) holds work unit `unit`."""
        base = units // ctas
        rem = units - base * ctas
        owner = unit // (base + 1)
        if unit >= rem * (base + 1):
            owner = rem + (unit - rem * (base + 1)) // base
        return owner

    @cute.jit
    def stream_k_store(self, s_c: cute.Tensor, partials: cute.Tensor, slot, tidx):
        """Writes the fp32 tile in `s_c` to partial tile `slot` of the workspace
        (element `q + j * block_w` for `s_c[q, j]`; consecutive threads, consecutive q)."""
        words = self.block_m * self.block_w
        for it in cutlass.range_constexpr(words // self.num_threads):
            i = it * self.num_threads + tidx
            partials[slot * words + i] = s_c[i % self.block_w, i // self.block_w]

    @cute.jit
    def stream_k_arrive(
        self, workspace: cute.Tensor, pair, segments, tidx, s_warp: cute.Tensor
    ) -> cutlass.Boolean:
        """Counts this CTA's part of tile `pair` as done (after its partial tile is
        written) and returns whether it was the last of the tile's `segments` parts.

        One thread adds to the tile's counter with acquire-release semantics at GPU
        scope, after a CTA barrier that orders every thread's partial stores before it:
        the last CTA then sees every other CTA's partial tile.
        """
        cute.arch.sync_threads()
        if tidx == 0:
            counter = workspace.iterator + pair
            s_warp[0] = cute.arch.atomic_add(
                counter.llvm_ptr, cutlass.Int32(1), sem="acq_rel", scope="gpu"
            )
        cute.arch.sync_threads()
        arrived = s_warp[0]
        cute.arch.sync_threads()
        return arrived == segments - 1

    @cute.jit
    def stream_k_sum(
        self,
        s_c: cute.Tensor,
        partials: cute.Tensor,
        pair,
        k_steps,
        units,
        ctas,
        tidx,
    ):
        """Writes to `s_c` the sum of tile `pair`'s partial tiles, added in the order of
        the CTAs that wrote them (the order of their K ranges). CTA `c`'s part is its
        partial slot `2 c` if the tile is the first it touches, else `2 c + 1`. Loads
        go to L2 (`ld.global.cg`): other SMs wrote the partial tiles."""
        words = self.block_m * self.block_w
        per_thread = words // self.num_threads
        first = self.stream_k_owner(pair * k_steps, units, ctas)
        last = self.stream_k_owner(pair * k_steps + k_steps - 1, units, ctas)
        sums = cute.make_rmem_tensor((per_thread,), cutlass.Float32)
        for c in cutlass.range(first, last + 1, unroll=1):
            begin, _ = self.stream_k_share(c, units, ctas)
            slot = 2 * c + cutlass.min(pair - begin // k_steps, 1)
            for it in cutlass.range_constexpr(per_thread):
                i = it * self.num_threads + tidx
                address = partials.iterator + (slot * words + i)
                value = cute.arch.load(address.llvm_ptr, cutlass.Float32, cop="cg")
                if c == first:
                    sums[it] = value
                else:
                    sums[it] = sums[it] + value
        for it in cutlass.range_constexpr(per_thread):
            i = it * self.num_threads + tidx
            s_c[i % self.block_w, i // self.block_w] = sums[it]
        cute.arch.sync_threads()

    @cute.jit
    def stream_k_run(
        self,
        m_b: cute.Tensor,
        m_packed: cute.Tensor,
        m_scale: cute.Tensor,
        sorted_slots: cute.Tensor,
        tile_expert: cute.Tensor,
        workspace: cute.Tensor,
        num_ctas: cutlass.Int32,
        tidx,
        tiled_mma: cute.TiledMma,
        out: tuple,
    ):
        """The stream-K kernel body (class docstring): this CTA's share of the work
        units, one K range of one (row tile, weight tile) pair at a time.

        Subclasses define `tile_b_rows(sorted_slots, row0, tidx, out)` (the token chunks'
        source rows of a row tile) and `tile_epilogue(s_c, sorted_slots, row0, w_tile,
        expert, tidx, out)`. `workspace` (int32) holds one arrival counter per pair,
        zero at launch, then the partial tiles (`stream_k_workspace_words`).
        """
        cta, _, _ = cute.arch.block_idx()
        smem = SmemAllocator()
        s_b, s_c, _, _, _ = self._allocate_smem(smem)
        s_list, s_warp = self.stream_k_smem(smem)
        active = self.stream_k_tiles(tile_expert, s_list, s_warp, tidx)
        w_tiles = m_packed.shape[1] // self.block_w
        k_steps = m_packed.shape[2] // (BLOCK_K // 2)
        units = active * w_tiles * k_steps
        ctas = cutlass.min(num_ctas, units)
        counters = (tile_expert.shape[0] * w_tiles + 3) // 4 * 4
        partials = cute.make_tensor(
            cute.recast_ptr(workspace.iterator + counters, dtype=cutlass.Float32),
            cute.make_layout((2 * ctas * self.block_m * self.block_w,)),
        )
        if cta < ctas:
            begin, end = self.stream_k_share(cta, units, ctas)
            first_pair = begin // k_steps
            unit = begin
            while unit < end:
                pair = unit // k_steps
                k_begin = unit - pair * k_steps
                k_end = cutlass.min(k_steps, k_begin + (end - unit))
                row_tile = s_list[pair // w_tiles]
                w_tile = pair - (pair // w_tiles) * w_tiles
                expert = tile_expert[row_tile]
                row0 = row_tile * self.block_m
                b_rows = self.tile_b_rows(sorted_slots, row0, tidx, out)
                self.mainloop_registers(
                    m_b,
                    b_rows,
                    m_packed,
                    m_scale,
                    expert,
                    w_tile * self.block_w,
                    tidx,
                    s_b,
                    s_c,
                    tiled_mma,
                    False,
                    (k_begin, k_end),
                )
                if k_end - k_begin == k_steps:
                    self.tile_epilogue(s_c, sorted_slots, row0, w_tile, expert, tidx, out)
                else:
                    slot = 2 * cta + cutlass.min(pair - first_pair, 1)
                    self.stream_k_store(s_c, partials, slot, tidx)
                    first = self.stream_k_owner(pair * k_steps, units, ctas)
                    last = self.stream_k_owner(pair * k_steps + k_steps - 1, units, ctas)
                    if self.stream_k_arrive(workspace, pair, last - first + 1, tidx, s_warp):
                        self.stream_k_sum(s_c, partials, pair, k_steps, units, ctas, tidx)
                        self.tile_epilogue(s_c, sorted_slots, row0, w_tile, expert, tidx, out)
                # The next pair's main loop rewrites `s_c` and the token tile.
                cute.arch.sync_threads()
                unit = unit + (k_end - k_begin)

    # ------------------------------------------------------------------ main loop
    def weight_tiles(self, m_packed: cute.Tensor, m_scale: cute.Tensor, expert: cutlass.Int32):
        """(codes, scales) of `expert` viewed as `(step block, K step, 16-row band)`.

        The prepared arrays are tiled (:mod:`jax_moe.prepare`): band `b` stores its 16
        rows K step by K step, so one step of a band is a contiguous block of 512 code
        bytes and 64 scale bytes, both in MMA A-fragment order (lane `l`'s code bytes
        at `16 * l`, lane group `g`'s scale bytes at `8 * g`).
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

    def first_band(self, w_row0: cutlass.Int32, tidx: cutlass.Int32) -> cutlass.Int32:
        """The 16-row band of this warp's first MMA tile; tile `mi` is band `+ mi * warps_m`."""
        return w_row0 // TILE_ROWS + (tidx // 32) % self.warps_m

    @cute.jit
    def load_a_step(
        self,
        tiles: tuple,
        band0: cutlass.Int32,
        k_step: cutlass.Int32,
        tidx: cutlass.Int32,
        r_codes: cute.Tensor,
        r_scales: cute.Tensor,
    ):
        """Loads this lane's code and scale bytes of one K step of its MMA tiles.

        `tiles` is `weight_tiles(...)`, `band0` is `first_band(...)`. Per tile: 16
        code bytes at `16 * lane` and 8 scale bytes at `8 * (lane // 4)` of the
        band's block (fragment order, :mod:`jax_moe.prepare`); a warp's loads of a
        tile are one contiguous 512-byte block (64 bytes of scales).
        """
        codes, scales = tiles
        lane = tidx % 32
        for mi in cutlass.range_constexpr(self.mma_m):
            band = band0 + mi * self.warps_m
            src = cute.local_tile(codes[None, k_step, band], (16,), (lane,))
            cute.autovec_copy(src, r_codes[None, mi])
            ssrc = cute.local_tile(scales[None, k_step, band], (8,), (lane // 4,))
            cute.autovec_copy(ssrc, r_scales[None, mi])

    @cute.jit
    def prefetch_l2_step(
        self, tiles: tuple, band0: cutlass.Int32, k_step: cutlass.Int32, tidx: cutlass.Int32
    ):
        """L2 prefetch of K step `k_step` of this warp's bands: lane `2 * mi` asks for the
        512 code bytes of its tile `mi`, lane `2 * mi + 1` for the 64 scale bytes."""
        codes, scales = tiles
        lane = tidx % 32
        for mi in cutlass.range_constexpr(self.mma_m):
            crd = (0, k_step, band0 + mi * self.warps_m)
            if lane == 2 * mi:
                prefetch_l2(codes.iterator + cute.crd2idx(crd, codes.layout), 512)
            if lane == 2 * mi + 1:
                prefetch_l2(scales.iterator + cute.crd2idx(crd, scales.layout), 64)

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
            chunk = c * self.num_threads + tidx
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
            chunk = c * self.num_threads + tidx
            if chunk < self.block_m * (BLOCK_K // 8):
                row = chunk // (BLOCK_K // 8)
                col = chunk % (BLOCK_K // 8)
                dst = cute.local_tile(s_b[row, None], (8,), (col,))
                cute.autovec_copy(r_b[None, c], dst)

    def k_range(self, m_packed: cute.Tensor) -> tuple:
        """`(k_begin, k_end)`: this CTA's K steps (all of them, or its split's share; a
        split past the end gets an empty range)."""
        num_k_steps = m_packed.shape[2] // (BLOCK_K // 2)
        k_begin = cutlass.Int32(0)
        k_end = num_k_steps
        if cutlass.const_expr(self.split_k > 1):
            per_split = (num_k_steps + self.split_k - 1) // self.split_k
            k_begin = self.split_rank() * per_split
            k_end = cutlass.min(k_begin + per_split, num_k_steps)
        return k_begin, k_end

    def weight_ring(self) -> tuple:
        """`(r_codes, r_scales, cur_codes, cur_scales)`: the register ring of `stages` K
        steps of this lane's weight bytes (`load_a_step`) and the step being decoded."""
        return (
            cute.make_rmem_tensor((16, self.mma_m, self.stages), cutlass.Uint8),
            cute.make_rmem_tensor((8, self.mma_m, self.stages), cutlass.Uint8),
            cute.make_rmem_tensor((16, self.mma_m), cutlass.Uint8),
            cute.make_rmem_tensor((8, self.mma_m), cutlass.Uint8),
        )

    @cute.jit
    def fill_weight_ring(self, tiles: tuple, band0, tidx, ring: tuple, k_begin, last):
        """Loads K steps `k_begin .. k_begin + stages - 1` (clamped to `last`) into the
        slots of `ring` (`weight_ring`)."""
        r_codes, r_scales = ring[0], ring[1]
        for d in cutlass.range_constexpr(self.stages):
            first = cutlass.min(k_begin + d, last)
            self.load_a_step(
                tiles, band0, first, tidx, r_codes[None, None, d], r_scales[None, None, d]
            )

    @cute.jit
    def refill_weight_slot(self, tiles: tuple, band0, tidx, ring: tuple, slot: int, ahead):
        """Copies slot `slot` of `ring` (`weight_ring`) to the step being decoded, then
        loads K step `ahead` into the slot."""
        r_codes, r_scales, cur_codes, cur_scales = ring
        cute.autovec_copy(r_codes[None, None, slot], cur_codes)
        cute.autovec_copy(r_scales[None, None, slot], cur_scales)
        self.load_a_step(
            tiles, band0, ahead, tidx, r_codes[None, None, slot], r_scales[None, None, slot]
        )

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
        s_b: cute.Tensor,
        s_c: cute.Tensor,
        tiled_mma: cute.TiledMma,
        wait_before_tokens: bool = False,
        k_bounds: Any = None,
    ):
        """Runs the K loop and leaves the fp32 tile in `s_c` (synchronized).

        With split-K, this CTA covers K steps `[k_begin, k_end)` of its rank; a rank
        past the end accumulates nothing (its tile is zero). `k_bounds` (stream-K): the
        non-empty `(k_begin, k_end)` to run instead. With `wait_before_tokens`
        (and `pdl`), the first `stages` K steps of weights are loaded, then the CTA
        waits for the previous kernel and triggers its dependents, then loads tokens.
        """
        if cutlass.const_expr(k_bounds is None):
            k_begin, k_end = self.k_range(m_packed)
        else:
            k_begin, k_end = k_bounds
        # Loads ahead of the last K step of this CTA's range re-read that step (an L1/L2
        # hit) instead of streaming the next split's weights a second time.
        last = k_end - 1
        depth = self.stages
        ring = self.weight_ring()
        r_codes, r_scales, cur_codes, cur_scales = ring
        r_b = cute.make_rmem_tensor((8, self.b_chunks, depth), cutlass.BFloat16)

        frags = self._fragments(tiled_mma, tidx, s_b, s_c)
        tiles = self.weight_tiles(m_packed, m_scale, expert)
        band0 = self.first_band(w_row0, tidx)

        # L2 prefetch: steps `depth .. prefetch - 1` before the loop, then step
        # `k + prefetch` at step k (clamped to this CTA's last step).
        if cutlass.const_expr(self.prefetch > 0):
            for d in cutlass.range_constexpr(depth, self.prefetch):
                self.prefetch_l2_step(tiles, band0, cutlass.min(k_begin + d, last), tidx)

        # Register ring of `depth` K steps: step k lives in buffer k % depth; the loop is
        # unrolled by `depth` so every buffer index is a compile-time constant. The token
        # tile alternates between two shared-memory stages, so one barrier per step
        # suffices: a stage is rewritten only after every warp passed the next barrier.
        if cutlass.const_expr(self.pdl and wait_before_tokens):
            self.fill_weight_ring(tiles, band0, tidx, ring, k_begin, last)
            self.dependency_wait()
            self.launch_dependents()
            for d in cutlass.range_constexpr(depth):
                first = cutlass.min(k_begin + d, last)
                self.load_b_step(m_b, b_rows, first, tidx, r_b[None, None, d])
        else:
            for d in cutlass.range_constexpr(depth):
                first = cutlass.min(k_begin + d, last)
                self.load_a_step(
                    tiles, band0, first, tidx, r_codes[None, None, d], r_scales[None, None, d]
                )
                self.load_b_step(m_b, b_rows, first, tidx, r_b[None, None, d])
        for k_group in cutlass.range(k_begin, k_end, depth, unroll=1):
            for d in cutlass.range_constexpr(depth):
                k_step = k_group + d
                if k_step < k_end:
                    stage = (k_step - k_begin) % 2
                    self.store_b_step(tidx, r_b[None, None, d], s_b[None, None, stage])
                    cute.arch.sync_threads()
                    ahead = cutlass.min(k_step + depth, last)
                    self.refill_weight_slot(tiles, band0, tidx, ring, d, ahead)
                    self.load_b_step(m_b, b_rows, ahead, tidx, r_b[None, None, d])
                    if cutlass.const_expr(self.prefetch > 0):
                        far = cutlass.min(k_step + self.prefetch, last)
                        self.prefetch_l2_step(tiles, band0, far, tidx)
                    self.mma_k_step(tiled_mma, frags, cur_codes, cur_scales, stage)

        cute.autovec_copy(frags.acc, frags.t_sc)
        cute.arch.sync_threads()

    @cute.jit
    def mainloop_token_ring(
        self,
        m_b: cute.Tensor,
        b_rows: cute.Tensor,
        m_packed: cute.Tensor,
        m_scale: cute.Tensor,
        expert: cutlass.Int32,
        w_row0: cutlass.Int32,
        tidx: cutlass.Int32,
        s_b: cute.Tensor,
        s_c: cute.Tensor,
        tiled_mma: cute.TiledMma,
        wait_before_tokens: bool = False,
    ):
        """`mainloop_registers` with the token rows copied by cp.async, `token_steps` K
        steps per group, and one CTA barrier per group; leaves the fp32 tile in `s_c`
        (synchronized), which shares its memory with `s_b`.

        `s_b` holds two groups: group `n` of this CTA's range (counted from `k_begin`)
        goes to stages `(n % 2) * token_steps ..`. At the start of group `n` every
        thread waits for its copies of the group, then one barrier: every thread's
        copies have landed, and every warp is done with group `n - 1`, whose stages
        then take the copies of group `n + 1`. Chunks of padding rows (`b_rows[c] < 0`)
        are zeroed in every stage once and never copied. The weights stream through
        the register ring of `stages` K steps as in `mainloop_registers`
        (`token_steps` is a multiple of `stages`, so a step's ring slot is a
        compile-time index within its group).
        """
        k_begin, k_end = self.k_range(m_packed)
        last = k_end - 1
        depth = self.stages
        group = self.token_steps
        ring = self.weight_ring()
        cur_codes, cur_scales = ring[2], ring[3]
        frags = self._fragments(tiled_mma, tidx, s_b, s_c)
        tiles = self.weight_tiles(m_packed, m_scale, expert)
        band0 = self.first_band(w_row0, tidx)

        zero = cute.make_rmem_tensor((8,), cutlass.BFloat16)
        zero.fill(0.0)
        for c in cutlass.range_constexpr(self.b_chunks):
            if b_rows[c] < 0:
                chunk = c * self.num_threads + tidx
                row = chunk // (BLOCK_K // 8)
                col = chunk % (BLOCK_K // 8)
                for st in cutlass.range_constexpr(self.b_stages):
                    cute.autovec_copy(zero, cute.local_tile(s_b[row, None, st], (8,), (col,)))
        self.fill_weight_ring(tiles, band0, tidx, ring, k_begin, last)
        if cutlass.const_expr(self.pdl and wait_before_tokens):
            self.dependency_wait()
            self.launch_dependents()
        for d in cutlass.range_constexpr(group):
            step = cutlass.min(k_begin + d, last)
            self.issue_step_cp_async(
                m_b, b_rows, tiles, w_row0, step, d, tidx, s_b, None, None, False, True
            )
        cute.arch.cp_async_commit_group()

        for k_group in cutlass.range(k_begin, k_end, group, unroll=1):
            half = ((k_group - k_begin) // group) % 2
            cute.arch.cp_async_wait_group(0)
            cute.arch.sync_threads()
            if k_group + group < k_end:
                for d in cutlass.range_constexpr(group):
                    step = cutlass.min(k_group + group + d, last)
                    self.issue_step_cp_async(
                        m_b,
                        b_rows,
                        tiles,
                        w_row0,
                        step,
                        (1 - half) * group + d,
                        tidx,
                        s_b,
                        None,
                        None,
                        False,
                        True,
                    )
            cute.arch.cp_async_commit_group()
            for d in cutlass.range_constexpr(group):
                k_step = k_group + d
                if k_step < k_end:
                    ahead = cutlass.min(k_step + depth, last)
                    self.refill_weight_slot(tiles, band0, tidx, ring, d % depth, ahead)
                    self.mma_k_step(tiled_mma, frags, cur_codes, cur_scales, half * group + d)

        # Nothing may still write or read the ring: `s_c` shares its memory.
        cute.arch.cp_async_wait_group(0)
        cute.arch.sync_threads()
        cute.autovec_copy(frags.acc, frags.t_sc)
        cute.arch.sync_threads()

    @cute.jit
    def mainloop_wgmma(
        self,
        m_b: cute.Tensor,
        b_rows: cute.Tensor,
        m_packed: cute.Tensor,
        m_scale: cute.Tensor,
        expert: cutlass.Int32,
        w_row0: cutlass.Int32,
        tidx: cutlass.Int32,
        s_b: cute.Tensor,
        s_c: cute.Tensor,
        tiled_mma: cute.TiledMma,
        wait_before_tokens: bool = False,
        rows: int = 0,
        bars=None,
    ):
        """The K loop with warpgroup MMAs; leaves the fp32 tile in `s_c` (synchronized).

        `rows` (compile time, with `tail_m`; default `block_m`): only the first `rows`
        token rows are copied and multiplied (`m64n{rows}k16` MMAs, `tiled_mma` None),
        and only those columns of `s_c` written.

        Weights: the register ring of `mainloop_registers` (`stages` K steps ahead).
        Token rows: cp.async into the swizzled ring `s_b` of `b_stages = stages + 1`
        steps (`stages + 2` with `overlap` or `mbarriers`), `stages` steps ahead; chunks with
        `b_rows[c] < 0` are zero in every
        stage and never copied. Per K step: wait for the previous step's MMAs (they
        read the A registers about to be rewritten and the token stage about to be
        refilled) and for this step's token copies, make those visible to the MMAs'
        async proxy, one barrier, issue the copies into the stage just freed and the
        weight loads, decode, then four warpgroup MMAs per 64-row tile. (Waiting for
        the MMAs later, after the loads, costs 26-30 more registers per thread in the
        64 x 128 tile, and 3 instead of 4 CTAs per SM.) With `overlap` the step does
        not wait for the previous step's MMAs: `mma_k_step` waits per 16 columns, and
        the stage refilled is the one read two steps back, whose MMAs are done. Split-K
        and `wait_before_tokens` behave as in `mainloop_registers`.

        With `mbarriers` (`bars`: the ring's "full" mbarriers, then its "empty" ones)
        no CTA barrier runs per K step. Step `i` (counted from `k_begin`) reads stage
        `i % ring`, whose fill is that stage's `i // ring`-th: each thread issues its
        copies of a fill and then `cp.async.mbarrier.arrive.noinc` on the stage's full
        barrier (one arrival per thread, made when its copies have landed), and a
        thread waits for the fill's phase before the MMAs. Once a warp's MMAs of step
        `i - 1` are done (at step `i`), its lane 0 arrives on that stage's empty
        barrier (one arrival per warp); before refilling a stage with step `j` a
        thread waits for the phase of step `j - ring`'s reads. With `ring = stages +
        2` and copies `stages` steps ahead, step `i` refills the stage of step
        `i - 2`: the warpgroups run up to one step apart. Every step issues one fill
        (past the range it copies the last step again), so the phases stay in order;
        after the loop every copy is waited for before `s_c` overwrites the ring.
        """
        k_begin, k_end = self.k_range(m_packed)
        last = k_end - 1
        depth = self.stages
        ring = self.b_stages
        # Token copies run `stages` steps ahead (one fewer than the ring holds; two
        # fewer with `overlap` or `mbarriers`, whose refilled stage was read two back).
        ahead_tokens = ring - (2 if self.overlap or self.mbarriers else 1)
        ring_w = self.weight_ring()
        cur_codes, cur_scales = ring_w[2], ring_w[3]

        if cutlass.const_expr(rows):
            tiled_mma = self._tiled_mma(rows)
            frags = self._fragments(
                tiled_mma,
                tidx,
                cute.local_tile(s_b, (rows, BLOCK_K, ring), (0, 0, 0)),
                cute.local_tile(s_c, (self.block_w, rows), (0, 0)),
            )
        else:
            frags = self._fragments(tiled_mma, tidx, s_b, s_c)
        tiles = self.weight_tiles(m_packed, m_scale, expert)
        band0 = self.first_band(w_row0, tidx)
        mbar = self.mbarriers
        empty = bars + ring if mbar else None

        # Padding chunks (no source row) are zero in every stage, once.
        for c in cutlass.range_constexpr(self.token_chunks(rows)):
            if b_rows[c] < 0:
                chunk = c * self.num_threads + tidx
                zero = cute.make_rmem_tensor((8,), cutlass.BFloat16)
                zero.fill(0.0)
                for st in cutlass.range_constexpr(ring):
                    dst = cute.local_tile(
                        s_b[chunk // (BLOCK_K // 8), None, st], (8,), (chunk % (BLOCK_K // 8),)
                    )
                    cute.autovec_copy(zero, dst)
        if cutlass.const_expr(mbar):
            if tidx == 0:
                for st in cutlass.range_constexpr(ring):
                    cute.arch.mbarrier_init(bars + st, self.num_threads)
                    cute.arch.mbarrier_init(empty + st, self.num_threads // 32)
            cute.arch.mbarrier_init_fence()
            # The zeroed chunks (generic-proxy writes) before the first MMA reads them.
            cute.arch.fence_proxy("async.shared", space="cta")
            cute.arch.sync_threads()
        self.fill_weight_ring(tiles, band0, tidx, ring_w, k_begin, last)
        if cutlass.const_expr(self.pdl and wait_before_tokens):
            self.dependency_wait()
            self.launch_dependents()
        for st in cutlass.range_constexpr(ahead_tokens):
            first = cutlass.min(k_begin + st, last)
            self.issue_step_cp_async(
                m_b, b_rows, tiles, w_row0, first, st, tidx, s_b, None, None, False, True, rows
            )
            cute.arch.cp_async_commit_group()
            if cutlass.const_expr(mbar):
                cute.arch.cp_async_mbarrier_arrive_noinc(bars + st)

        for k_group in cutlass.range(k_begin, k_end, depth, unroll=1):
            for d in cutlass.range_constexpr(depth):
                k_step = k_group + d
                if k_step < k_end:
                    i = k_step - k_begin
                    if cutlass.const_expr(mbar):
                        fill = i + ahead_tokens  # the step whose copies this one issues
                        warpgroup.wait_group(0)
                        if i > 0 and tidx % 32 == 0:
                            cute.arch.mbarrier_arrive(empty + (i - 1) % ring)
                        if fill >= ring:
                            cute.arch.mbarrier_wait(empty + fill % ring, (fill // ring + 1) % 2)
                    else:
                        if cutlass.const_expr(not self.overlap):
                            warpgroup.wait_group(0)
                        cute.arch.cp_async_wait_group(ahead_tokens - 1)
                        # cp.async writes are generic-proxy writes; the MMAs read through
                        # the async proxy.
                        cute.arch.fence_proxy("async.shared", space="cta")
                        cute.arch.sync_threads()
                    self.issue_step_cp_async(
                        m_b,
                        b_rows,
                        tiles,
                        w_row0,
                        cutlass.min(k_step + ahead_tokens, last),
                        (i + ahead_tokens) % ring,
                        tidx,
                        s_b,
                        None,
                        None,
                        False,
                        True,
                        rows,
                    )
                    cute.arch.cp_async_commit_group()
                    if cutlass.const_expr(mbar):
                        cute.arch.cp_async_mbarrier_arrive_noinc(bars + fill % ring)
                        cute.arch.mbarrier_wait(bars + i % ring, (i // ring) % 2)
                        cute.arch.fence_proxy("async.shared", space="cta")
                    ahead = cutlass.min(k_step + depth, last)
                    self.refill_weight_slot(tiles, band0, tidx, ring_w, d, ahead)
                    self.mma_k_step(tiled_mma, frags, cur_codes, cur_scales, i % ring)

        warpgroup.wait_group(0)
        cute.arch.cp_async_wait_group(0)
        # `s_c` shares the token ring: every warp's MMAs and copies must be done first.
        cute.arch.sync_threads()
        cute.autovec_copy(frags.acc, frags.t_sc)
        cute.arch.sync_threads()

    def tile_rows(self, sorted_slots: cute.Tensor, row0: cutlass.Int32, before_wait: bool = False):
        """With `tail_m`: the multiple of `tail_m` (at most `block_m`) that holds every
        routed row of the tile at `row0` (None without `tail_m`). A segment's padding
        rows (slot -1) are its last ones, so the tile's rows are a prefix: block `j` of
        `tail_m` rows is used when its first row is. `before_wait`: read with
        `read_before_wait`."""
        if not self.tail_m:
            return None
        return self._tail_rows(sorted_slots, row0, before_wait)

    @cute.jit
    def _tail_rows(self, sorted_slots: cute.Tensor, row0: cutlass.Int32, before_wait: bool):
        rows = cutlass.Int32(self.tail_m)
        for j in cutlass.range_constexpr(1, self.block_m // self.tail_m):
            row = row0 + j * self.tail_m
            slot = self.read_before_wait(sorted_slots, row) if before_wait else sorted_slots[row]
            if slot >= 0:
                rows = cutlass.Int32((j + 1) * self.tail_m)
        return rows

    @cute.jit
    def mainloop(
        self,
        m_b,
        b_rows,
        m_packed,
        m_scale,
        expert,
        w_row0,
        tidx,
        smem,
        tiled_mma,
        wait_before_tokens: bool = False,
        rows=None,
    ):
        """Allocates shared memory, runs the K loop; returns `s_c` holding the fp32 tile.

        `wait_before_tokens` (with `pdl`): `dependency_wait` and `launch_dependents` run
        inside, after the first weight loads and before the first read of `m_b`.
        `rows` (with `tail_m`): `tile_rows` of the tile; only the first `rows` columns
        of `s_c` are then computed (the others are padding rows).
        """
        s_b, s_c, s_raw, s_scale, bars = self._allocate_smem(smem)
        common = (m_b, b_rows, m_packed, m_scale, expert, w_row0, tidx, s_b, s_c)
        if cutlass.const_expr(self.bulk):
            self.mainloop_bulk(*common, s_raw, s_scale, bars, tiled_mma, wait_before_tokens)
        elif cutlass.const_expr(self.tail_m > 0):
            # One K loop per MMA width; `rows` is a multiple of `tail_m` from `tail_m` to
            # `block_m` (`tile_rows`), so exactly one of them runs.
            for j in cutlass.range_constexpr(1, self.block_m // self.tail_m):
                if rows == j * self.tail_m:
                    self.mainloop_wgmma(*common, None, wait_before_tokens, j * self.tail_m, bars)
            if rows >= self.block_m:
                self.mainloop_wgmma(*common, tiled_mma, wait_before_tokens, 0, bars)
        elif cutlass.const_expr(self.wgmma):
            self.mainloop_wgmma(*common, tiled_mma, wait_before_tokens, 0, bars)
        elif cutlass.const_expr(self.token_steps > 0):
            self.mainloop_token_ring(*common, tiled_mma, wait_before_tokens)
        elif cutlass.const_expr(not self.cp_async):
            self.mainloop_registers(*common, tiled_mma, wait_before_tokens)
        else:
            self.mainloop_cp_async(*common, s_raw, s_scale, tiled_mma, wait_before_tokens)
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
        weights: bool = True,
        tokens: bool = True,
        rows: int = 0,
    ):
        """cp.async of one K step's raw weight bytes, scales and token rows into `stage`.

        `tiles` is `weight_tiles(...)` of the CTA's expert. The CTA's bands are copied
        block by block: band `i` of the tile at `512 * i` of `s_raw` (`64 * i` of `s_scale`).
        `weights` / `tokens` select the weight and scale copies and the token-row copies;
        `rows` (compile time, default all): only token rows below it are copied.
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
        band0 = w_row0 // TILE_ROWS
        if cutlass.const_expr(weights):
            for u in cutlass.range_constexpr(self.w_units):
                unit = u * self.num_threads + tidx
                src = cute.local_tile(codes[None, k_step, band0 + unit // 32], (16,), (unit % 32,))
                dst = cute.local_tile(s_raw[None, stage], (16,), (unit,))
                cute.copy(atom_w, src, dst)
            if tidx < self.block_w:
                ssrc = cute.local_tile(scales[None, k_step, band0 + tidx // 16], (4,), (tidx % 16,))
                sdst = cute.local_tile(s_scale[None, stage], (4,), (tidx,))
                cute.copy(atom_s, ssrc, sdst)
        if cutlass.const_expr(tokens):
            for c in cutlass.range_constexpr(self.token_chunks(rows)):
                chunk = c * self.num_threads + tidx
                row = chunk // (BLOCK_K // 8)
                col = chunk % (BLOCK_K // 8)
                if b_rows[c] >= 0:  # padding chunks (wgmma path) stay zero
                    row_src = m_b[b_rows[c], None]
                    bsrc = cute.local_tile(row_src, (8,), (k_step * (BLOCK_K // 8) + col,))
                    bdst = cute.local_tile(s_b[row, None, stage], (8,), (col,))
                    cute.copy(atom_b, bsrc, bdst)

    def token_chunks(self, rows: int = 0) -> int:
        """Chunks per thread of a K step's first `rows` token rows (default `block_m`):
        chunk `c` of every thread covers rows `c * num_threads / 8 ..` of the tile."""
        return rows * (BLOCK_K // 8) // self.num_threads if rows else self.b_chunks

    @cute.jit
    def load_a_smem(self, stage, tidx, s_raw, s_scale, r_codes, r_scales, sub=0):
        """`load_a_step` from a staged K step of `s_raw` / `s_scale`: stage `stage` of the
        cp.async ring, or step `sub` of slot `stage` of the bulk-copy ring
        (`issue_bulk_slot`: band `b`'s steps at block `b * bulk`)."""
        lane = tidx % 32
        band0 = self.first_band(cutlass.Int32(0), tidx)  # bands counted from the CTA's first
        for mi in cutlass.range_constexpr(self.mma_m):
            block = (band0 + mi * self.warps_m) * max(1, self.bulk) + sub
            src = cute.local_tile(s_raw[None, stage], (16,), (block * 32 + lane,))
            cute.autovec_copy(src, r_codes[None, mi])
            ssrc = cute.local_tile(s_scale[None, stage], (8,), (block * 8 + lane // 4,))
            cute.autovec_copy(ssrc, r_scales[None, mi])

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
        s_b: cute.Tensor,
        s_c: cute.Tensor,
        s_raw: cute.Tensor,
        s_scale: cute.Tensor,
        tiled_mma: cute.TiledMma,
        wait_before_tokens: bool = False,
    ):
        """K loop with a `stages`-deep cp.async ring of raw weights, scales and token rows.

        `b_rows[c]` must be a valid row of `m_b` for every chunk (callers clamp invalid
        rows to a real one; their results are never read). One barrier per step: the
        stage refilled at step k is the one read at step k - 1. With
        `wait_before_tokens` (and `pdl`) the weight copies of the first `stages - 1`
        steps are issued before `dependency_wait`; they join the first commit group,
        which the first step waits for anyway.
        """
        num_k_steps = m_packed.shape[2] // (BLOCK_K // 2)
        r_codes = cute.make_rmem_tensor((16, self.mma_m), cutlass.Uint8)
        r_scales = cute.make_rmem_tensor((8, self.mma_m), cutlass.Uint8)

        frags = self._fragments(tiled_mma, tidx, s_b, s_c)
        tiles = self.weight_tiles(m_packed, m_scale, expert)

        if cutlass.const_expr(self.pdl and wait_before_tokens):
            for st in cutlass.range_constexpr(self.stages - 1):
                step = cutlass.min(st, num_k_steps - 1)
                self.issue_step_cp_async(
                    m_b, b_rows, tiles, w_row0, step, st, tidx, s_b, s_raw, s_scale, True, False
                )
            self.dependency_wait()
            self.launch_dependents()
            for st in cutlass.range_constexpr(self.stages - 1):
                step = cutlass.min(st, num_k_steps - 1)
                self.issue_step_cp_async(
                    m_b, b_rows, tiles, w_row0, step, st, tidx, s_b, s_raw, s_scale, False, True
                )
                cute.arch.cp_async_commit_group()
        else:
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
            self.load_a_smem(stage, tidx, s_raw, s_scale, r_codes, r_scales)
            self.mma_k_step(tiled_mma, frags, r_codes, r_scales, stage)

        cute.arch.cp_async_wait_group(0)
        cute.autovec_copy(frags.acc, frags.t_sc)
        cute.arch.sync_threads()

    @cute.jit
    def issue_bulk_slot(self, tiles, w_row0, tidx, s_raw, s_scale, bars, first, count, slot):
        """Bulk copies of K steps `[first, first + count)` of this warp's bands into weight
        slot `slot` (lane 0 of each warp; `count <= bulk`).

        A band's steps are contiguous, so per band one copy of `512 * count` code bytes
        and one of `64 * count` scale bytes, at block `local_band * bulk` of the slot.
        The warp arrives on the slot's mbarrier with their byte count first (one arrival
        per warp completes the phase once every copy has landed).
        """
        if tidx % 32 == 0:
            codes, scales = tiles
            bar = bars + slot
            cute.arch.mbarrier_arrive_and_expect_tx(bar, count * (576 * self.mma_m))
            band0 = self.first_band(w_row0, tidx)
            local0 = self.first_band(cutlass.Int32(0), tidx)
            for mi in cutlass.range_constexpr(self.mma_m):
                crd = (0, first, band0 + mi * self.warps_m)
                block = (local0 + mi * self.warps_m) * self.bulk
                bulk_copy_g2s(
                    s_raw.iterator + cute.crd2idx((block * 512, slot), s_raw.layout),
                    codes.iterator + cute.crd2idx(crd, codes.layout),
                    count * 512,
                    bar,
                )
                bulk_copy_g2s(
                    s_scale.iterator + cute.crd2idx((block * 64, slot), s_scale.layout),
                    scales.iterator + cute.crd2idx(crd, scales.layout),
                    count * 64,
                    bar,
                )

    @cute.jit
    def mainloop_bulk(
        self,
        m_b: cute.Tensor,
        b_rows: cute.Tensor,
        m_packed: cute.Tensor,
        m_scale: cute.Tensor,
        expert: cutlass.Int32,
        w_row0: cutlass.Int32,
        tidx: cutlass.Int32,
        s_b: cute.Tensor,
        s_c: cute.Tensor,
        s_raw: cute.Tensor,
        s_scale: cute.Tensor,
        bars,
        tiled_mma: cute.TiledMma,
        wait_before_tokens: bool = False,
    ):
        """K loop with the weights in a bulk-copy ring of `stages` slots of `bulk` steps.

        Slot `g % stages` holds group `g` (steps `k_begin + g * bulk ...` of this CTA's
        range, the last group possibly shorter); groups `g + 1 .. g + stages - 1` are in
        flight while group `g` is read. Token rows: the cp.async ring of `b_stages`
        (`BULK_TOKEN_STAGES`) steps, issued `b_stages - 1` steps ahead (`b_rows[c]`
        must be a valid row, as for `mainloop_cp_async`). Per step: wait for its token
        copies and, at a group's first step, for the slot's mbarrier (phase = the
        slot's use count mod 2; every thread waits, which makes the bulk writes visible
        to it); one barrier; then, at a group's first step, refill the slot read by the
        previous group (every warp is past it) with group `g + stages - 1`; issue the
        token copies into the stage read one step back; decode and multiply. Only steps
        of the range are copied, so every copy issued is waited for before the CTA
        exits. Weights of the first groups are copied before `dependency_wait` (`pdl`
        with `wait_before_tokens`).
        """
        k_begin, k_end = self.k_range(m_packed)
        last = k_end - 1
        steps = self.bulk
        slots = self.stages
        ring = self.b_stages
        r_codes = cute.make_rmem_tensor((16, self.mma_m), cutlass.Uint8)
        r_scales = cute.make_rmem_tensor((8, self.mma_m), cutlass.Uint8)

        frags = self._fragments(tiled_mma, tidx, s_b, s_c)
        tiles = self.weight_tiles(m_packed, m_scale, expert)
        bulk_args = (tiles, w_row0, tidx, s_raw, s_scale, bars)

        if tidx == 0:
            for st in cutlass.range_constexpr(slots):
                cute.arch.mbarrier_init(bars + st, self.warps_m)  # one arrival per warp
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()
        for g in cutlass.range_constexpr(slots - 1):
            first = k_begin + g * steps
            if first < k_end:
                self.issue_bulk_slot(*bulk_args, first, cutlass.min(steps, k_end - first), g)
        if cutlass.const_expr(self.pdl and wait_before_tokens):
            self.dependency_wait()
            self.launch_dependents()
        for st in cutlass.range_constexpr(ring - 1):
            step = cutlass.min(k_begin + st, last)
            self.issue_step_cp_async(
                m_b, b_rows, tiles, w_row0, step, st, tidx, s_b, s_raw, s_scale, False, True
            )
            cute.arch.cp_async_commit_group()

        for k_step in cutlass.range(k_begin, k_end, unroll=1):
            i = k_step - k_begin
            group = i // steps
            sub = i - group * steps
            slot = group % slots
            cute.arch.cp_async_wait_group(ring - 2)
            if sub == 0:
                cute.arch.mbarrier_wait(bars + slot, (group // slots) % 2)
            cute.arch.sync_threads()
            if sub == 0:
                first = k_step + (slots - 1) * steps
                if first < k_end:
                    self.issue_bulk_slot(
                        *bulk_args,
                        first,
                        cutlass.min(steps, k_end - first),
                        (group + slots - 1) % slots,
                    )
            self.issue_step_cp_async(
                m_b,
                b_rows,
                tiles,
                w_row0,
                cutlass.min(k_step + ring - 1, last),
                (i + ring - 1) % ring,
                tidx,
                s_b,
                s_raw,
                s_scale,
                False,
                True,
            )
            cute.arch.cp_async_commit_group()
            self.load_a_smem(slot, tidx, s_raw, s_scale, r_codes, r_scales, sub)
            self.mma_k_step(tiled_mma, frags, r_codes, r_scales, i % ring)

        cute.arch.cp_async_wait_group(0)
        cute.autovec_copy(frags.acc, frags.t_sc)
        cute.arch.sync_threads()


def fake_routed_weight_args(m_pad: Any) -> tuple:
    """Fake `(sorted_slots, tile_expert, w_packed, w_scale, w_global)` for `export_spec`.

    Shapes (all dynamic): sorted_slots int32 `(m_pad,)`, tile_expert int32
    `(num_tiles,)`, w_packed uint8 `(experts, rows, k // 2)` and w_scale uint8
    `(experts, rows, k // 16)` row-major, w_global float32 `(experts,)`; rows % 128 == 0,
    k % 64 == 0, 16-byte aligned `w_packed` and `w_scale`.
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
            cutlass.Uint8, (experts, rows, scale_cols), stride_order=(2, 1, 0), assumed_align=16
        ),
        make_fake_compact_tensor(cutlass.Float32, (experts,), assumed_align=4),
    )
