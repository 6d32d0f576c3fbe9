"""CPU tests of the ahead-of-time exporter (`python -m jax_moe._export`).

They compile real kernel variants with the CuTe DSL for sm_90a on the CPU and
check the files the build links: per-variant header + object, the object
archive, the DSL runtime shim and the generated dispatch table. Skipped when
the DSL is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jax_moe import _export

REPO = Path(__file__).resolve().parents[1]
requires_dsl = pytest.mark.skipif(
    importlib.util.find_spec("nvidia_cutlass_dsl") is None,
    reason="the CuTe DSL (nvidia-cutlass-dsl) is not installed",
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kernels")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    env.pop("CUTE_DSL_ARCH", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jax_moe._export",
            "--out",
            str(out),
            "--arch",
            "sm_90a",
            "--ops",
            "combine",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@requires_dsl
def test_variant_files_and_wrapper_declaration(exported):
    from jax_moe.kernels.combine_config import COMBINE_SM90_TACTICS

    for variant_id in range(len(COMBINE_SM90_TACTICS)):
        prefix = f"jax_moe_combine_{variant_id}"
        header = exported / f"{prefix}.h"
        obj = exported / f"{prefix}.o"
        assert header.is_file() and obj.is_file()
        assert obj.stat().st_size > 1000
        assert obj.read_bytes()[:4] == b"\x7fELF"
        text = header.read_text()
        assert f"cute_dsl_{prefix}_wrapper(" in text
        assert f"{prefix}_Kernel_Module_Load(" in text
        assert "cudaStream_t stream" in text
    for name in (_export.KERNEL_ARCHIVE, _export.RUNTIME_ARCHIVE):
        assert (exported / name).read_bytes()[:8] == b"!<arch>\n"


@requires_dsl
def test_generated_table(exported):
    from jax_moe.kernels.combine_config import COMBINE_SM90_TACTICS

    names = [str(t) for t in COMBINE_SM90_TACTICS]
    manifest = json.loads((exported / _export.MANIFEST).read_text())
    assert manifest["arch"] == "sm_90a"
    assert manifest["ops"]["combine"]["variants"] == names
    header = (exported / _export.TABLE_HEADER).read_text()
    assert "#define JAX_MOE_HAS_COMBINE 1" in header
    assert f"#define JAX_MOE_COMBINE_NUM_VARIANTS {len(names)}" in header
    assert "} jax_moe_combine_y_t;" in header
    assert "typedef int32_t (*jax_moe_combine_launch_fn)(jax_moe_combine_y_t *y, " in header
    source = (exported / _export.TABLE_SOURCE).read_text()
    for variant_id, (name, tactic) in enumerate(zip(names, COMBINE_SM90_TACTICS, strict=True)):
        entry = (
            f'{{"{name}", jax_moe_combine_{variant_id}_load, jax_moe_combine_{variant_id}_launch, '
            f"jax_moe_combine_{variant_id}_params, {len(tactic.params())}}}"
        )
        assert entry in source


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    roots = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ]
    if nvcc:
        roots.append(Path(os.path.realpath(nvcc)).parents[1])
    roots.append(Path("/usr/local/cuda"))
    for root in roots:
        if (root / "include" / "cuda_runtime.h").is_file():
            return root / "include"
    return None


@requires_dsl
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.skipif(_cuda_include() is None, reason="no CUDA headers (cuda_runtime.h)")
def test_table_compiles(exported):
    """The generated table (with the embedded DSL headers) is valid C++17."""
    result = subprocess.run(
        [
            "c++",
            "-std=c++17",
            "-fsyntax-only",
            "-Wall",
            "-Werror",
            f"-I{_cuda_include()}",
            f"-I{exported}",
            str(exported / _export.TABLE_SOURCE),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_parse_header_rejects_unknown_parameter():
    header = """
typedef struct { cudaLibrary_t module; } p_Kernel_Module_t;
typedef struct {
    void *data;
    int32_t dynamic_shapes[1];
} p_Tensor_x_t;
static inline int32_t cute_dsl_p_wrapper(p_Kernel_Module_t *module, p_Tensor_x_t *x,
                                         int32_t n, cudaStream_t stream) {
"""
    params = _export._parse_header(header, "p")
    assert [(p.name, p.kind) for p in params] == [
        ("x", "tensor"),
        ("n", "scalar"),
        ("stream", "stream"),
    ]
    bad = header.replace("int32_t n,", "some_struct_t n,")
    with pytest.raises(RuntimeError, match="unsupported wrapper parameter"):
        _export._parse_header(bad, "p")


def test_rejects_unknown_op_and_arch(tmp_path):
    with pytest.raises(NotImplementedError, match="arch"):
        _export.export_kernels(tmp_path, arch="sm_80")
    with pytest.raises(ValueError, match="ops"):
        _export.export_kernels(tmp_path, ops=["no_such_op"])
