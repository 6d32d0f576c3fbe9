"""Type stub of the CUDA extension `jax_moe._jax_moe_ffi` (built from ffi/)."""

from typing import Any

KERNEL_ARCH: str
DSL_VERSION: str
EVENT_SLOTS: int

def registrations() -> dict[str, dict[str, Any]]:
    """FFI target name -> {stage name: capsule} (platform CUDA)."""

def event_elapsed_ms(start: int, stop: int) -> float:
    """Milliseconds between the latest records of two `jax_moe_record_event` slots."""

def cpu_check_registrations() -> dict[str, Any]:
    """CPU check target name -> handler capsule (argument checks only, no launch)."""

def kernel_variants() -> dict[str, list[str]]:
    """Op name -> variant names in id order."""
