"""Kernel tactics: frozen, hashable, JSON round-trippable kernel configurations.

A tactic is everything a kernel needs to know at compile time that is not a
problem size: tile shape, pipeline stages, swap-AB, split-K, raster order...
Each kernel family defines one frozen dataclass that subclasses `Tactic`,
names itself with a class-level `family` string and registers itself:

    @register_tactic_family
    @dataclasses.dataclass(frozen=True)
    class GemmSm90Tactic(Tactic):
        family: ClassVar[str] = "gemm_sm90"
        block_m: int
        block_n: int
        stages: int
        swap_ab: bool

        def check(self, problem: ProblemKey) -> None:
            if problem.hidden % self.block_n:
                raise ValueError(...)

Fields may only be `int`, `bool` or an `enum.Enum` subclass, so a tactic is
hashable, compares by value and has one JSON form:

    {"family": "gemm_sm90",
     "params": {"block_m": 16, "block_n": 128, "stages": 4, "swap_ab": true}}

Enum members are written by name. `str(tactic)` is stable and readable, with
fields in declaration order, booleans as 0/1 and enum members by name:
`gemm_sm90[block_m=16,block_n=128,stages=4,swap_ab=1]`. It is used in logs, in
test ids and as the identity of a tactic in tuning reports.

`tactic_from_json` rebuilds a tactic from its JSON form through the registry.
When a family is not registered yet, the registry imports `jax_moe.kernels`
once (the package that defines the kernel families) and looks again.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import functools
import importlib
import re
import threading
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

if typing.TYPE_CHECKING:
    from jax_moe.tuning.problem import ProblemKey

__all__ = [
    "Tactic",
    "register_tactic_family",
    "registered_tactic_families",
    "tactic_from_json",
]

_FAMILY_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# The package whose import registers the built-in kernel families.
_KERNEL_PACKAGE = "jax_moe.kernels"


class Tactic(abc.ABC):
    """Base class of every kernel tactic.

    Subclasses are frozen dataclasses whose fields are ints, bools or enums,
    with a class-level `family` name, registered with `register_tactic_family`.
    Values are checked on construction (a `bool` is not accepted for an `int`
    field, nor an `int` for a `bool` field).
    """

    family: ClassVar[str]
    #: Fields added to the family after tables were written: a tactic JSON may leave
    #: them out (they take their dataclass default). Every other field is required.
    optional_params: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for field, field_type in _field_types(type(self)).items():
            _check_value(type(self), field, field_type, getattr(self, field))

    @abc.abstractmethod
    def check(self, problem: ProblemKey) -> None:
        """Raises ValueError if this tactic cannot run `problem`.

        Raises NotImplementedError if the problem is valid but this family does
        not support it (for example another arch).
        """

    def params(self) -> dict[str, int | bool | enum.Enum]:
        """The fields of this tactic in declaration order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> dict[str, Any]:
        """`{"family": ..., "params": {...}}`; enum members are written by name."""
        params = {
            name: value.name if isinstance(value, enum.Enum) else value
            for name, value in self.params().items()
        }
        return {"family": self.family, "params": params}

    def __str__(self) -> str:
        parts = []
        for name, value in self.params().items():
            if isinstance(value, enum.Enum):
                text = value.name
            elif isinstance(value, bool):
                text = str(int(value))
            else:
                text = str(value)
            parts.append(f"{name}={text}")
        return f"{self.family}[{','.join(parts)}]"


_registry: dict[str, type[Tactic]] = {}
_registry_lock = threading.Lock()
_kernel_package_imported = False


@functools.cache
def _field_types(cls: type[Tactic]) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_field_type(cls: type, name: str, field_type: Any) -> None:
    allowed = field_type in (int, bool) or (
        isinstance(field_type, type) and issubclass(field_type, enum.Enum)
    )
    if not allowed:
        raise TypeError(
            f"{cls.__name__}.{name} has type {field_type!r}; tactic fields must be "
            "int, bool or an enum.Enum subclass"
        )


def _check_value(cls: type, name: str, field_type: type, value: Any) -> None:
    if field_type is bool:
        ok = isinstance(value, bool)
    elif field_type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, field_type)
    if not ok:
        raise TypeError(
            f"{cls.__name__}.{name}={value!r} ({type(value).__name__}); "
            f"expected {field_type.__name__}"
        )


def register_tactic_family(cls: type[Tactic]) -> type[Tactic]:
    """Class decorator that registers a tactic family for `tactic_from_json`.

    Apply it on top of `@dataclasses.dataclass(frozen=True)`. Raises TypeError
    if `cls` is not a frozen dataclass subclass of `Tactic` with int, bool or
    enum fields, and ValueError if its `family` name is malformed or already
    taken by another class, or if `optional_params` names a field without a default.
    """
    if not (isinstance(cls, type) and issubclass(cls, Tactic)):
        raise TypeError(f"register_tactic_family expects a Tactic subclass, got {cls!r}")
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise TypeError(f"{cls.__name__} must be a frozen dataclass (dataclass(frozen=True))")
    family = getattr(cls, "family", None)
    if not isinstance(family, str) or not _FAMILY_NAME.match(family):
        raise ValueError(
            f"{cls.__name__}.family={family!r}; expected a lower-case identifier "
            "such as 'gemm_sm90'"
        )
    for name, field_type in _field_types(cls).items():
        _check_field_type(cls, name, field_type)
    defaults = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    if not set(cls.optional_params) <= defaults:
        raise ValueError(
            f"{cls.__name__}.optional_params={cls.optional_params!r}; each must be a field "
            f"with a default (fields with one: {sorted(defaults)})"
        )
    with _registry_lock:
        existing = _registry.get(family)
        same_definition = existing is not None and (
            (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__)
        )
        if existing is not None and not same_definition:
            raise ValueError(
                f"tactic family {family!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        _registry[family] = cls
    return cls


def registered_tactic_families() -> Mapping[str, type[Tactic]]:
    """A snapshot of the registry: family name -> tactic class."""
    with _registry_lock:
        return dict(_registry)


def _find_family(family: str) -> type[Tactic] | None:
    global _kernel_package_imported
    with _registry_lock:
        cls = _registry.get(family)
    if cls is not None or _kernel_package_imported:
        return cls
    _kernel_package_imported = True
    try:
        importlib.import_module(_KERNEL_PACKAGE)
    except ModuleNotFoundError as error:
        if error.name != _KERNEL_PACKAGE:
            raise
    with _registry_lock:
        return _registry.get(family)


def tactic_from_json(data: Mapping[str, Any]) -> Tactic:
    """Rebuilds a tactic from `Tactic.to_json()` output.

    Params named in the family's `optional_params` may be left out (they take their
    default, so tables written before a family gained a field still load). Raises ValueError
    for an unknown family, missing or unexpected params, or values of the wrong
    type or out of range.
    """
    if not isinstance(data, Mapping) or set(data) != {"family", "params"}:
        raise ValueError(
            f"tactic JSON {data!r}; expected an object with exactly the keys 'family' and 'params'"
        )
    family, params = data["family"], data["params"]
    if not isinstance(family, str):
        raise ValueError(f"tactic family {family!r}; expected a string")
    cls = _find_family(family)
    if cls is None:
        known = ", ".join(sorted(registered_tactic_families())) or "none"
        raise ValueError(
            f"unknown tactic family {family!r} (registered: {known}); import the module "
            "that defines it before loading tactics"
        )
    if not isinstance(params, Mapping):
        raise ValueError(f"params of tactic family {family!r} is {params!r}; expected an object")
    types = _field_types(cls)
    optional = set(cls.optional_params)
    missing, unexpected = set(types) - optional - set(params), set(params) - set(types)
    if missing or unexpected:
        note = f" (optional: {sorted(optional)})" if optional else ""
        raise ValueError(
            f"params of tactic family {family!r}: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}; expected {list(types)}{note}"
        )
    values = {}
    for name, field_type in types.items():
        if name not in params:
            continue
        value = params[name]
        if isinstance(field_type, type) and issubclass(field_type, enum.Enum):
            if not isinstance(value, str) or value not in field_type.__members__:
                raise ValueError(
                    f"{family}.{name}={value!r}; expected one of {list(field_type.__members__)}"
                )
            value = field_type[value]
        values[name] = value
    try:
        return cls(**values)
    except TypeError as error:
        raise ValueError(f"invalid params for tactic family {family!r}: {error}") from error
