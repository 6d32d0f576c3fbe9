"""Problem keys and token buckets: what a tuned tactic is indexed by.

A `ProblemKey` names one kernel problem: the op (for example `moe_gemm1`), the
GPU arch (`sm_90a`), the layer sizes (hidden, intermediate, number of experts,
local experts, top_k), the activation dtype and a token bucket.

Token buckets are the powers of two 1, 2, 4, ..., `max_tokens` (default 16384).
A runtime `num_tokens` maps up to the smallest bucket that holds it, and counts
above `max_tokens` map to `max_tokens`:

    num_tokens:  0 1 2 3 4 5..8 9..16 ... 8193..16384 16385...
    bucket:      1 1 2 4 4  8    16   ...    16384     16384

So a tactic tuned for bucket `b` serves every call with `b/2 < num_tokens <= b`
(or any count above the maximum). Since shapes are static under `jax.jit`, the
bucket, and with it the tactic, is fixed at trace time.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["DEFAULT_MAX_TOKENS", "ProblemKey", "token_bucket", "token_buckets"]

DEFAULT_MAX_TOKENS = 16384

_OP_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_ARCH_NAME = re.compile(r"^sm_[0-9]{2,3}[a-z]?$")


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


def _check_max_tokens(max_tokens: int) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise TypeError(f"max_tokens={max_tokens!r}; expected an int")
    if not _is_power_of_two(max_tokens):
        raise ValueError(f"max_tokens={max_tokens}; expected a power of two >= 1")


def token_buckets(max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[int, ...]:
    """All token buckets: `(1, 2, 4, ..., max_tokens)`; `max_tokens` a power of two."""
    _check_max_tokens(max_tokens)
    return tuple(1 << i for i in range(max_tokens.bit_length()))


def token_bucket(num_tokens: int, max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
    """The bucket of `num_tokens`: the next power of two, at most `max_tokens`.

    0 and 1 map to 1. Raises ValueError for a negative count or a `max_tokens`
    that is not a power of two.
    """
    _check_max_tokens(max_tokens)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)):
        raise TypeError(f"num_tokens={num_tokens!r}; expected an int")
    num_tokens = int(num_tokens)
    if num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens}; expected >= 0")
    if num_tokens <= 1:
        return 1
    return min(1 << (num_tokens - 1).bit_length(), max_tokens)


def _canonical_dtype(dtype: Any) -> str:
    """`jnp.bfloat16`, `np.dtype('bfloat16')` or `'bfloat16'` -> `'bfloat16'`."""
    import jax.numpy as jnp  # Deferred: keeps this module light for file tools.

    try:
        return jnp.dtype(dtype).name
    except TypeError as error:
        raise TypeError(f"dtype={dtype!r} is not a dtype") from error


@dataclasses.dataclass(frozen=True)
class ProblemKey:
    """One kernel problem, the key of a tactic table.

    Attributes:
      op: the kernel op, a lower-case identifier such as `moe_gemm1`.
      arch: the GPU arch with its feature suffix, such as `sm_90a`.
      hidden: model hidden size H.
      intermediate: expert intermediate size I (W13 is `(2I, H)` per expert).
      num_experts: total number of experts E.
      num_local_experts: experts held by this rank L (E divisible by L).
      top_k: experts per token k (k <= E).
      activation_dtype: dtype name of the activations, such as `bfloat16`.
      token_bucket: a power of two; see `token_bucket`.
    """

    op: str
    arch: str
    hidden: int
    intermediate: int
    num_experts: int
    num_local_experts: int
    top_k: int
    activation_dtype: str
    token_bucket: int

    def __post_init__(self) -> None:
        for name in ("op", "arch", "activation_dtype"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"ProblemKey.{name}={value!r}; expected a str")
        if not _OP_NAME.match(self.op):
            raise ValueError(f"ProblemKey.op={self.op!r}; expected a lower-case identifier")
        if not _ARCH_NAME.match(self.arch):
            raise ValueError(f"ProblemKey.arch={self.arch!r}; expected a name like 'sm_90a'")
        if _canonical_dtype(self.activation_dtype) != self.activation_dtype:
            raise ValueError(
                f"ProblemKey.activation_dtype={self.activation_dtype!r}; expected a canonical "
                f"dtype name such as {_canonical_dtype(self.activation_dtype)!r}"
            )
        for name in (
            "hidden",
            "intermediate",
            "num_experts",
            "num_local_experts",
            "top_k",
            "token_bucket",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ProblemKey.{name}={value!r}; expected an int")
            if value < 1:
                raise ValueError(f"ProblemKey.{name}={value}; expected >= 1")
        if self.num_experts % self.num_local_experts:
            raise ValueError(
                f"ProblemKey.num_local_experts={self.num_local_experts} does not divide "
                f"num_experts={self.num_experts}"
            )
        if self.top_k > self.num_experts:
            raise ValueError(
                f"ProblemKey.top_k={self.top_k}; expected <= num_experts={self.num_experts}"
            )
        if not _is_power_of_two(self.token_bucket):
            raise ValueError(
                f"ProblemKey.token_bucket={self.token_bucket}; expected a power of two"
            )

    @classmethod
    def for_call(
        cls,
        op: str,
        arch: str,
        hidden: int,
        intermediate: int,
        num_experts: int,
        num_local_experts: int,
        top_k: int,
        dtype: Any,
        num_tokens: int,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> ProblemKey:
        """The key of a call with `num_tokens` tokens (bucketed) and any dtype-like `dtype`."""
        return cls(
            op=op,
            arch=arch,
            hidden=hidden,
            intermediate=intermediate,
            num_experts=num_experts,
            num_local_experts=num_local_experts,
            top_k=top_k,
            activation_dtype=_canonical_dtype(dtype),
            token_bucket=token_bucket(num_tokens, max_tokens),
        )

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON object."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProblemKey:
        """Inverse of `to_json`; ValueError/TypeError for missing, extra or bad fields."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, Mapping) or set(data) != set(names):
            keys = sorted(data) if isinstance(data, Mapping) else data
            raise ValueError(f"problem key JSON has keys {keys!r}; expected exactly {names}")
        return cls(**data)

    def __str__(self) -> str:
        return (
            f"{self.op}[{self.arch},hidden={self.hidden},intermediate={self.intermediate},"
            f"experts={self.num_experts},local_experts={self.num_local_experts},"
            f"top_k={self.top_k},{self.activation_dtype},bucket={self.token_bucket}]"
        )
