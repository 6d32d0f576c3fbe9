"""Tactic tables shipped inside the package, one per device kind.

A table tuned with `python -m jax_moe.tune` for the model presets on a given
GPU is shipped as `jax_moe/tactics/<slug>.json`, where the slug is the
device kind (`jax.Device.device_kind`) in lower case with every run of
characters other than letters and digits replaced by one `_`:

    "NVIDIA H100 80GB HBM3"  ->  jax_moe/tactics/nvidia_h100_80gb_hbm3.json
    "NVIDIA H200"            ->  jax_moe/tactics/nvidia_h200.json

`shipped_table(device_name, arch)` returns that table when the file exists and
was tuned on exactly this device name and arch, else None. A shipped file that
cannot be used (corrupt, other schema, other device or arch) is logged as a
warning and ignored, so the default heuristic runs; it never selects a kernel
for another device. Shipped now: `nvidia_h100_80gb_hbm3.json` (DeepSeek-V3 as
EP=8 and EP=16 slices, token buckets 1 to 16384; see docs/TUNING.md for how it
was tuned and evaluated). A table passed by the user (`fused_moe(...,
tactics=...)`) replaces the shipped one entirely.
"""

from __future__ import annotations

import functools
import importlib.resources
import re

from jax_moe.tuning.tactic_table import TacticTable

__all__ = ["SHIPPED_DIRECTORY", "device_slug", "shipped_table"]

#: Package-relative directory of the shipped tables.
SHIPPED_DIRECTORY = "tactics"


def device_slug(device_name: str) -> str:
    """`"NVIDIA H100 80GB HBM3"` -> `"nvidia_h100_80gb_hbm3"` (see the module docstring)."""
    if not isinstance(device_name, str) or not device_name.strip():
        raise ValueError(f"device_name={device_name!r}; expected a non-empty str")
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    if not slug:
        raise ValueError(f"device_name={device_name!r} has no letters or digits")
    return slug


@functools.cache
def shipped_table(device_name: str, arch: str) -> TacticTable | None:
    """The shipped table of `device_name` (a `device_kind`) and `arch`, or None.

    Loaded once per (device_name, arch) and cached.
    """
    resource = importlib.resources.files("jax_moe").joinpath(
        SHIPPED_DIRECTORY, f"{device_slug(device_name)}.json"
    )
    if not resource.is_file():
        return None
    with importlib.resources.as_file(resource) as path:
        table = TacticTable.load(
            path, expect_device=device_name, expect_arch=arch, on_mismatch="fallback"
        )
    return table if table.metadata is not None else None
