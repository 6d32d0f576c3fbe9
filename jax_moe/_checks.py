"""Argument checks shared by the package's modules."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_int(name: str, value: Any, minimum: int) -> int:
    """`value` as an int; TypeError unless an int (not a bool), ValueError below `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}={value!r}; expected an int")
    if value < minimum:
        raise ValueError(f"{name}={value}; expected an int >= {minimum}")
    return int(value)
