"""XLA FFI wrappers of the ahead-of-time CuTe DSL kernels.

The CUDA extension `jax_moe._jax_moe_ffi` (built from `ffi/` and the kernels
exported by `python -m jax_moe._export`) holds one XLA FFI target per op,
`jax_moe_<op>`, and a table of compiled variants per op. This module

* imports the extension lazily and reports whether it is there
  (`is_available`), without touching any GPU;
* registers every target once, on first use, with
  `jax.ffi.register_ffi_target(name, {"instantiate": ..., "execute": ...},
  platform="CUDA")` (`register`);
* maps a tactic (or variant name) to the `variant` attribute the handler takes
  (`variant_id`): its position in the extension's table, so Python never needs
  the CuTe DSL at run time;
* wraps each op in a thin `jax.ffi.ffi_call` whose attributes are typed
  explicitly (`np.int32`), after validating shapes and dtypes at trace time.

Ops and their FFI signatures (`T = m_pad / block_m`, `E` = local experts):

`combine` (target `jax_moe_combine`)
    operands: y bfloat16 `(m_pad, hidden)`, slot_row int32 `(num_tokens * top_k,)`,
    optionally out bfloat16 `(num_tokens, hidden)` aliased to the result;
    result: out bfloat16 `(num_tokens, hidden)`;
    attributes: top_k int32, variant int32.
`moe_gemm1` (target `jax_moe_moe_gemm1`)
    operands: hidden bfloat16 `(num_tokens, hidden)`, sorted_slots int32 `(m_pad,)`,
    tile_expert int32 `(T,)`, w13_packed uint8 `(E, 2I, hidden/2)`, w13_scale uint8
    `(E, 2I, hidden/16)`, w13_global float32 `(E,)` (prepared layout, `jax_moe.prepare`);
    result: act bfloat16 `(m_pad, I)`;
    attributes: top_k int32, variant int32.
`moe_gemm2` (target `jax_moe_moe_gemm2`)
    operands: act bfloat16 `(m_pad, I)`, sorted_slots int32 `(m_pad,)`, tile_expert
    int32 `(T,)`, w2_packed uint8 `(E, hidden, I/2)`, w2_scale uint8 `(E, hidden, I/16)`,
    w2_global float32 `(E,)`, topk_weights float32 `(num_tokens * top_k,)`;
    result: y bfloat16 `(m_pad, hidden)`;
    attributes: variant int32.
`routing` (target `jax_moe_routing`)
    operand: topk_ids int32 `(num_slots,)`; results: sorted_slots int32 `(m_pad,)`,
    tile_expert int32 `(m_pad / block_m,)`, slot_row int32 `(num_slots,)` (the
    contract of `jax_moe.routing_metadata`); attributes: num_local_experts,
    block_m, local_expert_offset, variant (int32).
`record_event` (target `jax_moe_record_event`, execute stage only)
    operand: x of any shape and dtype, aliased to the result; attribute: slot int32.
    Records a CUDA event for device-time measurements (`event_elapsed_ms`).
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe._checks import check_int as _check_int

__all__ = [
    "combine",
    "event_elapsed_ms",
    "extension",
    "is_available",
    "kernel_variants",
    "moe_gemm1",
    "moe_gemm2",
    "record_event",
    "register",
    "register_cpu_checks",
    "routing_metadata",
    "variant_id",
]

_EXTENSION = "jax_moe._jax_moe_ffi"
_PLATFORM = "CUDA"
_COMBINE_VECTOR = 8  # combine_sm90 reads `hidden` in vectors of 8 (16-byte loads)

_register_lock = threading.Lock()
_registered = False


@functools.cache
def _load_extension() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(_EXTENSION), None
    except ImportError as error:
        return None, str(error)


def is_available() -> bool:
    """Whether the CUDA extension is built and importable (no device is queried)."""
    return _load_extension()[0] is not None


def extension() -> ModuleType:
    """The extension module; NotImplementedError if it was not built."""
    module, error = _load_extension()
    if module is None:
        raise NotImplementedError(
            "the jax_moe CUDA extension (jax_moe._jax_moe_ffi) is not available "
            f"({error}); reinstall with a CUDA toolkit (see CMakeLists.txt) or use the "
            "pure-JAX path"
        )
    return module


@functools.cache
def kernel_variants() -> dict[str, tuple[str, ...]]:
    """Op name -> variant names in id order, as compiled into the extension."""
    return {op: tuple(names) for op, names in extension().kernel_variants().items()}


def variant_id(op: str, variant: Any) -> int:
    """The `variant` attribute for `op`: the position of `str(variant)` in the table.

    `variant` is a tactic (any object whose `str` is a variant name) or a name.
    Raises ValueError for an unknown op and NotImplementedError for a variant
    that this build of the extension does not contain.
    """
    variants = kernel_variants()
    if op not in variants:
        raise ValueError(f"op={op!r}; the extension has ops {sorted(variants)}")
    name = str(variant)
    try:
        return variants[op].index(name)
    except ValueError:
        raise NotImplementedError(
            f"variant {name!r} of op {op!r} is not compiled into this build; "
            f"compiled variants: {list(variants[op])}"
        ) from None


def register() -> None:
    """Registers every FFI target of the extension for CUDA, once per process."""
    global _registered
    if _registered:
        return
    module = extension()
    with _register_lock:
        if _registered:
            return
        for name, stages in module.registrations().items():
            jax.ffi.register_ffi_target(name, stages, platform=_PLATFORM)
        _registered = True


_cpu_checks_registered = False


def register_cpu_checks() -> None:
    """Registers the CPU check targets (`jax_moe_<op>_check`), once per process.

    Each runs the CUDA execute handler's argument checks on the CPU and
    launches nothing (its output is left unwritten); tests use them to exercise
    the handlers' validation without a GPU.
    """
    global _cpu_checks_registered
    module = extension()
    with _register_lock:
        if _cpu_checks_registered:
            return
        for name, handler in module.cpu_check_registrations().items():
            jax.ffi.register_ffi_target(name, handler, platform="cpu")
        _cpu_checks_registered = True


def _call(
    op: str,
    variant: Any,
    result: jax.ShapeDtypeStruct | Sequence[jax.ShapeDtypeStruct],
    operands: Sequence[jax.Array],
    aliases: dict[int, int] | None = None,
    **attributes: np.int32,
) -> jax.Array:
    """Calls target `jax_moe_<op>` on `operands` with `attributes` and the variant id.

    Registers the targets first; `aliases` maps operand positions to the result.
    """
    vid = variant_id(op, variant)
    register()
    call = jax.ffi.ffi_call(
        f"jax_moe_{op}", result, input_output_aliases=aliases, vmap_method="sequential"
    )
    return call(*operands, **attributes, variant=np.int32(vid))


def _default_combine_variant() -> str:
    from jax_moe.kernels.combine_config import DEFAULT_COMBINE_SM90_TACTIC

    return str(DEFAULT_COMBINE_SM90_TACTIC)


def combine(
    y: jax.Array,
    slot_row: jax.Array,
    top_k: int,
    *,
    variant: Any = None,
    out: jax.Array | None = None,
) -> jax.Array:
    """Sums each token's `top_k` expert rows in slot order (CUDA kernel).

    `out[n] = bf16(sum_{j < top_k} (slot_row[n*top_k+j] >= 0 ? y[slot_row[n*top_k+j]] : 0))`
    with float32 accumulation (of the bfloat16 rows) in slot order; deterministic.

    Args:
      y: `(m_pad, hidden)` bfloat16 rows of GEMM2; `hidden % 8 == 0`.
      slot_row: `(num_tokens * top_k,)` int32 row of each slot in `y`, -1 for
        slots of experts on other ranks (rows `>= m_pad` count as -1).
      top_k: experts per token, >= 1.
      variant: a `CombineSm90Tactic` or its name; default
        `DEFAULT_COMBINE_SM90_TACTIC`.
      out: optional `(num_tokens, hidden)` bfloat16 buffer that the result
        overwrites in place (aliased; donate it under `jax.jit` to avoid a copy).

    Returns:
      `(num_tokens, hidden)` bfloat16.
    """
    top_k = _check_int("top_k", top_k, 1)
    if y.ndim != 2 or y.dtype != jnp.bfloat16:
        raise TypeError(
            f"y has dtype {y.dtype} and shape {y.shape}; expected bfloat16 (m_pad, hidden)"
        )
    if slot_row.ndim != 1 or slot_row.dtype != jnp.int32:
        raise TypeError(
            f"slot_row has dtype {slot_row.dtype} and shape {slot_row.shape}; "
            "expected int32 (num_tokens * top_k,)"
        )
    m_pad, hidden = y.shape
    if slot_row.shape[0] % top_k:
        raise ValueError(
            f"slot_row has {slot_row.shape[0]} entries, not a multiple of top_k={top_k}"
        )
    num_tokens = slot_row.shape[0] // top_k
    if hidden % _COMBINE_VECTOR:
        raise NotImplementedError(
            f"hidden={hidden}; the combine kernel needs a multiple of {_COMBINE_VECTOR}"
        )
    limit = np.iinfo(np.int32).max
    if max(m_pad, hidden, num_tokens, slot_row.shape[0]) > limit:
        raise NotImplementedError(
            f"sizes y{y.shape}, slot_row{slot_row.shape} exceed the kernel's 32-bit sizes"
        )
    out_type = jax.ShapeDtypeStruct((num_tokens, hidden), jnp.bfloat16)
    operands = [y, slot_row]
    aliases = {}
    if out is not None:
        if out.shape != out_type.shape or out.dtype != out_type.dtype:
            raise TypeError(
                f"out has dtype {out.dtype} and shape {out.shape}; expected bfloat16 "
                f"{out_type.shape}"
            )
        operands.append(out)
        aliases = {2: 0}
    if variant is None:
        variant = _default_combine_variant()
    return _call("combine", variant, out_type, operands, aliases, top_k=np.int32(top_k))


def _check_array(name: str, x: Any, dtype: Any, shape: tuple[int | None, ...]) -> None:
    """TypeError unless `x` has `dtype` and `shape` (None matches any size)."""
    ok = (
        hasattr(x, "dtype")
        and x.dtype == jnp.dtype(dtype)
        and len(x.shape) == len(shape)
        and all(want is None or got == want for got, want in zip(x.shape, shape, strict=True))
    )
    if not ok:
        expected = "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
        raise TypeError(
            f"{name} has dtype {getattr(x, 'dtype', None)} and shape {getattr(x, 'shape', None)};"
            f" expected {jnp.dtype(dtype).name} {expected}"
        )


def _scale_bytes(name: str, scale: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Prepared block scales (uint8 bytes of `jax_moe.prepare`'s scale encoding)."""
    if hasattr(scale, "dtype") and scale.dtype == jnp.float8_e4m3fn:
        raise TypeError(
            f"{name} is float8_e4m3fn; the kernels read prepared scale bytes (uint8), "
            "which are not e4m3 bit patterns: use jax_moe.prepare.prepare"
        )
    _check_array(name, scale, jnp.uint8, shape)
    return scale


def _check_routing(sorted_slots: jax.Array, tile_expert: jax.Array, variant: Any) -> int:
    _check_array("sorted_slots", sorted_slots, jnp.int32, (None,))
    _check_array("tile_expert", tile_expert, jnp.int32, (None,))
    m_pad = sorted_slots.shape[0]
    block_m = getattr(variant, "block_m", None)
    if isinstance(block_m, int) and (m_pad % block_m or tile_expert.shape[0] != m_pad // block_m):
        raise ValueError(
            f"sorted_slots has {m_pad} rows and tile_expert {tile_expert.shape[0]} tiles; "
            f"tactic {variant} needs routing metadata built with block_m={block_m}"
        )
    return m_pad


#: SMs assumed for a stream-K grid when JAX sees no GPU (H100 and H200 SXM).
_DEFAULT_SMS = 132
#: 32-bit words of the workspace of a GEMM variant without stream-K (never read).
_IDLE_WORKSPACE_WORDS = 4


@functools.cache
def _num_sms() -> int:
    """Streaming multiprocessors of the first GPU JAX sees (`_DEFAULT_SMS` without one)."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return _DEFAULT_SMS
    count = getattr(devices[0], "core_count", None) if devices else None
    return int(count) if isinstance(count, int) and count > 0 else _DEFAULT_SMS


@functools.cache
def _gemm_tactics(op: str) -> dict[str, Any]:
    from jax_moe.kernels.moe_gemm_config import gemm1_variants, gemm2_variants

    return {str(t): t for t in (gemm1_variants() if op == "moe_gemm1" else gemm2_variants())}


def _workspace(
    op: str, variant: Any, num_row_tiles: int, weight_rows: int, num_ctas: int | None
) -> tuple:
    """`(workspace result, num_ctas)` of a GEMM call: the stream-K grid's CTAs
    (`num_ctas`, default `stream_k` per SM) and its workspace
    (`stream_k_workspace_words`), or a `_IDLE_WORKSPACE_WORDS` placeholder and 0 for
    the other variants (which ignore `num_ctas`)."""
    from jax_moe.kernels.moe_gemm_config import stream_k_workspace_words

    tactic = _gemm_tactics(op).get(str(variant))
    per_sm = getattr(tactic, "stream_k", 0)
    if not per_sm:
        return jax.ShapeDtypeStruct((_IDLE_WORKSPACE_WORDS,), jnp.int32), 0
    if num_ctas is None:
        num_ctas = per_sm * _num_sms()
    num_ctas = _check_int("num_ctas", num_ctas, 1)
    words = stream_k_workspace_words(tactic, num_row_tiles, weight_rows, num_ctas)
    return jax.ShapeDtypeStruct((words,), jnp.int32), num_ctas


def _check_multiple(name: str, value: int, multiple: int) -> None:
    if value % multiple:
        raise NotImplementedError(f"{name}={value}; the kernel needs a multiple of {multiple}")


def moe_gemm1(
    hidden: jax.Array,
    sorted_slots: jax.Array,
    tile_expert: jax.Array,
    w13_packed: jax.Array,
    w13_scale: jax.Array,
    w13_global: jax.Array,
    top_k: int,
    *,
    variant: Any,
    num_ctas: int | None = None,
) -> jax.Array:
    """GEMM1 with fused SwiGLU on routed rows (CUDA kernel `moe_gemm1_sm90`).

    For row `r` of tile `t` with `e = tile_expert[t] >= 0` and `s = sorted_slots[r] >= 0`:
    `act[r] = bf16(silu(x . W13_gate[e]^T * gs[e]) * (x . W13_up[e]^T * gs[e]))`,
    `x = hidden[s // top_k]`. Other rows are unspecified.

    Args:
      hidden: `(num_tokens, hidden)` bfloat16, `hidden % 64 == 0`.
      sorted_slots, tile_expert: routing metadata (`jax_moe.routing_metadata`)
        built with the tactic's `block_m`.
      w13_packed: `(experts, 2 * intermediate, hidden // 2)` uint8, prepared layout.
      w13_scale: `(experts, 2 * intermediate, hidden // 16)` uint8, prepared scale
        bytes and order.
      w13_global: `(experts,)` float32.
      top_k: experts per token.
      variant: a `MoeGemm1Sm90Tactic` (or its name) compiled into the extension.
      num_ctas: with a stream-K variant, the grid's CTAs (>= 1; default `stream_k`
        per SM of the first GPU); ignored by the other variants.

    Returns:
      act: `(m_pad, intermediate)` bfloat16. A stream-K variant (`stream_k > 0`) also
      gets a workspace of `stream_k_workspace_words` int32 words (a second result of
      the custom call, dropped here) and a grid of `stream_k` CTAs per SM of the first
      GPU (132 SMs assumed without one).
    """
    top_k = _check_int("top_k", top_k, 1)
    _check_array("hidden", hidden, jnp.bfloat16, (None, None))
    h = hidden.shape[1]
    _check_array("w13_packed", w13_packed, jnp.uint8, (None, None, h // 2))
    experts, rows = w13_packed.shape[:2]
    if rows % 2:
        raise ValueError(f"w13_packed has {rows} rows per expert; expected 2 * intermediate")
    inter = rows // 2
    w13_scale = _scale_bytes("w13_scale", w13_scale, (experts, rows, h // 16))
    _check_array("w13_global", w13_global, jnp.float32, (experts,))
    m_pad = _check_routing(sorted_slots, tile_expert, variant)
    _check_multiple("hidden", h, 64)
    _check_multiple("intermediate", inter, 64)
    workspace, num_ctas = _workspace("moe_gemm1", variant, tile_expert.shape[0], rows, num_ctas)
    act, _ = _call(
        "moe_gemm1",
        variant,
        (jax.ShapeDtypeStruct((m_pad, inter), jnp.bfloat16), workspace),
        (hidden, sorted_slots, tile_expert, w13_packed, w13_scale, w13_global),
        top_k=np.int32(top_k),
        num_ctas=np.int32(num_ctas),
    )
    return act


def moe_gemm2(
    act: jax.Array,
    sorted_slots: jax.Array,
    tile_expert: jax.Array,
    w2_packed: jax.Array,
    w2_scale: jax.Array,
    w2_global: jax.Array,
    topk_weights: jax.Array,
    *,
    variant: Any,
    num_ctas: int | None = None,
) -> jax.Array:
    """GEMM2 with the router weight on routed rows (CUDA kernel `moe_gemm2_sm90`).

    For row `r` of tile `t` with `e = tile_expert[t] >= 0` and `s = sorted_slots[r] >= 0`:
    `y[r] = bf16(topk_weights[s] * (act[r] . W2[e]^T) * gs[e])`, computed in float32
    and rounded once. Other rows are unspecified.

    Args:
      act: `(m_pad, intermediate)` bfloat16, `intermediate % 64 == 0`.
      sorted_slots, tile_expert: routing metadata built with the tactic's `block_m`.
      w2_packed: `(experts, hidden, intermediate // 2)` uint8, prepared layout;
        `hidden % 128 == 0`.
      w2_scale: `(experts, hidden, intermediate // 16)` uint8, prepared scale bytes and order.
      w2_global: `(experts,)` float32.
      topk_weights: `(num_tokens * top_k,)` float32 router weight of each slot.
      variant: a `MoeGemm2Sm90Tactic` (or its name) compiled into the extension.
      num_ctas: as in `moe_gemm1`.

    Returns:
      y: `(m_pad, hidden)` bfloat16. Stream-K variants: as in `moe_gemm1`.
    """
    _check_array("act", act, jnp.bfloat16, (None, None))
    inter = act.shape[1]
    _check_array("w2_packed", w2_packed, jnp.uint8, (None, None, inter // 2))
    experts, h = w2_packed.shape[:2]
    w2_scale = _scale_bytes("w2_scale", w2_scale, (experts, h, inter // 16))
    _check_array("w2_global", w2_global, jnp.float32, (experts,))
    _check_array("topk_weights", topk_weights, jnp.float32, (None,))
    m_pad = _check_routing(sorted_slots, tile_expert, variant)
    if act.shape[0] != m_pad:
        raise ValueError(f"act has {act.shape[0]} rows; expected m_pad={m_pad}")
    _check_multiple("intermediate", inter, 64)
    _check_multiple("hidden", h, 128)
    workspace, num_ctas = _workspace("moe_gemm2", variant, tile_expert.shape[0], h, num_ctas)
    y, _ = _call(
        "moe_gemm2",
        variant,
        (jax.ShapeDtypeStruct((m_pad, h), jnp.bfloat16), workspace),
        (act, sorted_slots, tile_expert, w2_packed, w2_scale, w2_global, topk_weights),
        num_ctas=np.int32(num_ctas),
    )
    return y


def _check_slot(slot: int) -> int:
    slots = int(getattr(extension(), "EVENT_SLOTS", 0))
    if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < slots:
        raise ValueError(f"slot={slot!r}; expected an int in [0, {slots})")
    return int(slot)


def record_event(x: jax.Array, *, slot: int) -> jax.Array:
    """Records CUDA event `slot` on XLA's stream once `x` is computed; returns `x`.

    The result is `x` itself (the same buffer), so every op that consumes it runs
    after the record: `record_event(a, slot=0)` before a loop that reads the
    result and `record_event(b, slot=1)` on the loop's output bracket the loop,
    and `event_elapsed_ms(0, 1)` after the program ran is its device time. The
    call has a side effect, so XLA neither drops nor merges it. The slots are
    shared by the whole process, and a slot keeps only its latest record. Ops that
    do not consume the result are not ordered by it: route the loop's other
    inputs through `jax.lax.optimization_barrier` together with the result.
    """
    slot = _check_slot(slot)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x={x!r}; expected an array")
    register()
    call = jax.ffi.ffi_call(
        "jax_moe_record_event",
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        input_output_aliases={0: 0},
        has_side_effect=True,
    )
    return call(x, slot=np.int32(slot))


def event_elapsed_ms(start: int, stop: int) -> float:
    """Milliseconds from the latest record of event `start` to that of `stop`.

    Waits for `stop` (not for the rest of the device's work). RuntimeError if a
    slot was never recorded or both were not recorded on one device.
    """
    return float(extension().event_elapsed_ms(_check_slot(start), _check_slot(stop)))


def routing_metadata(
    topk_ids: jax.Array,
    *,
    num_local_experts: int,
    block_m: int,
    local_expert_offset: int = 0,
    variant: Any = None,
) -> Any:
    """`jax_moe.routing_metadata.routing_metadata` in CUDA kernels (`routing_sm90`: one
    launch, or three past `routing_config.MULTI_BLOCK_ROUTING_SLOTS` slots).

    Same arguments and the same `RoutingMetadata`, bit for bit. `variant`: a
    `RoutingSm90Tactic` (default: `routing_config.routing_tactic`). Integer ids wider
    than int32 are mapped to int32 first with their locality kept
    (`routing_metadata.ids_as_int32`). Raises NotImplementedError for more local experts than the
    kernel serves (`routing_config.MAX_LOCAL_EXPERTS`) or sizes past 2^31.
    """
    from jax_moe.kernels.routing_config import MAX_LOCAL_EXPERTS, routing_tactic
    from jax_moe.routing_metadata import (
        RoutingMetadata,
        check_metadata_args,
        ids_as_int32,
        padded_rows,
    )

    num_local, block_m, offset = check_metadata_args(
        topk_ids, num_local_experts, block_m, local_expert_offset
    )
    if num_local > MAX_LOCAL_EXPERTS:
        raise NotImplementedError(
            f"num_local_experts={num_local}; the routing kernel serves at most {MAX_LOCAL_EXPERTS}"
        )
    num_slots = topk_ids.shape[0] * topk_ids.shape[1]
    m_pad = padded_rows(num_slots, num_local, block_m)
    limit = np.iinfo(np.int32).max
    if m_pad > limit - 65536:  # the kernels' slot and row arithmetic stays in int32
        raise NotImplementedError(f"m_pad={m_pad}; the routing kernel needs < 2^31 - 65536")
    ids = ids_as_int32(topk_ids, num_local, offset)
    i32 = jnp.int32
    results = (
        jax.ShapeDtypeStruct((m_pad,), i32),
        jax.ShapeDtypeStruct((m_pad // block_m,), i32),
        jax.ShapeDtypeStruct((num_slots,), i32),
    )
    sorted_slots, tile_expert, slot_row = _call(
        "routing",
        routing_tactic(num_slots) if variant is None else variant,
        results,
        (ids,),
        num_local_experts=np.int32(num_local),
        block_m=np.int32(block_m),
        local_expert_offset=np.int32(offset),
    )
    return RoutingMetadata(sorted_slots, tile_expert, slot_row)
