"""CuTe DSL kernels and their tactics.

Importing this package needs no CuTe DSL: it imports only the DSL-free tactic
modules (`*_config.py`), which registers their tactic families with
`jax_moe.tactic`. The kernel modules themselves (`*_sm90.py`) import the DSL
and are imported only by the ahead-of-time exporter (`python -m
jax_moe._export`) and by tuning tools.

Kernel-module interface
=======================

Every module named in `KERNEL_MODULES` implements one FFI op and exposes:

* `OP: str` - the op name, a lower-case identifier such as `"combine"`. The
  XLA FFI target is `jax_moe_<OP>`.
* `variants() -> list[Tactic | str]` (or a sequence `VARIANTS`) - every
  compile-time configuration to build, in a fixed order. The position of a
  variant in this list is its *variant id*; `str(variant)` is its name, which
  must be unique within the op.
* `export_spec(variant) -> (jit_fn, fake_args)` - a `@cute.jit` function and
  the arguments for `cute.compile(jit_fn, *fake_args)`: fake tensors
  (`cutlass.cute.runtime.make_fake_compact_tensor`, dynamic sizes as
  `cute.sym_int(...)`), scalars (`cutlass.Int32(...)`) and a trailing stream
  `cuda.CUstream(0)` (`from cuda.bindings import driver as cuda`), the stream
  parameter annotated `cuda.CUstream`.

Every variant of one op must compile to the same C signature: the same
parameter names, kinds and tensor descriptors (which sizes and strides are
dynamic). Only compile-time constants (tile shapes, stages, ...) may differ.
The exporter checks this.

What the exporter makes of it (`python -m jax_moe._export --out DIR --arch
sm_90a`): for op `combine` with variants `[a, b]` it compiles
`jax_moe_combine_0.{h,o}` and `jax_moe_combine_1.{h,o}`, archives the objects
into `libjax_moe_kernels.a`, and writes `jax_moe_kernels.h`, which declares

* one descriptor struct per tensor parameter, `jax_moe_combine_<param>_t`
  (`{void *data; int32_t dynamic_shapes[..]; int64_t dynamic_strides[..]}`,
  only the dynamic entries, outermost first),
* `jax_moe_combine_launch_fn`, the launch signature (descriptors by pointer,
  scalars by value, `cudaStream_t` last; returns a `cudaError_t` value),
* `jax_moe_combine_variants[]`: `{name, load, launch}` per variant id, where
  `load()` loads the kernel module on every visible device once per process,
* `JAX_MOE_HAS_COMBINE` and `JAX_MOE_COMBINE_NUM_VARIANTS`,

and `jax_moe_kernels.cc`, the table itself.

Programmatic dependent launch
=============================

The layer's four kernels run back to back on one stream: routing -> GEMM1 ->
GEMM2 -> combine. With programmatic dependent launch (PDL) each kernel is
launched with the programmatic-stream-serialization attribute, so its CTAs may
start while the previous kernel is still running, and synchronizes on the
device instead:

* `griddepcontrol.wait` (`cute.arch.griddepcontrol_wait`) blocks until the
  previous grid has completed and its memory is visible. Every kernel executes
  it before its first read of a buffer written by an earlier kernel of the
  layer and before its first global write (a new output may reuse the memory
  of a buffer the previous kernel still reads). Every CTA of every kernel
  waits, except GEMM2's inactive row tiles (`tile_expert < 0`), which write
  nothing; of those, the CTAs of the first row tile's first weight tile wait
  too, so every grid has a CTA that waits and never completes before its
  predecessor (hence before every earlier kernel).
* `griddepcontrol.launch_dependents` lets the next kernel start once every CTA
  has issued it or exited. A CTA issues it only after its own wait, so when a
  kernel starts, the kernel two back has completed: GEMM2 reads routing's
  `tile_expert` and loads its first weight K steps before its wait, and the
  combine reads routing's `slot_row` before its wait. Those early reads of
  routing's output use `ld.global.cg` (L2), never a possibly stale L1 line.

A launch that does not follow a PDL-enabled kernel, or one without the
attribute, behaves as before (`griddepcontrol.wait` returns at once), so the
kernels stay correct when launched on their own. Results are unchanged, bit
for bit.

PDL is a build-time switch, off by default: the environment variable
`JAX_MOE_PDL` (`0`, the default, or `1`) read by `pdl_enabled()` when a kernel
is built. With `0` the kernels contain no `griddepcontrol` instruction and
their launch sets the attribute to 0 (no overlap). Measured on an H200 (the
whole layer between CUDA events, docs/BENCHMARKS.md) PDL saved 0.4-0.8 us at
N=1 and nothing measurable at N >= 8, so it stays opt-in until more work moves
in front of the waits.
`python -m jax_moe._export --pdl {0,1}` sets it for the export and records it
in `manifest.json` (`"pdl"`) and `jax_moe_kernels.h` (`JAX_MOE_KERNELS_PDL`).

Adding a kernel op
==================

1. `jax_moe/kernels/<name>_sm90.py` with `OP`, `variants()`, `export_spec()`;
   its tactic family in a DSL-free `<name>_config.py` imported below.
2. Its entry in `KERNEL_MODULES`.
3. `ffi/<op>.cc`: an execute handler (and an instantiate handler that calls
   `load()`), inside `#if JAX_MOE_HAS_<OP>`, declared in `ffi/jax_moe_ffi.h`
   and listed in `ffi/registrations.cc`. It validates every buffer and
   attribute, re-checks what `export_spec` promised (divisibility, 16-byte
   alignment), fills the descriptors and calls
   `jax_moe_<op>_variants[variant].launch(...)` on XLA's stream.
4. A wrapper in `jax_moe/_ffi.py` that calls `jax.ffi.ffi_call` with typed
   attributes, taking the variant id from `variant_id(op, tactic)`.
"""

from __future__ import annotations

import os

from jax_moe.kernels import combine_config, moe_gemm_config, routing_config

__all__ = [
    "KERNEL_MODULES",
    "PDL_ENV",
    "combine_config",
    "moe_gemm_config",
    "pdl_enabled",
    "routing_config",
]

#: Environment variable of the programmatic-dependent-launch switch ("1" or "0").
PDL_ENV = "JAX_MOE_PDL"


def pdl_enabled() -> bool:
    """Whether kernels are built with programmatic dependent launch (`JAX_MOE_PDL`).

    Unset or empty means off. Raises ValueError for anything but "0" or "1".
    """
    value = os.environ.get(PDL_ENV, "").strip()
    if value == "1":
        return True
    if value in ("", "0"):
        return False
    raise ValueError(f"{PDL_ENV}={value!r}; expected '0' (default) or '1'")


# op name -> kernel module, in table order. Each module follows the interface above.
KERNEL_MODULES: dict[str, str] = {
    "combine": "jax_moe.kernels.combine_sm90",
    "moe_gemm1": "jax_moe.kernels.moe_gemm1_sm90",
    "moe_gemm2": "jax_moe.kernels.moe_gemm2_sm90",
    "routing": "jax_moe.kernels.routing_sm90",
}
