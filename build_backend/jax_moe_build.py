"""PEP 517 build backend of jax_moe: scikit-build-core, plus the CUDA extension's needs.

The CUDA extension (`jax_moe._jax_moe_ffi`, see CMakeLists.txt) needs, at
build time, the XLA FFI headers from jaxlib and, unless pre-exported kernels
are given with `JAX_MOE_KERNEL_DIR`, the CuTe DSL to export the kernels. This
backend asks for them only when the extension will be built, i.e. when a CUDA
compiler is found (`nvcc` on PATH, `$CUDACXX`, or `$CUDA_HOME/bin/nvcc`) and
`JAX_MOE_BUILD_EXTENSION` is not OFF. A machine without CUDA installs the
pure-Python package and downloads neither.

Settings are read from `-Ccmake.define.NAME=VALUE` (pip `--config-settings`)
and from environment variables of the same name.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Any

from scikit_build_core import build as _scikit_build
from scikit_build_core.build import (
    build_editable,
    build_sdist,
    build_wheel,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

__all__ = [
    "build_editable",
    "build_sdist",
    "build_wheel",
    "get_requires_for_build_editable",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
    "prepare_metadata_for_build_editable",
    "prepare_metadata_for_build_wheel",
]

# Kept in step with the `kernels` extra in pyproject.toml.
_DSL_VERSION = "4.8.1"
_JAX_REQUIREMENT = "jax>=0.10"
_OFF = ("0", "off", "false", "no", "n")


def _setting(config_settings: dict[str, Any] | None, name: str) -> str:
    value = (config_settings or {}).get(f"cmake.define.{name}")
    if value is None:
        value = os.environ.get(name, "")
    return str(value).strip()


def _find_nvcc() -> str | None:
    candidates = [shutil.which("nvcc"), os.environ.get("CUDACXX")]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root:
            candidates.append(os.path.join(root, "bin", "nvcc"))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _cuda_major(nvcc: str) -> int | None:
    try:
        text = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.", text)
    return int(match.group(1)) if match else None


def _extension_requirements(config_settings: dict[str, Any] | None) -> list[str]:
    if _setting(config_settings, "JAX_MOE_BUILD_EXTENSION").lower() in _OFF:
        return []
    nvcc = _find_nvcc()
    if nvcc is None:
        return []
    requirements = [_JAX_REQUIREMENT]
    if not _setting(config_settings, "JAX_MOE_KERNEL_DIR"):
        major = _cuda_major(nvcc)
        if major in (12, 13):
            requirements.append(f"nvidia-cutlass-dsl[cu{major}]=={_DSL_VERSION}")
    return requirements


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    return [
        *_scikit_build.get_requires_for_build_wheel(config_settings),
        *_extension_requirements(config_settings),
    ]


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    return [
        *_scikit_build.get_requires_for_build_editable(config_settings),
        *_extension_requirements(config_settings),
    ]
