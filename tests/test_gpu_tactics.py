"""Trace-time tactic selection of the CUDA path, checked on any machine.

``select_tactics`` is pure Python; the lowering test lowers a jitted
``fused_moe`` for CUDA on this machine (no GPU needed) and reads the custom
calls and their ``variant`` attributes.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import jax_moe
from jax_moe import _ffi, gpu, models, tuning
from jax_moe.kernels import moe_gemm_config
from jax_moe.moe import validate_moe_args
from jax_moe.prepare import prepare

DEVICE = "NVIDIA H100 80GB HBM3"
ARCH = "sm_90a"


@pytest.fixture(scope="module")
def layer():
    cfg = models.get_preset("tiny")
    weights = prepare(models.random_moe_weights(jax.random.key(0), cfg))
    x = jax.random.normal(jax.random.key(1), (40, cfg.hidden), jnp.bfloat16)
    ids, wts = models.route(cfg, x, models.random_router(jax.random.key(2), cfg))
    return weights, x, ids, wts, validate_moe_args(x, weights, ids, wts)


def _key(op, problem):
    return tuning.ProblemKey.for_call(
        op,
        ARCH,
        problem.hidden,
        problem.intermediate,
        problem.num_experts,
        problem.num_local_experts,
        problem.top_k,
        problem.dtype,
        problem.num_tokens,
    )


def _table(problem, gemm1, gemm2, device=DEVICE):
    meta = tuning.TableMetadata.create(
        device_name=device, arch=ARCH, distribution="balanced", profile_key=0
    )
    return tuning.TacticTable(
        meta,
        {
            _key("moe_gemm1", problem): tuning.TacticEntry(gemm1, 10.0),
            _key("moe_gemm2", problem): tuning.TacticEntry(gemm2, 5.0),
        },
    )


def _select(problem, tactics):
    return gpu.select_tactics(problem, tactics, arch=ARCH, device_name=DEVICE)


def test_default_tactics_without_a_table(layer):
    *_, problem = layer
    gemm1, gemm2 = _select(problem, None)
    n, k, e = problem.num_tokens, problem.top_k, problem.num_local_experts
    h, i = problem.hidden, problem.intermediate
    assert gemm1 == moe_gemm_config.default_tactic("moe_gemm1", n, k, e, h, i, num_experts=e)
    assert gemm2 == moe_gemm_config.default_tactic("moe_gemm2", n, k, e, h, i, num_experts=e)


def test_tuned_tactics_win_and_misses_fall_back(layer, tmp_path):
    *_, problem = layer
    gemm1 = moe_gemm_config.gemm1_variants()[-1]
    gemm2 = next(t for t in moe_gemm_config.gemm2_variants() if t.block_m == gemm1.block_m)
    table = _table(problem, gemm1, gemm2)
    assert _select(problem, table) == (gemm1, gemm2)
    path = tmp_path / "tactics.json"
    table.save(path)
    assert _select(problem, str(path)) == (gemm1, gemm2)
    other = validate_moe_args(layer[1][:3], layer[0], layer[2][:3], layer[3][:3])
    assert _select(other, table) == _select(other, None)  # different bucket: a miss


def test_gemms_may_differ_in_block_m(layer):
    # The metadata is built for the larger row tile; the other GEMM runs finer tiles.
    *_, problem = layer
    for small, large in ((16, 64), (128, 32)):
        gemm1 = next(t for t in moe_gemm_config.gemm1_variants() if t.block_m == small)
        gemm2 = next(t for t in moe_gemm_config.gemm2_variants() if t.block_m == large)
        assert _select(problem, _table(problem, gemm1, gemm2)) == (gemm1, gemm2)


def test_table_from_another_device_is_an_error(layer):
    *_, problem = layer
    gemm1, gemm2 = _select(problem, None)
    with pytest.raises(tuning.TacticFileError):
        _select(problem, _table(problem, gemm1, gemm2, device="NVIDIA H200"))


def _lowered(layer, monkeypatch, gemm1, gemm2) -> str:
    weights, x, ids, wts, problem = layer
    monkeypatch.setattr(gpu, "device_identity", lambda: (DEVICE, ARCH))
    table = _table(problem, gemm1, gemm2)
    f = jax.jit(lambda *a: jax_moe.fused_moe(*a, tactics=table, implementation="cuda"))
    text = f.trace(x, weights, ids, wts).lower(lowering_platforms=("cuda",)).as_text()
    targets = re.findall(r'custom_call_target\s*=\s*"(\w+)"', text) or re.findall(
        r"@(jax_moe_\w+)", text
    )
    assert {"jax_moe_moe_gemm1", "jax_moe_moe_gemm2", "jax_moe_combine"} <= set(targets)
    variants = [int(v) for v in re.findall(r"variant\s*=\s*(\d+)\s*:\s*i32", text)]
    assert _ffi.variant_id("moe_gemm1", gemm1) in variants
    assert _ffi.variant_id("moe_gemm2", gemm2) in variants
    return text


@pytest.mark.skipif(not _ffi.is_available(), reason="the jax_moe CUDA extension is not built")
def test_lowered_calls_carry_the_tuned_variants(layer, monkeypatch):
    gemm1 = moe_gemm_config.gemm1_variants()[3]
    gemm2 = next(t for t in moe_gemm_config.gemm2_variants() if t.block_m == gemm1.block_m)
    text = _lowered(layer, monkeypatch, gemm1, gemm2)
    assert "optimization_barrier" not in text  # one row tile: no finer tile_expert


@pytest.mark.skipif(not _ffi.is_available(), reason="the jax_moe CUDA extension is not built")
def test_mixed_row_tiles_compute_the_finer_tiles_before_gemm1(layer, monkeypatch):
    # GEMM2 with programmatic dependent launch reads tile_expert before it waits for
    # the previous kernel: its finer tile_expert must not be computed right before it.
    gemm1 = next(t for t in moe_gemm_config.gemm1_variants() if t.warps_m == 8)
    gemm2 = next(t for t in moe_gemm_config.gemm2_variants() if t.block_m == 64 and t.wgmma)
    text = _lowered(layer, monkeypatch, gemm1, gemm2)
    barrier = text.index("optimization_barrier")
    assert barrier < text.index("jax_moe_moe_gemm1")


def _problem(**overrides):
    from jax_moe.moe import MoEProblem

    base = dict(
        num_tokens=4,
        hidden=256,
        intermediate=128,
        top_k=2,
        num_experts=8,
        num_local_experts=8,
        local_expert_offset=0,
        dtype="bfloat16",
    )
    base.update(overrides)
    return MoEProblem(**base)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(hidden=2880, intermediate=2880),
        dict(hidden=192),
        dict(intermediate=80),
        dict(dtype="float16"),
        dict(dtype="float32"),
    ],
)
def test_unsupported_problems_raise_not_implemented(overrides):
    # NotImplementedError makes fused_moe fall back to the XLA path.
    with pytest.raises(NotImplementedError):
        gpu.check_supported(_problem(**overrides))


def test_layouts_without_a_problem_key_use_defaults():
    # 4 local experts of 6: the tuning key needs num_experts % num_local_experts == 0.
    problem = _problem(num_experts=6, num_local_experts=4, local_expert_offset=2)
    gemm1, gemm2 = _select(problem, None)
    assert gemm1.block_m == gemm2.block_m


def test_a_tactic_of_the_wrong_family_is_an_error(layer):
    *_, problem = layer
    meta = tuning.TableMetadata.create(
        device_name=DEVICE, arch=ARCH, distribution="balanced", profile_key=0
    )
    wrong = moe_gemm_config.gemm2_variants()[0]
    table = tuning.TacticTable(meta, {_key("moe_gemm1", problem): tuning.TacticEntry(wrong, 1.0)})
    with pytest.raises(ValueError, match="moe_gemm1_sm90 tactic"):
        _select(problem, table)


def test_one_tuned_gemm_pairs_with_the_other_default(layer):
    *_, problem = layer
    default1, default2 = _select(problem, None)
    tuned = next(t for t in moe_gemm_config.gemm1_variants() if t.block_m != default1.block_m)
    meta = tuning.TableMetadata.create(
        device_name=DEVICE, arch=ARCH, distribution="balanced", profile_key=0
    )
    table = tuning.TacticTable(meta, {_key("moe_gemm1", problem): tuning.TacticEntry(tuned, 1.0)})
    gemm1, gemm2 = _select(problem, table)
    assert (gemm1, gemm2) == (tuned, default2)
