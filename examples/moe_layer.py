r"""Runs one NVFP4 MoE layer with random weights and checks it against the reference.

Builds random NVFP4 weights for the local experts of a model preset, routes
random bfloat16 hidden states with the preset's router, runs
``jax.jit(jax_moe.fused_moe)`` and compares it with the float32
``jax_moe.reference.fused_moe``. Prints the device, the error, the median time
of several runs and PASS or FAIL; exits nonzero on FAIL.

Examples::

    python examples/moe_layer.py                                  # tiny, seconds on a CPU
    python examples/moe_layer.py --model=qwen3_30b_a3b --num_tokens=64
    python examples/moe_layer.py --model=deepseek_v3 --num_tokens=8 --ep=32 --rank=3

Memory. The host builds the local experts' weights one expert at a time, so it
holds the NVFP4 weights of the slice (0.5625 bytes per parameter) plus one
expert's dense weights; the reference then dequantizes one expert at a time.
The full layers need (weights only, NVFP4, all experts):

* ``deepseek_v3``: 256 experts x 44.0M parameters, about 6.3 GB (use ``--ep``
  to run a slice: ``--ep=32`` holds 8 experts, about 0.2 GB).
* ``qwen3_30b_a3b``: 128 experts x 4.7M parameters, about 0.34 GB.
* ``mixtral_8x7b``: 8 experts x 176M parameters, about 0.8 GB.
* ``tiny``: 8 experts x 98K parameters, under 1 MB.

``jax_moe.fused_moe`` off the GPU dequantizes all local experts to bfloat16 at
once (2 bytes per parameter), so on a CPU choose ``--ep`` to keep the slice
small for the large presets.
"""

from __future__ import annotations

import functools
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

# From a source checkout, run the checkout's jax_moe without installing it.
_CHECKOUT = pathlib.Path(__file__).resolve().parent.parent
if (_CHECKOUT / "jax_moe" / "__init__.py").is_file():
    sys.path.insert(0, str(_CHECKOUT))

import jax_moe  # noqa: E402
from jax_moe import models, reference  # noqa: E402
from jax_moe.prepare import prepare  # noqa: E402

_MODEL = flags.DEFINE_enum(
    "model",
    "tiny",
    sorted(models.PRESETS),
    "Model preset giving the layer shape and router. deepseek_v3: 256 experts, "
    "about 6.3 GB of NVFP4 weights in all (24.7 MB per expert); qwen3_30b_a3b: about "
    "0.34 GB; mixtral_8x7b: about 0.8 GB; tiny: under 1 MB. Only the --ep slice is built.",
)
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 64, "Tokens in the batch.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights, router and hidden states.")
_EP = flags.DEFINE_integer(
    "ep",
    1,
    "Expert-parallel ranks: the experts are split into this many equal slices and only "
    "--rank's slice is built and run (tokens routed elsewhere contribute nothing here). "
    "Must divide the preset's number of experts.",
    lower_bound=1,
)
_RANK = flags.DEFINE_integer("rank", 0, "Which slice (0 <= rank < ep) to run.", lower_bound=0)
_ITERS = flags.DEFINE_integer("iters", 5, "Timed runs (after one warm-up run).", lower_bound=1)
_TOLERANCE = flags.DEFINE_float(
    "tolerance",
    2e-2,
    "Largest allowed max|out - reference| / max|reference| (bfloat16 outputs).",
    lower_bound=0.0,
)


def _median_seconds(fn, iters: int) -> float:
    jax.block_until_ready(fn())  # warm-up (and compilation)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = models.get_preset(_MODEL.value)
    try:
        num_local, offset = models.expert_slice(config, _EP.value, _RANK.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    n = _NUM_TOKENS.value

    key_weights, key_router, key_hidden = jax.random.split(jax.random.key(_SEED.value), 3)
    device = jax.devices()[0]
    print(
        f"model={config.name} experts={config.num_experts} top_k={config.top_k} "
        f"hidden={config.hidden} intermediate={config.intermediate} router={config.router}"
    )
    print(
        f"num_tokens={n} ep={_EP.value} rank={_RANK.value} local experts "
        f"[{offset}, {offset + num_local}) device={device.platform}:{device.device_kind}"
    )

    start = time.perf_counter()
    weights = models.random_moe_weights(key_weights, config, num_local, offset)
    jax.block_until_ready(weights)
    print(
        f"built {num_local} NVFP4 experts ({weights.w13.nbytes + weights.w2.nbytes:,} bytes) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    router = models.random_router(key_router, config)
    hidden_states = jax.random.normal(key_hidden, (n, config.hidden), jnp.bfloat16)
    topk_ids, topk_weights = jax.jit(functools.partial(models.route, config))(hidden_states, router)
    local = (topk_ids >= offset) & (topk_ids < offset + num_local)
    print(f"slots routed to local experts: {int(jnp.sum(local))} of {topk_ids.size}")

    ep_args = dict(num_local_experts=num_local, local_expert_offset=offset)
    layer = jax.jit(functools.partial(jax_moe.fused_moe, num_experts=config.num_experts, **ep_args))
    oracle = jax.jit(functools.partial(reference.fused_moe, **ep_args))

    # On a GPU the kernels read weights repacked once into their layout.
    layer_weights = jax.jit(prepare)(weights) if device.platform == "gpu" else weights
    out = layer(hidden_states, layer_weights, topk_ids, topk_weights)
    expected = oracle(hidden_states, weights, topk_ids, topk_weights)
    scale = float(jnp.max(jnp.abs(expected)))
    finite = bool(jnp.all(jnp.isfinite(out)))
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - expected)))
    rel = err / scale if scale > 0 else err
    print(
        f"output {out.dtype}{tuple(out.shape)} max|ref|={scale:.4g} max abs err={err:.4g} "
        f"(relative {rel:.3g}, tolerance {_TOLERANCE.value:g})"
    )

    seconds = _median_seconds(
        lambda: layer(hidden_states, layer_weights, topk_ids, topk_weights), _ITERS.value
    )
    print(f"fused_moe: median {seconds * 1e3:.3f} ms over {_ITERS.value} runs")

    ok = finite and rel <= _TOLERANCE.value
    print("PASS" if ok else "FAIL" + ("" if finite else " (non-finite output)"))
    return 0 if ok else 1


if __name__ == "__main__":
    app.run(main)
