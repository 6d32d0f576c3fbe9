"""Tactic tables: tuned tactics per problem, stored as versioned JSON files.

A table holds, for one device, the best tactic measured for each `ProblemKey`,
its time and the runner-up. The file (schema version 1) reads:

    {
     "format": "jax_moe.tactic_table",
     "schema_version": 1,
     "metadata": {
      "device_name": "NVIDIA H100 80GB HBM3",     # jax Device.device_kind
      "arch": "sm_90a",
      "jax_moe_version": "0.1.0",
      "dsl_version": "4.8.1",                     # nvidia-cutlass-dsl
      "created": "2026-11-27T23:59:59+00:00",     # UTC, ISO 8601
      "distribution": "balanced",                 # see RoutingDistribution
      "profile_key": [0, 0]                       # jax.random.key_data of the key
     },
     "entries": [
      {"problem": {ProblemKey fields},
       "tactic": {"family": "...", "params": {...}},
       "time_us": 12.5,
       "runner_up": {"tactic": {...}, "time_us": 13.1}}     # or null
     ]
    }

Entries are written sorted by `str(problem)`, so files diff well. `save` writes
a temporary file in the same directory and renames it over the target, so a
reader never sees a half-written file.

`load` rejects, with a `TacticFileError` naming the file and the reason, a file
that is unreadable, empty, truncated, not JSON, not a tactic table, of another
schema version, malformed (bad metadata, bad entry, unknown tactic family,
duplicate problem), or tuned on another device or arch than the one expected.
With `on_mismatch="fallback"` the same cases log a warning and give an empty
table instead, so every lookup misses and the documented default tactics run.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import logging
import math
import os
import re
import sys
import tempfile
import types
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from jax_moe.tactic import Tactic, tactic_from_json
from jax_moe.tuning.problem import ProblemKey
from jax_moe.tuning.routing_generator import RoutingDistribution, canonical_profile

__all__ = [
    "FILE_FORMAT",
    "SCHEMA_VERSION",
    "TableMetadata",
    "TacticEntry",
    "TacticFileError",
    "TacticTable",
]

logger = logging.getLogger("jax_moe.tuning")

FILE_FORMAT = "jax_moe.tactic_table"
SCHEMA_VERSION = 1

_ARCH_NAME = re.compile(r"^sm_[0-9]{2,3}[a-z]?$")


class TacticFileError(ValueError):
    """A tactic file (or table) that cannot be used; `path` may be None."""

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = None if path is None else os.fspath(path)
        self.reason = reason
        where = "tactic table" if path is None else f"tactic file {self.path}"
        super().__init__(f"{where}: {reason}")


def _package_version(distribution: str, module: str | None = None) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        loaded = sys.modules.get(module or "")
        return str(getattr(loaded, "__version__", "unknown"))


def _kernels_dsl_version() -> str:
    """The CuTe DSL release that compiled the kernels in the CUDA extension (the
    ones a tuning run times; a GPU machine may have no DSL installed), else the
    installed DSL's."""
    from jax_moe import _ffi

    if _ffi.is_available():
        return str(getattr(_ffi.extension(), "DSL_VERSION", "") or "unknown")
    return _package_version("nvidia-cutlass-dsl")


def _key_data(key: Any) -> tuple[int, ...]:
    import jax
    import numpy as np

    if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return tuple(int(x) for x in np.asarray(key).ravel())


@dataclasses.dataclass(frozen=True)
class TableMetadata:
    """Where and how a table was tuned.

    Attributes:
      device_name: `jax.Device.device_kind` of the GPU, e.g. `NVIDIA H100 80GB HBM3`.
      arch: e.g. `sm_90a`; every problem in the table has this arch.
      jax_moe_version, dsl_version: library versions used for tuning (the DSL's: the
        release that compiled the extension's kernels).
      created: UTC time of tuning, ISO 8601.
      distribution: the profiling routing, `str(RoutingDistribution)`, or a profile of
        several joined by `+` (`balanced+spread`: the first is the cells' routing,
        the others the robust choice's secondary routings; `balanced/spread+busy`: the
        first only picks the candidates; `routing_generator.parse_profile`, and
        `jax_moe.tuning.tuner`).
      profile_key: the raw data of the `jax.random` key the inputs came from.
    """

    device_name: str
    arch: str
    jax_moe_version: str
    dsl_version: str
    created: str
    distribution: str
    profile_key: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("device_name", "arch", "jax_moe_version", "dsl_version", "created"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"TableMetadata.{name}={value!r}; expected a non-empty str")
        if not _ARCH_NAME.match(self.arch):
            raise ValueError(f"TableMetadata.arch={self.arch!r}; expected a name like 'sm_90a'")
        try:
            canonical = canonical_profile(self.distribution)
        except (TypeError, ValueError) as error:
            raise ValueError(f"TableMetadata.distribution: {error}") from None
        if canonical != self.distribution:
            raise ValueError(
                f"TableMetadata.distribution={self.distribution!r}; expected {canonical!r}"
            )
        key = self.profile_key
        if not isinstance(key, (tuple, list)) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in key
        ):
            raise ValueError(
                f"TableMetadata.profile_key={key!r}; expected a sequence of non-negative ints"
            )
        object.__setattr__(self, "profile_key", tuple(key))

    @classmethod
    def create(
        cls,
        *,
        device_name: str,
        arch: str,
        distribution: str | RoutingDistribution,
        profile_key: Any,
        created: str | None = None,
    ) -> TableMetadata:
        """Metadata for a tuning run now, with the installed library versions.

        `profile_key` is a `jax.random` key (typed or raw) or its data as ints.
        """
        if created is None:
            now = datetime.datetime.now(datetime.UTC)
            created = now.isoformat(timespec="seconds")
        return cls(
            device_name=device_name,
            arch=arch,
            jax_moe_version=_package_version("jax_moe", "jax_moe"),
            dsl_version=_kernels_dsl_version(),
            created=created,
            distribution=(
                canonical_profile(distribution)
                if isinstance(distribution, str)
                else str(distribution)
            ),
            profile_key=_key_data(profile_key),
        )

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["profile_key"] = list(self.profile_key)
        return data

    @classmethod
    def from_json(cls, data: Any) -> TableMetadata:
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, Mapping) or set(data) != set(names):
            keys = sorted(data) if isinstance(data, Mapping) else data
            raise ValueError(f"metadata has keys {keys!r}; expected exactly {names}")
        return cls(**data)


def _check_time(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r}; expected a float (microseconds)")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value}; expected a finite time > 0 microseconds")
    return float(value)


@dataclasses.dataclass(frozen=True)
class TacticEntry:
    """The tuned result of one problem.

    Attributes:
      tactic: the fastest tactic.
      time_us: its measured time in microseconds.
      runner_up: the second fastest tactic, if more than one ran.
      runner_up_time_us: its time; given exactly when `runner_up` is.
    """

    tactic: Tactic
    time_us: float
    runner_up: Tactic | None = None
    runner_up_time_us: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tactic, Tactic):
            raise TypeError(f"TacticEntry.tactic={self.tactic!r}; expected a Tactic")
        object.__setattr__(self, "time_us", _check_time("TacticEntry.time_us", self.time_us))
        if (self.runner_up is None) != (self.runner_up_time_us is None):
            raise ValueError(
                "TacticEntry.runner_up and runner_up_time_us must be given together, got "
                f"{self.runner_up!r} and {self.runner_up_time_us!r}"
            )
        if self.runner_up is not None:
            if not isinstance(self.runner_up, Tactic):
                raise TypeError(f"TacticEntry.runner_up={self.runner_up!r}; expected a Tactic")
            time = _check_time("TacticEntry.runner_up_time_us", self.runner_up_time_us)
            object.__setattr__(self, "runner_up_time_us", time)

    def to_json(self) -> dict[str, Any]:
        runner_up = None
        if self.runner_up is not None:
            runner_up = {"tactic": self.runner_up.to_json(), "time_us": self.runner_up_time_us}
        return {"tactic": self.tactic.to_json(), "time_us": self.time_us, "runner_up": runner_up}

    @classmethod
    def from_json(cls, data: Any) -> TacticEntry:
        if not isinstance(data, Mapping) or set(data) != {"tactic", "time_us", "runner_up"}:
            raise ValueError("expected keys 'tactic', 'time_us' and 'runner_up'")
        runner_up = data["runner_up"]
        if runner_up is None:
            return cls(tactic_from_json(data["tactic"]), data["time_us"])
        if not isinstance(runner_up, Mapping) or set(runner_up) != {"tactic", "time_us"}:
            raise ValueError("runner_up must be null or have keys 'tactic' and 'time_us'")
        return cls(
            tactic_from_json(data["tactic"]),
            data["time_us"],
            tactic_from_json(runner_up["tactic"]),
            runner_up["time_us"],
        )


class TacticTable:
    """An immutable map `ProblemKey -> TacticEntry` with its `TableMetadata`.

    `metadata` is None only for an empty table without provenance
    (`TacticTable.empty()`, which a fallback load returns).
    """

    def __init__(
        self,
        metadata: TableMetadata | None,
        entries: Mapping[ProblemKey, TacticEntry] | None = None,
    ):
        entries = dict(entries or {})
        if metadata is None and entries:
            raise ValueError("a TacticTable with entries needs metadata")
        if metadata is not None and not isinstance(metadata, TableMetadata):
            raise TypeError(f"metadata={metadata!r}; expected a TableMetadata")
        for problem, entry in entries.items():
            if not isinstance(problem, ProblemKey) or not isinstance(entry, TacticEntry):
                raise TypeError(f"entry {problem!r}: {entry!r}; expected ProblemKey -> TacticEntry")
            if problem.arch != metadata.arch:
                raise ValueError(
                    f"problem {problem} has arch {problem.arch!r} but the table is for "
                    f"{metadata.arch!r}"
                )
        self._metadata = metadata
        self._entries = types.MappingProxyType(entries)

    @classmethod
    def empty(cls) -> TacticTable:
        """A table without entries or metadata: every lookup misses."""
        return cls(None)

    @property
    def metadata(self) -> TableMetadata | None:
        return self._metadata

    @property
    def entries(self) -> Mapping[ProblemKey, TacticEntry]:
        """A read-only view of the entries."""
        return self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ProblemKey]:
        return iter(self._entries)

    def __contains__(self, problem: object) -> bool:
        return problem in self._entries

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TacticTable):
            return NotImplemented
        return self._metadata == other._metadata and dict(self._entries) == dict(other._entries)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        device = "none" if self._metadata is None else self._metadata.device_name
        return f"TacticTable(device={device!r}, {len(self)} entries)"

    def lookup(self, problem: ProblemKey) -> Tactic | None:
        """The tuned tactic of `problem`, or None on a miss."""
        entry = self._entries.get(problem)
        return None if entry is None else entry.tactic

    def with_entries(self, entries: Mapping[ProblemKey, TacticEntry]) -> TacticTable:
        """A new table with `entries` added (replacing entries of the same problems)."""
        return TacticTable(self._metadata, {**self._entries, **entries})

    def merge(
        self,
        other: TacticTable,
        *,
        on_conflict: Literal["faster", "keep", "replace", "error"] = "faster",
    ) -> TacticTable:
        """The union of two tables tuned on the same device under the same inputs.

        Both must agree on device name, arch, distribution and profile key (else
        ValueError); the metadata of the more recently created one is kept.
        A problem present in both takes the entry with the smaller `time_us`
        (`faster`; ties keep this table's), this table's (`keep`), the other's
        (`replace`), or raises ValueError (`error`).
        """
        if on_conflict not in ("faster", "keep", "replace", "error"):
            raise ValueError(
                f"on_conflict={on_conflict!r}; expected 'faster', 'keep', 'replace' or 'error'"
            )
        if not isinstance(other, TacticTable):
            raise TypeError(f"other={other!r}; expected a TacticTable")
        if other._metadata is None:
            return self
        if self._metadata is None:
            return other
        mine, theirs = self._metadata, other._metadata
        for name in ("device_name", "arch", "distribution", "profile_key"):
            if getattr(mine, name) != getattr(theirs, name):
                hint = ""
                if name == "distribution":
                    hint = f" (tune with --distribution={mine.distribution} to add to this table)"
                raise ValueError(
                    f"cannot merge tactic tables with different {name}: "
                    f"{getattr(mine, name)!r} and {getattr(theirs, name)!r}{hint}"
                )
        merged = dict(self._entries)
        for problem, entry in other._entries.items():
            current = merged.get(problem)
            if current is None or on_conflict == "replace":
                merged[problem] = entry
            elif on_conflict == "error" and current != entry:
                raise ValueError(f"both tactic tables have an entry for {problem}")
            elif on_conflict == "faster" and entry.time_us < current.time_us:
                merged[problem] = entry
        metadata = theirs if theirs.created > mine.created else mine
        return TacticTable(metadata, merged)

    def check_device(
        self, *, expect_device: str | None = None, expect_arch: str | None = None
    ) -> None:
        """Raises TacticFileError if the table was tuned on another device or arch."""
        if self._metadata is None:
            return
        if expect_device is not None and self._metadata.device_name != expect_device:
            raise TacticFileError(
                None,
                f"tuned on device {self._metadata.device_name!r}, expected {expect_device!r}",
            )
        if expect_arch is not None and self._metadata.arch != expect_arch:
            raise TacticFileError(
                None, f"tuned for arch {self._metadata.arch!r}, expected {expect_arch!r}"
            )

    def to_json(self) -> dict[str, Any]:
        """The file contents as a JSON object (see the module docstring)."""
        if self._metadata is None:
            raise ValueError("an empty TacticTable without metadata cannot be saved")
        entries = [
            {"problem": problem.to_json(), **entry.to_json()}
            for problem, entry in sorted(self._entries.items(), key=lambda item: str(item[0]))
        ]
        return {
            "format": FILE_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "metadata": self._metadata.to_json(),
            "entries": entries,
        }

    @classmethod
    def from_json(cls, data: Any, *, path: str | os.PathLike | None = None) -> TacticTable:
        """Parses `to_json` output; raises TacticFileError naming `path` on any defect."""
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise TacticFileError(path, f'not a tactic table (no "format": {FILE_FORMAT!r})')
        version = data.get("schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:
            raise TacticFileError(
                path,
                f"schema version {version!r}; this jax_moe reads version {SCHEMA_VERSION} "
                "(re-tune, or use the jax_moe release that wrote the file)",
            )
        if set(data) != {"format", "schema_version", "metadata", "entries"}:
            raise TacticFileError(path, f"malformed: top-level keys {sorted(data)}")
        try:
            metadata = TableMetadata.from_json(data["metadata"])
        except (TypeError, ValueError) as error:
            raise TacticFileError(path, f"malformed metadata: {error}") from error
        if not isinstance(data["entries"], list):
            raise TacticFileError(path, "malformed: 'entries' is not a list")
        entries: dict[ProblemKey, TacticEntry] = {}
        for index, item in enumerate(data["entries"]):
            try:
                if not isinstance(item, dict) or "problem" not in item:
                    raise ValueError("expected an object with a 'problem'")
                rest = {name: value for name, value in item.items() if name != "problem"}
                problem = ProblemKey.from_json(item["problem"])
                entry = TacticEntry.from_json(rest)
            except (TypeError, ValueError) as error:
                raise TacticFileError(path, f"malformed entry {index}: {error}") from error
            if problem in entries:
                raise TacticFileError(path, f"duplicate entries for problem {problem}")
            entries[problem] = entry
        try:
            return cls(metadata, entries)
        except (TypeError, ValueError) as error:
            raise TacticFileError(path, f"malformed: {error}") from error

    def save(self, path: str | os.PathLike) -> None:
        """Writes the table to `path` atomically (temporary file, fsync, rename)."""
        text = json.dumps(self.to_json(), indent=1) + "\n"
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, temporary = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
        )
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        expect_device: str | None = None,
        expect_arch: str | None = None,
        on_mismatch: Literal["error", "fallback"] = "error",
    ) -> TacticTable:
        """Reads a tactic file written by `save`.

        Args:
          path: the file.
          expect_device: if given, the file's `device_name` must equal it.
          expect_arch: if given, the file's `arch` must equal it.
          on_mismatch: `error` raises TacticFileError for any file that cannot
            be used (unreadable, empty, truncated, corrupt, other schema,
            malformed, other device or arch); `fallback` logs a warning and
            returns `TacticTable.empty()` instead.
        """
        if on_mismatch not in ("error", "fallback"):
            raise ValueError(f"on_mismatch={on_mismatch!r}; expected 'error' or 'fallback'")
        try:
            table = cls._load(path)
            try:
                table.check_device(expect_device=expect_device, expect_arch=expect_arch)
            except TacticFileError as error:
                raise TacticFileError(path, error.reason) from None
        except TacticFileError as error:
            if on_mismatch == "error":
                raise
            logger.warning("%s; falling back to the default tactics", error)
            return cls.empty()
        return table

    @classmethod
    def _load(cls, path: str | os.PathLike) -> TacticTable:
        try:
            with open(path, "rb") as file:
                raw = file.read()
        except OSError as error:
            raise TacticFileError(path, f"cannot be read: {error}") from error
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise TacticFileError(path, f"corrupt: not UTF-8 text ({error})") from None
        if not text.strip():
            raise TacticFileError(path, "is empty (truncated write?)")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            if error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated string"):
                raise TacticFileError(
                    path, f"truncated: the JSON ends early (line {error.lineno})"
                ) from None
            raise TacticFileError(
                path,
                f"corrupt: not valid JSON ({error.msg} at line {error.lineno} "
                f"column {error.colno})",
            ) from None
        return cls.from_json(data, path=path)
