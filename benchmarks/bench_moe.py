"""Device time of one MoE layer: jax_moe.fused_moe against XLA peers and the hardware floors.

For each token count N it times, on the default JAX device:

* ``fused_moe``: ``jax_moe.fused_moe`` (the GPU kernels on CUDA), prepared NVFP4 weights;
* ``fused_moe_jax_routing``: the same with the routing metadata built by the jitted
  JAX version (``jax_moe.routing_metadata``) instead of the routing kernel;
* ``xla_nvfp4``: ``fused_moe(..., implementation="xla")``, i.e. dequantize the
  NVFP4 weights to bf16 inside the step, then ``ragged_dot``;
* ``ragged_bf16``: ``jax.lax.ragged_dot`` with weights already in bf16, over all
  ``N * top_k`` slots (slots of other ranks sorted to the end, outside every group);
* ``ragged_bf16_local``: the same over the local slots only (their count is known
  on the host here, so the gathered matrix has exactly those rows): the best case
  for the peer.

``--tactics=FILE`` makes ``fused_moe`` use that tactic table instead of the one
shipped for the device; ``--compare_tactics=A,B`` adds one ``fused_moe`` column per
table (``fused_moe_t1``, ``fused_moe_t2``, ...), timed in the same run on the same
inputs, to compare tables without run-to-run differences. ``--breakdown`` (profiler
timer) prints, for ``fused_moe``, the device time per layer of each kernel it ran
(routing metadata ops, GEMM1, GEMM2, combine, copies) and the tactics it picked.

Timing: one jitted program runs the layer ``--reps`` times back to back on ``--reps``
different inputs (so nothing is hoisted out of the loop), as straight-line code with
each input its own buffer (no device loop to dispatch, no slice copied before a
launch); each layer's routing ids depend on the previous layer's result (an integer
zero computed from it), so the layers run one after another even inside one command
buffer. ``--nounroll`` runs a device loop (``lax.fori_loop``) over one stacked input
instead, the chain through the input index. Each output is
added to a float32 carry: for the XLA implementations the whole output (XLA could
otherwise compute only the part that is used), for ``fused_moe`` on a GPU only its
first element (its last step, the combine kernel, is a custom call that always
writes the whole output), so the harness's own add is not counted there.
``--timer=profiler`` (default on GPUs): one scan runs under ``jax.profiler``, and
the time per layer is the time during which at least one GPU kernel or copy was
running (the union of the CUPTI activity intervals, the same clock as CUDA
events) divided by ``--reps``: device time, without the loop's host-side gaps,
and activities that overlap on several streams counted once. ``--timer=wall``: the
wall time of the whole scan divided by ``--reps``, the median of ``--trials`` runs
after a warm-up; host dispatch and loop overhead are amortised but counted.

Floors printed beside each row, from rates measured in the same run:

* weight bytes: (active local experts) x (NVFP4 bytes per expert) / (copy bandwidth,
  counting bytes read and written);
* bf16 FLOPs: 2 x (local slots) x (3 x H x I) / (bf16 dense matmul rate).

Example::

  python benchmarks/bench_moe.py --model=deepseek_v3 --ep=8 --num_tokens=1,32,128,2048
"""

from __future__ import annotations

import functools
import glob
import math
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import jax_moe
from jax_moe import _ffi, models, moe
from jax_moe.prepare import prepare
from jax_moe.tuning.profiler import after

_MODEL = flags.DEFINE_string("model", "deepseek_v3", "Model preset.")
_EP = flags.DEFINE_integer("ep", 8, "Expert-parallel ranks; the local slice of rank 0 is run.")
_NUM_TOKENS = flags.DEFINE_list(
    "num_tokens", ["1", "8", "32", "128", "512", "2048", "8192"], "Token counts."
)
_REPS = flags.DEFINE_integer("reps", 20, "Layers per timed scan.")
_TRIALS = flags.DEFINE_integer("trials", 5, "Timed scans; the median is reported.")
_UNROLL = flags.DEFINE_bool(
    "unroll",
    True,
    "Unroll the timed scan into straight-line layers (--nounroll: a device loop, whose "
    "per-iteration host dispatch shows in the events and wall timers at small sizes).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights, inputs and routing.")
_BREAKDOWN = flags.DEFINE_bool(
    "breakdown", False, "Print fused_moe's device time per kernel (profiler timer)."
)
_TIMER = flags.DEFINE_enum(
    "timer",
    None,
    ["profiler", "events", "wall"],
    "profiler: kernels' busy time from a device trace (gaps between kernels not counted; "
    "per-kernel breakdown); events: device time between CUDA events around the scan "
    "(gaps counted); wall: host time. Default: profiler on GPUs, wall elsewhere.",
)
_TACTICS = flags.DEFINE_string(
    "tactics",
    None,
    "Tactic table (JSON file) for fused_moe; default: the table shipped for the device.",
)
_COMPARE_TACTICS = flags.DEFINE_list(
    "compare_tactics",
    [],
    "More tactic tables: one fused_moe column each (fused_moe_t1, ...), same run and inputs.",
)
_PEERS = flags.DEFINE_list(
    "impls",
    ["fused_moe", "xla_nvfp4", "ragged_bf16", "ragged_bf16_local"],
    "Implementations to time.",
)


def _device_events(run, *args) -> list[tuple[str, int, int]] | None:
    """(name, start_ns, duration_ns) of every GPU activity of one ``run(*args)``, or None.

    None when the profile has no GPU activity (no CUPTI, or not a GPU).
    """
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            run(*args).block_until_ready()
        paths = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            return None
        data = ProfileData.from_file(paths[0])
    events = []
    seen = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU:0"):
            continue
        for line in plane.lines:
            seen.append(line.name)
            if line.name.startswith("Stream"):
                events.extend((ev.name, ev.start_ns, ev.duration_ns) for ev in line.events)
    if not events and seen:
        print(f"    (GPU profile lines without streams: {seen[:8]})")
    return events or None


def _time_scan(step, xs, *args, whole=True) -> tuple[float, dict[str, float]]:
    """Seconds per step of ``step(x, *args)`` run back to back over ``xs`` (see ``--timer``),
    and with the profiler timer the seconds per step of each GPU kernel name (else empty).

    `args` end with the routing ids and weights: the chain that orders the layers runs
    through the ids. Each step's output is added to a float32 carry, the whole output
    (``whole``) or, for a layer that ends in a custom call (which XLA cannot evaluate in part), its
    first element, so that the harness adds no full pass over the output.
    """

    events = _timer() == "events"
    unroll = _UNROLL.value

    def add(acc, out):
        return acc + (out if whole else out[:1, :1]).astype(jnp.float32)

    @jax.jit
    def run(xs, *args):
        acc = jnp.zeros(xs[0].shape if whole else (1, 1), jnp.float32)
        if events:  # As the tuner's timer: every step reads the barrier's outputs.
            acc = _ffi.record_event(acc, slot=0)
            acc, xs, args = jax.lax.optimization_barrier((acc, xs, args))
        *head, ids, wts = args
        if unroll:
            # Straight-line layers, each on its own input buffer (a slice of a stacked
            # array would be copied before every launch). The routing ids of each layer
            # wait for the previous layer's result (after), so the layers run one after
            # another and XLA cannot merge them (e.g. their weight reads).
            for x in xs:
                chained = ids + after(acc[0, 0]).astype(ids.dtype)
                acc = add(acc, step(x, *head, chained, wts))
        else:

            def body(i, acc):
                index = i + after(acc[0, 0])  # the same chain, through the input index
                x = jax.lax.dynamic_index_in_dim(xs, index, keepdims=False)
                return add(acc, step(x, *head, ids, wts))

            acc = jax.lax.fori_loop(0, xs.shape[0], body, acc, unroll=False)
        return _ffi.record_event(acc, slot=1) if events else acc

    reps = xs.shape[0]
    if unroll:
        xs = tuple(xs[i] for i in range(reps))
    run(xs, *args).block_until_ready()
    if events:
        times = []
        for _ in range(_TRIALS.value):
            run(xs, *args).block_until_ready()
            times.append(_ffi.event_elapsed_ms(0, 1) * 1e-3)
        return statistics.median(times) / reps, {}
    if _timer() == "profiler":
        events = _device_events(run, xs, *args)
        if events is not None:
            kernels: dict[str, float] = {}
            for name, _, ns in events:
                kernels[name] = kernels.get(name, 0.0) + ns * 1e-9 / reps
            return _busy_ns(events) * 1e-9 / reps, kernels
        print("    (no GPU activity in the profile: wall time)")
    times = []
    for _ in range(_TRIALS.value):
        t0 = time.perf_counter()
        run(xs, *args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / reps, {}


def _busy_ns(events: list[tuple[str, int, int]]) -> float:
    """Length of the union of the events' ``[start, start + duration)`` intervals."""
    busy, end = 0.0, -math.inf
    for _, start, duration in sorted(events, key=lambda e: e[1]):
        stop = start + duration
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def _timer() -> str:
    if _TIMER.value is not None:
        return _TIMER.value
    return "profiler" if jax.default_backend() == "gpu" else "wall"


def measure_copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes per second of a device copy, counting bytes read and written."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    f(x).block_until_ready()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(ts)


def measure_bf16_rate(n: int = 8192) -> float:
    """FLOP/s of a dense ``n x n x n`` bf16 matrix product on random data."""
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts)


def _bf16_ragged_layer(x, w13_t, w2_t, topk_ids, topk_weights, *, offset, num_local, num_rows=None):
    """The MoE layer with bf16 weights (``w13_t (L, H, 2I)``, ``w2_t (L, I, H)``) and ragged_dot.

    ``num_rows``: how many slots to gather (default all ``N * top_k``); the local
    slots come first, so ``num_rows`` >= the local slot count loses nothing.
    """
    n, k = topk_ids.shape
    inter = w2_t.shape[1]
    ids = topk_ids.reshape(-1) - offset
    group = jnp.where((ids >= 0) & (ids < num_local), ids, num_local)
    order = jnp.argsort(group, stable=True)
    if num_rows is not None:
        order = order[:num_rows]
    sizes = jnp.bincount(group, length=num_local + 1)[:num_local].astype(jnp.int32)
    xs = x[order // k]
    gu = jax.lax.ragged_dot(xs, w13_t, sizes, preferred_element_type=jnp.float32)
    act = (jax.nn.silu(gu[:, :inter]) * gu[:, inter:]).astype(jnp.bfloat16)
    down = jax.lax.ragged_dot(act, w2_t, sizes, preferred_element_type=jnp.float32)
    w = jnp.where(group[order] < num_local, topk_weights.reshape(-1)[order], 0.0)
    per_slot = jnp.zeros((n * k, down.shape[1]), down.dtype).at[order].set(down * w[:, None])
    return per_slot.reshape(n, k, -1).sum(1).astype(x.dtype)


def _with_jax_routing(step):
    """`step` traced with the jitted JAX routing metadata instead of the routing kernel."""
    from unittest import mock

    from jax_moe import gpu

    def run(*args):
        with mock.patch.object(gpu, "uses_routing_kernel", lambda problem: False):
            return step(*args)

    return run


@functools.cache
def _table(path: str | None = None):
    """The tactic table at `path` (default `--tactics`), loaded once; None: the shipped
    table."""
    path = _TACTICS.value if path is None else path
    return None if path is None else jax_moe.tuning.load_tactic_table(path)


def _columns() -> list[tuple[str, str | None]]:
    """(column name, tactic file for a fused_moe column or None) of every timed column."""
    compared = [p.strip() for p in _COMPARE_TACTICS.value if p.strip()]
    return [(name, None) for name in _PEERS.value] + [
        (f"fused_moe_t{i}", path) for i, path in enumerate(compared, 1)
    ]


def _print_breakdown(cfg, num_local, x, prepared, ids, wts, kernels) -> None:
    """fused_moe's tactics and its device time per kernel name (largest first)."""
    from jax_moe import gpu

    problem = moe.validate_moe_args(
        x, prepared, ids, wts, num_local_experts=num_local, num_experts=cfg.num_experts
    )
    g1, g2 = gpu.select_tactics(problem, _table())
    print(f"    tactics: {g1} / {g2}")
    total = sum(kernels.values())
    for name, t in sorted(kernels.items(), key=lambda kv: -kv[1])[:8]:
        print(f"    {t * 1e6:9.1f} us {100 * t / total:5.1f}%  {name[:110]}")


def main(argv):
    del argv
    cfg = models.get_preset(_MODEL.value)
    ep = _EP.value
    num_local = cfg.num_experts // ep
    key = jax.random.key(_SEED.value)
    kw, kx, kr = jax.random.split(key, 3)
    weights = models.random_moe_weights(kw, cfg, num_local_experts=num_local)
    prepared = jax.jit(prepare)(weights) if jax.default_backend() == "gpu" else weights
    router = models.random_router(kr, cfg)
    need_bf16 = any(name.startswith("ragged_bf16") for name in _PEERS.value)
    if need_bf16:
        w13_t = jnp.swapaxes(jax_moe.nvfp4.dequantize(weights.w13, jnp.bfloat16), 1, 2)
        w2_t = jnp.swapaxes(jax_moe.nvfp4.dequantize(weights.w2, jnp.bfloat16), 1, 2)

    on_gpu = jax.default_backend() == "gpu"  # fused_moe ends in the combine custom call
    bw = measure_copy_bandwidth()
    rate = measure_bf16_rate()
    expert_bytes = (weights.w13.nbytes + weights.w2.nbytes) / num_local
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}  backend: {jax.default_backend()}  jax {jax.__version__}")
    print(
        f"model {cfg.name} EP={ep}: {num_local} local experts, H={cfg.hidden}, "
        f"I={cfg.intermediate}, top_k={cfg.top_k} of {cfg.num_experts}; "
        f"{expert_bytes / 1e6:.2f} MB NVFP4 per expert"
    )
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    if _timer() == "events" and (jax.default_backend() != "gpu" or not _ffi.is_available()):
        raise app.UsageError("--timer=events needs a GPU and the jax_moe CUDA extension")
    if _BREAKDOWN.value and _timer() != "profiler":
        print("--breakdown needs --timer=profiler (the per-kernel times come from its trace)")
    print(f"timer: {_timer()}")
    columns = _columns()
    for name, path in columns:
        if path is not None:
            _table(path)  # a bad file fails before any timing
            print(f"{name}: {path}")
    header = f"{'N':>6} {'active':>6} {'floor_bytes_ms':>14} {'floor_flops_ms':>14} " + " ".join(
        f"{name + '_ms':>14}" for name, _ in columns
    )
    print(header)
    for n in (int(s) for s in _NUM_TOKENS.value):
        fused_kernels = {}
        reps = max(2, min(_REPS.value, (1 << 28) // max(1, n * cfg.hidden * 2)))
        xs = jax.random.normal(kx, (reps, n, cfg.hidden), jnp.bfloat16)
        ids, wts = models.route(cfg, xs[0], router)
        local = np.asarray(ids).reshape(-1)
        local = local[(local >= 0) & (local < num_local)]
        active = len(np.unique(local))
        floor_bytes = active * expert_bytes / bw
        floor_flops = 2 * local.size * 3 * cfg.hidden * cfg.intermediate / rate
        row = [f"{n:>6} {active:>6} {floor_bytes * 1e3:>14.4f} {floor_flops * 1e3:>14.4f}"]
        for name, path in columns:
            if name == "fused_moe" or path is not None:
                step = functools.partial(
                    jax_moe.fused_moe,
                    num_local_experts=num_local,
                    num_experts=cfg.num_experts,
                    tactics=_table(path),
                )
                t, kernels = _time_scan(step, xs, prepared, ids, wts, whole=not on_gpu)
                if path is None:
                    fused_kernels = kernels
            elif name == "fused_moe_jax_routing":
                step = _with_jax_routing(
                    functools.partial(
                        jax_moe.fused_moe,
                        num_local_experts=num_local,
                        num_experts=cfg.num_experts,
                        tactics=_table(),
                    )
                )
                t, _ = _time_scan(step, xs, prepared, ids, wts, whole=not on_gpu)
            elif name == "xla_nvfp4":
                step = functools.partial(
                    moe.fused_moe,
                    num_local_experts=num_local,
                    num_experts=cfg.num_experts,
                    implementation="xla",
                )
                t, _ = _time_scan(step, xs, weights, ids, wts)
            elif name == "ragged_bf16":
                step = functools.partial(_bf16_ragged_layer, offset=0, num_local=num_local)
                t, _ = _time_scan(step, xs, w13_t, w2_t, ids, wts)
            elif name == "ragged_bf16_local":
                step = functools.partial(
                    _bf16_ragged_layer, offset=0, num_local=num_local, num_rows=max(1, local.size)
                )
                t, _ = _time_scan(step, xs, w13_t, w2_t, ids, wts)
            else:
                raise app.UsageError(f"unknown implementation {name!r}")
            row.append(f"{t * 1e3:>14.4f}")
        print(" ".join(row), flush=True)
        if _BREAKDOWN.value and fused_kernels:
            _print_breakdown(cfg, num_local, xs[0], prepared, ids, wts, fused_kernels)


if __name__ == "__main__":
    app.run(main)
