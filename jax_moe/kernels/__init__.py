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

from jax_moe.kernels import combine_config, moe_gemm_config, routing_config

__all__ = ["KERNEL_MODULES", "combine_config", "moe_gemm_config", "routing_config"]

# op name -> kernel module, in table order. Each module follows the interface above.
KERNEL_MODULES: dict[str, str] = {
    "combine": "jax_moe.kernels.combine_sm90",
    "moe_gemm1": "jax_moe.kernels.moe_gemm1_sm90",
    "moe_gemm2": "jax_moe.kernels.moe_gemm2_sm90",
    "routing": "jax_moe.kernels.routing_sm90",
}
