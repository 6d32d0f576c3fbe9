"""Device time of the routing metadata and the combine, variant by variant.

For each token count N, on rank 0's expert slice (`--model`, `--ep`, row tiles of
`--block_m`) routed by uniformly random distinct expert choices, it times `--reps`
calls back to back in one jitted program with CUDA events (median of `--trials`):

* routing (`--ops` has `routing`): the jitted JAX version (``jax``), one column
  per exported ``routing_sm90`` variant (``v0``, ...), and ``chain``, the
  harness's own work (each call's ids wait for the previous result through an
  added zero, one small elementwise kernel), included in the other columns; the
  column ``default`` names the variant ``routing_config.routing_tactic`` picks.
* combine (`--ops` has `combine`): one column per exported ``combine_sm90``
  variant on random GEMM2 rows (``c0``, ...; the chain runs through ``slot_row``);
  ``default`` names the tactic ``combine_config.combine_tactic`` picks.

Every variant's result is checked against the first one's (the JAX metadata for
routing), bit for bit.

Example::

  python benchmarks/bench_routing_combine.py --model=qwen3_30b_a3b --ep=1 \\
      --num_tokens=256,2048,8192
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jax_moe import _ffi, models
from jax_moe.kernels.combine_config import COMBINE_SM90_TACTICS, combine_tactic
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
_OPS = flags.DEFINE_list("ops", ["routing", "combine"], "Ops to time: routing, combine.")


def _random_ids(key: jax.Array, num_tokens: int, top_k: int, num_experts: int) -> jax.Array:
    """Distinct experts per token, uniformly at random."""
    scores = jax.random.uniform(key, (num_tokens, num_experts))
    return jax.lax.top_k(scores, top_k)[1].astype(jnp.int32)


def _time(build, *args) -> float:
    """Seconds per `build(*args)` of `--reps` chained calls (CUDA events, median).

    The last argument (int32) is the chain: each call's copy waits for the previous
    call's result."""
    reps = _REPS.value

    @jax.jit
    def run(*args):
        acc = _ffi.record_event(jnp.zeros((), jnp.float32), slot=0)
        acc, args = jax.lax.optimization_barrier((acc, args))
        *head, chained = args
        for _ in range(reps):
            out = build(*head, chained + after(acc))
            acc = acc + out[-1].reshape(-1)[0].astype(jnp.float32)
        return _ffi.record_event(acc, slot=1)

    run(*args).block_until_ready()
    times = []
    for _ in range(_TRIALS.value):
        run(*args).block_until_ready()
        times.append(_ffi.event_elapsed_ms(0, 1) * 1e-3)
    return statistics.median(times) / reps


def _row(num_tokens: int, slots: int, times: list, default: str) -> str:
    cells = " | ".join(f"{t * 1e6:.1f}" for t in times)
    return f"| {num_tokens} | {slots} | {cells} | {default} |"


def _header(columns: dict) -> str:
    names = " | ".join(f"{c} us" for c in columns)
    return f"| N | slots | {names} | default |\n" + "|---" * (len(columns) + 3) + "|"


def main(argv):
    del argv
    if jax.default_backend() != "gpu" or "routing" not in _ffi.kernel_variants():
        raise SystemExit("this benchmark needs a CUDA GPU and the extension with its kernels")
    cfg = models.get_preset(_MODEL.value)
    num_local, offset = models.expert_slice(cfg, _EP.value, 0)
    args = dict(num_local_experts=num_local, block_m=_BLOCK_M.value, local_expert_offset=offset)
    routing = {"jax": lambda ids: routing_metadata(ids, **args)}
    for i, variant in enumerate(ROUTING_SM90_TACTICS):
        routing[f"v{i}"] = lambda ids, v=variant: _ffi.routing_metadata(ids, **args, variant=v)
    routing["chain"] = lambda ids: (ids.reshape(-1),)
    combine = {
        f"c{i}": lambda y, rows, v=variant: _ffi.combine(y, rows, cfg.top_k, variant=v)
        for i, variant in enumerate(COMBINE_SM90_TACTICS)
    }
    print(
        f"{jax.devices()[0].device_kind}; {cfg.name} EP={_EP.value}: {num_local} local "
        f"experts, block_m={_BLOCK_M.value}"
    )
    for i, variant in enumerate(ROUTING_SM90_TACTICS):
        print(f"  v{i} = {variant}")
    for i, variant in enumerate(COMBINE_SM90_TACTICS):
        print(f"  c{i} = {variant}")
    key = jax.random.key(_SEED.value)
    tables = {op: [] for op in _OPS.value}
    for text in _NUM_TOKENS.value:
        num_tokens = int(text)
        ids = _random_ids(
            jax.random.fold_in(key, num_tokens), num_tokens, cfg.top_k, cfg.num_experts
        )
        meta = jax.jit(routing["jax"])(ids)
        slots = num_tokens * cfg.top_k
        if "routing" in tables:
            for name, build in routing.items():
                if name.startswith("v"):
                    for w, g in zip(meta, jax.jit(build)(ids), strict=True):
                        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)
            times = [_time(build, ids) for build in routing.values()]
            default = f"v{ROUTING_SM90_TACTICS.index(routing_tactic(slots))}"
            tables["routing"].append(_row(num_tokens, slots, times, default))
        if "combine" in tables:
            y = jax.random.normal(key, (meta.sorted_slots.shape[0], cfg.hidden), jnp.bfloat16)
            outs = [
                np.asarray(jax.jit(build)(y, meta.slot_row)).view(np.uint16)
                for build in combine.values()
            ]
            for name, out in zip(combine, outs, strict=True):
                np.testing.assert_array_equal(out, outs[0], err_msg=name)
            times = [_time(build, y, meta.slot_row) for build in combine.values()]
            chosen = combine_tactic(cfg.top_k, num_local, cfg.num_experts)
            default = f"c{COMBINE_SM90_TACTICS.index(chosen)}"
            tables["combine"].append(_row(num_tokens, slots, times, default))
        print(f"N={num_tokens} done", flush=True)
    for op, rows in tables.items():
        print(f"\n{op}\n" + _header(routing if op == "routing" else combine))
        print("\n".join(rows))


if __name__ == "__main__":
    app.run(main)
