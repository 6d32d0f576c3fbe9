"""Device time of the routing metadata: every routing-kernel variant against the JAX version.

For each token count N it builds the routing metadata of rank 0's expert slice
(`--model`, `--ep`, row tiles of `--block_m`) from uniformly random distinct
expert choices, `--reps` times back to back in one jitted program timed with CUDA
events (median of `--trials`), with

* ``jax``: the jitted JAX version (``jax_moe.routing_metadata``);
* one column per exported ``routing_sm90`` variant (``_ffi.routing_metadata``);
* ``chain``: only the harness's own work (each repetition's ids wait for the
  previous result through an added zero, one small elementwise kernel), already
  included in the other columns.

The column ``default`` names the variant ``routing_config.routing_tactic`` picks.
Every variant's result is checked against the JAX version's first.

Example::

  python benchmarks/bench_routing.py --model=qwen3_30b_a3b --ep=1 --num_tokens=256,2048,8192
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jax_moe import _ffi, models
from jax_moe.kernels.routing_config import ROUTING_SM90_TACTICS, routing_tactic
from jax_moe.routing_metadata import routing_metadata
from jax_moe.tuning.profiler import after

_MODEL = flags.DEFINE_string("model", "deepseek_v3", "Model preset.")
_EP = flags.DEFINE_integer("ep", 8, "Expert-parallel ranks; the slice of rank 0 is used.")
_NUM_TOKENS = flags.DEFINE_list("num_tokens", ["1", "128", "2048", "8192"], "Token counts.")
_BLOCK_M = flags.DEFINE_integer("block_m", 64, "Row tile of the metadata.")
_REPS = flags.DEFINE_integer("reps", 20, "Builds per timed program.")
_TRIALS = flags.DEFINE_integer("trials", 5, "Timed runs; the median is reported.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the routing.")


def _random_ids(key: jax.Array, num_tokens: int, top_k: int, num_experts: int) -> jax.Array:
    """Distinct experts per token, uniformly at random."""
    scores = jax.random.uniform(key, (num_tokens, num_experts))
    return jax.lax.top_k(scores, top_k)[1].astype(jnp.int32)


def _time(build, ids: jax.Array) -> float:
    """Seconds per `build(ids)` of `--reps` chained builds (CUDA events, median)."""
    reps = _REPS.value

    @jax.jit
    def run(ids):
        acc = _ffi.record_event(jnp.zeros((), jnp.float32), slot=0)
        acc, ids = jax.lax.optimization_barrier((acc, ids))
        for _ in range(reps):
            out = build(ids + after(acc))
            acc = acc + out[-1][0].astype(jnp.float32)  # slot_row: the last array written
        return _ffi.record_event(acc, slot=1)

    run(ids).block_until_ready()
    times = []
    for _ in range(_TRIALS.value):
        run(ids).block_until_ready()
        times.append(_ffi.event_elapsed_ms(0, 1) * 1e-3)
    return statistics.median(times) / reps


def main(argv):
    del argv
    if jax.default_backend() != "gpu" or "routing" not in _ffi.kernel_variants():
        raise SystemExit("bench_routing needs a CUDA GPU and the extension with the routing kernel")
    cfg = models.get_preset(_MODEL.value)
    num_local, offset = models.expert_slice(cfg, _EP.value, 0)
    args = dict(num_local_experts=num_local, block_m=_BLOCK_M.value, local_expert_offset=offset)
    columns = {"jax": lambda ids: routing_metadata(ids, **args)}
    for i, variant in enumerate(ROUTING_SM90_TACTICS):
        columns[f"v{i}"] = lambda ids, v=variant: _ffi.routing_metadata(ids, **args, variant=v)
    columns["chain"] = lambda ids: (ids.reshape(-1),)
    print(
        f"{jax.devices()[0].device_kind}; {cfg.name} EP={_EP.value}: {num_local} local experts, "
        f"block_m={_BLOCK_M.value}"
    )
    for i, variant in enumerate(ROUTING_SM90_TACTICS):
        print(f"  v{i} = {variant}")
    print("| N | slots | " + " | ".join(f"{c} us" for c in columns) + " | default |")
    print("|---" * (len(columns) + 3) + "|")
    key = jax.random.key(_SEED.value)
    for text in _NUM_TOKENS.value:
        num_tokens = int(text)
        ids = _random_ids(
            jax.random.fold_in(key, num_tokens), num_tokens, cfg.top_k, cfg.num_experts
        )
        want = [np.asarray(a) for a in jax.jit(columns["jax"])(ids)]
        for name, build in columns.items():
            if name.startswith("v"):
                got = jax.jit(build)(ids)
                for w, g in zip(want, got, strict=True):
                    np.testing.assert_array_equal(np.asarray(g), w, err_msg=name)
        times = [_time(build, ids) * 1e6 for build in columns.values()]
        slots = num_tokens * cfg.top_k
        default = ROUTING_SM90_TACTICS.index(routing_tactic(slots))
        cells = " | ".join(f"{t:.1f}" for t in times)
        print(f"| {num_tokens} | {slots} | {cells} | v{default} |", flush=True)


if __name__ == "__main__":
    app.run(main)
