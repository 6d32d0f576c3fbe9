"""Trace-time tactic lookup for `fused_moe` and other ops.

Under `jax.jit` all shapes are static, so an op builds its `ProblemKey` from
them while tracing and asks `lookup_tactic` for a tactic:

    problem = ProblemKey.for_call("moe_gemm1", arch, hidden, intermediate,
                                  num_experts, num_local_experts, top_k,
                                  hidden_states.dtype, num_tokens)
    tactic = lookup_tactic(tactics, problem, default_gemm1_tactic,
                           device_name=device_kind)

- `tactics=None`: the default heuristic `default(problem)`.
- a `TacticTable`: its entry, or on a miss the default (the miss is logged
  once per problem at INFO level on the `jax_moe.tuning` logger).
- a path: the file is loaded once and cached by path and modification time
  (a rewritten file is loaded again), checked against `problem.arch` and
  `device_name`, then used as a table.

A tactic found in a table is validated with `tactic.check(problem)`; a stored
tactic that is invalid for its problem raises ValueError rather than silently
running something else. Nothing here runs after tracing: the result is a static
attribute of the compiled call.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Literal

from jax_moe.tactic import Tactic
from jax_moe.tuning.problem import ProblemKey
from jax_moe.tuning.tactic_table import TacticFileError, TacticTable

__all__ = ["device_identity", "load_tactic_table", "lookup_tactic"]

logger = logging.getLogger("jax_moe.tuning")

_cache_lock = threading.Lock()
# (real path, expect_device, expect_arch, on_mismatch) -> ((mtime_ns, size), table)
_table_cache: dict[tuple[Any, ...], tuple[tuple[int, int], TacticTable]] = {}
_logged_misses: set[ProblemKey] = set()


def load_tactic_table(
    path: str | os.PathLike,
    *,
    expect_device: str | None = None,
    expect_arch: str | None = None,
    on_mismatch: Literal["error", "fallback"] = "error",
) -> TacticTable:
    """`TacticTable.load`, cached by path and the file's modification time and size."""
    real_path = os.path.realpath(os.fspath(path))
    try:
        stat = os.stat(real_path)
        signature = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        signature = None  # Not cached: let load() report (or fall back) each time.
    cache_key = (real_path, expect_device, expect_arch, on_mismatch)
    with _cache_lock:
        cached = _table_cache.get(cache_key)
    if signature is not None and cached is not None and cached[0] == signature:
        return cached[1]
    table = TacticTable.load(
        real_path, expect_device=expect_device, expect_arch=expect_arch, on_mismatch=on_mismatch
    )
    if signature is not None:
        with _cache_lock:
            _table_cache[cache_key] = (signature, table)
    return table


def _checked(tactic: Any, problem: ProblemKey, *, tuned: bool) -> Tactic:
    """`tactic` after `tactic.check(problem)`.

    A tuned tactic that fails the check is a broken table: ValueError. A
    default that is unsupported keeps its NotImplementedError, so the caller
    can fall back to another path.
    """
    origin = "tuned tactic" if tuned else "default tactic"
    if not isinstance(tactic, Tactic):
        raise TypeError(f"{origin} for {problem} is {tactic!r}; expected a Tactic")
    try:
        tactic.check(problem)
    except NotImplementedError as error:
        if not tuned:
            raise
        raise ValueError(f"{origin} {tactic} is unsupported for {problem}: {error}") from error
    except ValueError as error:
        raise ValueError(f"{origin} {tactic} is invalid for {problem}: {error}") from error
    return tactic


def lookup_tactic(
    tactics: TacticTable | str | os.PathLike | None,
    problem: ProblemKey,
    default: Callable[[ProblemKey], Tactic],
    *,
    device_name: str | None = None,
    on_mismatch: Literal["error", "fallback"] = "error",
) -> Tactic:
    """The tactic for `problem`: tuned if `tactics` has it, else `default(problem)`.

    Args:
      tactics: None, a `TacticTable`, or the path of a tactic file.
      problem: the problem key built from the call's static shapes.
      default: the op's default heuristic, `problem -> Tactic`.
      device_name: if given, the table must have been tuned on this device
        (`jax.Device.device_kind`); the table's arch must be `problem.arch`.
      on_mismatch: `error` raises TacticFileError for an unusable file or a
        table from another device or arch; `fallback` logs it and uses the
        default.

    Raises ValueError if the chosen tactic fails `tactic.check(problem)`
    (NotImplementedError passes through from a default tactic, so the caller
    can fall back to another implementation).
    """
    if not isinstance(problem, ProblemKey):
        raise TypeError(f"problem={problem!r}; expected a ProblemKey")
    if tactics is None:
        return _checked(default(problem), problem, tuned=False)
    if isinstance(tactics, (str, os.PathLike)):
        table = load_tactic_table(
            tactics, expect_device=device_name, expect_arch=problem.arch, on_mismatch=on_mismatch
        )
    elif isinstance(tactics, TacticTable):
        table = tactics
        try:
            table.check_device(expect_device=device_name, expect_arch=problem.arch)
        except TacticFileError as error:
            if on_mismatch == "error":
                raise
            logger.warning("%s (%r); falling back to the default tactics", error, table)
            table = TacticTable.empty()
    else:
        raise TypeError(
            f"tactics={tactics!r}; expected None, a TacticTable or the path of a tactic file"
        )
    tactic = table.lookup(problem)
    if tactic is not None:
        return _checked(tactic, problem, tuned=True)
    with _cache_lock:
        first_miss = problem not in _logged_misses
        _logged_misses.add(problem)
    chosen = _checked(default(problem), problem, tuned=False)
    if first_miss:
        logger.info("no tuned tactic for %s; using the default %s", problem, chosen)
    return chosen


def device_identity(device: Any = None) -> tuple[str, str]:
    """`(device_name, arch)` of a GPU, e.g. `("NVIDIA H100 80GB HBM3", "sm_90a")`.

    `device` defaults to `jax.devices()[0]`. Compute capability 9.0 and newer
    get the arch-specific `a` suffix (sm_90a, sm_100a), which the kernels are
    compiled for. Raises NotImplementedError for a device that is not an
    NVIDIA GPU.
    """
    if device is None:
        import jax

        device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if getattr(device, "platform", None) != "gpu" or not capability:
        raise NotImplementedError(
            f"device {device!r} is not an NVIDIA GPU; tuned tactics apply to GPUs only"
        )
    major, minor = (int(part) for part in str(capability).split(".")[:2])
    suffix = "a" if major >= 9 else ""
    return str(device.device_kind), f"sm_{major}{minor}{suffix}"
