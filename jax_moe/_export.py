"""Ahead-of-time export of the CuTe DSL kernels to C objects and a C++ dispatch table.

    python -m jax_moe._export --out DIR [--arch sm_90a] [--ops combine,...] [--pdl {0,1}]

runs on any machine with the CuTe DSL installed, a GPU is not needed (the DSL
compiles for `--arch` through `CUTE_DSL_ARCH`). For every op in
`jax_moe.kernels.KERNEL_MODULES` and every variant of its module (see the
kernel-module interface in `jax_moe.kernels`), in order, it compiles
`cute.compile(*export_spec(variant))` and exports it with `export_to_c` under
the prefix `jax_moe_<op>_<id>`. `DIR` then holds:

* `jax_moe_<op>_<id>.h`, `jax_moe_<op>_<id>.o` - the DSL's C header (module
  load function, tensor descriptor structs, `cute_dsl_<prefix>_wrapper`) and
  the object holding the host launch code and the cubin;
* `libjax_moe_kernels.a` - all those objects in one archive;
* `jax_moe_kernels.h` / `jax_moe_kernels.cc` - the generated table: per op, the
  shared descriptor structs `jax_moe_<op>_<param>_t`, the launch signature
  `jax_moe_<op>_launch_fn` and `jax_moe_<op>_variants[id] = {name, load,
  launch}`; the `.cc` embeds the per-variant headers, so it compiles on its own;
* `libcuda_dialect_runtime_static.a` - the DSL's CUDA runtime shim, copied from
  the DSL wheel (`cu13/lib`), which the objects need at link time;
* `manifest.json` - arch, DSL version, programmatic dependent launch (`pdl`),
  ops and variant names, in table order.

Programmatic dependent launch (see `jax_moe.kernels`) is off unless
`JAX_MOE_PDL=1` is set or `--pdl 1` is given (`--pdl` overrides the variable
and is passed on to the compile processes); the table header defines
`JAX_MOE_KERNELS_PDL` as 0 or 1.

The output set is the same for any kernel list, so a build system can declare
it statically. Ids and names are deterministic: a variant's id is its
position in its module's list, its name is `str(variant)`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import importlib.metadata
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ExportedOp", "ExportedVariant", "export_kernels", "main"]

TABLE_HEADER = "jax_moe_kernels.h"
TABLE_SOURCE = "jax_moe_kernels.cc"
KERNEL_ARCHIVE = "libjax_moe_kernels.a"
RUNTIME_ARCHIVE = "libcuda_dialect_runtime_static.a"
MANIFEST = "manifest.json"

_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]*$")
_SUPPORTED_ARCHS = ("sm_90a",)
_SCALAR_TYPES = ("int32_t", "int64_t", "float", "double", "bool", "uint32_t", "uint64_t")


@dataclasses.dataclass(frozen=True)
class _Param:
    """One parameter of a generated wrapper: a tensor descriptor or a scalar."""

    name: str
    kind: str  # "tensor", "scalar" or "stream"
    c_type: str  # scalar type; "" for tensors and the stream
    struct_body: str  # the descriptor's fields, normalized; "" unless a tensor


@dataclasses.dataclass(frozen=True)
class ExportedVariant:
    """One compiled variant: its id, name, C prefix and wrapper parameters."""

    variant_id: int
    name: str
    prefix: str
    params: tuple[_Param, ...]
    header_text: str
    tactic_params: tuple[tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class ExportedOp:
    """All exported variants of one op, in id order."""

    op: str
    module: str
    variants: tuple[ExportedVariant, ...]


def _variant_list(module: Any) -> list[Any]:
    if hasattr(module, "variants"):
        variants = list(module.variants())
    elif hasattr(module, "VARIANTS"):
        variants = list(module.VARIANTS)
    else:
        raise TypeError(f"kernel module {module.__name__} has neither variants() nor VARIANTS")
    if not variants:
        raise ValueError(f"kernel module {module.__name__} lists no variants")
    names = [str(v) for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"kernel module {module.__name__} has duplicate variant names {duplicates}"
        )
    return variants


def _normalize_fields(body: str) -> str:
    fields = [" ".join(line.split()) for line in body.strip().splitlines() if line.strip()]
    return "\n".join(fields)


def _parse_header(header: str, prefix: str) -> tuple[_Param, ...]:
    """The wrapper parameters of a DSL-generated header, without the module handle."""
    structs = {
        match.group(2): _normalize_fields(match.group(1))
        for match in re.finditer(r"typedef struct \{(.*?)\}\s*(\w+)\s*;", header, re.DOTALL)
    }
    wrapper = re.search(
        rf"static inline int32_t cute_dsl_{re.escape(prefix)}_wrapper\((.*?)\)\s*\{{",
        header,
        re.DOTALL,
    )
    if wrapper is None:
        raise RuntimeError(f"cute_dsl_{prefix}_wrapper not found in the generated header")
    params = []
    for raw in wrapper.group(1).split(","):
        text = " ".join(raw.split())
        match = re.fullmatch(r"(.+?)\s*(\*?)\s*(\w+)", text)
        if match is None:
            raise RuntimeError(f"cannot parse wrapper parameter {text!r} of {prefix}")
        c_type, pointer, name = match.group(1).strip(), match.group(2), match.group(3)
        if c_type == f"{prefix}_Kernel_Module_t" and pointer:
            continue
        if pointer and c_type in structs and c_type.startswith(f"{prefix}_Tensor_"):
            params.append(_Param(name, "tensor", "", structs[c_type]))
        elif not pointer and c_type == "cudaStream_t":
            params.append(_Param(name, "stream", "", ""))
        elif not pointer and c_type in _SCALAR_TYPES:
            params.append(_Param(name, "scalar", c_type, ""))
        else:
            raise RuntimeError(
                f"unsupported wrapper parameter {text!r} of {prefix}: expected tensors, "
                f"scalars ({', '.join(_SCALAR_TYPES)}) and a cudaStream_t"
            )
    if [p.kind for p in params].count("stream") != 1 or params[-1].kind != "stream":
        raise RuntimeError(f"{prefix}: the stream must be the last and only stream parameter")
    return tuple(params)


def _compile_variant(
    op: str, variant_id: int, variant: Any, module: Any, out_dir: Path
) -> ExportedVariant:
    import cutlass.cute as cute

    prefix = f"jax_moe_{op}_{variant_id}"
    jit_fn, fake_args = module.export_spec(variant)
    compiled = cute.compile(jit_fn, *fake_args)
    # export_to_c overwrites NAME.h / NAME.o; write into a scratch dir first so a
    # failure leaves no half-written pair behind.
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        compiled.export_to_c(file_path=scratch, file_name=prefix, function_prefix=prefix)
        for suffix in (".h", ".o"):
            os.replace(Path(scratch) / f"{prefix}{suffix}", out_dir / f"{prefix}{suffix}")
    header_text = (out_dir / f"{prefix}.h").read_text()
    return ExportedVariant(
        variant_id=variant_id,
        name=str(variant),
        prefix=prefix,
        params=_parse_header(header_text, prefix),
        header_text=header_text,
        tactic_params=_tactic_params(variant),
    )


def _tactic_params(variant: Any) -> tuple[tuple[str, int], ...]:
    """The int and bool fields of a tactic (bools as 0/1), for run-time checks in C++."""
    if not dataclasses.is_dataclass(variant):
        return ()
    values = []
    for field in dataclasses.fields(variant):
        value = getattr(variant, field.name)
        if isinstance(value, (bool, int)) and _IDENTIFIER.match(field.name):
            values.append((field.name, int(value)))
    return tuple(values)


def _compile_job(
    op: str, module_name: str, variant_id: int, out_dir: Path, verbose: bool
) -> ExportedVariant:
    """Compiles variant `variant_id` of `module_name` (runs in a worker process too)."""
    start = time.perf_counter()
    module = importlib.import_module(module_name)
    variant = _variant_list(module)[variant_id]
    exported = _compile_variant(op, variant_id, variant, module, out_dir)
    if verbose:
        seconds = time.perf_counter() - start
        print(f"  {op}[{variant_id}] {variant}: {seconds:.2f} s", flush=True)
    return exported


def _check_same_signature(op: str, variants: Sequence[ExportedVariant]) -> None:
    first = variants[0]
    for other in variants[1:]:
        if other.params != first.params:
            raise RuntimeError(
                f"op {op!r}: variant {other.variant_id} ({other.name}) compiles to a different "
                f"C signature than variant 0 ({first.name}); every variant of an op must take "
                "the same tensors (same dynamic sizes and strides) and scalars"
            )


def _c_string(text: str) -> str:
    return json.dumps(text)  # a valid C string literal for printable ASCII


def _launch_params(op: str, params: Sequence[_Param]) -> str:
    parts = []
    for p in params:
        if p.kind == "tensor":
            parts.append(f"jax_moe_{op}_{p.name}_t *{p.name}")
        elif p.kind == "stream":
            parts.append(f"cudaStream_t {p.name}")
        else:
            parts.append(f"{p.c_type} {p.name}")
    return ", ".join(parts)


def _generate_header(
    ops: Sequence[ExportedOp], arch: str, dsl_version: str, pdl: bool = False
) -> str:
    lines = [
        "// Generated by `python -m jax_moe._export`; do not edit.",
        f"// Kernel table for {arch}, CuTe DSL {dsl_version}.",
        "#pragma once",
        "",
        "#include <cuda_runtime.h>",
        "#include <stdint.h>",
        "",
        f'#define JAX_MOE_KERNELS_ARCH "{arch}"',
        f'#define JAX_MOE_KERNELS_DSL_VERSION "{dsl_version}"',
        "// 1: the kernels launch with programmatic dependent launch (JAX_MOE_PDL).",
        f"#define JAX_MOE_KERNELS_PDL {int(pdl)}",
        "",
        "// One op of the table, for listing: its variant names in id order.",
        "typedef struct {",
        "  const char *op;",
        "  const char *const *variant_names;",
        "  int32_t num_variants;",
        "} jax_moe_kernel_op_t;",
        "",
        "// A compile-time parameter of a variant (an int or bool field of its tactic).",
        "typedef struct {",
        "  const char *name;",
        "  int64_t value;",
        "} jax_moe_variant_param_t;",
        "",
        f"#define JAX_MOE_NUM_KERNEL_OPS {len(ops)}",
        "extern const jax_moe_kernel_op_t jax_moe_kernel_ops[JAX_MOE_NUM_KERNEL_OPS];",
    ]
    for op in ops:
        upper = op.op.upper()
        params = op.variants[0].params
        lines += ["", f"// ---- {op.op} ({op.module})", f"#define JAX_MOE_HAS_{upper} 1"]
        for p in params:
            if p.kind != "tensor":
                continue
            body = "\n".join(f"  {field}" for field in p.struct_body.splitlines())
            lines += ["typedef struct {", body, f"}} jax_moe_{op.op}_{p.name}_t;"]
        lines += [
            "// Returns the cudaError_t of the launch (0 on success).",
            f"typedef int32_t (*jax_moe_{op.op}_launch_fn)({_launch_params(op.op, params)});",
            "typedef struct {",
            "  const char *name;  // str(variant)",
            "  cudaError_t (*load)(void);  // loads the module once per process; cached status",
            f"  jax_moe_{op.op}_launch_fn launch;",
            "  const jax_moe_variant_param_t *params;  // the tactic's int/bool fields",
            "  int32_t num_params;",
            f"}} jax_moe_{op.op}_variant_t;",
            f"#define JAX_MOE_{upper}_NUM_VARIANTS {len(op.variants)}",
            f"extern const jax_moe_{op.op}_variant_t "
            f"jax_moe_{op.op}_variants[JAX_MOE_{upper}_NUM_VARIANTS];",
        ]
    return "\n".join(lines) + "\n"


def _generate_source(ops: Sequence[ExportedOp]) -> str:
    lines = [
        "// Generated by `python -m jax_moe._export`; do not edit.",
        "// The per-variant headers written by the CuTe DSL are embedded below.",
        f'#include "{TABLE_HEADER}"',
        "",
        "#include <cstddef>",
    ]
    for op in ops:
        for v in op.variants:
            lines += ["", f"// ==== {v.prefix}.h: {op.op} variant {v.variant_id}, {v.name}"]
            lines.append(re.sub(r"^#pragma once\s*$", "", v.header_text, flags=re.MULTILINE))
    lines += ["", "namespace {"]
    for op in ops:
        params = op.variants[0].params
        for v in op.variants:
            p_ = v.prefix
            lines += [
                "",
                f"// {op.op} variant {v.variant_id}: {v.name}",
                f"{p_}_Kernel_Module_t {p_}_module = {{}};",
                f"cudaError_t {p_}_load() {{",
                "  static const cudaError_t status = [] {",
                "    (void)cudaGetLastError();",
                f"    {p_}_Kernel_Module_Load(&{p_}_module);",
                "    cudaError_t error = cudaGetLastError();",
                f"    if (error == cudaSuccess && {p_}_module.module == nullptr) {{",
                "      error = cudaErrorInvalidKernelImage;",
                "    }",
                "    return error;",
                "  }();",
                "  return status;",
                "}",
            ]
            args = []
            for p in params:
                if p.kind == "tensor":
                    lines.append(
                        f"static_assert(sizeof(jax_moe_{op.op}_{p.name}_t) == "
                        f'sizeof({p_}_Tensor_{p.name}_t), "descriptor size mismatch");'
                    )
                    args.append(f"reinterpret_cast<{p_}_Tensor_{p.name}_t *>({p.name})")
                else:
                    args.append(p.name)
            lines += [
                f"int32_t {p_}_launch({_launch_params(op.op, params)}) {{",
                f"  return cute_dsl_{p_}_wrapper(&{p_}_module, {', '.join(args)});",
                "}",
            ]
        for v in op.variants:
            entries = ", ".join(f"{{{_c_string(k)}, {value}}}" for k, value in v.tactic_params)
            lines.append(
                f"const jax_moe_variant_param_t {v.prefix}_params[] = "
                f"{{{entries or '{nullptr, 0}'}}};"
            )
        names = ", ".join(_c_string(v.name) for v in op.variants)
        lines += ["", f"const char *const jax_moe_{op.op}_variant_names[] = {{{names}}};"]
    lines += ["", "}  // namespace", ""]
    for op in ops:
        upper = op.op.upper()
        entries = ",\n".join(
            f"    {{{_c_string(v.name)}, {v.prefix}_load, {v.prefix}_launch, {v.prefix}_params, "
            f"{len(v.tactic_params)}}}"
            for v in op.variants
        )
        lines += [
            f"const jax_moe_{op.op}_variant_t jax_moe_{op.op}_variants"
            f"[JAX_MOE_{upper}_NUM_VARIANTS] = {{",
            entries,
            "};",
            "",
        ]
    entries = ",\n".join(
        f"    {{{_c_string(op.op)}, jax_moe_{op.op}_variant_names, {len(op.variants)}}}"
        for op in ops
    )
    lines += [
        "const jax_moe_kernel_op_t jax_moe_kernel_ops[JAX_MOE_NUM_KERNEL_OPS] = {",
        entries,
        "};",
    ]
    return "\n".join(lines) + "\n"


def _runtime_archive(cuda_major: int) -> Path:
    import nvidia_cutlass_dsl

    for root in nvidia_cutlass_dsl.__path__:
        path = Path(root) / f"cu{cuda_major}" / "lib" / RUNTIME_ARCHIVE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{RUNTIME_ARCHIVE} for CUDA {cuda_major} not found in the CuTe DSL installation "
        f"({list(nvidia_cutlass_dsl.__path__)}); install nvidia-cutlass-dsl[cu{cuda_major}]"
    )


def _default_cuda_major() -> int:
    from cuda import bindings

    return int(bindings.__version__.split(".")[0])


def _write_archive(out_dir: Path, objects: Sequence[Path]) -> None:
    ar = shutil.which(os.environ.get("AR", "ar"))
    if ar is None:
        raise FileNotFoundError("`ar` (binutils) is needed to archive the kernel objects")
    archive = out_dir / KERNEL_ARCHIVE
    archive.unlink(missing_ok=True)
    subprocess.run([ar, "rcs", str(archive), *map(str, objects)], check=True)


def export_kernels(
    out_dir: str | os.PathLike[str],
    arch: str = "sm_90a",
    ops: Sequence[str] | None = None,
    cuda_major: int | None = None,
    verbose: bool = False,
    jobs: int | None = None,
    pdl: bool | None = None,
) -> list[ExportedOp]:
    """Compiles and exports every variant of every (selected) op into `out_dir`.

    Args:
      out_dir: output directory, created if missing; existing files are overwritten.
      arch: GPU arch to compile for; only `sm_90a` is supported.
      ops: subset of `jax_moe.kernels.KERNEL_MODULES` (default: all), kept in
        table order.
      cuda_major: which CUDA major's runtime shim to copy (default: the major of
        the installed `cuda-bindings`).
      verbose: print one line per compiled variant.
      jobs: compile in this many processes (default: one per CPU). The output
        does not depend on it.
      pdl: build with programmatic dependent launch (default: the environment
        variable `JAX_MOE_PDL`, off unless it is "1"). Sets that variable for the
        compile processes.

    Returns:
      The exported ops with their variants, in table order.
    """
    if arch not in _SUPPORTED_ARCHS:
        raise NotImplementedError(f"arch={arch!r}; the exporter supports {_SUPPORTED_ARCHS}")
    from jax_moe.kernels import KERNEL_MODULES, PDL_ENV, pdl_enabled

    if pdl is None:
        pdl = pdl_enabled()
    elif not isinstance(pdl, bool):
        raise TypeError(f"pdl={pdl!r}; expected a bool or None")
    selected = list(KERNEL_MODULES) if ops is None else list(ops)
    unknown = [op for op in selected if op not in KERNEL_MODULES]
    if unknown:
        raise ValueError(f"ops={unknown}; expected names from {list(KERNEL_MODULES)}")
    selected = [op for op in KERNEL_MODULES if op in selected]
    previous_arch = os.environ.get("CUTE_DSL_ARCH")
    if previous_arch not in (None, arch) and "cutlass" in sys.modules:
        raise RuntimeError(
            f"the CuTe DSL is already imported with CUTE_DSL_ARCH={previous_arch!r}; "
            f"export for {arch!r} in a fresh process"
        )
    # The DSL reads the target arch when it is imported (no GPU needed).
    os.environ["CUTE_DSL_ARCH"] = arch
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    jobs_list: list[tuple[str, str, int]] = []
    for op in selected:
        if not _IDENTIFIER.match(op):
            raise ValueError(f"op name {op!r}; expected a lower-case identifier")
        module_name = KERNEL_MODULES[op]
        module = importlib.import_module(module_name)
        if getattr(module, "OP", op) != op:
            raise ValueError(f"{module_name}.OP={module.OP!r} but it is registered as {op!r}")
        jobs_list += [(op, module_name, i) for i in range(len(_variant_list(module)))]

    workers = max(1, min(jobs if jobs is not None else (os.cpu_count() or 1), len(jobs_list)))
    # The kernel modules read the switch when they build a kernel, here and in the
    # spawned compile processes (which inherit the environment).
    previous_pdl = os.environ.get(PDL_ENV)
    os.environ[PDL_ENV] = "1" if pdl else "0"
    try:
        if workers == 1:
            results = [_compile_job(op, name, i, out, verbose) for op, name, i in jobs_list]
        else:
            # Fresh interpreters (spawn): the DSL's compiler state is not fork-safe.
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                results = list(
                    pool.map(
                        _compile_job,
                        *zip(*jobs_list, strict=True),
                        [out] * len(jobs_list),
                        [verbose] * len(jobs_list),
                    )
                )
    finally:
        if previous_pdl is None:
            os.environ.pop(PDL_ENV, None)
        else:
            os.environ[PDL_ENV] = previous_pdl
    exported: list[ExportedOp] = []
    for op in selected:
        variants = [v for (job_op, _, _), v in zip(jobs_list, results, strict=True) if job_op == op]
        _check_same_signature(op, variants)
        exported.append(ExportedOp(op=op, module=KERNEL_MODULES[op], variants=tuple(variants)))

    dsl_version = importlib.metadata.version("nvidia-cutlass-dsl")
    (out / TABLE_HEADER).write_text(_generate_header(exported, arch, dsl_version, pdl))
    (out / TABLE_SOURCE).write_text(_generate_source(exported))
    _write_archive(out, [out / f"{v.prefix}.o" for op in exported for v in op.variants])
    major = cuda_major if cuda_major is not None else _default_cuda_major()
    shutil.copyfile(_runtime_archive(major), out / RUNTIME_ARCHIVE)
    manifest = {
        "arch": arch,
        "cuda_major": major,
        "dsl_version": dsl_version,
        "pdl": pdl,
        "ops": {
            op.op: {"module": op.module, "variants": [v.name for v in op.variants]}
            for op in exported
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return exported


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jax_moe._export", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--arch", default="sm_90a", help="GPU arch (default: sm_90a)")
    parser.add_argument("--ops", default=None, help="comma-separated subset of ops (default: all)")
    parser.add_argument(
        "--cuda-major", type=int, default=None, help="CUDA major of the runtime shim to copy"
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="compile processes (default: one per CPU)"
    )
    parser.add_argument(
        "--pdl",
        choices=("0", "1"),
        default=None,
        help="programmatic dependent launch (default: $JAX_MOE_PDL, else 0)",
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    ops = None if args.ops is None else [o.strip() for o in args.ops.split(",") if o.strip()]
    if args.pdl is None:
        from jax_moe.kernels import pdl_enabled

        pdl = pdl_enabled()
    else:
        pdl = args.pdl == "1"
    start = time.perf_counter()
    exported = export_kernels(
        args.out,
        arch=args.arch,
        ops=ops,
        cuda_major=args.cuda_major,
        verbose=not args.quiet,
        jobs=args.jobs,
        pdl=pdl,
    )
    if not args.quiet:
        count = sum(len(op.variants) for op in exported)
        seconds = time.perf_counter() - start
        print(
            f"exported {count} kernel variants of {len(exported)} ops to {args.out} "
            f"in {seconds:.1f} s (programmatic dependent launch {'on' if pdl else 'off'})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
