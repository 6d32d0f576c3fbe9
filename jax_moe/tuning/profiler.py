"""Profilers: the time of one (op, tactic, cell) on a device.

A *cell* (`TuneCell`) is one point of the tuning grid: a layer shape (a
`jax_moe.models.MoEConfig`), an expert-parallel size `ep` (rank 0's slice of
`num_experts // ep` local experts, offset 0), a token count, the GPU arch, the
routing the inputs are drawn under and the raw data of the `jax.random` key
they are drawn from. Its inputs (`cell_inputs`) come from the tuning core's
seeded generators, so a cell names its inputs exactly:

- `balanced`, `spread`, `busy`, `uniform`, `zipf:S`: `jax_moe.tuning.profile_inputs`
  (the balanced generator by default; `spread` and `busy` are the same generator
  with a typical and the busiest rank's uneven loads; see docs/TUNING.md);
- `softmax`: realistic routing, the top-k of a softmax of standard normal
  logits (`jax_moe.routing.topk_softmax`);
- `skewed`: the same with a per-expert bias `-0.15 * log(1 + rank)` over a
  random ranking of the experts, so a few experts are hot (for DeepSeek-V3
  the hottest expert gets about 3 to 4 times the mean load);
- `softmax@busiest`, `skewed@busiest`: the same routings seen from the
  expert-parallel rank that receives the most slots (expert ids shifted
  cyclically so that rank's experts come first). Under expert parallelism the
  step waits for the busiest rank, and the balanced plan profiles that rank's
  load, so this is the load the tuned choice is meant for; rank 0 is a
  typical rank.

A `Profiler` answers `time(op, tactic, cell)` with a `Measurement` (median
microseconds per launch) or a `Failure` (the tactic could not be compiled or
launched; the message is kept, the tuning goes on). `prepare_cell` is an
optional hook called once per cell before its tactics are timed (the GPU
profiler compiles all of them there, in parallel threads).

`GpuProfiler` times the FFI ops `jax_moe._ffi.moe_gemm1` / `moe_gemm2` with
`variant=tactic` on the default GPU:

- inputs: the cell's hidden states and routing, routing metadata built with
  the tactic's `block_m`, random NVFP4 weights of the local experts
  (`models.random_moe_weights` from a key derived from the cell's key, then
  `prepare`); for GEMM2, standard normal bf16 activations `(m_pad, intermediate)`.
  `prepare_cell` draws the routing and the weights, builds the metadata and
  compiles the activation draws in its compile threads, so timing compiles nothing;
- timing: a jitted loop (`lax.fori_loop`) runs R launches back to back over R
  distinct activation inputs (no launch can be hoisted or merged), unrolled into
  straight-line code (`TimingConfig.unroll`, the default: XLA runs no device
  loop whose per-iteration dispatch from the host could stretch launches of a
  few microseconds, and may run the launches as one command buffer). Each
  launch's input index is computed from the previous launch's result (`after`),
  so the launches run one after another (never concurrently); the time of a launch
  is the time of the whole scan divided by R, the median of `repeats` scans
  after `warmup` scans (the first also compiles). Each scan step also slices
  its activation input out of the stacked inputs and adds one element of the
  result to a float32 carry (two tiny kernels), a small constant that is the
  same for every tactic of an op.
- timer (`TimingConfig.timer`): `events` (the default) times the scan on the
  device: the program records a CUDA event (`jax_moe._ffi.record_event`) on
  XLA's stream before the scan and another after it, and the time is the
  elapsed time between the two, so the host's dispatch and synchronization
  (tens of microseconds, varying from call to call) are not in it. `wall`
  times the scan from the host, to `block_until_ready`, and only amortizes that
  overhead over the R launches.
- R (`_LaunchPlan.steps`) is `TimingConfig.reps`, lowered for long launches so
  that a scan lasts about `min_scan_us` by a roofline estimate (the active
  experts' weight bytes at `_ESTIMATE_BYTES_PER_US` and the FLOPs at
  `_ESTIMATE_FLOPS_PER_US`, both above what the GPU reaches, so the estimate is
  low and the scan no shorter than planned), but never below `min_reps`. The
  estimate depends only on the cell, so the plan is the same in every run.
- cold L2 (`TimingConfig.cold_l2`): each scan step launches C times, each on
  its own copy of the weights (drawn from their own keys) and its own
  activations, with C the smallest count whose bytes reach twice the L2 size
  (at most `max_weight_copies`), so no launch finds the previous launch's
  weights in L2. The L2 size is read from the device when JAX exposes it
  (`l2_cache_size`), else `DEFAULT_L2_BYTES` (50 MiB, the L2 of an H100/H200).
- R is also lowered where the stacked activations would exceed
  `max_input_bytes`, so large problems stay within memory.
- Any exception of a tactic (trace, compile or launch) becomes a `Failure`.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe import routing
from jax_moe.models import MoEConfig
from jax_moe.tactic import Tactic
from jax_moe.tuning.problem import ProblemKey
from jax_moe.tuning.routing_generator import (
    PLANNED_KINDS,
    ProfileInputs,
    RoutingDistribution,
    planned_expert_loads,
    profile_inputs,
)

__all__ = [
    "BUSIEST_RANK",
    "DEFAULT_L2_BYTES",
    "GEMM1_OP",
    "GEMM2_OP",
    "OPS",
    "REALISTIC_ROUTINGS",
    "TIMERS",
    "Failure",
    "GpuProfiler",
    "Measurement",
    "Profiler",
    "TimingConfig",
    "TuneCell",
    "busiest_rank_first",
    "cell_expert_loads",
    "cell_inputs",
    "estimated_launch_us",
    "key_data_of_seed",
    "l2_cache_bytes",
]

GEMM1_OP = "moe_gemm1"
GEMM2_OP = "moe_gemm2"
OPS = (GEMM1_OP, GEMM2_OP)
#: Realistic routings of the regret evaluation (see the module docstring).
REALISTIC_ROUTINGS = ("softmax", "skewed")
#: Suffix of a realistic routing seen from the busiest expert-parallel rank.
BUSIEST_RANK = "@busiest"
#: L2 bytes assumed when the device does not report its L2 size (H100 and H200: 50 MiB).
DEFAULT_L2_BYTES = 50 * 2**20

_SKEW = 0.15
#: Event slots the profiler's programs record (jax_moe._ffi.record_event).
_START_SLOT, _STOP_SLOT = 0, 1
#: Roofline of the launch-time estimate that sets R (see the module docstring): bytes
#: per microsecond and FLOPs per microsecond, above an H100's or H200's peak.
_ESTIMATE_BYTES_PER_US = 5e6
_ESTIMATE_FLOPS_PER_US = 1.2e9
TIMERS = ("events", "wall")
# fold_in tags of keys derived from a cell's key (the core uses 0..2 for its inputs).
_WEIGHTS_TAG = 101
_ACTIVATION_TAG = 102
_REALISTIC_ROUTING_TAG = 103


def key_data_of_seed(seed: int) -> tuple[int, ...]:
    """The raw data of `jax.random.key(seed)`, as stored in a table's `profile_key`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}; expected an int >= 0")
    return tuple(int(x) for x in np.asarray(jax.random.key_data(jax.random.key(seed))).ravel())


def _realistic_base(routing: str) -> str | None:
    """`softmax` / `skewed` for a realistic routing name (with or without the rank
    suffix), else None."""
    base = routing.removesuffix(BUSIEST_RANK) if isinstance(routing, str) else None
    return base if base in REALISTIC_ROUTINGS else None


def _check_routing(routing: str) -> str:
    if _realistic_base(routing) is not None:
        return routing
    try:
        return str(RoutingDistribution.parse(routing))
    except (TypeError, ValueError):
        raise ValueError(
            f"routing={routing!r}; expected 'balanced', 'spread', 'busy', 'uniform', 'zipf:S', "
            f"{' or '.join(repr(r) for r in REALISTIC_ROUTINGS)}, optionally with "
            f"{BUSIEST_RANK!r}"
        ) from None


@dataclasses.dataclass(frozen=True)
class TuneCell:
    """One point of the tuning grid (see the module docstring).

    Attributes:
      model: the layer shape; only `hidden`, `intermediate`, `num_experts`,
        `top_k` and `name` matter here.
      ep: expert-parallel size; rank 0 holds experts `[0, num_experts // ep)`.
      num_tokens: tokens of the batch (the token bucket being tuned).
      arch: GPU arch of the problem keys, e.g. `sm_90a`.
      routing: `balanced`, `spread`, `busy`, `uniform`, `zipf:S`, `softmax` or `skewed`
        (the last two optionally with `@busiest`).
      key_data: raw data of the `jax.random` key the inputs are drawn from.
      dtype: activation dtype name.
    """

    model: MoEConfig
    ep: int
    num_tokens: int
    arch: str
    routing: str = "balanced"
    key_data: tuple[int, ...] = (0, 0)
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if not isinstance(self.model, MoEConfig):
            raise TypeError(f"TuneCell.model={self.model!r}; expected a MoEConfig")
        for name in ("ep", "num_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TuneCell.{name}={value!r}; expected an int >= 1")
        if self.model.num_experts % self.ep:
            raise ValueError(
                f"TuneCell.ep={self.ep} does not divide num_experts={self.model.num_experts} "
                f"of {self.model.name}"
            )
        object.__setattr__(self, "routing", _check_routing(self.routing))
        object.__setattr__(self, "key_data", tuple(int(x) for x in self.key_data))
        self.problem_key(GEMM1_OP)  # Validates arch and dtype.

    @property
    def num_local_experts(self) -> int:
        return self.model.num_experts // self.ep

    def problem_key(self, op: str) -> ProblemKey:
        """The `ProblemKey` of `op` for this cell (bucket = `num_tokens` bucket)."""
        m = self.model
        return ProblemKey.for_call(
            op,
            self.arch,
            m.hidden,
            m.intermediate,
            m.num_experts,
            self.num_local_experts,
            m.top_k,
            self.dtype,
            self.num_tokens,
        )

    def key(self) -> jax.Array:
        """The `jax.random` key of the inputs."""
        return jax.random.wrap_key_data(np.asarray(self.key_data, dtype=np.uint32))

    def __str__(self) -> str:
        routing = "" if self.routing == "balanced" else f" {self.routing}"
        return f"{self.model.name} EP={self.ep} N={self.num_tokens}{routing}"


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A successful timing: `time_us` is the median of `samples_us` (per launch)."""

    time_us: float
    samples_us: tuple[float, ...] = ()
    launches: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.time_us, (int, float)) and math.isfinite(self.time_us)):
            raise ValueError(f"Measurement.time_us={self.time_us!r}; expected a finite float")
        if self.time_us <= 0:
            raise ValueError(f"Measurement.time_us={self.time_us}; expected > 0")


@dataclasses.dataclass(frozen=True)
class Failure:
    """A tactic that could not be timed; `message` says why."""

    message: str


class Profiler(abc.ABC):
    """Times one (op, tactic, cell). Subclasses set `device_name` and `arch`.

    `device_name` is the `jax.Device.device_kind` recorded in the tactic table;
    `arch` (e.g. `sm_90a`) is the arch of the cells it can time.
    """

    device_name: str
    arch: str

    def prepare_cell(self, cell: TuneCell, candidates: Mapping[str, Sequence[Tactic]]) -> None:
        """Called once before the `candidates` (op -> tactics) of `cell` are timed."""
        del cell, candidates

    @abc.abstractmethod
    def time(self, op: str, tactic: Tactic, cell: TuneCell) -> Measurement | Failure:
        """The time of one launch of `op` with `tactic` on `cell`'s inputs, or a Failure."""

    def screen(self, op: str, tactic: Tactic, cell: TuneCell) -> Measurement | Failure:
        """A cheaper, rougher `time` for the search's screening pass (default: `time`)."""
        return self.time(op, tactic, cell)


def _realistic_routing(cell: TuneCell) -> tuple[jax.Array, jax.Array]:
    m = cell.model
    key = jax.random.fold_in(cell.key(), _REALISTIC_ROUTING_TAG)
    k_logits, k_rank = jax.random.split(key)
    logits = jax.random.normal(k_logits, (cell.num_tokens, m.num_experts), jnp.float32)
    if _realistic_base(cell.routing) == "skewed":
        rank = jax.random.permutation(k_rank, m.num_experts).astype(jnp.float32)
        logits = logits - _SKEW * jnp.log1p(rank)[None, :]
    ids, weights = routing.topk_softmax(logits, m.top_k)
    if cell.routing.endswith(BUSIEST_RANK):
        ids = busiest_rank_first(ids, m.num_experts, cell.num_local_experts)
    return ids, weights


def busiest_rank_first(topk_ids: jax.Array, num_experts: int, num_local_experts: int) -> jax.Array:
    """`topk_ids` with expert ids shifted cyclically so that the rank holding the most slots
    owns experts `[0, num_local_experts)` (ties: the lowest rank).

    Rank `r` holds experts `[r * L, (r + 1) * L)`. The shift keeps every token's ids
    distinct and every rank's load; only which rank comes first changes.
    """
    loads = jnp.bincount(
        (topk_ids // num_local_experts).ravel(), length=num_experts // num_local_experts
    )
    first = jnp.argmax(loads).astype(topk_ids.dtype) * num_local_experts
    return (topk_ids - first) % num_experts


@functools.lru_cache(maxsize=16)
def cell_inputs(cell: TuneCell) -> ProfileInputs:
    """The inputs of `cell`: hidden states `(num_tokens, hidden)`, routing and router weights.

    Raises ValueError for an infeasible balanced or busy plan (see
    `balanced_expert_loads`).
    """
    realistic = _realistic_base(cell.routing) is not None
    m = cell.model
    inputs = profile_inputs(
        cell.key(),
        cell.num_tokens,
        m.hidden,
        m.num_experts,
        m.top_k,
        dtype=jnp.dtype(cell.dtype),
        distribution="uniform" if realistic else cell.routing,
        num_local_experts=cell.num_local_experts,
    )
    if realistic:
        ids, weights = _realistic_routing(cell)
        inputs = ProfileInputs(inputs.hidden_states, ids, weights)
    return inputs


@functools.lru_cache(maxsize=256)
def cell_expert_loads(cell: TuneCell) -> tuple[int, ...]:
    """Routed rows of each local expert of `cell` (length `num_local_experts`).

    Under a planned routing (`balanced`, `spread`, `busy`) these are its plan exactly, so no
    inputs are drawn.
    """
    m = cell.model
    if cell.routing in PLANNED_KINDS:
        plan = planned_expert_loads(
            cell.routing, cell.num_tokens, m.num_experts, m.top_k, cell.num_local_experts
        )
        return tuple(int(x) for x in plan)
    ids = np.asarray(cell_inputs(cell).topk_ids).ravel()
    local = ids[ids < cell.num_local_experts]
    return tuple(int(x) for x in np.bincount(local, minlength=cell.num_local_experts))


def _shape_of(cell: TuneCell) -> tuple[Any, ...]:
    """What the shapes of a cell's programs depend on, besides the launch plan."""
    return cell.model, cell.ep, cell.num_tokens, cell.arch, cell.dtype


def l2_cache_bytes(device: Any) -> int:
    """The L2 size of `device` if JAX exposes it, else `DEFAULT_L2_BYTES`."""
    value = getattr(device, "l2_cache_size", None)
    if isinstance(value, int) and value > 0:
        return value
    return DEFAULT_L2_BYTES


def after(acc: jax.Array) -> jax.Array:
    """An int32 zero computed from `acc` (`acc * 0`, which XLA does not fold for
    floats): added to the next launch's input index, it makes that launch wait for
    `acc`, so the launches of a timed program run one after another even where XLA
    could run independent launches concurrently (a command buffer)."""
    return (acc * 0).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    """How `GpuProfiler` times a launch (see the module docstring).

    Attributes:
      reps: launches per timed scan (R), at most; >= 1.
      repeats: timed scans; the median is reported; >= 1.
      warmup: untimed scans first (the first also compiles); >= 1.
      cold_l2: rotate weight copies so that no launch hits the L2.
      l2_bytes: the L2 size; None reads it from the device (or DEFAULT_L2_BYTES).
      max_weight_copies: at most this many weight copies with `cold_l2`.
      max_input_bytes: the stacked activations of one scan stay below this.
      compile_threads: threads compiling a cell's tactics and building its inputs in
        parallel (at most the CPU count).
      timer: `events` (device time between CUDA events around the scan) or
        `wall` (host time to `block_until_ready`).
      min_scan_us: R is lowered for long launches so that a scan lasts about
        this long by the estimate (see the module docstring).
      min_reps: R never goes below this (but `reps` if smaller).
      unroll: unroll the timed scan into straight-line launches (no device loop:
        XLA can then run the R launches as one command buffer, so a short launch
        is not timed together with the host's per-iteration dispatch).
    """

    reps: int = 20
    repeats: int = 5
    warmup: int = 1
    cold_l2: bool = False
    l2_bytes: int | None = None
    max_weight_copies: int = 16
    max_input_bytes: int = 2 * 2**30
    compile_threads: int = 16
    timer: str = "events"
    min_scan_us: float = 2000.0
    min_reps: int = 3
    unroll: bool = True

    def __post_init__(self) -> None:
        if self.timer not in TIMERS:
            raise ValueError(f"TimingConfig.timer={self.timer!r}; expected one of {TIMERS}")
        if (
            isinstance(self.min_scan_us, bool)
            or not isinstance(self.min_scan_us, (int, float))
            or not self.min_scan_us >= 0
            or not math.isfinite(self.min_scan_us)
        ):
            raise ValueError(
                f"TimingConfig.min_scan_us={self.min_scan_us!r}; expected a finite float >= 0"
            )
        for name in (
            "reps",
            "min_reps",
            "repeats",
            "warmup",
            "max_weight_copies",
            "max_input_bytes",
            "compile_threads",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TimingConfig.{name}={value!r}; expected an int >= 1")
        for name in ("cold_l2", "unroll"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TimingConfig.{name}={getattr(self, name)!r}; expected a bool")
        if self.l2_bytes is not None and (
            isinstance(self.l2_bytes, bool)
            or not isinstance(self.l2_bytes, int)
            or self.l2_bytes < 1
        ):
            raise ValueError(
                f"TimingConfig.l2_bytes={self.l2_bytes!r}; expected None or an int >= 1"
            )


def _seconds(run: Callable[[], Any], warmup: int, repeats: int, timer: str) -> list[float]:
    """Seconds of `repeats` calls of `run` after `warmup` calls: host time to
    block_until_ready (`wall`), or device time between the start and stop events that
    each call records (`events`)."""
    from jax_moe import _ffi

    for _ in range(warmup):
        jax.block_until_ready(run())
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        if timer == "events":
            seconds.append(_ffi.event_elapsed_ms(_START_SLOT, _STOP_SLOT) * 1e-3)
        else:
            seconds.append(time.perf_counter() - start)
    return seconds


def estimated_launch_us(op: str, cell: TuneCell) -> float:
    """A lower estimate of one launch of `op` on `cell` in microseconds (roofline of the
    active experts' weight bytes and the routed rows' FLOPs; see the module docstring)."""
    m = cell.model
    loads = cell_expert_loads(cell)
    active = sum(1 for load in loads if load)
    rows = sum(loads)
    if op == GEMM1_OP:
        weights, flops = 2 * m.intermediate * m.hidden, 2 * rows * 2 * m.intermediate * m.hidden
    else:
        weights, flops = m.hidden * m.intermediate, 2 * rows * m.hidden * m.intermediate
    weight_bytes = active * weights * 9 // 16  # 4-bit codes + one byte per 16
    return max(weight_bytes / _ESTIMATE_BYTES_PER_US, flops / _ESTIMATE_FLOPS_PER_US, 1.0)


def _nbytes(arrays: Sequence[Any]) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)


@jax.jit
def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(-1)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _draw_activation(
    key: jax.Array, hidden_states: jax.Array, shape: tuple[int, ...], lead: bool
) -> jax.Array:
    """A standard normal bfloat16 array of `shape` (`(steps, *activation)`) drawn from
    `key`; with `lead`, its first step is `hidden_states` and only the others are drawn.
    One program per (shape, lead), whatever the key, so copies and `block_m`s share it."""
    if not lead:
        return jax.random.normal(key, shape).astype(jnp.bfloat16)
    rest = jax.random.normal(key, (shape[0] - 1, *shape[1:])).astype(jnp.bfloat16)
    return jnp.concatenate([hidden_states[None].astype(jnp.bfloat16), rest])


@dataclasses.dataclass(frozen=True)
class _LaunchPlan:
    """Shapes of one (op, block_m) scan: `copies` launches per step, `steps` steps."""

    op: str
    block_m: int
    m_pad: int
    copies: int
    steps: int
    activation: jax.ShapeDtypeStruct  # one launch's activation input
    weights: tuple[jax.ShapeDtypeStruct, ...]  # one copy's weight operands

    @property
    def launches(self) -> int:
        return self.copies * self.steps


def _plan_order(plan: _LaunchPlan) -> tuple[str, int]:
    return plan.op, plan.block_m


class GpuProfiler(Profiler):
    """Times the CUDA FFI ops on the default GPU (see the module docstring).

    Raises NotImplementedError on construction when no CUDA GPU is visible to
    JAX or the jax_moe CUDA extension is not built.
    """

    def __init__(self, timing: TimingConfig | None = None):
        from jax_moe import _ffi
        from jax_moe.tuning.lookup import device_identity

        try:
            backend = jax.default_backend()
        except RuntimeError as error:
            raise NotImplementedError(f"GpuProfiler needs a CUDA GPU: {error}") from error
        if backend != "gpu":
            raise NotImplementedError(
                f"GpuProfiler needs a CUDA GPU visible to JAX; the default backend is {backend!r}"
            )
        if not _ffi.is_available():
            raise NotImplementedError(
                "GpuProfiler needs the jax_moe CUDA extension, which is not built"
            )
        timing = timing or TimingConfig()
        device = jax.devices()[0]  # The device jit places programs and inputs on.
        device_name, arch = device_identity(device)
        self._setup(timing, device_name, arch, timing.l2_bytes or l2_cache_bytes(device))

    def _setup(self, timing: TimingConfig, device_name: str, arch: str, l2_bytes: int) -> None:
        self.timing = timing
        self.device_name, self.arch = device_name, arch
        self.l2_bytes = l2_bytes
        self._cell: TuneCell | None = None
        self._weights_key: Any = None
        self._weights: list[Any] = []  # prepared weight copies of the current layer slice
        # (op, tactic, launch plan) -> compiled scan or its error, for one cell shape.
        self._compiled: dict[tuple[str, Tactic, _LaunchPlan], Any] = {}
        self._group: tuple[str, int] | None = None
        self._group_args: tuple[Any, ...] = ()
        # block_m -> ((sorted_slots, tile_expert), router weights) of the current cell.
        self._small: dict[int, tuple[Any, Any]] = {}

    # Inputs -------------------------------------------------------------------------

    def _enter(self, cell: TuneCell) -> None:
        if cell == self._cell:
            return
        # Cells that differ only in routing or key share programs of equal launch plans.
        if self._cell is None or _shape_of(self._cell) != _shape_of(cell):
            self._compiled = {}
        self._cell, self._group, self._group_args, self._small = cell, None, (), {}
        weights_key = (cell.model, cell.ep, cell.key_data)
        if weights_key != self._weights_key:
            self._weights_key, self._weights = weights_key, []

    def _weight_copies(self, cell: TuneCell, count: int) -> list[Any]:
        from jax_moe import models
        from jax_moe.prepare import prepare

        base = jax.random.fold_in(cell.key(), _WEIGHTS_TAG)
        while len(self._weights) < count:
            key = jax.random.fold_in(base, len(self._weights))
            logical = models.random_moe_weights(
                key, cell.model, num_local_experts=cell.num_local_experts
            )
            self._weights.append(jax.block_until_ready(jax.jit(prepare)(logical)))
        return self._weights[:count]

    def _plan(self, op: str, block_m: int, cell: TuneCell) -> _LaunchPlan:
        from jax_moe.routing_metadata import padded_rows

        m = cell.model
        local, h, inter = cell.num_local_experts, m.hidden, m.intermediate
        m_pad = padded_rows(cell.num_tokens * m.top_k, local, block_m)
        u8, f32 = jnp.uint8, jnp.float32
        if op == GEMM1_OP:
            activation = jax.ShapeDtypeStruct((cell.num_tokens, h), jnp.bfloat16)
            shapes = ((local, 2 * inter, h // 2), (local, 2 * inter, h // 16))
        elif op == GEMM2_OP:
            activation = jax.ShapeDtypeStruct((m_pad, inter), jnp.bfloat16)
            shapes = ((local, h, inter // 2), (local, h, inter // 16))
        else:
            raise ValueError(f"op={op!r}; expected one of {OPS}")
        weights = (
            jax.ShapeDtypeStruct(shapes[0], u8),
            jax.ShapeDtypeStruct(shapes[1], u8),
            jax.ShapeDtypeStruct((local,), f32),
        )
        copies = 1
        if self.timing.cold_l2:
            set_bytes = _nbytes(weights) + _nbytes([activation])
            copies = min(self.timing.max_weight_copies, max(1, -(-2 * self.l2_bytes // set_bytes)))
        reps = self.timing.reps
        if self.timing.min_scan_us > 0:
            wanted = math.ceil(self.timing.min_scan_us / estimated_launch_us(op, cell))
            reps = min(reps, max(self.timing.min_reps, wanted))
        steps = max(1, -(-reps // copies))
        per_step = copies * _nbytes([activation])
        steps = max(1, min(steps, self.timing.max_input_bytes // max(per_step, 1)))
        return _LaunchPlan(op, block_m, m_pad, copies, steps, activation, weights)

    def _abstract_args(self, plan: _LaunchPlan, cell: TuneCell) -> tuple[Any, ...]:
        i32 = jnp.int32
        meta = (
            jax.ShapeDtypeStruct((plan.m_pad,), i32),
            jax.ShapeDtypeStruct((plan.m_pad // plan.block_m,), i32),
        )
        xs = tuple(
            jax.ShapeDtypeStruct((plan.steps, *plan.activation.shape), plan.activation.dtype)
            for _ in range(plan.copies)
        )
        weights = tuple(plan.weights for _ in range(plan.copies))
        slots = jax.ShapeDtypeStruct((cell.num_tokens * cell.model.top_k,), jnp.float32)
        return xs, meta, weights, slots

    def _concrete_args(self, plan: _LaunchPlan, cell: TuneCell) -> tuple[Any, ...]:
        meta, slots = self._small_args(plan.block_m, cell)
        copies = self._weight_copies(cell, plan.copies)
        if plan.op == GEMM1_OP:
            weights = tuple((w.w13_packed, w.w13_scale, w.w13_global) for w in copies)
        else:
            weights = tuple((w.w2_packed, w.w2_scale, w.w2_global) for w in copies)
        xs = tuple(_draw_activation(*args) for args in self._activation_args(plan, cell))
        return xs, meta, weights, slots

    def _small_args(self, block_m: int, cell: TuneCell) -> tuple[Any, Any]:
        """`((sorted_slots, tile_expert), router weights)` of `cell` for `block_m`, kept
        while the profiler stays on `cell`."""
        from jax_moe.routing_metadata import routing_metadata

        small = self._small.get(block_m)
        if small is None:
            inputs = cell_inputs(cell)
            meta = routing_metadata(
                inputs.topk_ids, num_local_experts=cell.num_local_experts, block_m=block_m
            )
            small = ((meta.sorted_slots, meta.tile_expert), _flat(inputs.topk_weights))
            self._small[block_m] = small
        return small

    def _activation_args(self, plan: _LaunchPlan, cell: TuneCell) -> list[tuple[Any, ...]]:
        """The arguments of `_draw_activation` for each copy of `plan`: activations
        `(steps, *activation)` drawn from `fold_in(key, copy)`, `key` one of the cell
        and `block_m`; GEMM1's first copy starts with the cell's own hidden states."""
        key = jax.random.fold_in(jax.random.fold_in(cell.key(), _ACTIVATION_TAG), plan.block_m)
        shape = (plan.steps, *plan.activation.shape)
        hidden = cell_inputs(cell).hidden_states
        return [
            (jax.random.fold_in(key, c), hidden, shape, plan.op == GEMM1_OP and c == 0)
            for c in range(plan.copies)
        ]

    # Programs -----------------------------------------------------------------------

    def _program(self, op: str, tactic: Tactic, top_k: int) -> Callable[..., Any]:
        from jax_moe import _ffi

        def launch(x, meta, weights, slots):
            if op == GEMM1_OP:
                return _ffi.moe_gemm1(x, *meta, *weights, top_k, variant=tactic)
            return _ffi.moe_gemm2(x, *meta, *weights, slots, variant=tactic)

        events = self.timing.timer == "events"

        def program(xs, meta, weights, slots):
            def step(i, acc):
                for stacked, w in zip(xs, weights, strict=True):
                    x = jax.lax.dynamic_index_in_dim(stacked, i + after(acc), keepdims=False)
                    y = launch(x, meta, w, slots)
                    acc = acc + y[0, 0].astype(jnp.float32)  # keeps every launch alive
                return acc

            acc = jnp.zeros((), jnp.float32)
            if events:
                # Every launch reads an output of the barrier, which waits for the start
                # record (even if XLA unrolls the loop); the stop reads the loop's result.
                acc = _ffi.record_event(acc, slot=_START_SLOT)
                acc, xs, meta, weights, slots = jax.lax.optimization_barrier(
                    (acc, xs, meta, weights, slots)
                )
            acc = jax.lax.fori_loop(0, len(xs[0]), step, acc, unroll=self.timing.unroll)
            if events:
                acc = _ffi.record_event(acc, slot=_STOP_SLOT)
            return acc

        return jax.jit(program)

    def _lower(
        self, op: str, tactic: Tactic, cell: TuneCell, platforms: tuple[str, ...] | None = None
    ) -> Any:
        """The lowered scan of `op` with `tactic` for `cell` (abstract inputs, no data)."""
        plan = self._plan(op, tactic.block_m, cell)
        program = self._program(op, tactic, cell.model.top_k)
        traced = program.trace(*self._abstract_args(plan, cell))
        return traced.lower() if platforms is None else traced.lower(lowering_platforms=platforms)

    def _compile(self, op: str, tactic: Tactic, cell: TuneCell) -> Any:
        return self._lower(op, tactic, cell).compile()

    def prepare_cell(self, cell: TuneCell, candidates: Mapping[str, Sequence[Tactic]]) -> None:
        """Compiles every candidate of `cell` in parallel threads (errors kept for `time`).

        The same threads draw the cell's routing and its weight copies, build its
        metadata for each `block_m` and compile each distinct activation draw, so that
        timing compiles nothing.
        """
        self._enter(cell)
        jobs = [(op, t) for op, tactics in candidates.items() for t in tactics]
        plans = sorted({self._plan(op, t.block_m, cell) for op, t in jobs}, key=_plan_order)
        jobs = [job for job in jobs if self._compile_key(*job, cell) not in self._compiled]
        if not plans:
            return

        def small_args(block_m: int) -> None:
            routed.result()
            self._small_args(block_m, cell)

        def compile_draw(args: tuple[Any, ...]) -> None:
            _draw_activation.lower(*args).compile()

        block_ms = sorted({p.block_m for p in plans})
        tasks = 2 + len(block_ms) + sum(p.copies for p in plans) + len(jobs)
        threads = min(self.timing.compile_threads, tasks, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            # The routing and the weights first, then the candidates (which need
            # neither), then the inputs that need the routing (drawn by then).
            routed = pool.submit(cell_inputs, cell)
            weights = pool.submit(self._weight_copies, cell, max(p.copies for p in plans))
            futures = {job: pool.submit(self._compile, *job, cell) for job in jobs}
            inputs = [weights] + [pool.submit(small_args, b) for b in block_ms]
            if routed.exception() is None:
                # One compile per distinct (shape, lead) of the plans' draws.
                unique = {}
                for plan in plans:
                    for args in self._activation_args(plan, cell):
                        unique.setdefault(args[2:], args)
                inputs += [pool.submit(compile_draw, args) for args in unique.values()]
            for job, future in futures.items():
                key = self._compile_key(*job, cell)
                try:
                    self._compiled[key] = future.result()
                except Exception as error:  # noqa: BLE001 - recorded, reported by time()
                    self._compiled[key] = error
            # An input that fails here fails again when `time` builds it, and becomes
            # each tactic's Failure there.
            concurrent.futures.wait(inputs)

    def _compile_key(self, op: str, tactic: Tactic, cell: TuneCell) -> tuple[Any, ...]:
        return op, tactic, self._plan(op, tactic.block_m, cell)

    def time(self, op: str, tactic: Tactic, cell: TuneCell) -> Measurement | Failure:
        return self._time(op, tactic, cell, self.timing.repeats)

    def screen(self, op: str, tactic: Tactic, cell: TuneCell) -> Measurement | Failure:
        """`time` with a single timed scan (after the warm-up)."""
        return self._time(op, tactic, cell, 1)

    def _time(self, op: str, tactic: Tactic, cell: TuneCell, repeats: int) -> Measurement | Failure:
        try:
            self._enter(cell)
            key = self._compile_key(op, tactic, cell)
            compiled = self._compiled.get(key)
            if compiled is None:
                compiled = self._compiled[key] = self._compile(op, tactic, cell)
            if isinstance(compiled, BaseException):
                raise compiled
            plan = self._plan(op, tactic.block_m, cell)
            if self._group != (op, tactic.block_m):
                self._group_args = ()  # Frees the previous group's inputs first.
                self._group_args = self._concrete_args(plan, cell)
                self._group = (op, tactic.block_m)
            args = self._group_args
            timing = self.timing
            seconds = _seconds(lambda: compiled(*args), timing.warmup, repeats, timing.timer)
        except Exception as error:  # noqa: BLE001 - a failing tactic is data, not fatal
            return Failure(f"{type(error).__name__}: {error}")
        samples = tuple(s / plan.launches * 1e6 for s in seconds)
        return Measurement(statistics.median(samples), samples, plan.launches)
