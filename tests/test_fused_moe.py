"""jax_moe.fused_moe against the float32 reference, and its argument checks.

The suite runs the default implementation of the machine it is on: the pure
JAX path on a CPU, the GPU kernels on a CUDA machine with the extension.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, requires_gpu

import jax_moe
from jax_moe import models, reference


def _layer(name: str, num_tokens: int, ep: int = 1, rank: int = 0, seed: int = 0):
    cfg = models.get_preset(name)
    num_local, offset = models.expert_slice(cfg, ep, rank)
    kw, kx, kr = jax.random.split(jax.random.key(seed), 3)
    weights = models.random_moe_weights(kw, cfg, num_local, offset)
    x = jax.random.normal(kx, (num_tokens, cfg.hidden), jnp.float32).astype(jnp.bfloat16)
    ids, wts = models.route(cfg, x, models.random_router(kr, cfg))
    return cfg, weights, x, ids, wts, num_local, offset


def _check(cfg, weights, x, ids, wts, num_local, offset):
    kwargs = dict(
        num_local_experts=num_local, local_expert_offset=offset, num_experts=cfg.num_experts
    )
    got = jax.jit(lambda *a: jax_moe.fused_moe(*a, **kwargs))(x, weights, ids, wts)
    assert got.shape == x.shape and got.dtype == x.dtype
    want = reference.fused_moe(
        x, weights, ids, wts, num_local_experts=num_local, local_expert_offset=offset
    )
    assert_close(got, want, jnp.bfloat16)
    return got, want


@pytest.mark.parametrize(
    "name,num_tokens,ep,rank",
    [
        ("tiny", 1, 1, 0),
        ("tiny", 37, 1, 0),
        ("tiny", 64, 4, 2),
        ("tiny", 128, 1, 0),  # 32 rows per expert: 64-row two-warpgroup GEMM1, 32-row GEMM2
        ("tiny", 300, 1, 0),  # 75: 128-row two-warpgroup tail_m GEMM1, 64-row GEMM2
        ("qwen3_30b_a3b", 5, 16, 3),  # 8 local experts of 128
        ("mixtral_8x7b", 3, 8, 5),  # 1 local expert of 8
        ("deepseek_v3", 2, 128, 7),  # 2 local experts of 256
    ],
)
def test_matches_reference(name, num_tokens, ep, rank):
    _check(*_layer(name, num_tokens, ep, rank))


def test_single_token():
    _check(*_layer("tiny", 1, seed=3))


def test_all_tokens_on_one_expert_and_empty_experts():
    cfg, weights, x, _, wts, num_local, offset = _layer("tiny", 24)
    ids = jnp.stack(
        [jnp.full((24,), 5, jnp.int32), jnp.full((24,), 2, jnp.int32)], axis=1
    )  # experts 0, 1, 3, 4, 6, 7 get nothing
    _check(cfg, weights, x, ids, wts, num_local, offset)


def test_negative_zero_and_subnormal_block_scales():
    # Checkpoints may hold any e4m3 scale; the GPU path folds signs and zeros into the
    # codes when preparing, so these must give the reference's values too.
    cfg, weights, x, ids, wts, num_local, offset = _layer("tiny", 29, seed=5)
    rng = np.random.default_rng(5)

    def odd_scales(t):
        bits = np.asarray(t.scale).view(np.uint8).copy()
        pick = rng.random(bits.shape)
        bits[pick < 0.1] = 0x00  # zero
        bits[(pick >= 0.1) & (pick < 0.15)] = 0x80  # -0
        sub = (pick >= 0.15) & (pick < 0.25)
        bits[sub] = rng.integers(1, 8, sub.sum()).astype(np.uint8)  # subnormal
        bits[(pick >= 0.25) & (pick < 0.5)] |= 0x80  # negative
        return dataclasses.replace(t, scale=jnp.asarray(bits.view(jnp.float8_e4m3fn)))

    weights = dataclasses.replace(weights, w13=odd_scales(weights.w13), w2=odd_scales(weights.w2))
    _check(cfg, weights, x, ids, wts, num_local, offset)


def test_tokens_without_local_experts_give_zero():
    cfg, weights, x, ids, wts, _, _ = _layer("tiny", 16)
    sliced = jax.tree.map(lambda a: a[4:6], weights)
    ids = ids.at[:8].set(jnp.array([0, 7], jnp.int32))  # tokens 0..7: no local expert
    got, want = _check(cfg, sliced, x, ids, wts, 2, 4)
    np.testing.assert_array_equal(np.asarray(got[:8], np.float32), 0.0)
    assert float(jnp.max(jnp.abs(want[8:]))) > 0


def test_ep_slices_sum_to_whole_layer():
    cfg, weights, x, ids, wts, _, _ = _layer("tiny", 33)
    whole = jax_moe.fused_moe(x.astype(jnp.float32), weights, ids, wts)
    parts = sum(
        jax_moe.fused_moe(
            x.astype(jnp.float32),
            jax.tree.map(lambda a, lo=lo: a[lo : lo + 2], weights),
            ids,
            wts,
            num_local_experts=2,
            local_expert_offset=lo,
            num_experts=cfg.num_experts,
        )
        for lo in range(0, cfg.num_experts, 2)
    )
    assert_close(parts, whole, jnp.float32, rtol=1e-5)


def _pair_table(cfg, num_tokens, num_local, gemm1, gemm2):
    from jax_moe import tuning

    device_name, arch = tuning.device_identity()
    meta = tuning.TableMetadata.create(
        device_name=device_name, arch=arch, distribution="balanced", profile_key=0
    )
    entries = {}
    for op, tactic in (("moe_gemm1", gemm1), ("moe_gemm2", gemm2)):
        key = tuning.ProblemKey.for_call(
            op,
            arch,
            cfg.hidden,
            cfg.intermediate,
            cfg.num_experts,
            num_local,
            cfg.top_k,
            "bfloat16",
            num_tokens,
        )
        entries[key] = tuning.TacticEntry(tactic, 1.0)
    return tuning.TacticTable(meta, entries)


def _variant(variants, block_m, warps_m=None, wgmma=False, tail_m=0, mbarriers=False, stream_k=0):
    """The first exported variant with `block_m` (and `warps_m`; unsplit wgmma; `tail_m`;
    `mbarriers`; `stream_k`)."""
    return next(
        t
        for t in variants
        if t.block_m == block_m
        and warps_m in (None, t.warps_m)
        and (not wgmma or (t.wgmma and t.split_k == 1 and not t.overlap))
        and t.tail_m == tail_m
        and t.mbarriers == mbarriers
        and t.stream_k == stream_k
    )


@requires_gpu
@pytest.mark.parametrize(
    "gemm1, gemm2",
    [
        ((128, 8), (64,)),
        ((16,), (128,)),
        ((64,), (32,)),
        # The pairs of the shipped H200 table from N=2048 (wgmma GEMM2s).
        ((128, 8, True), (64, 4, True)),
        ((128, 8, True), (64, 8, True)),
        # With narrow MMAs for a segment's last tile (`tail_m`), as shipped from N=2048.
        ((128, 8, True, 32), (64, 4, True)),
        ((128, 8, True, 32), (128, 8, True, 32)),
        ((64, 8, True, 32), (32, 4, True, 16)),
        # The token ring guarded by mbarriers (experimental).
        ((128, 8, True, 32, True), (64, 4, True)),
        ((128, 8, True, 32, True), (128, 8, True, 32, True)),
    ],
)
def test_gemms_with_different_row_tiles_match_reference(gemm1, gemm2):
    # The metadata is built for the larger row tile; the other GEMM runs finer tiles
    # over the same rows (jax_moe.routing_metadata.finer_tile_expert).
    from jax_moe.kernels import moe_gemm_config

    cfg, weights, x, ids, wts, num_local, offset = _layer("tiny", 300)
    gemm1 = _variant(moe_gemm_config.gemm1_variants(), *gemm1)
    gemm2 = _variant(moe_gemm_config.gemm2_variants(), *gemm2)
    table = _pair_table(cfg, 300, num_local, gemm1, gemm2)
    got = jax.jit(lambda *a: jax_moe.fused_moe(*a, tactics=table))(x, weights, ids, wts)
    want = reference.fused_moe(x, weights, ids, wts)
    assert_close(got, want, jnp.bfloat16)


@requires_gpu
@pytest.mark.parametrize(
    "gemm1, gemm2",
    [
        ((16, None, False, 0, False, 4), (16, None, False, 0, False, 5)),
        ((16, None, False, 0, False, 8), (16, None, False, 0, False, 3)),
        # Routing built for 64-row tiles: the stream-K GEMM's list skips padding tiles.
        ((16, None, False, 0, False, 4), (64, 4, True)),
        ((64, 4, True), (16, None, False, 0, False, 6)),
    ],
)
@pytest.mark.parametrize("num_tokens", [1, 40])
def test_stream_k_gemms_match_reference(gemm1, gemm2, num_tokens):
    from jax_moe.kernels import moe_gemm_config

    cfg, weights, x, ids, wts, num_local, offset = _layer("tiny", num_tokens)
    gemm1 = _variant(moe_gemm_config.gemm1_variants(), *gemm1)
    gemm2 = _variant(moe_gemm_config.gemm2_variants(), *gemm2)
    table = _pair_table(cfg, num_tokens, num_local, gemm1, gemm2)
    fn = jax.jit(lambda *a: jax_moe.fused_moe(*a, tactics=table))
    got = fn(x, weights, ids, wts)
    want = reference.fused_moe(x, weights, ids, wts)
    assert_close(got, want, jnp.bfloat16)
    again = fn(x, weights, ids, wts)
    assert np.array_equal(np.asarray(got).view(np.uint16), np.asarray(again).view(np.uint16))


def test_float32_hidden_states_close_to_reference():
    cfg, weights, x, ids, wts, num_local, offset = _layer("tiny", 9)
    x = x.astype(jnp.float32)
    got = jax_moe.fused_moe(x, weights, ids, wts)
    assert got.dtype == jnp.float32
    assert_close(got, reference.fused_moe(x, weights, ids, wts), jnp.float32, rtol=1e-4)


def test_bitwise_deterministic():
    _, weights, x, ids, wts, _, _ = _layer("tiny", 50)
    f = jax.jit(jax_moe.fused_moe)
    first = np.asarray(f(x, weights, ids, wts))
    for _ in range(9):  # ten runs in all
        np.testing.assert_array_equal(np.asarray(f(x, weights, ids, wts)), first)


# --- bad inputs -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return _layer("tiny", 4)


def _call(tiny, **overrides):
    _, weights, x, ids, wts, _, _ = tiny
    args = dict(hidden_states=x, weights=weights, topk_ids=ids, topk_weights=wts)
    args.update(overrides)
    kwargs = {
        k: args.pop(k)
        for k in list(args)
        if k not in ("hidden_states", "weights", "topk_ids", "topk_weights")
    }
    return jax_moe.fused_moe(
        args["hidden_states"], args["weights"], args["topk_ids"], args["topk_weights"], **kwargs
    )


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(hidden_states=jnp.zeros((4, 256, 1), jnp.bfloat16)), ValueError, "hidden_states"),
        (dict(hidden_states=jnp.zeros((4, 128), jnp.bfloat16)), ValueError, "hidden size"),
        (dict(hidden_states=jnp.zeros((4, 256), jnp.int32)), TypeError, "hidden_states"),
        (dict(hidden_states=[[1.0]]), TypeError, "hidden_states"),
        (dict(weights=object()), TypeError, "weights"),
        (dict(topk_ids=jnp.zeros((5, 2), jnp.int32)), ValueError, "topk_ids"),
        (dict(topk_ids=jnp.zeros((4, 2), jnp.float32)), TypeError, "topk_ids"),
        (dict(topk_ids=jnp.full((4, 2), 8, jnp.int32)), ValueError, "topk_ids must lie"),
        (dict(topk_ids=jnp.full((4, 2), -1, jnp.int32)), ValueError, "topk_ids must lie"),
        (dict(topk_weights=jnp.zeros((4, 3), jnp.float32)), ValueError, "topk_weights"),
        (dict(topk_weights=jnp.zeros((4, 2), jnp.int32)), TypeError, "topk_weights"),
        (dict(num_local_experts=4), ValueError, "num_local_experts"),
        (dict(num_local_experts=0), ValueError, "num_local_experts"),
        (dict(local_expert_offset=-1), ValueError, "local_expert_offset"),
        (dict(local_expert_offset=4, num_experts=8), ValueError, "exceed num_experts"),
        (dict(num_experts=1), ValueError, "num_experts"),
        (dict(implementation="triton"), ValueError, "implementation"),
        (dict(tactics=3), TypeError, "tactics"),
    ],
)
def test_bad_inputs(tiny, overrides, error, match):
    with pytest.raises(error, match=match):
        _call(tiny, **overrides)


def test_bad_weights_shapes(tiny):
    _, weights, *_ = tiny
    w2 = weights.w2
    short = jax_moe.nvfp4.Nvfp4Tensor(w2.packed[:, :128], w2.scale[:, :128], w2.global_scale)
    bad = jax_moe.MoEWeights(w13=weights.w13, w2=short)
    with pytest.raises(ValueError, match="weights.w2"):
        _call(tiny, weights=bad)


def test_out_of_range_ids_cannot_be_checked_under_jit_but_contribute_nothing(tiny):
    _, weights, x, ids, wts, _, _ = tiny
    bad = ids.at[0, 0].set(99)
    got = jax.jit(jax_moe.fused_moe)(x, weights, bad, wts)
    want = reference.fused_moe(x, weights, bad, wts)
    assert_close(got, want, jnp.bfloat16)


def test_corrupt_tactic_file_is_an_error(tiny, tmp_path):
    from jax_moe import tuning

    path = tmp_path / "tactics.json"
    path.write_text('{"format": "jax_moe')
    with pytest.raises(tuning.TacticFileError):
        _call(tiny, tactics=str(path))
    with pytest.raises(tuning.TacticFileError):
        _call(tiny, tactics=tmp_path / "missing.json")


def test_prepared_weights_run_anywhere(tiny):
    from jax_moe.prepare import prepare

    _, weights, x, ids, wts, _, _ = tiny
    got = jax_moe.fused_moe(x, prepare(weights), ids, wts, implementation="xla")
    want = jax_moe.fused_moe(x, weights, ids, wts, implementation="xla")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_bad_prepared_weights(tiny):
    import dataclasses

    from jax_moe.prepare import prepare

    _, weights, *_ = tiny
    prepared = prepare(weights)
    bad = dataclasses.replace(prepared, w2_scale=prepared.w2_scale[:, :, :-1])
    with pytest.raises(ValueError, match="weights.w2_scale"):
        _call(tiny, weights=bad)
    bad = dataclasses.replace(prepared, w13_global=prepared.w13_global.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="weights.w13_global"):
        _call(tiny, weights=bad)


def test_64_bit_ids_never_wrap_onto_local_experts(tiny):
    _, weights, x, ids, wts, _, _ = tiny
    with jax.enable_x64(True):
        wide = ids.astype(jnp.int64).at[0, 1].set(2**32 + 1)  # would wrap to expert 1
        got = jax.jit(jax_moe.fused_moe)(x, weights, wide, wts)
        dropped = jax_moe.fused_moe(x, weights, ids.at[0, 1].set(0), wts.at[0, 1].set(0.0))
        want = reference.fused_moe(x, weights, wide, wts)
    assert_close(got, dropped, jnp.bfloat16)
    assert_close(want, dropped.astype(jnp.float32), jnp.bfloat16)


def test_numpy_ints_accepted_and_bools_rejected(tiny):
    _, weights, x, ids, wts, _, _ = tiny
    got = jax_moe.fused_moe(x, weights, ids, wts, num_local_experts=np.int64(8))
    assert got.shape == x.shape
    with pytest.raises(TypeError, match="local_expert_offset"):
        _call(tiny, local_expert_offset=True)
    with pytest.raises(TypeError, match="num_experts"):
        _call(tiny, num_experts=8.0)


def test_prepared_weights_of_another_layout_version(tiny):
    import dataclasses

    from jax_moe.prepare import prepare

    _, weights, *_ = tiny
    old = dataclasses.replace(prepare(weights), layout_version=1)
    with pytest.raises(NotImplementedError, match="layout version"):
        _call(tiny, weights=old)


def test_float16_hidden_states_compute_in_float16(tiny):
    _, weights, x, ids, wts, _, _ = tiny
    x16 = x.astype(jnp.float16)
    got = jax_moe.fused_moe(x16, weights, ids, wts)
    assert got.dtype == jnp.float16
    assert_close(got, reference.fused_moe(x16, weights, ids, wts), jnp.float16, rtol=2e-3)
