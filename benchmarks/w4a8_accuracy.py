"""Accuracy of fp8 (e4m3) activations with NVFP4 weights (W4A8), emulated on the CPU.

A W4A8 mode would quantize the MoE's activations (the GEMM1 input rows and the
SwiGLU output) to float8 e4m3 with one float32 scale per row, and feed fp8 MMAs.
Hopper's fp8 MMAs reduce over 32 elements at a time, two NVFP4 scale blocks of
16, so the weights cannot keep their exact `e2m1 * e4m3` values: each would be
rounded to e4m3 after a power-of-two shift per expert matrix that keeps the
largest product within e4m3's range. This script measures what each step costs
against the float32 reference (:mod:`jax_moe.reference`), on random NVFP4 layers
of the model presets:

  w4a16       the current kernels: exact weights, bf16 activations, fp32 sums,
              the SwiGLU output rounded to bf16 between the GEMMs, each expert's
              weighted output rows rounded to bf16 before the float32 combine;
  w4a8        as w4a16 but both activations quantized to e4m3 per row;
  w4a8_w8     w4a8 with the weights rounded to e4m3 as above.

Errors are reported relative to the reference output's RMS, over the local
slots of a layer slice (`--ep`). For scale, the column `nvfp4` is the error of the
reference itself against the dense bf16 weights the NVFP4 ones were quantized
from (float32 math in both). `--outliers` scales a few hidden channels of the
input by 20x, as in trained models, which hurts per-row activation scales.

    python benchmarks/w4a8_accuracy.py --models=deepseek_v3,qwen3_30b_a3b --num_tokens=64
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jax_moe import models, nvfp4, reference
from jax_moe.weights import MoEWeights

_MODELS = flags.DEFINE_list("models", ["qwen3_30b_a3b", "deepseek_v3"], "Model presets.")
_EP = flags.DEFINE_integer(
    "ep", 32, "Expert-parallel ranks (reduced to a divisor of each model's experts)."
)
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 64, "Tokens per layer.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Random layers per model (seeds 0..seeds-1).")
_OUTLIERS = flags.DEFINE_bool("outliers", False, "Scale 1% of hidden channels by 20x.")

MODES = ("w4a16", "w4a8", "w4a8_w8")
E4M3_MAX = 448.0


def quantize_rows_e4m3(x: jax.Array) -> jax.Array:
    """float32 `x` rounded through e4m3 with one float32 scale per row (amax -> 448)."""
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    return (x / scale).astype(jnp.float8_e4m3fn).astype(jnp.float32) * scale


def round_weights_e4m3(w: jax.Array) -> jax.Array:
    """float32 dequantized weights of one matrix rounded to e4m3 after an exact power-of-two
    shift that brings the largest magnitude to at most 448 (and back)."""
    amax = jnp.max(jnp.abs(w))
    shift = jnp.where(amax > 0, jnp.floor(jnp.log2(E4M3_MAX / amax)), 0.0)
    scale = jnp.exp2(shift)
    return (w * scale).astype(jnp.float8_e4m3fn).astype(jnp.float32) / scale


@dataclasses.dataclass(frozen=True)
class LayerError:
    """Errors of one mode on one layer.

    Attributes:
      rms: RMS of the error over the whole output / RMS of the reference output.
      worst_token: the largest per-token relative error `|y - ref| / |ref|` (L2 over
        the hidden axis) among tokens with at least one local expert.
    """

    rms: float
    worst_token: float


def layer_outputs(
    hidden: jax.Array,
    w13,
    w2,
    slot_weights: jax.Array,
    mode: str,
) -> jax.Array:
    """float32 `(num_tokens, hidden)` output of the local experts under `mode`.

    `w13` `(L, 2I, H)` and `w2` `(L, H, I)` are stacked `Nvfp4Tensor`s, or dense
    float arrays with mode "dense" (float32 math, nothing rounded);
    `slot_weights` `(num_tokens, L)` is each token's router weight for each local
    expert (0 where it did not choose it).
    """
    if mode not in MODES + ("dense",):
        raise ValueError(f"mode={mode!r}; expected one of {MODES + ('dense',)}")
    x = hidden.astype(jnp.float32)
    if mode not in ("w4a16", "dense"):
        x = quantize_rows_e4m3(x)
    hp = jax.lax.Precision.HIGHEST

    def expert(carry, inputs):
        w13, w2, weight = inputs
        if mode == "w4a8_w8":
            # e2m1 * e4m3 products rounded to e4m3; the global scale applied after (exact
            # in the epilogue of a kernel, as now).
            w13, w2 = (
                round_weights_e4m3(nvfp4.dequantize(t) / t.global_scale) * t.global_scale
                for t in (w13, w2)
            )
        elif mode != "dense":
            w13, w2 = nvfp4.dequantize(w13), nvfp4.dequantize(w2)
        w13, w2 = w13.astype(jnp.float32), w2.astype(jnp.float32)
        act = reference.swiglu(jnp.dot(x, w13.T, precision=hp))
        if mode != "dense":
            act = act.astype(jnp.bfloat16).astype(jnp.float32)
        if mode not in ("w4a16", "dense"):
            act = quantize_rows_e4m3(act)
        contribution = weight[:, None] * jnp.dot(act, w2.T, precision=hp)
        if mode != "dense":
            # GEMM2 writes each expert's weighted rows as bf16; the combine adds them
            # in float32.
            contribution = contribution.astype(jnp.bfloat16).astype(jnp.float32)
        return carry + contribution, None

    out0 = jnp.zeros(x.shape, jnp.float32)
    out, _ = jax.lax.scan(expert, out0, (w13, w2, slot_weights.T))
    return out


def measure(config: models.MoEConfig, ep: int, num_tokens: int, seed: int, outliers: bool):
    """{mode: LayerError} of one random layer slice."""
    local, offset = models.expert_slice(config, ep, 0)
    key_w, key_x, key_r, key_o = jax.random.split(jax.random.key(seed), 4)
    # Dense bf16 weights as in `models.random_moe_weights`, kept for the "nvfp4" column.
    k13, k2 = jax.random.split(key_w)
    h, i = config.hidden, config.intermediate
    dense13 = (jax.random.normal(k13, (local, 2 * i, h)) / math.sqrt(h)).astype(jnp.bfloat16)
    dense2 = (jax.random.normal(k2, (local, h, i)) / math.sqrt(i)).astype(jnp.bfloat16)
    weights = MoEWeights(
        w13=jax.lax.map(nvfp4.quantize, dense13), w2=jax.lax.map(nvfp4.quantize, dense2)
    )
    hidden = jax.random.normal(key_x, (num_tokens, config.hidden), jnp.float32)
    if outliers:
        channels = jax.random.choice(
            key_o, config.hidden, (max(1, config.hidden // 100),), replace=False
        )
        hidden = hidden.at[:, channels].multiply(20.0)
    hidden = hidden.astype(jnp.bfloat16)
    router = models.random_router(key_r, config)
    topk_ids, topk_weights = models.route(config, hidden, router)
    want = reference.fused_moe(
        hidden,
        weights,
        topk_ids,
        topk_weights,
        num_local_experts=local,
        local_expert_offset=offset,
    ).astype(jnp.float32)
    local_ids, local_weights = reference.local_slot_weights(topk_ids, topk_weights, local, offset)
    # (num_tokens, local): each token's router weight per local expert (one_hot of -1 is 0).
    slot = jnp.einsum("nj,nje->ne", local_weights, jax.nn.one_hot(local_ids, local))
    run = jax.jit(layer_outputs, static_argnames="mode")
    out = {}
    for mode in ("nvfp4",) + MODES:
        if mode == "nvfp4":  # the reference against the dense weights it was quantized from
            got, base = want, run(hidden, dense13, dense2, slot, mode="dense")
        else:
            got, base = run(hidden, weights.w13, weights.w2, slot, mode=mode), want
        err = got - base
        norms = jnp.linalg.norm(base, axis=1)
        routed = norms > 0
        per_token = jnp.where(routed, jnp.linalg.norm(err, axis=1) / jnp.where(routed, norms, 1), 0)
        out[mode] = LayerError(
            float(jnp.sqrt(jnp.mean(err**2) / jnp.mean(base**2))), float(jnp.max(per_token))
        )
    return out


def main(argv) -> None:
    del argv
    print(
        f"W4A8 emulation, rank 0's slice, N={_NUM_TOKENS.value}, {_SEEDS.value} seeds, "
        f"outliers={_OUTLIERS.value}; rms: error RMS / reference RMS, worst: largest "
        "per-token relative error (medians over seeds)"
    )
    columns = ("nvfp4",) + MODES
    header = " ".join(f"{m + ' rms':>12} {m + ' worst':>13}" for m in columns)
    print(f"{'model':16} {'EP':>3} {header}")
    for name in _MODELS.value:
        config = models.get_preset(name)
        ep = math.gcd(_EP.value, config.num_experts)  # an EP size that divides the experts
        runs = [
            measure(config, ep, _NUM_TOKENS.value, seed, _OUTLIERS.value)
            for seed in range(_SEEDS.value)
        ]
        cells = []
        for mode in columns:
            cells.append(f"{np.median([r[mode].rms for r in runs]):12.2e}")
            cells.append(f"{np.median([r[mode].worst_token for r in runs]):13.2e}")
        print(f"{name:16} {ep:3d} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    app.run(main)
