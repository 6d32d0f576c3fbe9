"""GPU tests of the FFI pipeline: exported CuTe DSL kernels called from jax.jit.

The GPU tests need a CUDA GPU visible to JAX and the built extension
(`jax_moe._jax_moe_ffi`); they are skipped otherwise. The argument checks of
the Python wrapper run everywhere.

Run with `-s` to see the timing table of `test_combine_timing`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_moe import _ffi
from jax_moe.kernels.combine_config import COMBINE_SM90_TACTICS
from jax_moe.routing_metadata import finer_tile_expert, routing_metadata


@functools.cache
def _gpu_skip_reason() -> str | None:
    try:
        if jax.default_backend() != "gpu":
            return "no CUDA GPU visible to JAX"
    except RuntimeError as error:
        return f"no JAX backend: {error}"
    if not _ffi.is_available():
        return "the jax_moe CUDA extension (jax_moe._jax_moe_ffi) is not built"
    return None


requires_ffi_gpu = pytest.mark.skipif(
    _gpu_skip_reason() is not None, reason=str(_gpu_skip_reason())
)
TACTIC_IDS = [str(t) for t in COMBINE_SM90_TACTICS]
REPO = Path(__file__).resolve().parents[1]


def _combine_numpy(y: np.ndarray, slot_row: np.ndarray, top_k: int) -> np.ndarray:
    """float32 sum of each token's (bf16) rows in slot order, one rounding to bf16."""
    y = np.asarray(y, np.float32)
    rows = slot_row.reshape(-1, top_k)
    acc = np.zeros((rows.shape[0], y.shape[1]), np.float32)
    for j in range(top_k):
        r = rows[:, j]
        valid = (r >= 0) & (r < y.shape[0])
        acc += np.where(valid[:, None], y[np.clip(r, 0, max(y.shape[0] - 1, 0))], np.float32(0))
    return acc.astype(ml_dtypes.bfloat16)


def _problem(
    seed: int,
    num_tokens: int,
    top_k: int,
    hidden: int,
    num_experts: int,
    num_local: int,
    offset: int,
    block_m: int,
):
    rng = np.random.default_rng(seed)
    topk_ids = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(num_tokens)])
    meta = routing_metadata(
        jnp.asarray(topk_ids, jnp.int32),
        num_local_experts=num_local,
        block_m=block_m,
        local_expert_offset=offset,
    )
    m_pad = meta.sorted_slots.shape[0]
    y = rng.standard_normal((m_pad, hidden), dtype=np.float32).astype(ml_dtypes.bfloat16)
    return y, np.asarray(meta.slot_row)


def _combine_jit(top_k: int, variant: str):
    return jax.jit(
        lambda y, slot_row, out: _ffi.combine(y, slot_row, top_k, variant=variant, out=out),
        donate_argnums=2,
    )


def _poison(num_tokens: int, hidden: int) -> jax.Array:
    return jnp.full((num_tokens, hidden), jnp.nan, jnp.bfloat16)


CASES = [
    # (num_tokens, top_k, hidden, num_experts, num_local, offset, block_m)
    (1, 1, 64, 4, 4, 0, 8),
    (7, 8, 7168, 64, 16, 16, 16),
    (33, 4, 1032, 32, 8, 8, 64),
    (300, 2, 512, 8, 8, 0, 128),
    (64, 6, 2048, 24, 24, 0, 32),
]


@pytest.mark.gpu
@requires_ffi_gpu
@pytest.mark.parametrize("variant", TACTIC_IDS)
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_combine_matches_reference(case, variant):
    num_tokens, top_k, hidden = case[:3]
    y, slot_row = _problem(sum(case), *case)
    want = _combine_numpy(y, slot_row, top_k)
    got = _combine_jit(top_k, variant)(
        jnp.asarray(y), jnp.asarray(slot_row), _poison(num_tokens, hidden)
    )
    got = np.asarray(got)
    assert got.dtype == jnp.bfloat16 and got.shape == (num_tokens, hidden)
    assert np.all(np.isfinite(got.astype(np.float32))), "unwritten (poisoned) output"
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.gpu
@requires_ffi_gpu
@pytest.mark.parametrize("variant", TACTIC_IDS)
@pytest.mark.parametrize("top_k", [4, 11])  # 11: slots past the first 8 too
def test_combine_out_of_range_rows_count_as_missing(variant, top_k):
    rng = np.random.default_rng(11)
    num_tokens, hidden, m_pad = 40, 256, 96
    y = rng.standard_normal((m_pad, hidden), dtype=np.float32).astype(ml_dtypes.bfloat16)
    slot_row = rng.integers(-3, m_pad + 50, num_tokens * top_k).astype(np.int32)
    got = _ffi.combine(jnp.asarray(y), jnp.asarray(slot_row), top_k, variant=variant)
    want = _combine_numpy(y, slot_row, top_k)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16))


@pytest.mark.gpu
@requires_ffi_gpu
def test_combine_is_bitwise_deterministic():
    case = (512, 8, 7168, 64, 32, 0, 64)
    y, slot_row = _problem(5, *case)
    y, slot_row = jnp.asarray(y), jnp.asarray(slot_row)
    fn = jax.jit(lambda y, s: _ffi.combine(y, s, 8))
    first = np.asarray(fn(y, slot_row)).view(np.uint16)
    for _ in range(9):
        np.testing.assert_array_equal(np.asarray(fn(y, slot_row)).view(np.uint16), first)


def _raw_combine(target, y, slot_row, out_shape, top_k, variant, out_dtype=jnp.bfloat16):
    """Calls an FFI target directly, bypassing the wrapper's Python checks."""
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, out_dtype))
    return jax.jit(lambda a, b: call(a, b, top_k=np.int32(top_k), variant=np.int32(variant)))(
        y, slot_row
    )


# name: (y shape, y dtype, slot_row size, out shape, top_k, variant, out dtype, message)
BAD_CALLS = {
    "hidden_not_multiple_of_8": (
        (16, 12),
        "bfloat16",
        8,
        (4, 12),
        2,
        0,
        "bfloat16",
        "multiple of 8",
    ),
    "y_float32": ((16, 64), "float32", 8, (4, 64), 2, 0, "bfloat16", "y must be a rank-2 bfloat16"),
    "slot_row_size": ((16, 64), "bfloat16", 9, (4, 64), 2, 0, "bfloat16", "num_tokens"),
    "hidden_mismatch": ((16, 64), "bfloat16", 8, (4, 72), 2, 0, "bfloat16", "hidden"),
    "out_float32": ((16, 64), "bfloat16", 8, (4, 64), 2, 0, "float32", "bfloat16"),
    "top_k_zero": ((16, 64), "bfloat16", 0, (4, 64), 0, 0, "bfloat16", "top_k"),
    "variant_out_of_range": ((16, 64), "bfloat16", 8, (4, 64), 2, 99, "bfloat16", "variant"),
}


def _bad_call(target: str, name: str, device=None) -> str:
    """Runs one bad call; returns the error message (AssertionError if none is raised)."""
    y_shape, y_dtype, slots, out_shape, top_k, variant, out_dtype, _ = BAD_CALLS[name]
    y = jax.device_put(jnp.ones(y_shape, y_dtype), device)
    slot_row = jax.device_put(jnp.zeros((slots,), jnp.int32), device)
    try:
        jax.block_until_ready(
            _raw_combine(target, y, slot_row, out_shape, top_k, variant, out_dtype)
        )
    except Exception as error:  # the runtime's error type differs between jax versions
        return str(error)
    raise AssertionError(f"{target} accepted the bad call {name!r}")


def _median_seconds(fn, *args, iters: int = 50, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            result = fn(*args)
        jax.block_until_ready(result)
        times.append((time.perf_counter() - start) / iters)
    return float(np.median(times))


@pytest.mark.gpu
@requires_ffi_gpu
def test_combine_timing():
    """Prints kernel vs XLA reference time (back-to-back dispatches, median)."""
    top_k, hidden, num_experts = 8, 7168, 256
    rows = ["  tokens variant                               us    GB/s   xla_us"]

    def xla_combine(y, slot_row):
        r = slot_row.reshape(-1, top_k)
        acc = jnp.zeros((r.shape[0], y.shape[1]), jnp.float32)
        for j in range(top_k):
            valid = (r[:, j] >= 0)[:, None]
            acc = acc + jnp.where(valid, y[jnp.maximum(r[:, j], 0)], 0.0)
        return acc.astype(jnp.bfloat16)

    xla = jax.jit(xla_combine)
    mismatches = []
    for num_tokens in (1, 32, 512, 4096):
        y, slot_row = _problem(num_tokens, num_tokens, top_k, hidden, num_experts, 32, 0, 64)
        y, slot_row = jnp.asarray(y), jnp.asarray(slot_row)
        local = int(np.count_nonzero(np.asarray(slot_row) >= 0))
        moved = local * hidden * 2 + num_tokens * hidden * 2 + slot_row.size * 4
        xla_time = _median_seconds(xla, y, slot_row)
        for variant in TACTIC_IDS:
            fn = jax.jit(functools.partial(_ffi.combine, top_k=top_k, variant=variant))
            seconds = _median_seconds(fn, y, slot_row)
            rows.append(
                f"  {num_tokens:6d} {variant:36s} {seconds * 1e6:7.1f} "
                f"{moved / seconds / 1e9:7.1f} {xla_time * 1e6:8.1f}"
            )
            if not np.array_equal(
                np.asarray(fn(y, slot_row)).view(np.uint16),
                np.asarray(xla(y, slot_row)).view(np.uint16),
            ):
                mismatches.append((num_tokens, variant))
    print("\ncombine timing (wall clock per call, includes dispatch):\n" + "\n".join(rows))
    assert not mismatches, f"kernel and XLA results differ for {mismatches}"


def test_wrapper_validates_arguments():
    y = jnp.ones((16, 64), jnp.bfloat16)
    slot_row = jnp.zeros((8,), jnp.int32)
    for dtype in (jnp.float16, jnp.float32):
        with pytest.raises(TypeError, match="y"):
            _ffi.combine(y.astype(dtype), slot_row, 2)
    with pytest.raises(TypeError, match="slot_row"):
        _ffi.combine(y, slot_row.astype(jnp.int64 if jax.config.x64_enabled else jnp.uint32), 2)
    with pytest.raises(ValueError, match="top_k"):
        _ffi.combine(y, slot_row, 0)
    with pytest.raises(ValueError, match="multiple of top_k"):
        _ffi.combine(y, slot_row, 3)
    with pytest.raises(NotImplementedError, match="hidden"):
        _ffi.combine(jnp.ones((16, 60), jnp.bfloat16), slot_row, 2)
    with pytest.raises(TypeError, match="out"):
        _ffi.combine(y, slot_row, 2, out=jnp.zeros((4, 64), jnp.float32))


def test_stream_k_calls_size_their_grid_and_workspace():
    from jax_moe.kernels import moe_gemm_config as cfg

    tactic = next(t for t in cfg.gemm1_variants() if t.stream_k == 4 and t.block_w == 128)
    workspace, num_ctas = _ffi._workspace("moe_gemm1", tactic, 10, 4096, None)
    assert num_ctas == 4 * _ffi._num_sms()
    assert workspace.shape == (cfg.stream_k_workspace_words(tactic, 10, 4096, num_ctas),)
    assert workspace.dtype == jnp.int32
    workspace, num_ctas = _ffi._workspace("moe_gemm1", str(tactic), 10, 4096, 3)
    assert num_ctas == 3 and workspace.shape == (320 + 2 * 3 * 16 * 128,)
    with pytest.raises(ValueError, match="num_ctas"):
        _ffi._workspace("moe_gemm1", tactic, 10, 4096, 0)
    # Other variants: a 4-word placeholder, no grid size.
    twin = dataclasses.replace(tactic, stream_k=0)
    workspace, num_ctas = _ffi._workspace("moe_gemm1", twin, 10, 4096, 7)
    assert (workspace.shape, num_ctas) == ((4,), 0)


def test_gemm_wrappers_reject_e4m3_scales():
    # The kernels read prepared scale bytes; raw e4m3 scales would decode wrongly.
    e, h, i = 2, 128, 64
    scale13 = jnp.zeros((e, 2 * i, h // 16), jnp.float8_e4m3fn)
    with pytest.raises(TypeError, match="w13_scale.*prepare"):
        _ffi.moe_gemm1(
            jnp.zeros((4, h), jnp.bfloat16),
            jnp.zeros((16,), jnp.int32),
            jnp.zeros((1,), jnp.int32),
            jnp.zeros((e, 2 * i, h // 2), jnp.uint8),
            scale13,
            jnp.ones((e,), jnp.float32),
            top_k=2,
            variant="unused",
        )
    with pytest.raises(TypeError, match="w2_scale.*prepare"):
        _ffi.moe_gemm2(
            jnp.zeros((16, i), jnp.bfloat16),
            jnp.zeros((16,), jnp.int32),
            jnp.zeros((1,), jnp.int32),
            jnp.zeros((e, h, i // 2), jnp.uint8),
            jnp.zeros((e, h, i // 16), jnp.float8_e4m3fn),
            jnp.ones((e,), jnp.float32),
            jnp.ones((8,), jnp.float32),
            variant="unused",
        )


# ---------------------------------------------------------------------------
# Grouped NVFP4 GEMMs through the FFI (kernels jax_moe/kernels/moe_gemm{1,2}_sm90.py).


def _gemm_variants(op: str) -> list[str]:
    if _gpu_skip_reason() is not None:
        return []
    return list(_ffi.kernel_variants().get(op, ()))


def _tactic(op: str, name: str):
    tactic = _ffi._gemm_tactics(op).get(name)
    if tactic is None:
        raise LookupError(name)
    return tactic


@functools.cache
def _moe_problem(num_tokens: int, top_k: int, hidden: int, inter: int, num_local: int):
    """Random NVFP4 weights (logical + prepared + dequantized) and routing."""
    from jax_moe import nvfp4
    from jax_moe.prepare import prepare
    from jax_moe.weights import quantize_moe_weights

    rng = np.random.default_rng(num_tokens * 7 + hidden + inter)
    w13 = rng.standard_normal((num_local, 2 * inter, hidden), dtype=np.float32) * 0.1
    w2 = rng.standard_normal((num_local, hidden, inter), dtype=np.float32) * 0.1
    weights = quantize_moe_weights(jnp.asarray(w13), jnp.asarray(w2))
    prepared = prepare(weights)
    w13_f = np.asarray(nvfp4.dequantize(weights.w13), np.float64)
    w2_f = np.asarray(nvfp4.dequantize(weights.w2), np.float64)
    num_experts = 2 * num_local  # half the slots go to experts of another rank
    counts = _LOCAL_COUNTS.get((num_tokens, top_k, hidden, inter, num_local))
    if counts is None:
        topk_ids = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(num_tokens)])
    else:
        topk_ids = _routing_with_counts(rng, num_tokens, top_k, num_experts, counts)
    topk_weights = rng.random((num_tokens, top_k), dtype=np.float32)
    x = rng.standard_normal((num_tokens, hidden), dtype=np.float32).astype(ml_dtypes.bfloat16)
    return prepared, w13_f, w2_f, topk_ids.astype(np.int32), topk_weights, x


def _routing_with_counts(rng, num_tokens, top_k, num_experts, counts):
    """`topk_ids` (distinct experts per token) in which local expert `e` has exactly
    `counts[e]` slots; the other slots go to experts of another rank."""
    slots = [[] for _ in range(num_tokens)]
    for expert, count in enumerate(counts):
        # The tokens with the fewest slots so far (ties by index) take this expert.
        order = sorted(range(num_tokens), key=lambda t: len(slots[t]))[:count]
        assert all(len(slots[t]) < top_k for t in order), "counts do not fit the slots"
        for t in order:
            slots[t].append(expert)
    remote = np.arange(len(counts), num_experts)
    for t in range(num_tokens):
        slots[t] += list(rng.permutation(remote)[: top_k - len(slots[t])])
        rng.shuffle(slots[t])
    return np.asarray(slots, np.int32)


def _silu(v):
    return v / (1.0 + np.exp(-v))


GEMM_SHAPE = (48, 4, 256, 128, 4)  # num_tokens, top_k, hidden, intermediate, local experts
# K steps not a multiple of 2 (GEMM2: 5) and longer loops (GEMM1: 6), for the wgmma
# variants, whose cp.async token ring wraps around there.
ODD_K_SHAPE = (40, 4, 384, 320, 4)
# Loops longer than the bulk-copy rings (GEMM1: 18 K steps, GEMM2: 9), so each slot's
# mbarrier runs through both phases and the last group is short (also per split of 2).
LONG_K_SHAPE = (24, 4, 1152, 576, 4)
# About 160 routed rows per local expert: full 128-row tiles and a partial second one,
# for the two-warpgroup tiles (each warpgroup's MMAs read every token row of the tile).
FULL_TILE_SHAPE = (320, 4, 256, 128, 4)
# The same loads with long K loops (GEMM1: 18 K steps, GEMM2: 9), for the `mbarriers`
# tile: its full-tile (128-wide) loop runs past its ring, so each stage's mbarriers go
# through several phases there too.
FULL_TILE_LONG_K_SHAPE = (320, 4, 1152, 576, 4)
# Uneven loads (slots per local expert below), for the `tail_m` variants: the last
# tile of a segment holds 1 to `block_m` rows, so each MMA width is taken (128-row
# tiles in steps of 32: 1, 31, 150 -> 32; 40 -> 64; 70 -> 96; 97, 230 -> 128; 128:
# full tiles only) and one expert gets no slot.
TAIL_SHAPE = (256, 4, 256, 128, 9)
_LOCAL_COUNTS = {TAIL_SHAPE: (1, 31, 40, 70, 97, 128, 0, 150, 230)}


def _gemm_cases(op: str) -> list:
    """`(variant name, shape)`: every variant on GEMM_SHAPE, the wgmma and bulk-copy ones
    also on ODD_K_SHAPE, the bulk-copy, L2-prefetch and `mbarriers` ones also on
    LONG_K_SHAPE (18 / 9 K steps: the `mbarriers` tile's phases wrap several times in
    the loop its 32-row tails take; its full tiles on FULL_TILE_LONG_K_SHAPE), the
    two-warpgroup ones also on FULL_TILE_SHAPE, the `tail_m` ones also on TAIL_SHAPE.
    The stream-K ones also run on LONG_K_SHAPE and TAIL_SHAPE: on these small
    problems each of the default grid's CTAs runs 1-3 work units, so every tile is split
    between CTAs and summed by the last to arrive (whole tiles: the small-grid test).
    """
    names = _gemm_variants(op)
    if not names:
        return [pytest.param("none", GEMM_SHAPE, id="none")]
    cases = [pytest.param(n, GEMM_SHAPE, id=n) for n in names]
    rings = [n for n in names if _tactic(op, n).wgmma or _tactic(op, n).bulk]
    cases += [pytest.param(n, ODD_K_SHAPE, id=f"{n}-odd_k") for n in rings]
    deep = [
        n
        for n in names
        if _tactic(op, n).bulk
        or _tactic(op, n).prefetch
        or _tactic(op, n).mbarriers
        or _tactic(op, n).stream_k
    ]
    cases += [pytest.param(n, LONG_K_SHAPE, id=f"{n}-long_k") for n in deep]
    two = [n for n in names if _tactic(op, n).warps_m == 8]
    cases += [pytest.param(n, FULL_TILE_SHAPE, id=f"{n}-full_tile") for n in two]
    guarded = [n for n in names if _tactic(op, n).mbarriers]
    cases += [pytest.param(n, FULL_TILE_LONG_K_SHAPE, id=f"{n}-full_tile_long_k") for n in guarded]
    tails = [n for n in names if _tactic(op, n).tail_m or _tactic(op, n).stream_k]
    cases += [pytest.param(n, TAIL_SHAPE, id=f"{n}-tail") for n in tails]
    return cases


@pytest.mark.gpu
@requires_ffi_gpu
@pytest.mark.parametrize("name, shape", _gemm_cases("moe_gemm1"))
def test_moe_gemm1_matches_reference(name, shape):
    tactic = _tactic("moe_gemm1", name)
    num_tokens, top_k, hidden, inter, num_local = shape
    prepared, w13_f, _, topk_ids, _, x = _moe_problem(*shape)
    meta = routing_metadata(
        jnp.asarray(topk_ids), num_local_experts=num_local, block_m=tactic.block_m
    )
    fn = jax.jit(functools.partial(_ffi.moe_gemm1, top_k=top_k, variant=tactic))
    act = fn(
        jnp.asarray(x),
        meta.sorted_slots,
        meta.tile_expert,
        prepared.w13_packed,
        prepared.w13_scale,
        prepared.w13_global,
    )
    act = np.asarray(act).astype(np.float32)
    slots = np.asarray(meta.sorted_slots)
    tiles = np.asarray(meta.tile_expert)
    rows = np.flatnonzero(slots >= 0)
    experts = tiles[rows // tactic.block_m]
    xs = x.astype(np.float64)[slots[rows] // top_k]
    gate = np.einsum("rh,rih->ri", xs, w13_f[experts, :inter])
    up = np.einsum("rh,rih->ri", xs, w13_f[experts, inter:])
    want = _silu(gate) * up
    got = act[rows]
    scale = np.max(np.abs(want))
    assert np.all(np.isfinite(got))
    assert np.max(np.abs(got - want)) <= 1e-2 * scale, np.max(np.abs(got - want)) / scale


@pytest.mark.gpu
@requires_ffi_gpu
@pytest.mark.parametrize("name, shape", _gemm_cases("moe_gemm2"))
def test_moe_gemm2_matches_reference(name, shape):
    tactic = _tactic("moe_gemm2", name)
    num_tokens, top_k, hidden, inter, num_local = shape
    prepared, _, w2_f, topk_ids, topk_weights, _ = _moe_problem(*shape)
    meta = routing_metadata(
        jnp.asarray(topk_ids), num_local_experts=num_local, block_m=tactic.block_m
    )
    m_pad = meta.sorted_slots.shape[0]
    rng = np.random.default_rng(5)
    act = rng.standard_normal((m_pad, inter), dtype=np.float32)
    # GEMM1 leaves padding rows unwritten: whatever they hold must not reach a real row.
    act[np.asarray(meta.sorted_slots) < 0] = np.nan
    act = act.astype(ml_dtypes.bfloat16)
    fn = jax.jit(functools.partial(_ffi.moe_gemm2, variant=tactic))
    y = fn(
        jnp.asarray(act),
        meta.sorted_slots,
        meta.tile_expert,
        prepared.w2_packed,
        prepared.w2_scale,
        prepared.w2_global,
        jnp.asarray(topk_weights.reshape(-1)),
    )
    assert y.dtype == jnp.bfloat16
    y = np.asarray(y).astype(np.float64)
    slots = np.asarray(meta.sorted_slots)
    rows = np.flatnonzero(slots >= 0)
    experts = np.asarray(meta.tile_expert)[rows // tactic.block_m]
    weight = topk_weights.reshape(-1)[slots[rows]].astype(np.float64)
    want = weight[:, None] * np.einsum("ri,rhi->rh", act[rows].astype(np.float64), w2_f[experts])
    got = y[rows]
    scale = np.max(np.abs(want))
    assert np.all(np.isfinite(got))
    # One rounding to bf16 (at most 2**-8 relative) on top of the float32 product.
    assert np.all(np.abs(got - want) <= 2.0**-8 * np.abs(want) + 1e-5 * scale), (
        np.max(np.abs(got - want)) / scale
    )


def _stream_k_names(op: str) -> list[str]:
    return [n for n in _gemm_variants(op) if _tactic(op, n).stream_k] or ["none"]


def _gemm_call(op, tactic, shape, coarse_block_m=None, num_ctas=None):
    """`(fn, args, sorted_slots, tile_expert)` of one GEMM on `_moe_problem(*shape)`; with
    `coarse_block_m`, the routing is built for that row tile and the tactic's
    `tile_expert` derived by `finer_tile_expert` (tiles of padding in between get -1)."""
    num_tokens, top_k, hidden, inter, num_local = shape
    prepared, _, _, topk_ids, topk_weights, x = _moe_problem(*shape)
    meta = routing_metadata(
        jnp.asarray(topk_ids),
        num_local_experts=num_local,
        block_m=coarse_block_m or tactic.block_m,
    )
    tile_expert = meta.tile_expert
    if coarse_block_m:
        tile_expert = finer_tile_expert(meta.sorted_slots, meta.tile_expert, tactic.block_m)
    if op == "moe_gemm1":
        fn = jax.jit(
            functools.partial(_ffi.moe_gemm1, top_k=top_k, variant=tactic, num_ctas=num_ctas)
        )
        weights = (prepared.w13_packed, prepared.w13_scale, prepared.w13_global)
        args = (jnp.asarray(x), meta.sorted_slots, tile_expert, *weights)
    else:
        fn = jax.jit(functools.partial(_ffi.moe_gemm2, variant=tactic, num_ctas=num_ctas))
        m_pad = meta.sorted_slots.shape[0]
        act = np.random.default_rng(3).standard_normal((m_pad, inter), dtype=np.float32)
        weights = (prepared.w2_packed, prepared.w2_scale, prepared.w2_global)
        args = (
            jnp.asarray(act.astype(ml_dtypes.bfloat16)),
            meta.sorted_slots,
            tile_expert,
            *weights,
            jnp.asarray(topk_weights.reshape(-1)),
        )
    return fn, args, np.asarray(meta.sorted_slots), np.asarray(tile_expert)


@pytest.mark.gpu
@requires_ffi_gpu
@pytest.mark.parametrize("op", ["moe_gemm1", "moe_gemm2"])
def test_stream_k_is_bitwise_deterministic_and_matches_its_unsplit_twin(op):
    """The stream-K sums of split tiles are added in a fixed order: the same call gives
    the same bits, and the values match the unsplit register tile within the rounding
    of a different fp32 summation order."""
    names = [n for n in _stream_k_names(op) if n != "none"]
    if not names:
        pytest.skip("no stream-K variant in this build")
    shape = LONG_K_SHAPE
    for name in names:
        tactic = _tactic(op, name)
        twin = dataclasses.replace(tactic, stream_k=0)
        fn, args, slots, _ = _gemm_call(op, tactic, shape)
        first = np.asarray(fn(*args))
        again = np.asarray(fn(*args))
        rows = np.flatnonzero(slots >= 0)
        assert np.array_equal(first[rows].view(np.uint16), again[rows].view(np.uint16)), name
        twin_fn, twin_args, _, _ = _gemm_call(op, twin, shape)
        want = np.asarray(twin_fn(*twin_args)).astype(np.float32)[rows]
        got = first.astype(np.float32)[rows]
        scale = np.max(np.abs(want))
        assert np.max(np.abs(got - want)) <= 2.0**-7 * scale, (name, np.max(np.abs(got - want)))


@pytest.mark.gpu
@requires_ffi_gpu
@pytest.mark.parametrize("op", ["moe_gemm1", "moe_gemm2"])
def test_stream_k_small_grids_write_whole_tiles_and_split_ones(op):
    """With few CTAs each runs many work units: whole (row tile, weight tile) pairs
    written by the CTA that ran them, several pairs per CTA, and split pairs only at
    the ends of its share (one CTA: every pair whole). Every grid size gives the twin's
    values, and the same grid size the same bits."""
    names = [n for n in _stream_k_names(op) if n != "none"]
    if not names:
        pytest.skip("no stream-K variant in this build")
    for name in names:
        tactic = _tactic(op, name)
        twin_fn, args, slots, _ = _gemm_call(
            op, dataclasses.replace(tactic, stream_k=0), LONG_K_SHAPE
        )
        rows = np.flatnonzero(slots >= 0)
        want = np.asarray(twin_fn(*args)).astype(np.float32)[rows]
        scale = np.max(np.abs(want))
        for num_ctas in (1, 3, 7, 40):
            fn, _, _, _ = _gemm_call(op, tactic, LONG_K_SHAPE, num_ctas=num_ctas)
            got = np.asarray(fn(*args))[rows]
            again = np.asarray(fn(*args))[rows]
            assert np.array_equal(got.view(np.uint16), again.view(np.uint16)), (name, num_ctas)
            error = np.max(np.abs(got.astype(np.float32) - want))
            assert error <= 2.0**-7 * scale, (name, num_ctas, error / scale)


@pytest.mark.gpu
@requires_ffi_gpu
@pytest.mark.parametrize("op", ["moe_gemm1", "moe_gemm2"])
def test_stream_k_skips_tiles_of_padding_and_runs_without_tiles(op):
    """Routing built for 64-row tiles: the 16-row `tile_expert` has -1 tiles between
    active ones, which the stream-K list must skip (compared with the unsplit twin on
    the same metadata), and a call without an active tile runs and returns."""
    names = [n for n in _stream_k_names(op) if n != "none"]
    if not names:
        pytest.skip("no stream-K variant in this build")
    for name in names:
        tactic = _tactic(op, name)
        fn, args, slots, tiles = _gemm_call(op, tactic, GEMM_SHAPE, coarse_block_m=64)
        active = np.flatnonzero(tiles >= 0)
        assert np.any(np.diff(active) > 1), "expected tiles of padding between active tiles"
        twin = dataclasses.replace(tactic, stream_k=0)
        twin_fn, _, _, _ = _gemm_call(op, twin, GEMM_SHAPE, coarse_block_m=64)
        rows = np.flatnonzero(slots >= 0)
        got = np.asarray(fn(*args)).astype(np.float32)[rows]
        want = np.asarray(twin_fn(*args)).astype(np.float32)[rows]
        scale = np.max(np.abs(want))
        assert np.all(np.isfinite(got)), name
        assert np.max(np.abs(got - want)) <= 2.0**-7 * scale, name
        idle = list(args)
        idle[1] = jnp.full_like(args[1], -1)
        idle[2] = jnp.full_like(args[2], -1)
        assert np.asarray(fn(*idle)).shape[0] == slots.shape[0]


@pytest.mark.gpu
@requires_ffi_gpu
def test_moe_chain_matches_reference():
    """routing metadata -> GEMM1 -> GEMM2 -> combine under one jax.jit."""
    from jax_moe.kernels.moe_gemm_config import gemm1_variants, gemm2_variants

    num_tokens, top_k, hidden, inter, num_local = GEMM_SHAPE
    prepared, w13_f, w2_f, topk_ids, topk_weights, x = _moe_problem(*GEMM_SHAPE)
    t1, t2 = gemm1_variants()[0], gemm2_variants()[0]
    assert t1.block_m == t2.block_m

    @jax.jit
    def moe(x, ids, weights, p):
        meta = routing_metadata(ids, num_local_experts=num_local, block_m=t1.block_m)
        act = _ffi.moe_gemm1(
            x,
            meta.sorted_slots,
            meta.tile_expert,
            p.w13_packed,
            p.w13_scale,
            p.w13_global,
            top_k,
            variant=t1,
        )
        y = _ffi.moe_gemm2(
            act,
            meta.sorted_slots,
            meta.tile_expert,
            p.w2_packed,
            p.w2_scale,
            p.w2_global,
            weights.reshape(-1),
            variant=t2,
        )
        return _ffi.combine(y, meta.slot_row, top_k)

    got = np.asarray(
        moe(jnp.asarray(x), jnp.asarray(topk_ids), jnp.asarray(topk_weights), prepared)
    ).astype(np.float32)
    want = np.zeros((num_tokens, hidden))
    xs = x.astype(np.float64)
    for n in range(num_tokens):
        for j in range(top_k):
            e = topk_ids[n, j]
            if e >= num_local:
                continue
            act = _silu(w13_f[e, :inter] @ xs[n]) * (w13_f[e, inter:] @ xs[n])
            want[n] += topk_weights[n, j] * (w2_f[e] @ act)
    scale = np.max(np.abs(want))
    assert np.max(np.abs(got - want)) <= 2e-2 * scale, np.max(np.abs(got - want)) / scale


# Handler argument checks (kept last: a crash here cannot hide the results above).


@pytest.mark.parametrize("name", list(BAD_CALLS))
@pytest.mark.skipif(not _ffi.is_available(), reason="the jax_moe CUDA extension is not built")
def test_handler_checks_on_cpu(name):
    """The execute handler's checks, run by the CPU check target (no GPU needed)."""
    _ffi.register_cpu_checks()
    message = _bad_call("jax_moe_combine_check", name, jax.devices("cpu")[0])
    assert BAD_CALLS[name][-1] in message, message
    assert "INVALID_ARGUMENT" in message, message


@pytest.mark.skipif(not _ffi.is_available(), reason="the jax_moe CUDA extension is not built")
def test_handler_rejects_wrongly_typed_attribute_on_cpu():
    """XLA's own attribute decoding (an int64 where int32 is declared) fails cleanly."""
    _ffi.register_cpu_checks()
    cpu = jax.devices("cpu")[0]
    call = jax.ffi.ffi_call("jax_moe_combine_check", jax.ShapeDtypeStruct((4, 64), jnp.bfloat16))
    y = jax.device_put(jnp.ones((16, 64), jnp.bfloat16), cpu)
    slot_row = jax.device_put(jnp.zeros((8,), jnp.int32), cpu)
    fn = jax.jit(lambda a, b: call(a, b, top_k=np.int64(2), variant=np.int32(0)))
    with pytest.raises(Exception, match="S32"):
        jax.block_until_ready(fn(y, slot_row))


def _gemm1_check(workspace_words, num_ctas, variant, row_tiles=4, workspace_dtype=jnp.int32):
    """Runs the GEMM1 handler's checks on the CPU (hidden 64, intermediate 64, 2 experts,
    16-row tiles); returns the error message, or None when the call is accepted."""
    cpu = jax.devices("cpu")[0]
    m_pad = 16 * row_tiles
    args = [
        jnp.ones((4, 64), jnp.bfloat16),
        jnp.full((m_pad,), -1, jnp.int32),
        jnp.full((row_tiles,), -1, jnp.int32),
        jnp.zeros((2, 128, 32), jnp.uint8),
        jnp.zeros((2, 128, 4), jnp.uint8),
        jnp.ones((2,), jnp.float32),
    ]
    results = (
        jax.ShapeDtypeStruct((m_pad, 64), jnp.bfloat16),
        jax.ShapeDtypeStruct((workspace_words,), workspace_dtype),
    )
    call = jax.ffi.ffi_call("jax_moe_moe_gemm1_check", results)
    attrs = dict(top_k=np.int32(2), num_ctas=np.int32(num_ctas), variant=np.int32(variant))
    try:
        jax.block_until_ready(jax.jit(lambda *a: call(*a, **attrs))(*jax.device_put(args, cpu)))
    except Exception as error:  # the runtime's error type differs between jax versions
        return str(error)
    return None


@pytest.mark.skipif(not _ffi.is_available(), reason="the jax_moe CUDA extension is not built")
def test_gemm_handler_checks_the_stream_k_workspace_on_cpu():
    from jax_moe.kernels import moe_gemm_config as cfg

    _ffi.register_cpu_checks()
    names = _ffi.kernel_variants()["moe_gemm1"]
    streamed = [n for n in names if _tactic("moe_gemm1", n).stream_k]
    if not streamed:
        pytest.skip("no stream-K variant in this build")
    tactic = _tactic("moe_gemm1", streamed[0])
    variant = names.index(streamed[0])
    plain = names.index(str(dataclasses.replace(tactic, stream_k=0)))
    # 4 row tiles x 128 / block_w weight tiles of counters, then 2 partial tiles per CTA.
    need = cfg.stream_k_workspace_words(tactic, 4, 128, 3)
    assert _gemm1_check(need, 3, variant) is None
    assert "workspace has" in _gemm1_check(need - 1, 3, variant)
    assert "num_ctas = 0" in _gemm1_check(need, 0, variant)
    assert "int32" in _gemm1_check(need, 3, variant, workspace_dtype=jnp.float32)
    too_many = cfg.STREAM_K_MAX_TILES + 1
    assert "at most 1024 row tiles" in _gemm1_check(need + 4 * too_many, 3, variant, too_many)
    # Other variants ignore the size of the workspace and num_ctas, not its type.
    assert _gemm1_check(4, 0, plain) is None
    assert "int32" in _gemm1_check(4, 0, plain, workspace_dtype=jnp.float32)


@pytest.mark.gpu
@requires_ffi_gpu
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_handler_rejects_bad_input(name):
    """A bad call raises a Python exception and leaves the process and GPU usable.

    Each case runs in a fresh process (this file run as a script), so a crash is
    reported as a failure of that case.
    """
    # The caller's PYTHONPATH first: it may hold the build under test (a `pip --target`
    # install), which the checkout's own sources would otherwise shadow.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*paths, str(REPO)]))
    result = subprocess.run(
        [sys.executable, __file__, name],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, f"exit code {result.returncode}:\n{output}"
    assert "ERROR: " in result.stdout and BAD_CALLS[name][-1] in result.stdout, output
    assert "VALID OK" in result.stdout, output


def _child_bad_input(name: str) -> None:
    """Script mode: one bad call on the GPU, then a valid call."""
    _ffi.register()
    print("ERROR:", _bad_call("jax_moe_combine", name).splitlines()[0], flush=True)
    y, slot_row = _problem(1, 3, 2, 64, 4, 4, 0, 8)
    got = _ffi.combine(jnp.asarray(y), jnp.asarray(slot_row), 2)
    want = _combine_numpy(y, slot_row, 2)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16))
    print("VALID OK", flush=True)


if __name__ == "__main__":
    _child_bad_input(sys.argv[1])
