"""Tactics of the Hopper NVFP4 MoE GEMMs and their default heuristic.

Both GEMMs are swap-AB: the expert's weight rows sit on the MMA M side
(`block_w` rows per CTA) and the routed token rows on the N side (`block_m`
rows per CTA, which is also the routing row tile: `tile_expert` has one entry per
`block_m` rows of `sorted_slots`; GEMM1 and GEMM2 may use different `block_m` over
metadata built for the larger one, see `jax_moe.gpu`).
The warps of a CTA (4, or 8 for the two-warpgroup wgmma tiles) form a
`warps_m x warps_n` grid over the tile.

Families:
  `moe_gemm1_sm90`: GEMM1 (gathered tokens x W13, fused SwiGLU), bf16 output.
  `moe_gemm2_sm90`: GEMM2 (activations x W2, router weight), bf16 output.

Regimes: `block_m` 16 or 32 (decode) with all four warps along the weight rows
(`warps_m=4, warps_n=1`), so few routed rows per expert waste little MMA work;
`block_m` 64 or 128 (prefill) with either `4 x 1` or a `2 x 2` warp grid. The
weights are decoded in registers straight into the MMA's A fragments, so each warp
decodes the weight rows it multiplies: with `2 x 2` two warps decode the same rows,
with `4 x 1` every warp reads the whole token tile by `ldmatrix`. `block_w` is 128,
or 64 to put more CTAs on the weights when few experts are active.

`stages` is how many 64-wide K steps of weights and tokens are loaded ahead: in a
register ring (`cp_async=False`, 1 to 4 deep, limited by a register estimate; 6 or 8
deep as a decode tactic for short K loops, `_DEEP_VARIANTS`), or in
a cp.async shared-memory ring of raw weight bytes (`cp_async=True`, 3 to 6 deep;
correct but slower on the measured shapes, so not exported).

`bulk` (K steps per bulk copy, 0 = off; with `cp_async`, `4 x 1` warps, `mma.sync`):
the weights and scales stream through a shared-memory ring of `stages` slots of `bulk`
K steps, filled by bulk copies (`cp.async.bulk`: per slot and 16-row band one copy of
the codes and one of the scales, each warp copying its own bands) that complete on one
mbarrier per slot; the token rows go through a 3-stage cp.async ring. The steps in
flight sit in shared memory, not registers (40-60 registers per thread). Split-K works
as with the register path. Decode tactics (like split-K, valid while the expected
routed rows per expert fit one row tile). Measured on an H200 (DeepSeek-V3 EP=8 and
Qwen3-30B-A3B, N = 1-256, the tuner's routings, 17 bulk variants against every other
one): never the fastest; the best bulk GEMM1 was 1.14-2.1x the best GEMM1, the best
bulk GEMM2 1.01-1.17x. A first build with one bulk copy per band and K step, all
issued by one thread, was 1.4-2.2x (GEMM1); grouping 4 steps per copy and spreading
the copies over the warps closed part of that. The two fastest shapes (4 steps per
copy, 2 slots; 64- and 128-row weight tiles, unsplit and split in 2) stay exported as
experimental variants (`_BULK_VARIANTS`, `is_experimental`).

`prefetch` (K steps, 0 = off; `mma.sync` register path): each warp asks L2 for its
bands' weight and scale bytes of the step `prefetch` ahead (`cp.async.bulk.prefetch.L2`)
while the register ring loads `stages` ahead, for more bytes in flight from DRAM
without more registers. Measured on an H200 (tunes of DeepSeek-V3 EP=8 and EP=16 and
Qwen3-30B-A3B over every variant, N = 1-256; 10 prefetch variants 8 or 16 steps ahead
against their plain twins): median 1.05-1.11x the twin's time, faster mostly where the
twin itself was slow (4-stage or split rings), and the best prefetch variant beat the
best plain one in 5 of 134 (cell, op, routing) timings, by at most 6 %. The whole
layer with a DeepSeek-V3 EP=8 table tuned over all variants was unchanged (within 1 %).
So the weight stream of the best decode tiles is not short of DRAM requests in flight;
one pair stays exported as experimental (`_PREFETCH_VARIANTS`).

`tail_m` (rows, 0 = off; wgmma tiles without split-K): the kernel holds one K loop
per multiple of `tail_m` up to `block_m`, and a row tile runs the narrowest that covers
its routed rows (its segment's last tile, padded to `block_m`, often holds far fewer):
`m64n{rows}k16` MMAs, and only those token rows copied. Same registers and shared
memory as the plain twin; the code is larger. Under a softmax router's uneven loads
the padding is a large share of the prefill MMAs (DeepSeek-V3 EP=8 in
`benchmarks/bench_moe.py`: 5265 routed rows in 58 row tiles of 128 at N=8192, 71 %
used; at N=2048 in tiles of 64, 53 %).

`mbarriers` (with `wgmma`, unsplit, no `overlap`): the token ring's stages are guarded
by two mbarriers each, "full" (every thread's cp.async copies of the stage have landed)
and "empty" (every warp's MMAs reading it are done), instead of one CTA barrier per K
step; the ring is one stage deeper, so the stage refilled at a step was read two steps
back. The two warpgroups of an `8 x 1` tile then wait only for the token rows they
read and run up to a K step apart (with one barrier, a warpgroup waiting for its
weights held the other one too). Same registers; one more 16 KB token stage, which
the `128 x 128` tile's fp32 buffer already covers. Measured on an H200 (tunes of
DeepSeek-V3 EP=8 and Qwen3-30B-A3B, N = 1-16384, the twins of the four `tail_m` tiles,
334 cell-op-routing timings): median 1.08x the twin's time (0.89-1.29x). The
two-warpgroup `128 x 128` 2-stage tile, the tuned prefill tile: from N=1024 on median
1.07x (GEMM1) and 1.02x (GEMM2), 0.96-1.14x; at N <= 512, where neither is the tuned
choice, median 0.98x. The one-stage two-warpgroup tiles lost 5-18 % (medians) and
the one-warpgroup `32 x 128` tile, whose four warps the barrier never held apart,
5-11 %. Under Nsight Compute (DeepSeek-V3 EP=8, N=8192) the mbarrier GEMM1 waits at
a barrier less but more on long-scoreboard (its mbarrier waits), fixed-latency
dependencies and the MMAs, and issues more instructions: the warpgroups wait for
the token rows and each other's MMAs either way. One variant stays exported,
experimental (`_MBARRIER_VARIANTS`, `is_experimental`).

`stream_k` (CTAs per SM, 0: off) runs a 16-row `mma.sync` register tile on a grid of
`stream_k` CTAs per SM. The K steps of all (active row tile, weight tile) pairs, laid
end to end, are cut into one equal, contiguous share per CTA; a pair split between
CTAs is summed, in the order of its K ranges, by the last of them to finish (an
arrival counter per pair and two partial tiles per CTA in a workspace that the GEMM
call returns besides its output and whose counters the FFI handler clears with a
memset before the launch). It is a decode tactic like `split_k`. On an H200 it matches
the reference and repeats bitwise (FFI tests on small shapes and grids of 1 to 1056
CTAs, `fused_moe` pairs), but in the tuner's DeepSeek-V3 EP=8 decode cells (N = 1..256,
every routing plan) it took 1.09-1.3x the time of each cell's best unsplit or split
tile: equal weight bytes per SM did not make decode faster. It keeps fewer CTAs per SM
than the plain tiles (its loop state costs registers, capped by `min_blocks_per_mp`,
with some spills) and adds the memset. Experimental (`_STREAM_K_VARIANTS`,
`is_experimental`).

`token_steps` (0: off, or 2 or 4; the `mma.sync` register path) copies the token
rows into shared memory by cp.async, `token_steps` K steps at a time into one half
of a two-half ring, with one CTA barrier per `token_steps` steps instead of one per
step; the copies of the next group are issued right after that barrier, and padding
rows are zeroed once and never copied. The token rows then take no registers (the
plain register path holds them in its ring and stores them to shared memory every
step), and the fp32 tile shares the ring's memory. Yet ptxas gives most of these
tiles more registers than their twins (`16 x 64` with 2 stages: 60-68 with 4 steps
per group, 48-58 with 2, against 56-64; `16 x 128` with 2 stages: 108-112 against
88-92). On an H200 (tunes of DeepSeek-V3 EP=8 and Qwen3-30B-A3B, N <= 256) eight such
tiles took 0.84-1.22x the time of their twins, mostly 1.02-1.10x, and the best of them
was within 0.97-1.11x of each cell's best tile: the per-step barrier is not what
limits the decode tiles. Experimental (`_TOKEN_RING_VARIANTS`, `is_experimental`).

`split_k` (1, 2, 4, 8) splits the K loop over that many CTAs of one output tile, a
thread block cluster that adds its fp32 tiles in rank order through distributed
shared memory (deterministic, no workspace). It is a decode tactic: `check` rejects
it when the expected routed rows per expert (`token_bucket * top_k / num_experts`)
exceed `block_m`, where the grid is full without it.

Default heuristic (`default_tactic`): with the expected routed rows per expert
`m = num_tokens * top_k / num_experts`,

    m <= 8:        block_m=16, block_w=64,  stages=2, split-K (decode: most CTAs over
                   the weights); unsplit, block_w=128 where that fills the GPU
    8 < m < 32:    block_m=32, block_w=128, stages=2, wgmma (GEMM1 with tail_m=16)
    32 <= m < 64:  GEMM1: block_m=64,  block_w=128, stages=1, wgmma, 8 x 1 warps, tail_m=32
                   GEMM2: block_m=32,  block_w=128, stages=2, wgmma
    m >= 64:       GEMM1: block_m=128, block_w=128, stages=2, wgmma, 8 x 1 warps, tail_m=32
                   GEMM2: block_m=64,  block_w=128, stages=1, wgmma
    m >= 128:      GEMM2 as GEMM1

all with `4 x 1` warps but the two-warpgroup tiles, the same `block_m` for both GEMMs
below m = 32 and from m = 128 (the two may differ: the routing metadata is built for
the larger `block_m`, see `jax_moe.gpu`).
For `block_m=16` the split grows through 1, 2, 4, 8 until the expected CTA
count (expected active local experts x 64-row weight tiles x split) reaches 4 per SM of
132 SMs, or until a larger split would leave fewer than 8 K steps per split; unsplit,
the tile takes 128 weight rows (`block_w=128`) where those still make 4 CTAs per SM.
On the saved timings of the `tail_m` build's H200 tunes (DeepSeek-V3 EP=8 and EP=1,
Qwen3-30B-A3B) and an EP=1 `softmax` evaluation, the 2-stage `16 x 128` tile was the
fastest unsplit decode GEMM in most cells (2-7 % ahead of `16 x 64`), and split 8 of
DeepSeek-V3's 32-step GEMM2 lost 20-32 % to split 2-4 at N=1; with both changes the
rule's mean regret over the m <= 8 cells fell from 5.9 / 4.4 / 4.4 / 4.7 % to 3.9 / 2.1 /
0.7 / 1.2 % (in-sample; its largest, DeepSeek-V3 EP=8 N=16 under the spread plan,
rose from 22.2 to 25.6 %: a typical rank there activates fewer experts than the
uniform estimate, and split 4 wins). The switch from 16- to 32-row tiles above m = 8
follows the best pairs under realistic routings on an H200 (DeepSeek-V3 EP=1 and EP=8,
Qwen3-30B-A3B EP=1; four evaluations of the `mma.sync` build, 120 cell-routings, every
variant timed; an in-sample fit). The warpgroup MMA above m = 8 and the 64-row tile
from m = 64 follow the balanced-plan tunes of the wgmma build on an H200 (DeepSeek-V3
EP=8 and Qwen3-30B-A3B EP=1; in-sample): at m >= 64 the wgmma `64 x 128` pair was the
best pair or within 1 % of it in all 9 such cells, where the former `mma.sync` rule was
1.14-1.37x the best; at m = 16 and 32 the wgmma 32-row pair was 1.05-1.39x the best
(`mma.sync`: 1.07-1.45x; the best pairs use 16-row tiles for Qwen3 at m = 16 and
64-row tiles for DeepSeek-V3 at m = 32). The two-warpgroup `128 x 128` GEMM1 from
m = 128 follows the same two presets' tunes with those tiles (H200, balanced plan):
the fastest GEMM1 at m >= 128 for Qwen3-30B-A3B (1.08-1.10x over the best
one-warpgroup tile) and at m = 64 and m >= 256 for DeepSeek-V3 EP=8 (1.03-1.07x),
1.08x the best at m = 128 there. The 2-stage `tail_m=32` form of that tile, GEMM1 from
m = 64 and GEMM2 from m = 128, follows the tunes of the build that added it (H200,
DeepSeek-V3 EP=8 and EP=16, Qwen3-30B-A3B; in-sample): it is the tuned GEMM1 at m = 64
in all three and at every larger m but one, and the tuned GEMM2 from m = 128 for
DeepSeek-V3 (Qwen3 picks the 64-row tile at m = 128, 6 % faster under the spread plan,
and the 3-stage plain tile past it); the former rule's pair took 1.04-1.37x the tuned
pair's time there for DeepSeek-V3 and 0.93-1.08x for Qwen3 (balanced plan; Qwen3's
tuned pair wins under the uneven plans). From m = 16 to 64 the tables of four H200
presets (DeepSeek-V3 EP=1, 8 and 16, Qwen3-30B-A3B; the tunes of that build) agree: at
m = 16 all four take the 2-stage 32-row wgmma pair, GEMM1 with `tail_m=16`; at m = 32
three take the two-warpgroup 64-row `tail_m=32` GEMM1 and two a 2-stage 32-row GEMM2,
so the rule follows them (the single-stage 32-row pair it had for 8 < m < 64 is
older, from the `mma.sync` build's evaluations). On that build's saved timings (the
tunes of DeepSeek-V3 EP=8 and EP=1 and Qwen3, and an EP=1 evaluation under the
`softmax` routing; in-sample; the cells where both rules' pairs were timed) the
heuristic's mean regret fell from 5.3 / 4.4 / 5.5 /
4.7 % to 4.2 / 3.8 / 4.8 / 3.6 % and its largest from 40.6 % (DeepSeek-V3 EP=8
N=1024) to 22.2 %; under `softmax` at DeepSeek-V3 EP=1 N = 512 / 1024 from 7.8 / 15.0 %
to 1.9 / 3.5 % (not measured again on a GPU as a default). The
`4 x 1` grid follows the tuner on an H100 (DeepSeek-V3 EP=8, N = 1024 .. 16384: every
tuned pair used `4 x 1`; the former `2 x 2` default was 18-48 % slower there). Shipped
tables (:mod:`jax_moe.tuning`) override the heuristic.

Exported variants (`gemm1_variants` / `gemm2_variants`, identical tile lists): for
each regime in `_REGIMES`, `block_w` in (128, 64) x register `stages` in (1, 2, 4):
4 only for tiles up to 32 x 128, only 1 for block_m=128, and none whose register
estimate exceeds the budget (which leaves out the 128 x 128 tile and, with `2 x 2`
warps, 64 x 128 with 2 stages and 64 x 64 with 4: 22 variants); then the 6
split-K variants of `_SPLIT_K_VARIANTS`, the 3 deep-prefetch decode variants of
`_DEEP_VARIANTS`, the 13 warpgroup-MMA variants of `_WGMMA_VARIANTS`, the 3 of
`_OVERLAP_VARIANTS`, the 4 of `_BULK_VARIANTS`, the 2 of `_PREFETCH_VARIANTS` and the
5 of `_TWO_WARPGROUP_VARIANTS`, the 4 of `_TAIL_VARIANTS`, the one of
`_MBARRIER_VARIANTS`, the 7 of `_STREAM_K_VARIANTS` and the 3 of
`_TOKEN_RING_VARIANTS` (each list's ids after the previous ones). The tuner's default
search leaves out the `2 x 2` grids, the unsplit `mma.sync` tiles of 32 rows or more
and the experimental variants (`overlap`, `bulk`, `prefetch`, `mbarriers`, `stream_k`,
`token_steps`: `is_experimental`; `searched_by_default`).

`wgmma`: the MMAs run as warpgroup MMAs (`wgmma.mma_async`, A = the decoded weights in
registers, B = the token rows in shared memory, copied there by cp.async) instead of
`mma.sync` with `ldmatrix`; `4 x 1` warps only. Measured on an H200 (DeepSeek-V3 EP=8,
balanced plan): 0.71-0.76x the best `mma.sync` GEMM1 and 0.77-0.94x the best GEMM2 from
N = 1024 (m = 32) up; 1.04-1.16x (GEMM1) and 0.97-1.08x (GEMM2) at decode sizes, where
the tuner mostly keeps `mma.sync`.

Two warpgroups (`8 x 1` warps, 256 threads; wgmma, unsplit, `block_w = 128`): each
warpgroup decodes and multiplies 64 of the weight rows against one shared token tile,
so per decoded weight `block_m` token rows are multiplied (as in a one-warpgroup tile
of `block_m` rows and 64 weight rows) while each token row copied to shared memory
serves 128 weight rows (as in a one-warpgroup tile of 128). Per thread the registers
of the one-warpgroup `block_m x 64` tile (`128 x 128`: 124 and 121 registers, two
CTAs per SM). Measured on an H200 (tunes of DeepSeek-V3 EP=8 and Qwen3-30B-A3B,
every searched variant timed, balanced plan, N >= 2048): the `128 x 128` GEMM1 was
1.08-1.10x faster than the best one-warpgroup tile for Qwen3 and 0.93-1.07x for
DeepSeek-V3 (the fastest GEMM1 at N = 2048, 8192, 16384); the `64 x 128` GEMM2
1.04-1.08x faster for Qwen3, 0.95-0.98x for DeepSeek-V3; as GEMM2 the `128 x 128`
tile was 0.81-0.95x. The 128-row GEMM1 pays in a pair with a 64-row GEMM2
(different `block_m`, above).

`overlap` (with `wgmma`, unsplit): each 16 columns of a K step are decoded once the
previous step's MMAs of those columns are done, and issued as their own commit group,
so a step's decode overlaps the previous step's MMAs within the CTA; the token ring is
one step deeper. They match the reference and pass compute-sanitizer on an H200, but
are slower there than the plain wgmma tiles of the same size in all but two measured cells
(DeepSeek-V3 EP=8, balanced plan, N = 1-16384, against the faster of the plain 1- and
2-stage tiles: 1.00-1.26x for the 32x128 and 64x128 tiles but for two cells at 0.96x
and 0.97x, 1.17-2.2x for 128x64), so they are experimental: left out of
the default search and of evaluations (`is_experimental`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jax_moe.tactic import Tactic, register_tactic_family

__all__ = [
    "BULK_STEPS",
    "BULK_TOKEN_STAGES",
    "PREFETCH_STEPS",
    "MoeGemm1Sm90Tactic",
    "MoeGemm2Sm90Tactic",
    "default_tactic",
    "gemm1_variants",
    "gemm2_variants",
    "searched_by_default",
    "STREAM_K_CTAS_PER_SM",
    "STREAM_K_MAX_TILES",
    "TOKEN_STEPS",
    "stream_k_workspace_words",
    "swap_ab_smem_bytes",
]

_ARCHS = ("sm_90a",)
_BLOCK_K = 64
# K steps loaded ahead: register ring depths, cp.async shared-memory ring depths.
_REGISTER_STAGES = (1, 2, 3, 4, 6, 8)
# Register rings deeper than this are decode tactics (see `_DEEP_VARIANTS`).
_DEEP_STAGES = 4
_CP_ASYNC_STAGES = (3, 4, 6)
# Slots of the bulk-copy weight ring (`bulk` K steps each) and steps per bulk copy:
# shared memory, not registers, holds the steps in flight.
_BULK_STAGES = (2, 3, 4)
BULK_STEPS = (1, 2, 4)
# K steps ahead of the L2 prefetch of the register path (`prefetch`).
PREFETCH_STEPS = (4, 8, 16)
#: Token-row stages of the bulk-copy main loop (token rows 2 K steps ahead).
BULK_TOKEN_STAGES = 3
#: CTAs per SM of a stream-K grid (`stream_k`): the kernel launches `stream_k * SMs` CTAs.
STREAM_K_CTAS_PER_SM = (2, 3, 4, 5, 6, 8)
#: Row tiles (`m_pad / block_m`) a stream-K GEMM takes at most: each CTA lists the active
#: ones in shared memory (the FFI handler rejects more, ffi/moe_gemm.cc).
STREAM_K_MAX_TILES = 1024
#: K steps of token rows per cp.async group and CTA barrier of the register path
#: (`token_steps`): the ring holds two groups.
TOKEN_STEPS = (2, 4)
# Prefetch + accumulator registers per thread (`register_estimate`) above which the
# kernel spills or runs at one CTA per SM (ptxas, weights decoded in registers: 64 x 128
# with 2 x 2 warps and 2 stages, estimate 144, spills in GEMM2; 32 x 128 with 4 stages,
# estimate 112, uses 252 registers without spilling).
_REGISTER_BUDGET = 140
_SMEM_LIMIT = 227 * 1024
#: Alignment (bytes) of the wgmma variants' 128-byte-swizzled token tile.
WGMMA_SMEM_ALIGN = 1024
# K splits: the CTAs of one output tile form a thread block cluster along the grid's
# z axis (at most 8, the portable cluster size) and reduce through distributed
# shared memory in rank order.
_SPLIT_K = (1, 2, 4, 8)
# Split-K variants are decode tactics: valid while the expected routed rows per
# expert (num_tokens * top_k / num_experts) fit in this many row tiles.
_SPLIT_K_MAX_ROW_TILES = 1


def stream_k_workspace_words(tactic, num_row_tiles: int, weight_rows: int, num_ctas: int) -> int:
    """32-bit words (int32 counters, then float32 partials) of a stream-K GEMM's
    workspace (0 without `stream_k`).

    One arrival counter per (row tile, weight tile) pair, rounded up to 4 words, then two
    fp32 partial tiles (`block_m x block_w`) per CTA: a CTA's range of work units ends
    at most two tiles partly (its first and its last). The counters must be zero when
    the kernel starts (the FFI handler clears them).
    """
    if not tactic.stream_k:
        return 0
    counters = num_row_tiles * (weight_rows // tactic.block_w)
    return -(-counters // 4) * 4 + 2 * num_ctas * tactic.block_m * tactic.block_w


def _check_common(tactic, problem) -> None:
    if problem.arch not in _ARCHS:
        raise NotImplementedError(
            f"{tactic}: arch {problem.arch!r} is not supported; expected sm_90a"
        )
    if problem.activation_dtype != "bfloat16":
        raise NotImplementedError(
            f"{tactic}: activation dtype {problem.activation_dtype!r}; only bfloat16 is supported"
        )
    if tactic.split_k > 1 or tactic.stages > _DEEP_STAGES or tactic.bulk or tactic.stream_k:
        rows = _expected_rows_per_expert(problem.token_bucket, problem.top_k, problem.num_experts)
        if rows > _SPLIT_K_MAX_ROW_TILES * tactic.block_m:
            if tactic.split_k > 1:
                what = f"split_k={tactic.split_k}"
            elif tactic.stream_k:
                what = f"stream_k={tactic.stream_k}"
            elif tactic.bulk:
                what = f"bulk={tactic.bulk}"
            else:
                what = f"stages={tactic.stages}"
            raise ValueError(
                f"{tactic}: {what} is a decode tactic; the problem expects "
                f"{rows:g} routed rows per expert (> {_SPLIT_K_MAX_ROW_TILES * tactic.block_m}), "
                "where the grid is full without it"
            )


def swap_ab_smem_bytes(
    block_w: int,
    block_m: int,
    stages: int,
    cp_async: bool,
    wgmma: bool = False,
    overlap: bool = False,
    bulk: int = 0,
    mbarriers: bool = False,
    stream_k: int = 0,
    token_steps: int = 0,
) -> int:
    """Dynamic shared memory of one CTA of the swap-AB GEMMs (their `_allocate_smem`).

    bf16 token tiles `(block_m, 64)` with 8 elements of row padding (two of them with
    register prefetch, one per ring stage with cp.async), the fp32 output tile
    `(block_m, block_w + 4)`, with cp.async the raw weight bytes and scales of every
    stage (`36 * block_w` bytes each), and a fixed 768 bytes. The weights never pass
    through shared memory with register prefetch: they are decoded in registers.
    With `wgmma` the token tiles (a cp.async ring of `stages + 1`) are unpadded
    (swizzled) and aligned to `WGMMA_SMEM_ALIGN` bytes (counted in full as padding),
    and the fp32 tile shares their buffer (written once the K loop is over);
    with `overlap` the ring has `stages + 2` steps, with `mbarriers` also `stages + 2`
    and two 8-byte mbarriers per step. With `bulk` (K steps per weight
    slot) the weight ring has `stages` slots of `bulk` steps, the token ring 3 stages,
    plus one 8-byte mbarrier per slot. With `stream_k`, the list of active row tiles
    (`STREAM_K_MAX_TILES` int32) and one int32 per warp besides. With `token_steps`
    the padded token ring has `2 * token_steps` stages and the fp32 tile shares it.
    """
    if wgmma:
        b_stages = stages + (2 if overlap or mbarriers else 1)
        ring = 2 * _BLOCK_K * b_stages * block_m
        bars = 16 * b_stages if mbarriers else 0
        return max(ring, 4 * (block_w + 4) * block_m) + WGMMA_SMEM_ALIGN + bars + 6 * 128
    row = _BLOCK_K + 8
    if token_steps:
        return max(2 * row * 2 * token_steps * block_m, 4 * (block_w + 4) * block_m) + 6 * 128
    b_stages = BULK_TOKEN_STAGES if bulk else stages if cp_async else 2
    ring = stages * max(1, bulk) if cp_async else 0
    return (
        2 * row * b_stages * block_m
        + 4 * (block_w + 4) * block_m
        + 36 * block_w * ring
        + (8 * stages if bulk else 0)
        + (4 * (STREAM_K_MAX_TILES + 8) if stream_k else 0)
        + 6 * 128
    )


@dataclasses.dataclass(frozen=True)
class _SwapAbTactic(Tactic):
    block_m: int
    block_w: int
    warps_m: int
    warps_n: int
    stages: int
    cp_async: bool
    split_k: int = 1
    wgmma: bool = False
    overlap: bool = False
    bulk: int = 0
    prefetch: int = 0
    tail_m: int = 0
    mbarriers: bool = False
    stream_k: int = 0
    token_steps: int = 0

    # Tables written before these fields existed have no such params.
    optional_params: ClassVar[tuple[str, ...]] = (
        "wgmma",
        "overlap",
        "bulk",
        "prefetch",
        "tail_m",
        "mbarriers",
        "stream_k",
        "token_steps",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.wgmma and (self.cp_async or (self.warps_m, self.warps_n) not in ((4, 1), (8, 1))):
            raise ValueError(
                f"{name}: wgmma=1 needs the register path (cp_async=0) and 4 x 1 or 8 x 1 "
                f"warps; got cp_async={int(self.cp_async)}, warps=({self.warps_m}, {self.warps_n})"
            )
        if (self.warps_m, self.warps_n) == (8, 1) and (
            not self.wgmma or self.split_k != 1 or self.overlap
        ):
            raise ValueError(
                f"{name}: 8 x 1 warps (two warpgroups) need wgmma=1, split_k=1 and overlap=0; "
                f"got wgmma={int(self.wgmma)}, split_k={self.split_k}, "
                f"overlap={int(self.overlap)}"
            )
        if self.block_m * 8 % self.num_threads():
            # Each thread copies whole 16-byte chunks of the token tile's K step.
            raise ValueError(
                f"{name}: block_m={self.block_m} gives {self.block_m * 8} token chunks per K "
                f"step, not a multiple of the {self.num_threads()} threads"
            )
        if self.overlap and (not self.wgmma or self.split_k != 1):
            raise ValueError(
                f"{name}: overlap=1 needs wgmma=1 and split_k=1; got wgmma={int(self.wgmma)}, "
                f"split_k={self.split_k}"
            )
        if self.prefetch and self.prefetch not in PREFETCH_STEPS:
            raise ValueError(
                f"{name}.prefetch={self.prefetch}; expected 0 (off) or one of {PREFETCH_STEPS}"
            )
        if self.prefetch and (self.cp_async or self.wgmma):
            raise ValueError(
                f"{name}: prefetch={self.prefetch} needs the mma.sync register path "
                f"(cp_async=0, wgmma=0); got cp_async={int(self.cp_async)}, "
                f"wgmma={int(self.wgmma)}"
            )
        if self.prefetch and self.prefetch <= self.stages:
            raise ValueError(
                f"{name}: prefetch={self.prefetch} must exceed stages={self.stages} (the "
                "register ring already loads that far ahead)"
            )
        if self.tail_m and (
            self.tail_m < 0
            or not self.wgmma
            or self.split_k != 1
            or self.overlap
            or self.tail_m >= self.block_m
            or self.block_m % self.tail_m
            or self.tail_m * 8 % self.num_threads()
        ):
            raise ValueError(
                f"{name}.tail_m={self.tail_m}: needs wgmma=1, split_k=1, overlap=0 and a "
                f"divisor of block_m={self.block_m} below it holding a multiple of "
                f"{self.num_threads() // 8} rows (whole token chunks per thread)"
            )
        if self.mbarriers and (not self.wgmma or self.split_k != 1 or self.overlap):
            raise ValueError(
                f"{name}: mbarriers=1 needs wgmma=1, split_k=1 and overlap=0; got "
                f"wgmma={int(self.wgmma)}, split_k={self.split_k}, overlap={int(self.overlap)}"
            )
        if self.bulk and self.bulk not in BULK_STEPS:
            raise ValueError(
                f"{name}.bulk={self.bulk}; expected 0 (off) or K steps per copy in {BULK_STEPS}"
            )
        if self.stream_k and (
            self.stream_k not in STREAM_K_CTAS_PER_SM
            or self.block_m != 16
            or (self.warps_m, self.warps_n) != (4, 1)
            or self.wgmma
            or self.cp_async
            or self.split_k != 1
            or self.prefetch
        ):
            raise ValueError(
                f"{name}.stream_k={self.stream_k}: expected 0 (off) or CTAs per SM in "
                f"{STREAM_K_CTAS_PER_SM}, on the mma.sync register path with 16-row tiles and "
                f"4 x 1 warps, without split_k or prefetch"
            )
        if self.token_steps and (
            self.token_steps not in TOKEN_STEPS
            or (self.warps_m, self.warps_n) != (4, 1)
            or self.wgmma
            or self.cp_async
            or self.stream_k
            or self.prefetch
            or self.token_steps % self.stages
        ):
            raise ValueError(
                f"{name}.token_steps={self.token_steps}: expected 0 (off) or one of "
                f"{TOKEN_STEPS}, a multiple of stages={self.stages}, on the mma.sync register "
                "path with 4 x 1 warps, without stream_k or prefetch"
            )
        if self.bulk and (not self.cp_async or (self.warps_m, self.warps_n) != (4, 1)):
            raise ValueError(
                f"{name}: bulk={self.bulk} needs the shared-memory ring (cp_async=1) and 4 x 1 "
                f"warps; got cp_async={int(self.cp_async)}, warps=({self.warps_m}, {self.warps_n})"
            )
        if self.split_k not in _SPLIT_K:
            raise ValueError(f"{name}.split_k={self.split_k}; expected one of {_SPLIT_K}")
        if self.split_k > 1 and self.cp_async and not self.bulk:
            raise ValueError(
                f"{name}: split_k={self.split_k} needs the register path (cp_async=0) or the "
                "bulk-copy ring (bulk > 0)"
            )
        if self.bulk:
            allowed = _BULK_STAGES
        else:
            allowed = _CP_ASYNC_STAGES if self.cp_async else _REGISTER_STAGES
        if self.stages not in allowed:
            raise ValueError(
                f"{name}.stages={self.stages} with cp_async={int(self.cp_async)}, "
                f"bulk={self.bulk}; expected one of {allowed}"
            )
        if not self.cp_async and self.register_estimate() > _REGISTER_BUDGET:
            raise ValueError(
                f"{name}: stages={self.stages} with a {self.block_w} x {self.block_m} tile needs "
                f"about {self.register_estimate()} registers per thread for prefetch and "
                f"accumulators (> {_REGISTER_BUDGET}, it would spill); use fewer stages or a "
                "smaller tile"
            )
        if self.smem_bytes() > _SMEM_LIMIT:
            raise ValueError(
                f"{type(self).__name__}: {self.smem_bytes()} bytes of shared memory > {_SMEM_LIMIT}"
            )
        if self.block_m not in (16, 32, 64, 128):
            raise ValueError(
                f"{type(self).__name__}.block_m={self.block_m}; expected 16, 32, 64 or 128"
            )
        if self.block_w not in (64, 128):
            raise ValueError(f"{type(self).__name__}.block_w={self.block_w}; expected 64 or 128")
        if (self.warps_m, self.warps_n) not in ((4, 1), (2, 2), (8, 1)):
            raise ValueError(
                f"{type(self).__name__} warps=({self.warps_m}, {self.warps_n}); "
                "expected (4, 1), (2, 2) or (8, 1) (wgmma)"
            )
        if self.block_m % (16 * self.warps_n) or self.block_w % (16 * self.warps_m):
            raise ValueError(
                f"{type(self).__name__}: tile ({self.block_w}, {self.block_m}) is not divisible "
                f"by the warp grid ({self.warps_m}, {self.warps_n}) of 16 x 16 MMA tiles"
            )

    def register_estimate(self) -> int:
        """32-bit registers per thread held by the prefetch ring and the accumulators.

        Per ring stage: 4 code words and 2 scale words per 16-row MMA tile of the
        warp, 4 words per 16-byte chunk of token rows (none with `wgmma`: its token
        rows go to shared memory by cp.async).
        """
        mma_m = self.block_w // (16 * self.warps_m)
        threads = self.num_threads()
        b_chunks = 0 if self.wgmma or self.token_steps else max(1, self.block_m * 8 // threads)
        ring = 0 if self.cp_async else self.stages * (6 * mma_m + 4 * b_chunks)
        return ring + self.block_m * self.block_w // threads

    def num_threads(self) -> int:
        """Threads per CTA: 128 (one warpgroup), 256 with `8 x 1` warps (two)."""
        return 32 * self.warps_m * self.warps_n

    def smem_bytes(self) -> int:
        """Dynamic shared memory of one CTA."""
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


@register_tactic_family
@dataclasses.dataclass(frozen=True)
class MoeGemm1Sm90Tactic(_SwapAbTactic):
    """GEMM1 tactic: `block_m` routed rows x `block_w` prepared W13 rows per CTA."""

    family: ClassVar[str] = "moe_gemm1_sm90"

    def check(self, problem) -> None:
        _check_common(self, problem)
        if problem.hidden % _BLOCK_K:
            raise ValueError(f"{self}: hidden={problem.hidden} must be a multiple of {_BLOCK_K}")
        if problem.intermediate % 64:
            raise ValueError(
                f"{self}: intermediate={problem.intermediate} must be a multiple of 64"
            )


@register_tactic_family
@dataclasses.dataclass(frozen=True)
class MoeGemm2Sm90Tactic(_SwapAbTactic):
    """GEMM2 tactic: `block_m` routed rows x `block_w` W2 rows (hidden columns) per CTA."""

    family: ClassVar[str] = "moe_gemm2_sm90"

    def check(self, problem) -> None:
        _check_common(self, problem)
        if problem.intermediate % _BLOCK_K:
            raise ValueError(
                f"{self}: intermediate={problem.intermediate} must be a multiple of {_BLOCK_K}"
            )
        if problem.hidden % 128:
            raise ValueError(f"{self}: hidden={problem.hidden} must be a multiple of 128")


# (block_m, warps_m, warps_n). The cp.async ring (stages >= 3) is valid but not
# exported: on an H100 it was slower than register prefetch for every measured shape.
_REGIMES = ((16, 4, 1), (32, 4, 1), (64, 2, 2), (128, 2, 2), (64, 4, 1), (128, 4, 1))


# (block_m, block_w, stages, split_k values) of the exported split-K variants.
_SPLIT_K_VARIANTS = ((16, 64, 2, (2, 4, 8)), (16, 128, 4, (2, 4)), (32, 128, 2, (2,)))
# Deep register prefetch, (block_m, block_w, stages, split_k values): a decode tactic
# (valid while the expected routed rows per expert fit in one row tile) for short K
# loops, which it keeps in flight almost whole. It costs occupancy (128-200 registers
# per thread instead of 56-68 for 16x64 with 2 stages): on DeepSeek-V3, 8 stages against
# 2 were 0.97-1.50x unsplit and 1.10-2.87x split (H200); on Qwen3-30B-A3B (12-32 K steps)
# they won N=1-2 by 8-20 % under the balanced plan. Splits 4 and 8 were slower everywhere
# and are not exported.
_DEEP_VARIANTS = ((16, 64, 8, (1, 2)), (16, 128, 6, (1,)))
# Warpgroup-MMA variants, (block_m, block_w, stages, split_k values), all `4 x 1`
# warps (one warpgroup): a selection of one- and two-stage tiles of every `block_m`
# (the 128-row ones included, which `mma.sync` cannot hold in its register budget) and
# the decode tile with its splits.
_WGMMA_VARIANTS = (
    (16, 64, 2, (1, 2, 4, 8)),
    (16, 128, 2, (1,)),
    (32, 64, 2, (1,)),
    (32, 128, 1, (1,)),
    (32, 128, 2, (1,)),
    (64, 64, 2, (1,)),
    (64, 128, 1, (1,)),
    (64, 128, 2, (1,)),
    (128, 64, 1, (1,)),
    (128, 128, 1, (1,)),
)
# Warpgroup-MMA variants that overlap a K step's decode with the previous step's MMAs
# (`overlap`), (block_m, block_w, stages): the one-stage prefill tiles. Not in the
# default search: not measured on a GPU yet.
_OVERLAP_VARIANTS = ((32, 128, 1), (64, 128, 1), (128, 64, 1))
# `mma.sync` decode tiles whose weights stream through a shared-memory ring filled by
# bulk copies, (block_m, block_w, stages, bulk, split_k values): `stages` slots of
# `bulk` K steps; each warp copies its bands' steps of a slot (one copy of codes and
# one of scales per band) against the slot's mbarrier, so a deep ring costs neither
# registers nor per-thread copy instructions. Measured slower than the register ring
# on an H200 (module docstring), so experimental (`is_experimental`); these are the
# two fastest of the 17 measured, kept for profiling the difference.
_BULK_VARIANTS = ((16, 64, 2, 4, (1, 2)), (16, 128, 2, 4, (1, 2)))
# `mma.sync` decode tiles of the register path with an L2 prefetch of the weights,
# (block_m, block_w, stages, prefetch, split_k values). Measured slower than their
# plain twins on an H200 in most cells (module docstring), so experimental
# (`is_experimental`); this pair won a few GEMM1 cells by 5-6 %.
_PREFETCH_VARIANTS = ((16, 64, 2, 8, (1, 2)),)
# Warpgroup-MMA prefill tiles with two warpgroups (`8 x 1` warps, 256 threads) over
# the weight rows, (block_m, block_w, stages): both read one token tile, so each
# decoded weight serves `block_m` token rows and each token row copied to shared
# memory serves 128 weight rows, at the per-thread registers of a one-warpgroup
# `block_m x 64` tile. The deeper ones fit two CTAs per SM (three for 64 x 128 with
# two stages) because the fp32 tile shares the token ring's shared memory.
_TWO_WARPGROUP_VARIANTS = ((128, 128, 1), (64, 128, 1), (128, 128, 2), (128, 128, 3), (64, 128, 2))
# Prefill tiles whose last tile of a segment multiplies only the rows it holds, in
# steps of `tail_m` rows, (block_m, block_w, stages, warps_m, tail_m): one K loop per
# width is compiled into the kernel.
_TAIL_VARIANTS = (
    (128, 128, 1, 8, 32),
    (128, 128, 2, 8, 32),
    (64, 128, 1, 8, 32),
    (32, 128, 2, 4, 16),
)
# `_TAIL_VARIANTS` with `mbarriers`: the token ring's stages are guarded by per-stage
# mbarriers (copies landed / every warp's MMAs done) instead of one CTA barrier per K
# step, so the two warpgroups of a tile wait only for the data they read and run up
# to a K step apart. Measured slower than their twins on an H200 (module docstring),
# so experimental; the two-warpgroup prefill tile stays for profiling.
_MBARRIER_VARIANTS = ((128, 128, 2, 8, 32),)
# Stream-K decode tiles of the `mma.sync` register path, (block_m, block_w, stages,
# CTAs per SM values): a grid of `stream_k` CTAs per SM, each taking an equal share of
# all (active row tile, weight tile, K step) work units, so every SM streams the same
# number of weight bytes whatever the number of active experts; tiles split between
# CTAs are summed in a fixed order by the last CTA to finish its part (module docstring
# of `nvfp4_decode_sm90`). Each is compiled for `stream_k` CTAs per SM (ptxas caps the
# registers). Correct, but 1.09-1.3x slower than the best tile of every DeepSeek-V3
# EP=8 decode cell on an H200 (docs/PERFORMANCE.md), so experimental.
_STREAM_K_VARIANTS = ((16, 64, 2, (6, 8)), (16, 128, 2, (4, 5, 6)), (16, 128, 4, (3, 4)))
# Decode tiles of the `mma.sync` register path whose token rows go to shared memory by
# cp.async `token_steps` K steps at a time, one CTA barrier per group instead of one
# per step, (block_m, block_w, stages, token_steps, split_k values). Within a few
# percent of their twins on an H200, so experimental (module docstring); these three
# were the fastest of eight against their twins.
_TOKEN_RING_VARIANTS = (
    (16, 64, 2, 2, (1,)),
    (16, 64, 2, 4, (8,)),
    (16, 128, 4, 4, (2,)),
)
# Streaming multiprocessors the default split-K rule plans for (H100 and H200 SXM),
# and the CTAs per SM it aims to keep resident.
_PLANNED_SMS = 132
_PLANNED_CTAS_PER_SM = 4
# Fewest 64-wide K steps one split keeps: with fewer, a split's prologue, cluster
# barriers and epilogue outweigh its share of the loop (DeepSeek-V3 EP=8 GEMM2, 32 K
# steps, at N=1 on an H200: split 8 took 1.2-1.3x the time of split 2 or 4).
_MIN_K_STEPS_PER_SPLIT = 8


def _variants(cls):
    specs = []  # keyword arguments of `cls`, in id order
    # The register tiles are filtered by validity; every fixed list after them must be valid.
    for bm, wm, wn in _REGIMES:
        for bw in (128, 64):
            for st in (1, 2, 4):
                if st == 4 and bm * bw > 32 * 128:
                    continue
                if st > 1 and bm == 128:  # 128-row tiles spill with deeper prefetch
                    continue
                specs.append(dict(block_m=bm, block_w=bw, warps_m=wm, warps_n=wn, stages=st))
    num_register_tiles = len(specs)
    # Split-K decode variants, after the others. (Ids are per build: the extension maps
    # tactic names to them, so tables never store ids.)
    for bm, bw, st, splits in _SPLIT_K_VARIANTS + _DEEP_VARIANTS:
        specs.extend(dict(block_m=bm, block_w=bw, stages=st, split_k=k) for k in splits)
    for bm, bw, st, splits in _WGMMA_VARIANTS:
        specs.extend(dict(block_m=bm, block_w=bw, stages=st, split_k=k, wgmma=True) for k in splits)
    specs.extend(
        dict(block_m=bm, block_w=bw, stages=st, wgmma=True, overlap=True)
        for bm, bw, st in _OVERLAP_VARIANTS
    )
    for bm, bw, st, steps, splits in _BULK_VARIANTS:
        specs.extend(
            dict(block_m=bm, block_w=bw, stages=st, split_k=k, cp_async=True, bulk=steps)
            for k in splits
        )
    for bm, bw, st, ahead, splits in _PREFETCH_VARIANTS:
        specs.extend(
            dict(block_m=bm, block_w=bw, stages=st, split_k=k, prefetch=ahead) for k in splits
        )
    specs.extend(
        dict(block_m=bm, block_w=bw, stages=st, wgmma=True, warps_m=8)
        for bm, bw, st in _TWO_WARPGROUP_VARIANTS
    )
    specs.extend(
        dict(block_m=bm, block_w=bw, stages=st, wgmma=True, warps_m=wm, tail_m=tail)
        for bm, bw, st, wm, tail in _TAIL_VARIANTS
    )
    specs.extend(
        dict(block_m=bm, block_w=bw, stages=st, wgmma=True, warps_m=wm, tail_m=tail, mbarriers=True)
        for bm, bw, st, wm, tail in _MBARRIER_VARIANTS
    )
    for bm, bw, st, per_sm in _STREAM_K_VARIANTS:
        specs.extend(dict(block_m=bm, block_w=bw, stages=st, stream_k=k) for k in per_sm)
    for bm, bw, st, steps, splits in _TOKEN_RING_VARIANTS:
        specs.extend(
            dict(block_m=bm, block_w=bw, stages=st, split_k=k, token_steps=steps) for k in splits
        )
    out = []
    for i, spec in enumerate(specs):
        try:
            out.append(cls(**(dict(warps_m=4, warps_n=1, cp_async=False) | spec)))
        except ValueError:
            if i >= num_register_tiles:
                raise
    return out


def is_experimental(tactic: _SwapAbTactic) -> bool:
    """Whether `tactic` is an experimental variant (the `overlap` ones, correct but
    slower than their plain twins on an H200, the `bulk` ones, slower than the register
    ring there, the `prefetch` ones, slower than their twins in most cells, the
    `mbarriers` one, slower than its twin from N=1024 on, the stream-K ones, slower
    than the best unsplit or split tile in every decode cell, and the `token_steps`
    ones, within a few percent of their twins; module docstring): the
    tuner and its evaluation time it only when asked (`--all_variants`)."""
    return (
        tactic.overlap
        or tactic.bulk > 0
        or tactic.prefetch > 0
        or tactic.mbarriers
        or tactic.stream_k > 0
        or tactic.token_steps > 0
    )


def searched_by_default(tactic: _SwapAbTactic) -> bool:
    """Whether the tuner times `tactic` in its default search (all exported variants
    stay usable, and `python -m jax_moe.tune --all_variants` times them all).

    Searched: every wgmma variant but the experimental ones (`overlap`, `mbarriers`), and
    the `mma.sync` ones with 16-row tiles or a K
    split (the decode tactics, where `mma.sync` is still the faster family). Left out:
    the `2 x 2` warp grids and the unsplit `mma.sync` tiles of 32 rows or more. In the
    `mma.sync` tables' tunes (H100 and H200; DeepSeek-V3 EP=1/8/16 and Qwen3-30B-A3B; 210
    op entries, every exported variant timed) a `2 x 2` grid was chosen once and a
    128-row tile never. On the balanced-plan timings of the wgmma build's tunes on an
    H200 (DeepSeek-V3 EP=8 and Qwen3-30B-A3B EP=1, every searched variant timed), the
    best pair of every cell is the same with and without the `mma.sync` tiles of 32 rows
    or more (from N=512 on, the best wgmma tile of 32 or 64 rows is 1.03-1.45x faster than
    the best `mma.sync` one of the same size), which are 31 % of the timings. An evaluation
    (`--evaluate`) still times every variant (but the `is_experimental` ones), so a loss
    from leaving them out shows as regret.
    """
    if tactic.warps_n != 1 or is_experimental(tactic):
        return False
    return tactic.wgmma or tactic.block_m == 16 or tactic.split_k > 1


def gemm1_variants() -> list[MoeGemm1Sm90Tactic]:
    """Every exported GEMM1 tactic, in a fixed order (the variant ids)."""
    return _variants(MoeGemm1Sm90Tactic)


def gemm2_variants() -> list[MoeGemm2Sm90Tactic]:
    """Every exported GEMM2 tactic, in a fixed order (the variant ids)."""
    return _variants(MoeGemm2Sm90Tactic)


def _expected_rows_per_expert(num_tokens: int, top_k: int, num_experts: int) -> float:
    return num_tokens * top_k / num_experts


def default_tactic(
    op: str,
    num_tokens: int,
    top_k: int,
    num_local_experts: int,
    hidden: int,
    intermediate: int,
    *,
    num_experts: int | None = None,
) -> MoeGemm1Sm90Tactic | MoeGemm2Sm90Tactic:
    """The rule-based tactic for `op` ("moe_gemm1" or "moe_gemm2"); see the module docstring.

    `num_experts` is the total number of experts (default: `num_local_experts`, no
    expert parallelism); it sets the expected routed rows per expert.
    """
    if num_experts is None:
        num_experts = num_local_experts
    for name, value in (
        ("num_tokens", num_tokens),
        ("top_k", top_k),
        ("num_local_experts", num_local_experts),
        ("hidden", hidden),
        ("intermediate", intermediate),
        ("num_experts", num_experts),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}={value!r}; expected an int")
        if value < (0 if name == "num_tokens" else 1):
            raise ValueError(f"{name}={value}; expected a positive int")
    if num_experts < num_local_experts:
        raise ValueError(f"num_experts={num_experts} < num_local_experts={num_local_experts}")
    rows = _expected_rows_per_expert(num_tokens, top_k, num_experts)
    if op == "moe_gemm1":
        cls = MoeGemm1Sm90Tactic
    elif op == "moe_gemm2":
        cls = MoeGemm2Sm90Tactic
    else:
        raise ValueError(f"op={op!r}; expected 'moe_gemm1' or 'moe_gemm2'")
    wgmma = False
    warps_m, warps_n = 4, 1
    tail_m = 0
    if rows <= 8:
        block_m, block_w, stages = 16, 64, 2
    elif rows < 32 or (rows < 64 and op == "moe_gemm2"):
        block_m, block_w, stages, wgmma = 32, 128, 2, True
        tail_m = 16 if op == "moe_gemm1" else 0
    elif rows < 64:
        block_m, block_w, stages, wgmma, warps_m, tail_m = 64, 128, 1, True, 8, 32
    elif rows >= 128 or op == "moe_gemm1":
        block_m, block_w, stages, wgmma, warps_m, tail_m = 128, 128, 2, True, 8, 32
    else:
        block_m, block_w, stages, wgmma = 64, 128, 1, True
    split_k = 1
    if block_m == 16:
        if op == "moe_gemm1":
            weight_rows, k_steps = 2 * intermediate, hidden // _BLOCK_K
        else:
            weight_rows, k_steps = hidden, intermediate // _BLOCK_K
        active = _expected_active_experts(num_tokens, top_k, num_local_experts, num_experts)
        split_k = _default_split_k(active * max(1, weight_rows // block_w), k_steps)
        # Unsplit, the 128-row weight tile where it still fills the planned CTAs.
        if split_k == 1 and active * weight_rows / 128 >= _PLANNED_SMS * _PLANNED_CTAS_PER_SM:
            block_w = 128
    return cls(
        block_m=block_m,
        block_w=block_w,
        warps_m=warps_m,
        warps_n=warps_n,
        stages=stages,
        cp_async=False,
        split_k=split_k,
        wgmma=wgmma,
        tail_m=tail_m,
    )


def _expected_active_experts(
    num_tokens: int, top_k: int, num_local_experts: int, num_experts: int
) -> float:
    """Expected local experts with at least one routed row under uniform random routing."""
    return num_local_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def _default_split_k(ctas: float, k_steps: int) -> int:
    """Smallest exported split of the (16, 64, 2) decode tile that fills the planned SMs.

    `ctas` is the expected CTA count without splitting; a split keeps at least
    `_MIN_K_STEPS_PER_SPLIT` K steps.
    """
    target = _PLANNED_SMS * _PLANNED_CTAS_PER_SM
    splits = next(v[3] for v in _SPLIT_K_VARIANTS if v[:3] == (16, 64, 2))
    best = 1
    for split in splits:
        if ctas * best >= target or k_steps // split < _MIN_K_STEPS_PER_SPLIT:
            break
        best = split
    return best
