"""CPU tests: the MoE GEMM kernels compile for sm_90a and export to C on a machine without a GPU.

The default tactics of both GEMMs compile and export in the fast suite; every
exported variant is compiled in the test marked `slow` (about a minute on 2 cores).
The programmatic-dependent-launch switch (`JAX_MOE_PDL`) is checked on the PTX
and the launch configuration of one small variant of each op. Skipped when the
CuTe DSL is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from jax_moe.kernels import moe_gemm_config as cfg

requires_dsl = pytest.mark.skipif(
    importlib.util.find_spec("nvidia_cutlass_dsl") is None,
    reason="the CuTe DSL (nvidia-cutlass-dsl) is not installed",
)


@pytest.fixture(scope="module")
def dsl():
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    import cutlass.cute as cute

    from jax_moe.kernels import moe_gemm1_sm90, moe_gemm2_sm90

    return cute, {"moe_gemm1": moe_gemm1_sm90, "moe_gemm2": moe_gemm2_sm90}


def _compile_and_export(cute, module, tactic, out_dir) -> float:
    fn, fake_args = module.export_spec(tactic)
    start = time.perf_counter()
    compiled = cute.compile(fn, *fake_args)
    elapsed = time.perf_counter() - start
    name = f"{module.OP}_{abs(hash(str(tactic))) % 10**8}"
    compiled.export_to_c(file_path=str(out_dir), file_name=name, function_prefix=name)
    header = (out_dir / f"{name}.h").read_text()
    assert f"{name}" in header
    assert (out_dir / f"{name}.o").stat().st_size > 1000
    return elapsed


def test_variants_are_unique_and_valid():
    for variants in (cfg.gemm1_variants(), cfg.gemm2_variants()):
        names = [str(t) for t in variants]
        assert len(names) == len(set(names))
        assert all(t.smem_bytes() <= 227 * 1024 for t in variants)
    # GEMM1 and GEMM2 list the same tile shapes in the same order.
    assert [t.params() for t in cfg.gemm1_variants()] == [t.params() for t in cfg.gemm2_variants()]


@requires_dsl
@pytest.mark.parametrize("op", ["moe_gemm1", "moe_gemm2"])
def test_default_tactic_compiles_and_exports(dsl, op, tmp_path):
    cute, modules = dsl
    module = modules[op]
    tactic = cfg.default_tactic(op, 128, 8, 32, 7168, 2048, num_experts=256)
    assert tactic in module.variants()
    assert module.OP == op
    _compile_and_export(cute, module, tactic, tmp_path)


@requires_dsl
@pytest.mark.slow
@pytest.mark.parametrize("op", ["moe_gemm1", "moe_gemm2"])
def test_every_variant_compiles_and_exports(dsl, op, tmp_path):
    cute, modules = dsl
    module = modules[op]
    for tactic in module.variants():
        elapsed = _compile_and_export(cute, module, tactic, tmp_path)
        assert elapsed < 60, f"{tactic} took {elapsed:.1f} s to compile"


@requires_dsl
def test_export_spec_rejects_other_tactics(dsl):
    _, modules = dsl
    with pytest.raises(TypeError, match="MoeGemm1Sm90Tactic"):
        modules["moe_gemm1"].export_spec(cfg.gemm2_variants()[0])


def _problem(op: str, **overrides):
    from jax_moe.tuning.problem import ProblemKey

    fields = dict(
        op=op,
        arch="sm_90a",
        hidden=7168,
        intermediate=2048,
        num_experts=256,
        num_local_experts=32,
        top_k=8,
        activation_dtype="bfloat16",
        token_bucket=128,
    )
    fields.update(overrides)
    return ProblemKey(**fields)


def test_tactics_round_trip_through_json():
    from jax_moe.tactic import tactic_from_json

    for tactic in cfg.gemm1_variants() + cfg.gemm2_variants():
        assert tactic_from_json(tactic.to_json()) == tactic
    assert str(cfg.gemm1_variants()[0]).startswith("moe_gemm1_sm90[block_m=16,block_w=128")


def test_tactic_json_without_a_later_field_takes_its_default():
    """Tables written before `wgmma` existed still load (as `mma.sync` tactics); an
    unknown param or a missing one that is not optional is still an error."""
    from jax_moe.tactic import tactic_from_json

    tactic = cfg.gemm2_variants()[0]
    data = tactic.to_json()
    old = {"family": data["family"], "params": dict(data["params"])}
    del old["params"]["wgmma"]
    del old["params"]["overlap"]
    del old["params"]["bulk"]
    del old["params"]["prefetch"]
    assert tactic_from_json(old) == tactic
    assert not (tactic.wgmma or tactic.overlap or tactic.bulk or tactic.prefetch)
    for required in ("split_k", "block_m"):
        missing = {"family": data["family"], "params": dict(data["params"])}
        del missing["params"][required]
        with pytest.raises(ValueError, match=f"missing \\['{required}'\\].*optional"):
            tactic_from_json(missing)
    extra = {"family": data["family"], "params": {**data["params"], "raster": 1}}
    with pytest.raises(ValueError, match="unexpected \\['raster'\\]"):
        tactic_from_json(extra)


def test_wgmma_variants_are_exported_for_every_regime():
    wgmma = [t for t in cfg.gemm1_variants() if t.wgmma]
    assert {t.block_m for t in wgmma} == {16, 32, 64, 128}
    assert {t.split_k for t in wgmma} == {1, 2, 4, 8}
    assert all((t.warps_n, t.cp_async) == (1, False) and t.warps_m in (4, 8) for t in wgmma)
    # No token rows in registers: the 128-row wgmma tiles fit the budget and are
    # searched by default, the mma.sync ones are not.
    assert all(t.register_estimate() <= 140 for t in wgmma)
    for t in (t for t in wgmma if t.warps_m == 4):
        sync = (
            dataclasses.replace(t, wgmma=False, overlap=False, tail_m=0, mbarriers=False)
            if t.block_m < 128
            else None
        )
        assert sync is None or t.register_estimate() < sync.register_estimate()
    assert all(cfg.searched_by_default(t) != cfg.is_experimental(t) for t in wgmma)
    assert not any(
        cfg.searched_by_default(t) for t in cfg.gemm1_variants() if t.block_m == 128 and not t.wgmma
    )


@requires_dsl
@pytest.mark.parametrize("op", ["moe_gemm1", "moe_gemm2"])
def test_wgmma_variant_emits_warpgroup_mmas(dsl, op, tmp_path):
    """A wgmma tactic's PTX has register-A warpgroup MMAs over the whole token tile, the
    proxy fence after the token stores, and no `ldmatrix`; its `mma.sync` twin none."""
    cute, modules = dsl
    module = modules[op]
    tactic = next(t for t in module.variants() if t.wgmma and t.block_m == 32)
    for variant in (tactic, dataclasses.replace(tactic, wgmma=False)):
        fn, fake_args = module.export_spec(variant)
        dump = tmp_path / f"wgmma{int(variant.wgmma)}"
        dump.mkdir()
        ptx = cute.compile(fn, *fake_args, options=f"--keep-ptx --dump-dir={dump}").__ptx__
        if not variant.wgmma:
            assert "wgmma" not in ptx and "ldmatrix" in ptx and "mma.sync" in ptx
            continue
        shape = f"wgmma.mma_async.sync.aligned.m64n{tactic.block_m}k16.f32.bf16.bf16"
        # Per K step: 4 MMAs of 16 columns for each 64-row wgmma tile.
        assert ptx.count(shape) % (4 * tactic.block_w // 64) == 0 and shape in ptx
        assert "ldmatrix" not in ptx and "mma.sync" not in ptx
        assert "fence.proxy.async.shared::cta" in ptx
        assert "wgmma.commit_group" in ptx and "wgmma.wait_group.sync.aligned \t0" in ptx


def test_overlap_variants_are_unsplit_wgmma_tiles_outside_the_default_search():
    for variants in (cfg.gemm1_variants(), cfg.gemm2_variants()):
        overlap = [t for t in variants if t.overlap]
        assert [(t.block_m, t.block_w, t.stages) for t in overlap] == [
            (32, 128, 1),
            (64, 128, 1),
            (128, 64, 1),
        ]
        assert all(t.wgmma and t.split_k == 1 for t in overlap)
        assert not any(cfg.searched_by_default(t) for t in overlap)
        # Ids after every earlier variant (only the bulk-copy, prefetch, two-warpgroup,
        # `tail_m` and stream-K ones follow).
        earlier = [
            t
            for t in variants
            if not (
                t.bulk or t.prefetch or t.warps_m == 8 or t.tail_m or t.stream_k or t.token_steps
            )
        ]
        assert earlier[-len(overlap) :] == overlap
        # One more token stage than the plain wgmma tile (the ring shares its buffer
        # with the larger fp32 tile).
        for t in overlap:
            ring = 2 * 64 * (t.stages + 2) * t.block_m
            assert t.smem_bytes() == max(ring, 4 * (t.block_w + 4) * t.block_m) + 1024 + 768


def test_two_warpgroup_variants_share_one_token_tile():
    for variants in (cfg.gemm1_variants(), cfg.gemm2_variants()):
        two = [t for t in variants if t.warps_m == 8 and not t.tail_m]
        assert [(t.block_m, t.block_w, t.stages) for t in two] == [
            (128, 128, 1),
            (64, 128, 1),
            (128, 128, 2),
            (128, 128, 3),
            (64, 128, 2),
        ]
        # The last ids but the `tail_m` and stream-K ones; unsplit wgmma tiles searched by
        # default.
        assert [t for t in variants if not (t.tail_m or t.stream_k or t.token_steps)][
            -len(two) :
        ] == two
        for t in two:
            assert t.wgmma and t.warps_n == 1 and t.split_k == 1 and not t.overlap
            assert t.num_threads() == 256 and cfg.searched_by_default(t)
            # Per thread, the registers of the one-warpgroup tile with half the weight
            # rows; the CTA's shared memory is that of the one-warpgroup tile of its
            # size, where that one is exported.
            half = dataclasses.replace(t, warps_m=4, block_w=64)
            assert t.register_estimate() == half.register_estimate()
            key = (t.block_m, t.block_w, t.stages, 4, 1, True, False, 0)
            one = [
                v
                for v in variants
                if (v.block_m, v.block_w, v.stages, v.warps_m, v.split_k, v.wgmma)
                + (v.overlap, v.tail_m)
                == key
            ]
            assert not one or t.smem_bytes() == one[0].smem_bytes()
        # The fp32 tile shares the token ring's buffer: up to 3 stages (a ring of 4 x 16
        # KB) the 128 x 128 tile needs only the 67.6 KB of its fp32 tile, so two CTAs
        # (three by shared memory alone) fit an SM's 228 KB.
        by_stages = {t.stages: t.smem_bytes() for t in two if t.block_m == 128}
        assert by_stages[1] == by_stages[2] == by_stages[3] == 4 * 132 * 128 + 1024 + 768
        assert 3 * (by_stages[3] + 1024) <= 228 * 1024


def test_tail_variants_are_prefill_tiles_after_the_others():
    for variants in (cfg.gemm1_variants(), cfg.gemm2_variants()):
        tails = [t for t in variants if t.tail_m and not t.mbarriers]
        assert [(t.block_m, t.block_w, t.stages, t.warps_m, t.tail_m) for t in tails] == [
            (128, 128, 1, 8, 32),
            (128, 128, 2, 8, 32),
            (64, 128, 1, 8, 32),
            (32, 128, 2, 4, 16),
        ]
        # The last ids but the `mbarriers` and stream-K ones.
        plain = [t for t in variants if not (t.mbarriers or t.stream_k or t.token_steps)]
        assert plain[-len(tails) :] == tails
        for t in tails:
            # Each has its plain twin, with the same shared memory and registers.
            twin = dataclasses.replace(t, tail_m=0)
            assert twin in variants
            assert t.smem_bytes() == twin.smem_bytes()
            assert t.register_estimate() == twin.register_estimate()
            assert cfg.searched_by_default(t) and not cfg.is_experimental(t)
    base = dict(block_m=128, block_w=128, warps_m=8, warps_n=1, stages=1, cp_async=False)
    cfg.MoeGemm1Sm90Tactic(**base, wgmma=True, tail_m=64)
    for bad in (
        dict(wgmma=False, warps_m=4, tail_m=32),  # mma.sync
        dict(wgmma=True, tail_m=128),  # not below block_m
        dict(wgmma=True, tail_m=48),  # not a divisor
        dict(wgmma=True, tail_m=16),  # 16 rows: half a token chunk per thread of 256
        dict(wgmma=True, tail_m=-32),
    ):
        with pytest.raises(ValueError, match="tail_m"):
            cfg.MoeGemm1Sm90Tactic(**(base | bad))


@requires_dsl
@pytest.mark.parametrize("op", ["moe_gemm1", "moe_gemm2"])
def test_tail_variant_compiles_one_loop_per_width(dsl, op, tmp_path):
    """A `tail_m` tactic's PTX has the K loop's MMAs at every multiple of `tail_m`
    (four per unrolled K step each), in as many registers as its plain twin."""
    cute, modules = dsl
    module = modules[op]
    tactic = next(t for t in module.variants() if t.tail_m and t.block_m == 128)
    twin = dataclasses.replace(tactic, tail_m=0)
    compiled = {
        t: _compile_kept(cute, module, t, tmp_path / f"tail{t.tail_m}") for t in (tactic, twin)
    }
    ptx = compiled[tactic].__ptx__
    per_width = 4 * tactic.stages
    for rows in range(tactic.tail_m, tactic.block_m + 1, tactic.tail_m):
        shape = f"wgmma.mma_async.sync.aligned.m64n{rows}k16.f32.bf16.bf16"
        assert ptx.count(shape) == per_width, (rows, ptx.count(shape))
    assert compiled[twin].__ptx__.count("wgmma.mma_async") == per_width
    registers = {t: _cubin_registers(c.__cubin__) for t, c in compiled.items()}
    assert registers[tactic] <= max(registers[twin], 128), registers


def test_mbarrier_variant_is_an_experimental_tail_tile_with_a_deeper_ring():
    for variants in (cfg.gemm1_variants(), cfg.gemm2_variants()):
        guarded = [t for t in variants if t.mbarriers]
        assert [(t.block_m, t.block_w, t.stages, t.warps_m, t.tail_m) for t in guarded] == [
            (128, 128, 2, 8, 32)
        ]
        # The last ids but the stream-K and `token_steps` ones.
        assert [t for t in variants if not (t.stream_k or t.token_steps)][
            -len(guarded) :
        ] == guarded
        for t in guarded:
            assert dataclasses.replace(t, mbarriers=False) in variants  # its twin
            assert cfg.is_experimental(t) and not cfg.searched_by_default(t)
            # One more 16 KB token stage than the twin (`block_m` rows of a 64-wide K
            # step) and two mbarriers per stage; the 128 x 128 tile's ring of 4 stages
            # still fits in the buffer of its fp32 tile.
            ring = 2 * 64 * (t.stages + 2) * t.block_m
            fp32 = 4 * (t.block_w + 4) * t.block_m
            bars = 16 * (t.stages + 2)
            assert t.smem_bytes() == max(ring, fp32) + 1024 + bars + 768
            assert (
                t.register_estimate() == dataclasses.replace(t, mbarriers=False).register_estimate()
            )
    base = dict(block_m=64, block_w=128, warps_m=4, warps_n=1, stages=1, cp_async=False)
    cfg.MoeGemm1Sm90Tactic(**base, wgmma=True, mbarriers=True)  # without tail_m too
    for bad in (
        dict(wgmma=False, mbarriers=True),  # mma.sync
        dict(wgmma=True, split_k=2, block_m=16, mbarriers=True),
        dict(wgmma=True, overlap=True, mbarriers=True),
    ):
        with pytest.raises(ValueError, match="mbarriers"):
            cfg.MoeGemm1Sm90Tactic(**(base | bad))


def test_stream_k_variants_are_decode_register_tiles_after_the_others():
    for variants in (cfg.gemm1_variants(), cfg.gemm2_variants()):
        streamed = [t for t in variants if t.stream_k]
        assert [(t.block_w, t.stages, t.stream_k) for t in streamed] == [
            (64, 2, 6),
            (64, 2, 8),
            (128, 2, 4),
            (128, 2, 5),
            (128, 2, 6),
            (128, 4, 3),
            (128, 4, 4),
        ]
        # The last ids but the `token_steps` ones.
        assert [t for t in variants if not t.token_steps][-len(streamed) :] == streamed
        for t in streamed:
            twin = dataclasses.replace(t, stream_k=0)
            assert twin in variants
            assert (t.block_m, t.warps_m, t.wgmma, t.cp_async, t.split_k) == (16, 4, 0, 0, 1)
            assert cfg.is_experimental(t) and not cfg.searched_by_default(t)
            assert t.register_estimate() == twin.register_estimate()
            # The active-tile list and one word per warp.
            assert t.smem_bytes() == twin.smem_bytes() + 4 * (cfg.STREAM_K_MAX_TILES + 8)
            # A decode tactic: one row tile per expert at most.
            problem = _problem("moe_gemm1", token_bucket=512)  # 16 rows per expert
            t.check(problem)
            with pytest.raises(ValueError, match="stream_k.*decode tactic"):
                t.check(_problem("moe_gemm1", token_bucket=1024))
    base = dict(block_m=16, block_w=128, warps_m=4, warps_n=1, stages=2, cp_async=False)
    cfg.MoeGemm1Sm90Tactic(**base, stream_k=6)
    for bad in (
        dict(stream_k=7),  # not a listed CTAs-per-SM count
        dict(stream_k=2, wgmma=True),
        dict(stream_k=2, split_k=2),
        dict(stream_k=2, block_m=32),
        dict(stream_k=2, prefetch=4),
    ):
        with pytest.raises(ValueError, match="stream_k"):
            cfg.MoeGemm1Sm90Tactic(**(base | bad))


def test_token_ring_variants_are_experimental_decode_tiles_after_the_others():
    for variants in (cfg.gemm1_variants(), cfg.gemm2_variants()):
        ringed = [t for t in variants if t.token_steps]
        assert [(t.block_w, t.stages, t.token_steps, t.split_k) for t in ringed] == [
            (64, 2, 2, 1),
            (64, 2, 4, 8),
            (128, 4, 4, 2),
        ]
        assert variants[-len(ringed) :] == ringed  # the last ids
        for t in ringed:
            twin = dataclasses.replace(t, token_steps=0)
            assert twin in variants
            assert (t.block_m, t.warps_m, t.wgmma, t.cp_async) == (16, 4, 0, 0)
            assert cfg.is_experimental(t) and not cfg.searched_by_default(t)
            # No token chunks in registers; two groups of padded token stages, which the
            # fp32 tile shares.
            assert t.register_estimate() == twin.register_estimate() - 4 * t.stages
            ring = 2 * (64 + 8) * 2 * t.token_steps * t.block_m
            assert t.smem_bytes() == max(ring, 4 * (t.block_w + 4) * t.block_m) + 768
    base = dict(block_m=16, block_w=64, warps_m=4, warps_n=1, stages=2, cp_async=False)
    cfg.MoeGemm1Sm90Tactic(**base, token_steps=2)
    for bad in (
        dict(token_steps=3),  # not a listed group size
        dict(token_steps=2, stages=4),  # not a multiple of the weight ring
        dict(token_steps=4, wgmma=True),
        dict(token_steps=4, cp_async=True, stages=3),
        dict(token_steps=4, prefetch=4),
        dict(token_steps=2, stream_k=6),
    ):
        with pytest.raises(ValueError, match="token_steps"):
            cfg.MoeGemm1Sm90Tactic(**(base | bad))


@requires_dsl
def test_token_ring_variant_copies_tokens_with_one_barrier_per_group(dsl, tmp_path):
    """The `token_steps` tile copies token rows by cp.async in commit groups (no register
    staging), where its twin loads them into registers and stores them to shared memory;
    its K loop has one CTA barrier per group (with 2 stages and 2 steps per group, one
    in the loop body, against the twin's two: one per step)."""
    cute, modules = dsl
    module = modules["moe_gemm2"]
    tactic = next(t for t in module.variants() if t.token_steps == 2)
    twin = dataclasses.replace(tactic, token_steps=0)
    ptx = _compile_kept(cute, module, tactic, tmp_path / "ringed").__ptx__
    twin_ptx = _compile_kept(cute, module, twin, tmp_path / "twin").__ptx__
    assert "cp.async.cg.shared.global" in ptx and "cp.async" not in twin_ptx
    assert "cp.async.commit_group" in ptx and "cp.async.wait_group" in ptx
    # Token ring: the loop's barrier, then one before and one after the fp32 tile is
    # written over the ring. Twin: two in the loop (unrolled by its 2 stages), one after.
    assert ptx.count("bar.sync") == 3 and twin_ptx.count("bar.sync") == 3
    loop = ptx[ptx.index("cp.async.wait_group") :]
    assert loop.count("bar.sync") == 3  # the loop's barrier follows its wait


@requires_dsl
def test_decode_terms_use_plain_shifts_where_the_mask_allows():
    """`shift_for_mask` replaces a rotation by one plain shift only where the mask keeps
    the same bits: checked on random words for every term of the decode, and on
    synthetic masks for each kind."""
    from jax_moe.kernels.nvfp4_decode_sm90 import shift_for_mask
    from jax_moe.prepare import DECODE_TERMS

    def rotate(word, r):
        return ((word << r) | (word >> (32 - r) % 32)) & 0xFFFFFFFF

    def apply(word, kind, amount):
        return {
            "none": word,
            "left": (word << amount) & 0xFFFFFFFF,
            "right": word >> amount,
            "rotate": rotate(word, amount),
        }[kind]

    words = [int(w) for w in np.random.default_rng(0).integers(0, 2**32, 2000, dtype=np.uint64)]
    terms = [term for pair in DECODE_TERMS for term in pair]
    terms += [(8, 0xFFFFFF00), (8, 0x000000FF), (8, 0x00000F0F), (0, 0xFFFFFFFF)]
    kinds = {}
    for rotation, mask in terms:
        kind, amount = shift_for_mask(rotation, mask)
        kinds[(rotation, mask)] = kind
        for word in words:
            assert apply(word, kind, amount) & mask == rotate(word, rotation) & mask
    # The decode keeps one funnel shift per code word (pair 2's rotation by 10).
    assert [kinds[t] for pair in DECODE_TERMS for t in pair] == [
        "none",
        "left",
        "rotate",
        "left",
        "right",
    ]
    assert [kinds[t] for t in terms[-4:]] == ["left", "right", "rotate", "none"]


@requires_dsl
def test_decode_ptx_shifts_each_code_word_as_planned(dsl, tmp_path):
    """In the compiled decode every term of DECODE_TERMS is the shift `shift_for_mask`
    plans (left by 4 and 6, right by 2, one funnel shift by 10) followed by the AND with
    its mask, once per code word; none of the plain-shift terms is a funnel shift. The
    scales of a word's two rows are converted together and multiplied half by half."""
    from jax_moe.kernels.nvfp4_decode_sm90 import shift_for_mask
    from jax_moe.prepare import DECODE_TERMS

    cute, modules = dsl
    module = modules["moe_gemm1"]
    tactic = next(
        t
        for t in module.variants()
        if (t.block_m, t.block_w, t.stages, t.split_k) == (16, 64, 1, 1)
        and not (t.wgmma or t.cp_async or t.token_steps or t.stream_k or t.prefetch)
        and t.warps_m == 4
    )
    ptx = _compile_kept(cute, module, tactic, tmp_path / "decode").__ptx__
    words = 4  # code words of one lane in a K step of a 16 x 64 tile (the loop's one step)
    gap = r"\s*(?://[^\n]*\s*)*"  # whitespace and inline-asm comments
    for rotation, mask in (t for pair in DECODE_TERMS for t in pair):
        kind, amount = shift_for_mask(rotation, mask)
        if kind == "none":
            continue
        shift = {
            "left": rf"shl\.b32\s+(%r\d+), %r\d+, {amount};",
            "right": rf"shr\.u32\s+(%r\d+), %r\d+, {amount};",
            "rotate": rf"shf\.l\.wrap\.b32\s+(%r\d+), %r\d+, %r\d+, {amount};",
        }[kind]
        signed = mask - (1 << 32) if mask >= 1 << 31 else mask
        found = re.findall(shift + gap + rf"and\.b32\s+%r\d+, \1, {signed};", ptx)
        assert len(found) == words, (rotation, kind, len(found))
    assert len(re.findall(r"shf\.l\.wrap\.b32", ptx)) == words  # only the rotation by 10
    # One byte permute per code word takes the scale bytes of its two rows (bytes 0, 1
    # of the scale word for even words, 2, 3 for odd ones); each of the word's four
    # products takes one half of the converted pair: rows g, g + 8, g, g + 8.
    selectors = re.findall(r"prmt\.b32\s+%r\d+, %r\d+, 0, (\d+);", ptx)
    assert [int(s) for s in selectors] == [0x4140, 0x4342] * (words // 2)
    assert ptx.count("mov.b32 {lo, hi}, %r") == 4 * words  # bits 0..15 are `lo`
    halves = re.findall(r"mov\.b32 s, \{(\w+), \1\}; mul\.rn\.bf16x2", ptx)
    assert halves == ["lo", "hi", "lo", "hi"] * words
    assert ptx.count("mul.rn.bf16x2") == 4 * words


def test_stream_k_workspace_words():
    tactic = next(t for t in cfg.gemm1_variants() if t.stream_k == 4 and t.block_w == 128)
    # 10 row tiles x 4096 / 128 weight tiles = 320 counters, then 2 partial tiles per CTA.
    assert cfg.stream_k_workspace_words(tactic, 10, 4096, 264) == 320 + 2 * 264 * 16 * 128
    assert cfg.stream_k_workspace_words(tactic, 3, 384, 1) == 12 + 2 * 16 * 128  # 9 -> 12
    assert cfg.stream_k_workspace_words(dataclasses.replace(tactic, stream_k=0), 3, 384, 1) == 0


@requires_dsl
@pytest.mark.parametrize("op", ["moe_gemm1", "moe_gemm2"])
def test_mbarrier_variant_has_no_cta_barrier_in_its_k_loop(dsl, op, tmp_path):
    """An `mbarriers` tactic's K loops wait on mbarriers (a full and an empty wait per
    unrolled K step) instead of a CTA barrier: three `bar.sync` per K loop (after the
    barriers' initialization, before and after the fp32 tile), where the twin has one
    more per unrolled K step. Its registers leave as many 256-thread CTAs per SM as the
    twin's (two)."""
    cute, modules = dsl
    module = modules[op]
    tactic = next(t for t in module.variants() if t.mbarriers and t.block_m == 128)
    twin = dataclasses.replace(tactic, mbarriers=False)
    compiled = {
        t: _compile_kept(cute, module, t, tmp_path / f"mbar{int(t.mbarriers)}")
        for t in (tactic, twin)
    }
    loops = tactic.block_m // tactic.tail_m
    ptx = compiled[tactic].__ptx__
    assert ptx.count("bar.sync") == 3 * loops
    assert compiled[twin].__ptx__.count("bar.sync") == (2 + tactic.stages) * loops
    assert ptx.count("mbarrier.try_wait.parity") == 2 * tactic.stages * loops
    # One arrival per thread when its copies land: each prologue fill and each step.
    assert ptx.count("cp.async.mbarrier.arrive.noinc") == 2 * tactic.stages * loops
    registers = {t: _cubin_registers(c.__cubin__) for t, c in compiled.items()}
    per_sm = {t: 65536 // (-(-r // 8) * 8 * 256) for t, r in registers.items()}
    assert per_sm[tactic] >= per_sm[twin] and per_sm[twin] >= 2, registers


@requires_dsl
def test_two_warpgroup_variant_compiles_for_256_threads(dsl, tmp_path):
    """The `8 x 1` wgmma tile launches 256 threads, each warpgroup issuing the
    `m64n128k16` MMAs of its 64 weight rows (four per K step), and no `ldmatrix`."""
    cute, modules = dsl
    for op, module in modules.items():
        tactic = next(t for t in module.variants() if t.warps_m == 8 and t.block_m == 128)
        ptx = _compile_kept(cute, module, tactic, tmp_path / op).__ptx__
        assert ".reqntid 256, 1, 1" in ptx
        shape = "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16"
        assert ptx.count(shape) == 4 and "ldmatrix" not in ptx


def _compile_kept(cute, module, tactic, dump):
    """`cute.compile` of `tactic`'s export spec keeping its PTX and cubin in `dump`."""
    fn, fake_args = module.export_spec(tactic)
    dump.mkdir()
    return cute.compile(fn, *fake_args, options=f"--keep-ptx --keep-cubin --dump-dir={dump}")


def test_bulk_variants_are_experimental_decode_tiles_after_the_others():
    for variants in (cfg.gemm1_variants(), cfg.gemm2_variants()):
        bulk = [t for t in variants if t.bulk]
        assert {(t.block_m, t.block_w, t.stages, t.bulk) for t in bulk} == {
            (16, 64, 2, 4),
            (16, 128, 2, 4),
        }
        assert {t.split_k for t in bulk} == {1, 2}
        assert all(t.cp_async and not t.wgmma and (t.warps_m, t.warps_n) == (4, 1) for t in bulk)
        # After every other variant but the prefetch, two-warpgroup, `tail_m` and
        # stream-K ones.
        earlier = [
            t
            for t in variants
            if not (t.prefetch or t.warps_m == 8 or t.tail_m or t.stream_k or t.token_steps)
        ]
        assert earlier[-len(bulk) :] == bulk
        assert all(cfg.is_experimental(t) and not cfg.searched_by_default(t) for t in bulk)
        for t in bulk:
            # 3 token stages, `stages` weight slots of `bulk` steps, one mbarrier per slot.
            assert t.smem_bytes() == (
                2 * 72 * 3 * t.block_m
                + 4 * (t.block_w + 4) * t.block_m
                + 36 * t.block_w * t.stages * t.bulk
                + 8 * t.stages
                + 768
            )
            assert t.register_estimate() == t.block_m * t.block_w // 128
    # Like split-K, a decode tactic: one row tile of expected rows per expert at most.
    tactic = next(t for t in cfg.gemm1_variants() if t.bulk and t.split_k == 1)
    tactic.check(_problem("moe_gemm1", token_bucket=512))  # 16 rows per expert
    with pytest.raises(ValueError, match="bulk=4 is a decode tactic"):
        tactic.check(_problem("moe_gemm1", token_bucket=1024))


def test_prefetch_variants_are_experimental_mma_sync_decode_tiles_after_the_others():
    for variants in (cfg.gemm1_variants(), cfg.gemm2_variants()):
        pre = [t for t in variants if t.prefetch]
        # Only the two-warpgroup, `tail_m` and stream-K tiles follow.
        earlier = [
            t for t in variants if t.warps_m != 8 and not (t.tail_m or t.stream_k or t.token_steps)
        ]
        assert earlier[-len(pre) :] == pre
        assert {(t.block_w, t.stages, t.prefetch, t.split_k) for t in pre} == {
            (64, 2, 8, 1),
            (64, 2, 8, 2),
        }
        assert all(t.block_m == 16 and not (t.wgmma or t.cp_async or t.bulk) for t in pre)
        assert all(cfg.is_experimental(t) and not cfg.searched_by_default(t) for t in pre)
        # Each has its plain twin among the exported variants.
        assert all(dataclasses.replace(t, prefetch=0) in variants for t in pre)


@requires_dsl
@pytest.mark.parametrize("op", ["moe_gemm1", "moe_gemm2"])
def test_prefetch_variant_asks_l2_for_steps_ahead(dsl, op, tmp_path):
    """A `prefetch` tactic's PTX prefetches each band's 512 code bytes and 64 scale bytes
    into L2 (the steps between the register ring and `prefetch` before the loop, one
    step per loop step, the loop unrolled `stages` times); its twin has none."""
    cute, modules = dsl
    module = modules[op]
    tactic = next(t for t in module.variants() if t.prefetch and t.block_w == 64)
    for variant in (tactic, dataclasses.replace(tactic, prefetch=0)):
        ptx = _compile_kept(cute, module, variant, tmp_path / f"pf{variant.prefetch}").__ptx__
        # Steps `stages .. prefetch - 1` before the loop, `stages` unrolled steps in it.
        sites = variant.prefetch
        assert ptx.count("cp.async.bulk.prefetch.L2.global") == 2 * sites
        assert ptx.count("], 512;") == ptx.count("], 64;") == sites


@requires_dsl
@pytest.mark.parametrize("op", ["moe_gemm1", "moe_gemm2"])
def test_bulk_variant_copies_weights_in_bulk(dsl, op, tmp_path):
    """A `bulk` tactic's PTX copies each warp's bands with one bulk copy of codes and one
    of scales per slot on an mbarrier per slot, which the threads wait for; only the
    token rows go through per-thread cp.async; it keeps 64 registers or fewer."""
    cute, modules = dsl
    module = modules[op]
    exported = next(t for t in module.variants() if t.bulk and t.block_w == 64)
    # The exported shape and two other valid rings (slots x steps per copy).
    picked = [exported] + [
        dataclasses.replace(exported, stages=st, bulk=steps) for st, steps in ((4, 1), (3, 2))
    ]
    for tactic in picked:
        compiled = _compile_kept(cute, module, tactic, tmp_path / f"{tactic.stages}_{tactic.bulk}")
        ptx = compiled.__ptx__
        copies = "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
        # Slots 0 .. stages - 2 in the prologue, one refill in the loop; one 16-row band
        # per warp: a copy of codes and one of scales each time.
        assert ptx.count(copies) == 2 * tactic.stages
        assert ptx.count("mbarrier.arrive.expect_tx") == tactic.stages
        assert ptx.count("mbarrier.init.shared.b64") == tactic.stages
        assert "mbarrier.try_wait.parity" in ptx
        # Token rows: 16-byte cp.async chunks, 2 steps in the prologue and one per step.
        assert ptx.count("cp.async.cg.shared.global") == 3
        assert "cp.async.ca.shared.global" not in ptx
        registers = _cubin_registers(compiled.__cubin__)
        assert registers <= 64, f"{tactic}: {registers} registers"


@requires_dsl
@pytest.mark.parametrize("op", ["moe_gemm1", "moe_gemm2"])
def test_overlap_variant_waits_per_slice(dsl, op, tmp_path):
    """An `overlap` tactic's PTX commits each 16 columns of a K step as its own group
    and waits for all but 3 groups before rewriting a slice's A registers (the plain
    wgmma tile: one group per step and a full wait); both fit 4 or 3 CTAs per SM."""
    cute, modules = dsl
    module = modules[op]
    tactic = next(t for t in module.variants() if t.overlap and t.block_m == 64)
    counts = {}
    for variant in (tactic, dataclasses.replace(tactic, overlap=False)):
        compiled = _compile_kept(cute, module, variant, tmp_path / f"overlap{variant.overlap}")
        ptx = compiled.__ptx__
        counts[variant.overlap] = (
            ptx.count("wgmma.commit_group"),
            ptx.count("wgmma.wait_group.sync.aligned \t3;"),
            ptx.count("wgmma.wait_group.sync.aligned \t0;"),
            ptx.count("wgmma.fence"),
            _cubin_registers(compiled.__cubin__),
        )
    # The K loop's body is emitted once per register-ring stage (one here).
    assert counts[True][:4] == (4, 4, 1, 4) and counts[False][:4] == (1, 0, 2, 1)
    assert counts[False][4] <= 128 and counts[True][4] <= 160  # 4 and 3 CTAs per SM


def _local_ptxas_isa() -> str | None:
    """The PTX ISA version of the toolkit's `ptxas` on the PATH (CUDA 13.0 -> 9.0), or
    None without one."""
    import re
    import shutil
    import subprocess

    if shutil.which("ptxas") is None:
        return None
    text = subprocess.run(["ptxas", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", text)
    return None if match is None else f"{int(match[1]) - 4}.{match[2]}"


@requires_dsl
@pytest.mark.parametrize("op", ["moe_gemm1", "moe_gemm2"])
def test_overlap_variant_is_not_serialized_by_ptxas(dsl, op, tmp_path):
    """ptxas keeps the overlap variant's MMAs asynchronous: no C7513 warning (it
    serializes warpgroup MMAs when it cannot prove their register operands untouched,
    which would undo the overlap). Run with the toolkit's own ptxas on the DSL's PTX,
    its ISA version lowered to what that ptxas accepts (the instructions are older)."""
    import re
    import subprocess

    isa = _local_ptxas_isa()
    if isa is None:
        pytest.skip("no ptxas on the PATH")
    cute, modules = dsl
    module = modules[op]
    for tactic in (t for t in module.variants() if t.overlap):
        fn, fake_args = module.export_spec(tactic)
        dump = tmp_path / f"{tactic.block_m}x{tactic.block_w}"
        dump.mkdir()
        ptx = cute.compile(fn, *fake_args, options=f"--keep-ptx --dump-dir={dump}").__ptx__
        source = dump / "kernel.ptx"
        source.write_text(re.sub(r"^\.version \d+\.\d+", f".version {isa}", ptx, flags=re.M))
        run = subprocess.run(
            ["ptxas", "-arch=sm_90a", "-v", str(source), "-o", str(dump / "kernel.cubin")],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert "C7513" not in run.stderr and "wgmma" not in run.stderr.lower(), run.stderr
        registers = int(re.search(r"Used (\d+) registers", run.stderr)[1])
        assert registers <= 160, f"{tactic}: {registers} registers"


def test_tactic_check_rejects_unsupported_problems():
    t1 = cfg.default_tactic("moe_gemm1", 4, 8, 32, 7168, 2048, num_experts=256)
    t2 = cfg.default_tactic("moe_gemm2", 4, 8, 32, 7168, 2048, num_experts=256)
    t1.check(_problem("moe_gemm1"))
    t2.check(_problem("moe_gemm2"))
    with pytest.raises(NotImplementedError, match="arch"):
        t1.check(_problem("moe_gemm1", arch="sm_100a"))
    with pytest.raises(NotImplementedError, match="bfloat16"):
        t2.check(_problem("moe_gemm2", activation_dtype="float16"))
    with pytest.raises(ValueError, match="hidden"):
        t1.check(_problem("moe_gemm1", hidden=7200))
    with pytest.raises(ValueError, match="intermediate"):
        t2.check(_problem("moe_gemm2", intermediate=2000))
    with pytest.raises(ValueError, match="hidden"):
        t2.check(_problem("moe_gemm2", hidden=7232))


def test_combine_tactic_batches_tokens_with_several_local_rows():
    from jax_moe.kernels.combine_config import (
        COMBINE_SM90_TACTICS,
        CombineSm90Tactic,
        combine_tactic,
    )

    # DeepSeek-V3 EP=8: one local row per token expected; Qwen3-30B-A3B EP=1: eight.
    assert not combine_tactic(8, 32, 256).batch
    assert combine_tactic(8, 128, 128).batch
    assert combine_tactic(8, 64, 256).batch  # EP=4: two
    assert combine_tactic(8, 32, 256) in COMBINE_SM90_TACTICS
    assert combine_tactic(8, 128, 128) in COMBINE_SM90_TACTICS
    with pytest.raises(TypeError):
        CombineSm90Tactic(threads=128, batch=1)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(block_m=24), ValueError),
        (dict(block_w=96), ValueError),
        (dict(warps_m=1, warps_n=4), ValueError),
        (dict(stages=5), ValueError),
        (dict(block_m=128, block_w=128, warps_m=2, warps_n=2, stages=2), ValueError),
        (dict(stages=2, cp_async=True), ValueError),
        (dict(split_k=3), ValueError),
        (dict(split_k=16), ValueError),
        (dict(stages=3, cp_async=True, split_k=2), ValueError),
        (dict(block_m=16.0), TypeError),
        (dict(block_m=32, warps_m=2, warps_n=2, wgmma=True), ValueError),
        (dict(stages=3, cp_async=True, wgmma=True), ValueError),
        (dict(wgmma=1), TypeError),
        (dict(overlap=True), ValueError),  # needs wgmma
        (dict(block_m=32, block_w=128, wgmma=True, overlap=True, split_k=2), ValueError),
        (dict(wgmma=True, overlap=1), TypeError),
        (dict(stages=4, bulk=1), ValueError),  # needs the shared-memory ring
        (dict(block_m=64, warps_m=2, warps_n=2, stages=3, cp_async=True, bulk=2), ValueError),
        (dict(stages=6, cp_async=True, bulk=1), ValueError),
        (dict(stages=3, cp_async=True, bulk=3), ValueError),
        (dict(stages=3, cp_async=True, wgmma=True, bulk=2), ValueError),
        (dict(stages=3, cp_async=True, bulk=True), TypeError),
        (dict(stages=2, prefetch=6), ValueError),
        (dict(stages=4, prefetch=4), ValueError),  # not beyond the register ring
        (dict(stages=3, cp_async=True, prefetch=8), ValueError),
        (dict(block_m=32, block_w=128, stages=1, wgmma=True, prefetch=8), ValueError),
        (dict(stages=2, prefetch=True), TypeError),
        (dict(block_m=128, block_w=128, warps_m=8), ValueError),  # needs wgmma
        (dict(block_m=128, block_w=128, warps_m=8, wgmma=True, split_k=2), ValueError),
        (dict(block_m=128, block_w=128, warps_m=8, wgmma=True, overlap=True), ValueError),
        (dict(block_m=64, block_w=64, warps_m=8, wgmma=True), ValueError),  # 16 x 8 rows
        (dict(block_m=16, block_w=128, warps_m=8, wgmma=True), ValueError),  # 128 chunks
    ],
)
def test_tactic_validation(kwargs, error):
    fields = dict(block_m=16, block_w=64, warps_m=4, warps_n=1, stages=1, cp_async=False)
    fields.update(kwargs)
    with pytest.raises(error):
        cfg.MoeGemm1Sm90Tactic(**fields)


def test_default_tactic_regimes_and_errors():
    decode = cfg.default_tactic("moe_gemm1", 1, 8, 32, 7168, 2048, num_experts=256)
    assert (decode.block_m, decode.block_w, decode.stages) == (16, 64, 2)
    middle = cfg.default_tactic("moe_gemm2", 64, 2, 8, 4096, 14336)
    assert (middle.block_m, middle.block_w, middle.stages) == (32, 128, 2)
    assert middle.wgmma
    # Expected routed rows per expert m = N * top_k / num_experts: 16-row mma.sync tiles
    # up to m = 8, 2-stage 32-row warpgroup-MMA tiles below m = 64 (GEMM1's with
    # tail_m=16 below m = 32, then the two-warpgroup 64-row tile with tail_m=32); from
    # m = 64 GEMM2 takes the 64-row one.
    fields = ("block_m", "block_w", "warps_m", "stages", "wgmma", "tail_m")
    for n, gemm1, gemm2 in (
        (256, (16, 128, 4, 2, False, 0), (16, 128, 4, 2, False, 0)),
        (257, (32, 128, 4, 2, True, 16), (32, 128, 4, 2, True, 0)),
        (1023, (32, 128, 4, 2, True, 16), (32, 128, 4, 2, True, 0)),
        (1024, (64, 128, 8, 1, True, 32), (32, 128, 4, 2, True, 0)),
        (2047, (64, 128, 8, 1, True, 32), (32, 128, 4, 2, True, 0)),
        (2048, (128, 128, 8, 2, True, 32), (64, 128, 4, 1, True, 0)),
        (4095, (128, 128, 8, 2, True, 32), (64, 128, 4, 1, True, 0)),
    ):
        for op, want in (("moe_gemm1", gemm1), ("moe_gemm2", gemm2)):
            tactic = cfg.default_tactic(op, n, 8, 32, 7168, 2048, num_experts=256)
            assert tuple(getattr(tactic, f) for f in fields) == want, (n, op)
    # GEMM1 from m = 64 and GEMM2 from m = 128: the two-warpgroup 128 x 128 tile with two
    # stages and narrow MMAs for a segment's last tile.
    prefill = (128, 128, 8, 2, True, 32)
    for n in (2048, 4095, 4096, 16384):
        gemm1 = cfg.default_tactic("moe_gemm1", n, 8, 32, 7168, 2048, num_experts=256)
        gemm2 = cfg.default_tactic("moe_gemm2", n, 8, 32, 7168, 2048, num_experts=256)
        assert tuple(getattr(gemm1, f) for f in fields) == prefill
        assert (tuple(getattr(gemm2, f) for f in fields) == prefill) == (n >= 4096)
        assert gemm1 in cfg.gemm1_variants() and gemm2 in cfg.gemm2_variants()
    for n in (1, 3, 64, 128, 1000, 1024, 2047, 2048, 4095, 16384):
        pair = [
            cfg.default_tactic(op, n, 8, 32, 7168, 2048, num_experts=256)
            for op in ("moe_gemm1", "moe_gemm2")
        ]
        assert pair[0] in cfg.gemm1_variants() and pair[1] in cfg.gemm2_variants()
        # They share block_m below 32 and from 128 expected rows per expert (n < 1024
        # and n >= 4096 here).
        assert (pair[0].block_m == pair[1].block_m) == (not 32 <= n * 8 / 256 < 128)
    with pytest.raises(ValueError, match="op"):
        cfg.default_tactic("moe_gemm3", 1, 8, 32, 7168, 2048)


def test_split_k_is_a_decode_tactic():
    split = [t for t in cfg.gemm1_variants() if t.split_k > 1]
    assert split and all(t.block_m <= 32 and (t.bulk or not t.cp_async) for t in split)
    # The ids of the unsplit register-ring variants (stages <= 4) come first, then the
    # split-K ones, then the deep-prefetch decode ones, then the wgmma ones (so earlier
    # ids never move); the bulk-copy and prefetch ones come last (their own tests).
    variants = [
        t for t in cfg.gemm1_variants() if not (t.bulk or t.prefetch or t.stream_k or t.token_steps)
    ]
    first_split = next(i for i, t in enumerate(variants) if t.split_k > 1)
    first_deep = next(i for i, t in enumerate(variants) if t.stages > 4)
    first_wgmma = next(i for i, t in enumerate(variants) if t.wgmma)
    assert all(t.split_k == 1 and t.stages <= 4 for t in variants[:first_split])
    assert first_split < first_deep < first_wgmma
    assert all(t.stages <= 4 for t in variants[first_split:first_deep])
    assert all(t.block_m == 16 and t.stages > 4 for t in variants[first_deep:first_wgmma])
    assert all(t.wgmma and t.stages <= 4 for t in variants[first_wgmma:])
    tactic = cfg.MoeGemm1Sm90Tactic(
        block_m=16, block_w=64, warps_m=4, warps_n=1, stages=2, cp_async=False, split_k=4
    )
    tactic.check(_problem("moe_gemm1", token_bucket=512))  # 16 rows per expert
    with pytest.raises(ValueError, match="decode"):
        tactic.check(_problem("moe_gemm1", token_bucket=1024))
    # DeepSeek-V3 EP=8: one expert active at N=1, so GEMM1 has 64 CTAs without split-K.
    splits = [
        cfg.default_tactic("moe_gemm1", n, 8, 32, 7168, 2048, num_experts=256).split_k
        for n in (1, 2, 4, 8, 16, 64)
    ]
    assert splits[0] == 8 and splits == sorted(splits, reverse=True) and splits[-1] == 1
    # Few K steps: a split keeps at least eight of them (GEMM2's 32 steps: split 4).
    small = cfg.default_tactic("moe_gemm2", 1, 8, 32, 7168, 128, num_experts=256)
    assert small.split_k == 1
    assert cfg.default_tactic("moe_gemm2", 1, 8, 32, 7168, 2048, num_experts=256).split_k == 4
    # Split decode tiles stay 64 rows wide; unsplit ones take 128 weight rows once
    # those still make 4 CTAs per SM (DeepSeek-V3 EP=8: from N=32 for GEMM1).
    for n in (1, 2, 4, 8, 16, 32, 64, 256):
        tactic = cfg.default_tactic("moe_gemm1", n, 8, 32, 7168, 2048, num_experts=256)
        assert tactic.block_m == 16 and tactic.block_w == (
            64 if tactic.split_k > 1 or n < 32 else 128
        )
    for n in (1, 2, 4, 8):
        for op in ("moe_gemm1", "moe_gemm2"):
            tactic = cfg.default_tactic(op, n, 8, 32, 7168, 2048, num_experts=256)
            tactic.check(_problem(op, token_bucket=n))
    with pytest.raises(TypeError, match="num_tokens"):
        cfg.default_tactic("moe_gemm1", 1.5, 8, 32, 7168, 2048)
    with pytest.raises(ValueError, match="num_experts"):
        cfg.default_tactic("moe_gemm1", 1, 8, 32, 7168, 2048, num_experts=16)


@requires_dsl
def test_scale_conversion_is_exact_for_every_e4m3_byte():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from jax_moe.kernels.nvfp4_decode_sm90 import scale_bf16x2
    from jax_moe.prepare import SCALE_ENCODING

    bits = np.arange(256, dtype=np.uint8)
    e4m3 = np.abs(bits.view(ml_dtypes.float8_e4m3fn).astype(np.float64))
    # The kernel's input: two prepared bytes, in bits 0..7 and 16..23 (spread_bytes),
    # here every byte against every other one so that a carry between the halves shows.
    low, high = (a.reshape(-1) for a in np.meshgrid(bits, bits, indexing="ij"))
    encoded = [SCALE_ENCODING[b].astype(np.uint32) for b in (low, high)]
    out = scale_bf16x2(encoded[0] | (encoded[1] << np.uint32(16)), np.uint32)
    halves = np.stack([out & np.uint32(0xFFFF), out >> np.uint32(16)], -1)
    got = halves.astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)
    for half, b in enumerate((low, high)):
        nonzero = ~np.isnan(e4m3[b]) & (e4m3[b] != 0)
        np.testing.assert_array_equal(got[nonzero, half], e4m3[b][nonzero] * 2.0**117)


def test_pdl_switch_parses_the_environment(monkeypatch):
    from jax_moe.kernels import PDL_ENV, pdl_enabled

    monkeypatch.delenv(PDL_ENV, raising=False)
    assert not pdl_enabled()
    monkeypatch.setenv(PDL_ENV, "0")
    assert not pdl_enabled()
    monkeypatch.setenv(PDL_ENV, "1")
    assert pdl_enabled()
    monkeypatch.setenv(PDL_ENV, "yes")
    with pytest.raises(ValueError, match=PDL_ENV):
        pdl_enabled()


def test_exported_table_header_records_the_pdl_switch():
    from jax_moe import _export

    for pdl in (True, False):
        header = _export._generate_header([], "sm_90a", "0.0", pdl)
        assert f"#define JAX_MOE_KERNELS_PDL {int(pdl)}" in header
    with pytest.raises(TypeError, match="pdl"):
        _export.export_kernels("unused", pdl=1)


def _pdl_cases():
    gemm_cp_async = dict(block_m=16, block_w=64, warps_m=4, warps_n=1, stages=3, cp_async=True)
    split = dict(block_m=16, block_w=64, warps_m=4, warps_n=1, stages=2, cp_async=False, split_k=4)
    from jax_moe.kernels.combine_config import COMBINE_SM90_TACTICS
    from jax_moe.kernels.routing_config import ROUTING_SM90_TACTICS

    return [
        ("routing", ROUTING_SM90_TACTICS[0]),
        ("routing", ROUTING_SM90_TACTICS[2]),  # three kernels
        ("combine", COMBINE_SM90_TACTICS[0]),
        ("combine", COMBINE_SM90_TACTICS[2]),  # batched
        ("moe_gemm1", cfg.MoeGemm1Sm90Tactic(**split)),
        ("moe_gemm2", cfg.MoeGemm2Sm90Tactic(**split)),
        ("moe_gemm2", cfg.MoeGemm2Sm90Tactic(**gemm_cp_async)),
    ]


@requires_dsl
@pytest.mark.parametrize("op, tactic", _pdl_cases(), ids=lambda x: str(x))
def test_pdl_switch_sets_launch_attribute_and_griddepcontrol(
    dsl, op, tactic, tmp_path, monkeypatch
):
    """With `JAX_MOE_PDL=1` the launch allows programmatic stream serialization and the
    kernel waits (`griddepcontrol.wait`) before its first dependent access; with 0
    neither appears."""
    import importlib
    import re

    from cutlass.cutlass_dsl import cutlass as dsl_core

    from jax_moe.kernels import KERNEL_MODULES, PDL_ENV

    cute, _ = dsl
    module = importlib.import_module(KERNEL_MODULES[op])
    variant = tactic if tactic is not None else module.variants()[-1]
    recorded = []
    dialect = dsl_core.cuda_dialect
    original = dialect.launch_cfg_programmatic_stream_serialization_allowed

    def spy(cfg_value, value, *args, **kwargs):
        # `value` is an i32 constant: `"arith.constant"() <{value = 1 : i32}>`.
        recorded.append(int(re.search(r"value = (-?\d+) : i32", str(value.owner)).group(1)))
        return original(cfg_value, value, *args, **kwargs)

    monkeypatch.setattr(dialect, "launch_cfg_programmatic_stream_serialization_allowed", spy)
    for pdl in (True, False):
        monkeypatch.setenv(PDL_ENV, "1" if pdl else "0")
        recorded.clear()
        fn, fake_args = module.export_spec(variant)
        dump = tmp_path / f"pdl{int(pdl)}"
        dump.mkdir()
        compiled = cute.compile(fn, *fake_args, options=f"--keep-ptx --dump-dir={dump}")
        ptx = compiled.__ptx__
        assert ptx and ".target sm_90a" in ptx
        kernels = ptx.count(".entry")
        assert recorded == [int(pdl)] * kernels, recorded
        if not pdl:
            assert "griddepcontrol" not in ptx
            continue
        assert ptx.count("griddepcontrol.launch_dependents") == kernels
        wait = ptx.index("griddepcontrol.wait")
        trigger = ptx.index("griddepcontrol.launch_dependents")
        before_wait = ptx[:wait]
        assert "st.global" not in before_wait
        if op == "routing":
            # Every routing kernel waits for the stream (or the previous one) first.
            for entry in ptx.split(".entry")[1:]:
                before = entry[: entry.index("griddepcontrol.wait")]
                assert "ld.global" not in before and "st.global" not in before
                assert entry.index("griddepcontrol.launch_dependents") > len(before)
        elif op == "moe_gemm1":
            # GEMM1 waits for routing's metadata.
            assert "ld.global" not in before_wait and trigger > wait
        elif op == "combine":
            # Only routing's slot_row is read (from L2) before waiting for GEMM2's rows.
            assert "ld.global.cg.b32" in before_wait
            assert "ld.global.v4" not in before_wait and "ld.global.b32" not in before_wait
        else:
            # GEMM2: routing's tile_expert (from L2) and the first weight K steps are
            # loaded before the wait for GEMM1's activations that precedes the trigger.
            assert "ld.global.cg.b32" in before_wait
            loads = ("ld.global.v4", "cp.async.cg")
            assert any(load in ptx[:trigger] for load in loads)
            assert ptx.count("griddepcontrol.wait") == 2  # + inactive first tile
            assert "ldmatrix" not in ptx[:trigger] and "st.global" not in ptx[:trigger]


def _cubin_registers(cubin: bytes) -> int:
    """Registers per thread of the kernel in `cubin` (EIATTR_REGCOUNT of its .nv.info)."""
    import struct

    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * entsize) for i in range(count)]
    names_offset = headers[names_index][4]
    registers = []
    for name, _, _, _, offset, size in headers:
        start = names_offset + name
        if not cubin[start : cubin.index(b"\0", start)].startswith(b".nv.info"):
            continue
        data, i = cubin[offset : offset + size], 0
        while i + 2 <= len(data):
            fmt, attr = data[i], data[i + 1]
            i += 2
            if fmt == 4:  # u16 size, then the value
                value_size = struct.unpack_from("<H", data, i)[0]
                if attr == 0x2F:  # REGCOUNT: function index, registers
                    registers.append(struct.unpack_from("<I", data, i + 6)[0])
                i += 2 + value_size
            elif fmt == 3:
                i += 2
            elif fmt == 2:
                i += 1
            elif fmt != 1:
                break
    assert registers, "no register count in the cubin"
    return max(registers)


@requires_dsl
@pytest.mark.parametrize("op", ["moe_gemm1", "moe_gemm2"])
def test_wgmma_tiles_keep_their_occupancy(dsl, op, tmp_path):
    """The wgmma prefill tiles fit 128 registers per thread (4 CTAs of 128 threads per
    SM, or 2 of 256 for the two-warpgroup tiles: their measured speed depends on it),
    the two-warpgroup 64 x 128 tiles 80 (3 CTAs) and the decode tile 64 (8 CTAs)."""
    cute, modules = dsl
    module = modules[op]
    limits = {
        (64, 128, 1, 4): 128,
        (128, 64, 1, 4): 128,
        (16, 64, 2, 4): 64,
        (128, 128, 1, 8): 128,
        (64, 128, 1, 8): 80,
        (128, 128, 2, 8): 128,
        (128, 128, 3, 8): 128,
        (64, 128, 2, 8): 80,
        (32, 128, 2, 4): 128,
    }
    tactics = {
        (t.block_m, t.block_w, t.stages, t.warps_m, t.tail_m): t
        for t in module.variants()
        if t.wgmma
        and not t.overlap
        and t.split_k == 1
        and (t.block_m, t.block_w, t.stages, t.warps_m) in limits
    }
    # Every listed tile, and the `tail_m` twins of some.
    assert {key[:4] for key in tactics} == set(limits)
    assert any(key[4] for key in tactics)
    for key, tactic in tactics.items():
        fn, fake_args = module.export_spec(tactic)
        dump = tmp_path / "_".join(map(str, key))
        dump.mkdir()
        compiled = cute.compile(fn, *fake_args, options=f"--keep-cubin --dump-dir={dump}")
        registers = _cubin_registers(compiled.__cubin__)
        assert registers <= limits[key[:4]], f"{tactic}: {registers} registers"


def test_deep_prefetch_is_a_decode_tactic():
    deep = [t for t in cfg.gemm2_variants() if t.stages > 4]
    assert deep and all(t.block_m == 16 and not t.cp_async for t in deep)
    tactic = deep[0]
    tactic.check(_problem("moe_gemm2", token_bucket=512))  # 16 rows per expert
    with pytest.raises(ValueError, match="stages=8 is a decode tactic"):
        tactic.check(_problem("moe_gemm2", token_bucket=1024))
    with pytest.raises(ValueError, match="registers"):
        cfg.MoeGemm1Sm90Tactic(
            block_m=16, block_w=128, warps_m=4, warps_n=1, stages=8, cp_async=False
        )


def test_stream_k_tile_limit_matches_the_ffi_handler():
    source = (Path(__file__).resolve().parents[1] / "ffi" / "moe_gemm.cc").read_text()
    assert f"kStreamKMaxTiles = {cfg.STREAM_K_MAX_TILES};" in source
