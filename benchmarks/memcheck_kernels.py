"""Runs every compiled kernel variant once on a small problem, for compute-sanitizer.

Meant to run under the memory checker, with XLA's platform allocator so that
every buffer is its own allocation and an out-of-bounds access cannot land in a
neighbouring buffer::

  XLA_PYTHON_CLIENT_ALLOCATOR=platform compute-sanitizer --tool memcheck \\
      python benchmarks/memcheck_kernels.py --ops=routing,moe_gemm1,moe_gemm2,combine

Each variant runs on an expert-parallel slice (slots of other ranks, an empty
local expert, a token with no local expert, a busy expert spanning several row
tiles); each routing variant also on 3000 tokens (several blocks for the
multi-block tactic). The memory checker does the checking; the script only
reports outputs that are not finite on the rows the next stage reads, and
routing metadata that differs from the JAX version's (the NaN-poisoned tests in
`tests/test_ffi_gpu.py` check values and unwritten rows). The variant name is
printed before its launch, so a crash names its kernel.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jax_moe import _ffi, models
from jax_moe.prepare import prepare
from jax_moe.routing_metadata import routing_metadata

_OPS = flags.DEFINE_list("ops", ["routing", "moe_gemm1", "moe_gemm2", "combine"], "Ops to check.")
_FILTER = flags.DEFINE_string(
    "filter", "", "Only variants whose name contains this text (several joined by '|': any)."
)
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 37, "Tokens of the problem.")


def _tactics(op: str) -> dict[str, object]:
    """The tactics of `op` by name (none for the combine, which takes its name)."""
    from jax_moe.kernels import moe_gemm_config, routing_config

    family = {
        "moe_gemm1": moe_gemm_config.gemm1_variants,
        "moe_gemm2": moe_gemm_config.gemm2_variants,
        "routing": lambda: routing_config.ROUTING_SM90_TACTICS,
    }.get(op, list)()
    return {str(t): t for t in family}


def main(argv):
    del argv
    _ffi.register()
    cfg = models.MoEConfig(name="check", num_experts=16, top_k=4, hidden=256, intermediate=192)
    num_local, offset = 8, 8  # rank 1 of EP=2
    kw, kx, kr = jax.random.split(jax.random.key(0), 3)
    weights = prepare(models.random_moe_weights(kw, cfg, num_local_experts=num_local))
    n = _NUM_TOKENS.value
    x = jax.random.normal(kx, (n, cfg.hidden), jnp.bfloat16)
    ids, wts = models.route(cfg, x, models.random_router(kr, cfg))
    ids = np.asarray(ids).copy()
    ids[0] = np.arange(cfg.top_k)  # token 0: no local expert
    ids[1:, 0] = offset + 1  # local expert 0 stays empty, expert 1 is busy
    ids = jnp.asarray(ids)
    # The routing variants' inputs (the slice above and 3000 tokens: several blocks
    # for the multi-block tactic) and the JAX metadata they must reproduce.
    routing_args = dict(num_local_experts=num_local, block_m=16, local_expert_offset=offset)
    many = jax.random.randint(kr, (3000, cfg.top_k), 0, cfg.num_experts, jnp.int32)
    routings = [(routed, routing_metadata(routed, **routing_args)) for routed in (ids, many)]
    failures = 0
    names = _ffi.kernel_variants()
    filters = [part for part in _FILTER.value.split("|") if part] or [""]
    for op in _OPS.value:
        tactics = _tactics(op)
        for name in names.get(op, ()):
            if not any(part in name for part in filters):
                continue
            print(f"{op} {name}", flush=True)
            if op == "routing":
                ok = True
                for routed, want in routings:
                    got = _ffi.routing_metadata(routed, **routing_args, variant=tactics[name])
                    ok &= all(bool(jnp.all(w == g)) for w, g in zip(want, got, strict=True))
            elif op == "combine":
                meta = routing_metadata(
                    ids, num_local_experts=num_local, block_m=16, local_expert_offset=offset
                )
                rows = jax.random.normal(kx, (meta.sorted_slots.shape[0], cfg.hidden), jnp.bfloat16)
                out = _ffi.combine(rows, meta.slot_row, cfg.top_k, variant=name)
                ok = bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
            else:
                tactic = tactics[name]
                meta = routing_metadata(
                    ids,
                    num_local_experts=num_local,
                    block_m=tactic.block_m,
                    local_expert_offset=offset,
                )
                valid = meta.sorted_slots >= 0
                if op == "moe_gemm1":
                    out = _ffi.moe_gemm1(
                        x,
                        meta.sorted_slots,
                        meta.tile_expert,
                        weights.w13_packed,
                        weights.w13_scale,
                        weights.w13_global,
                        cfg.top_k,
                        variant=tactic,
                    )
                else:
                    act = jax.random.normal(
                        kx, (meta.sorted_slots.shape[0], cfg.intermediate), jnp.bfloat16
                    )
                    out = _ffi.moe_gemm2(
                        act,
                        meta.sorted_slots,
                        meta.tile_expert,
                        weights.w2_packed,
                        weights.w2_scale,
                        weights.w2_global,
                        wts.reshape(-1),
                        variant=tactic,
                    )
                finite = jnp.isfinite(out.astype(jnp.float32)).all(axis=1)
                ok = bool(jnp.all(finite | ~valid))
            if not ok:
                failures += 1
                print(
                    f"  non-finite rows that are read, or wrong metadata: {op} {name}", flush=True
                )
    print(f"done, {failures} variants with unwritten rows or wrong metadata", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    app.run(main)
