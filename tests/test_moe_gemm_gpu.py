"""GPU tests of the sm_90a NVFP4 MoE GEMM kernels, run straight from the CuTe DSL.

Each case draws random NVFP4 weights, a random top-k routing and its routing
metadata, runs GEMM1 and GEMM2 (compiled from the modules' `export_spec`, the
ahead-of-time path) into NaN-poisoned outputs and compares every routed row with
a float32 torch reference (`benchmarks/gemm_kernels_dsl.py` holds the harness).
Skipped without a CUDA GPU, torch or the CuTe DSL.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _gpu_skip_reason() -> str | None:
    if (
        importlib.util.find_spec("nvidia_cutlass_dsl") is None
        and importlib.util.find_spec("cutlass") is None
    ):
        return "the CuTe DSL (nvidia-cutlass-dsl) is not installed"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (the GPU harness uses it for buffers and references)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"needs an sm_90 GPU, found {torch.cuda.get_device_name()}"
    return None


_REASON = _gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]


@pytest.fixture(scope="module")
def harness():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gemm_kernels_dsl.py"
    spec = importlib.util.spec_from_file_location("gemm_kernels_dsl", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gemm_kernels_dsl"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runners():
    return {}


_SHAPES = {
    "small": dict(num_experts=16, num_local_experts=8, top_k=4, hidden=256, intermediate=192),
    "odd_k_steps": dict(num_experts=8, num_local_experts=8, top_k=2, hidden=384, intermediate=448),
}


def _tactic_pairs():
    from jax_moe.kernels import moe_gemm_config as cfg

    pairs = list(zip(cfg.gemm1_variants(), cfg.gemm2_variants(), strict=True))
    # The cp.async ring is not exported but stays a tuning candidate: keep it correct.
    ring = dict(block_m=16, block_w=64, warps_m=4, warps_n=1, stages=4, cp_async=True)
    pairs.append((cfg.MoeGemm1Sm90Tactic(**ring), cfg.MoeGemm2Sm90Tactic(**ring)))
    return pairs


@pytest.mark.parametrize("shape_name", sorted(_SHAPES))
@pytest.mark.parametrize("num_tokens", [1, 5, 200])
@pytest.mark.parametrize("pair", _tactic_pairs() if _REASON is None else [None], ids=str)
def test_gemms_match_reference(harness, runners, shape_name, num_tokens, pair):
    tactic1, tactic2 = pair
    shape = harness.ModelShape(shape_name, **_SHAPES[shape_name])
    problem = harness.Problem(shape, seed=num_tokens)
    result = harness.run_case(
        problem,
        num_tokens,
        tactic1,
        tactic2,
        runners,
        seed=1000 + num_tokens,
        log=print,
        timing=False,
    )
    assert result["nonfinite_gemm1"] == 0 and result["nonfinite_gemm2"] == 0, result
    assert result["rel_err_gemm1"] < 5e-3, result
    assert result["rel_err_gemm2"] < 5e-3, result  # one rounding to bf16
