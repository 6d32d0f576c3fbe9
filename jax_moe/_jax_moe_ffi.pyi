"""Type stub of the CUDA extension `jax_moe._jax_moe_ffi` (built from ffi/)."""

from typing import Any

KERNEL_ARCH: str
DSL_VERSION: str

def registrations() -> dict[str, dict[str, Any]]:
    """FFI target name -> {"instantiate": capsule, "execute": capsule} (platform CUDA)."""

def cpu_check_registrations() -> dict[str, Any]:
    """CPU check target name -> handler capsule (argument checks only, no launch)."""

def kernel_variants() -> dict[str, list[str]]:
    """Op name -> variant names in id order."""
