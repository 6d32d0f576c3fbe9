"""Deterministic synthetic routings and inputs for profiling MoE kernels.

Kernels are tuned under a routing in which this rank's local experts carry a
balanced but realistic load, so a tuning run is reproducible and reflects
serving. Everything is drawn from a `jax.random` key.

The balanced plan (`balanced_expert_loads`)
-------------------------------------------
With N tokens, E experts, top_k = k and L local experts (EP size ep = E / L):

    avg = N*k / ep                                   mean load of a rank
    T   = min(N*k, ceil(avg + sqrt(avg * ln(ep))))   load of the busiest rank
    T   = N*k                                        when ep == 1
    plan[j] = T // L + (1 if j < T % L else 0)       for j = 0..L-1

`avg + sqrt(avg*ln ep)` is a common estimate of the largest of ep loads with
mean `avg`, so the local experts see the load of the busiest rank of a
uniformly routed batch, spread as evenly as the total allows. The plan is
computed on the host in Python; it is static under `jax.jit`.

The plan is feasible when every `plan[j] <= N` (an expert can take a token at
most once); otherwise the arguments are rejected. That happens only when the
rank's share exceeds what its L experts can hold at all (T > L*N), for example
when L < top_k with few tokens.

The balanced generator (`balanced_routing`), correct by construction
--------------------------------------------------------------------
1. Draw a random order of the L local experts and list expert `e` `plan[e]`
   times in that order: a sequence `s[0..T)` whose entries for one expert are
   consecutive ("runs").
2. Wrap the sequence onto a `(N, k)` grid column by column: entry `i` goes to
   row `i mod N`, column `i div N` (McNaughton's wrap-around rule).
   - A run has length `plan[e] <= N`, so its entries land in distinct rows:
     no token gets the same expert twice.
   - Row `p` receives the entries `i = p, p+N, p+2N, ... < T`, i.e.
     `c_p = T div N + (p < T mod N)` of them in columns `0..c_p-1`, and
     `c_p <= ceil(T/N) <= k` because `T <= N*k`. Rows differ by at most one.
   - Expert `e` is used exactly `plan[e]` times, and an expert planned for 0
     tokens does not occur at all.
3. Permute the rows with a random permutation of the tokens.
4. Fill the remaining `k - c_p` slots of each token with distinct non-local
   experts: the first `k - c_p` of a random ordering of the `E - L` experts
   outside `[offset, offset + L)`, drawn per token. This is possible because
   `k - c_p <= E - L`: from `T >= avg = N*k/ep` we get
   `c_p >= T div N >= floor(k/ep)`, and `k - (E - L) = k - L*(ep-1) <= k/ep`
   (as `k <= E = L*ep`), so `k - (E - L) <= floor(k/ep) <= c_p`. When ep == 1
   every slot is local (`T = N*k`, `c_p = k`).
5. Shuffle the k slots of each token, so the position of an expert in a row
   does not reveal the construction.

The result is a valid routing (k distinct ids per token, all in `[0, E)`) with
local loads equal to the plan. Only integer work decides the assignment:
threefry random words, stable argsorts of them (the random permutations), an
integer scatter-add and cumulative sums. So a key gives the same routing bit
for bit on CPU and GPU (for a given JAX version and `jax_threefry_partitionable`
setting); a different key gives a different assignment.

The spread plan (`spread_expert_loads`)
---------------------------------------
The balanced plan is the busiest rank with every expert evenly filled. A router
that spreads tokens uniformly over the experts gives a typical rank fewer slots
(about `avg`), unevenly: each expert's load is Binomial(N, k/E), so at N=1 on
a 32-expert slice of 256 experts (top 8) one expert holds the rank's one slot,
and at N=1024 the loads range from about 20 to 45 around a mean of 32. The
spread plan is that rank's loads made deterministic:

    T       = N*k                    when ep == 1, else min(N*k, ceil(avg))
    q[j]    = the ((j + 1/2) / L)-quantile of Binomial(N, k/E),  j = 0..L-1
    plan    = q adjusted by one row at a time until it sums to T: rows are added
              to the largest loads below N first (in decreasing index order) and
              removed from the largest loads first

(exact binomial quantiles from the log-probabilities, no sampling). Its loads
satisfy `plan[j] <= N` and `T >= avg`, so the generator above builds a routing
from it with the same guarantees (step 4's argument needs only `T >= avg`).

The busy plan (`busy_expert_loads`)
-----------------------------------
The balanced plan gives the busiest rank's slots to every local expert evenly, so at
small N it activates all of them, more than a real busy rank does; the spread plan
activates as many experts as a typical rank. Kernels whose grid grows with the
active experts (one column of CTAs per active expert) can be fastest under both and
still lose a wave under a batch in between. The busy plan is the busiest rank's total
with a router's unevenness: the spread plan's quantile rule with the balanced plan's
total and the per-expert probability scaled to it,

    T       = the balanced plan's total (the busiest rank's load)
    q[j]    = the ((j + 1/2) / L)-quantile of Binomial(N, min(1, T / (N*L)))
    plan    = q adjusted to sum to T as in the spread plan

(at DeepSeek-V3 EP=8, N=32: 41 slots on 23 of the 32 experts, where the balanced plan
uses all 32 and the spread plan 32 slots on 20).

Other distributions (`profile_routing`)
---------------------------------------
`RoutingDistribution` selects one of:
- `balanced` (default): the generator above with the balanced plan.
- `busy`: the same generator with the busy plan (the busiest rank's load,
  unevenly spread).
- `spread`: the same generator with the spread plan (a typical rank's uneven
  loads, deterministic); the tuner profiles under it as a second routing
  (docs/TUNING.md, "Robust choice").
- `uniform`: each token takes k distinct experts uniformly at random.
- `zipf:S`: expert popularity follows Zipf's law with exponent S over a random
  ranking of the experts (the expert of rank r has weight `1/(r+1)**S`); each
  token draws k distinct experts in proportion to the weights (successive
  draws without replacement, from integer weights). `zipf:0` is uniform.
Local loads are whatever the draw gives for these two.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe._checks import check_int as _check_int

__all__ = [
    "PLANNED_KINDS",
    "ProfileInputs",
    "RoutingDistribution",
    "balanced_expert_loads",
    "balanced_routing",
    "canonical_profile",
    "join_profile",
    "parse_profile",
    "planned_expert_loads",
    "profile_inputs",
    "profile_routing",
    "split_profile",
    "spread_expert_loads",
    "busy_expert_loads",
]

_KINDS = ("balanced", "spread", "busy", "uniform", "zipf")
#: Distributions whose local loads are a deterministic plan (no random loads).
PLANNED_KINDS = ("balanced", "spread", "busy")
# Fixed fold_in tags that derive each profile input's key from the user's key,
# so that e.g. the routing does not change with the hidden size.
_ROUTING_STREAM = 0
_HIDDEN_STREAM = 1
_WEIGHTS_STREAM = 2
# Integer Zipf weights sum to at most 2**24 (see _uniform_below).
_ZIPF_WEIGHT_TOTAL = 1 << 24
_ZIPF_MAX_EXPERTS = 1 << 20


def _check_shape_args(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    num_local_experts: int,
    local_expert_offset: int,
) -> None:
    _check_int("num_tokens", num_tokens, 1)
    _check_int("num_experts", num_experts, 1)
    _check_int("top_k", top_k, 1)
    _check_int("num_local_experts", num_local_experts, 1)
    _check_int("local_expert_offset", local_expert_offset, 0)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k}; expected <= num_experts={num_experts}")
    if num_local_experts > num_experts or num_experts % num_local_experts:
        raise ValueError(
            f"num_local_experts={num_local_experts}; expected a divisor of "
            f"num_experts={num_experts}"
        )
    if local_expert_offset > num_experts - num_local_experts:
        raise ValueError(
            f"local_expert_offset={local_expert_offset}; expected 0 <= offset <= "
            f"num_experts - num_local_experts = {num_experts - num_local_experts}"
        )


def _busiest_total(num_tokens: int, num_experts: int, top_k: int, num_local_experts: int) -> int:
    """`T` of the balanced plan: the load of the busiest rank (module docstring)."""
    total = num_tokens * top_k
    ep = num_experts // num_local_experts
    if ep == 1:
        return total
    avg = total / ep
    return min(total, math.ceil(avg + math.sqrt(avg * math.log(ep))))


def _plan(num_tokens: int, num_experts: int, top_k: int, num_local_experts: int) -> np.ndarray:
    num_tokens, num_experts, top_k = int(num_tokens), int(num_experts), int(top_k)
    num_local_experts = int(num_local_experts)
    ep = num_experts // num_local_experts
    busiest = _busiest_total(num_tokens, num_experts, top_k, num_local_experts)
    base, rem = divmod(busiest, num_local_experts)
    plan = np.full(num_local_experts, base, dtype=np.int32)
    plan[:rem] += 1
    if base + (rem > 0) > num_tokens:
        raise ValueError(
            f"infeasible balanced plan: num_tokens={num_tokens}, num_experts={num_experts}, "
            f"top_k={top_k}, num_local_experts={num_local_experts} (EP {ep}) put {busiest} "
            f"slots on this rank, so a local expert would need {base + (rem > 0)} tokens but "
            f"there are only {num_tokens}; use more tokens or more local experts"
        )
    return plan


def balanced_expert_loads(
    num_tokens: int, num_experts: int, top_k: int, num_local_experts: int
) -> np.ndarray:
    """The balanced plan: how many tokens each local expert receives.

    Returns an int32 numpy array of shape `(num_local_experts,)` (see the module
    docstring for the formula). Raises ValueError for invalid arguments or an
    infeasible plan (a local expert would need more than `num_tokens` tokens).
    """
    _check_shape_args(num_tokens, num_experts, top_k, num_local_experts, 0)
    return _plan(num_tokens, num_experts, top_k, num_local_experts)


def _binomial_quantiles(n: int, p: float, probabilities: np.ndarray) -> np.ndarray:
    """The `probabilities`-quantiles of Binomial(n, p): the smallest i with CDF(i) >= q."""
    if p >= 1.0:
        return np.full(len(probabilities), n, dtype=np.int64)
    i = np.arange(n + 1, dtype=np.float64)
    lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
    log_pmf = (
        math.lgamma(n + 1)
        - lgamma(i + 1)
        - lgamma(n - i + 1)
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
    )
    cdf = np.cumsum(np.exp(log_pmf))
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, probabilities, side="left"), n).astype(np.int64)


def spread_expert_loads(
    num_tokens: int, num_experts: int, top_k: int, num_local_experts: int
) -> np.ndarray:
    """The spread plan: a typical rank's uneven loads under a uniform router.

    Returns an int32 numpy array of shape `(num_local_experts,)`, ascending, that
    sums to `T` (the module docstring gives `T` and the quantile rule); every
    entry is at most `num_tokens`. Deterministic: no key is involved.
    """
    _check_shape_args(num_tokens, num_experts, top_k, num_local_experts, 0)
    n, e, k, local = int(num_tokens), int(num_experts), int(top_k), int(num_local_experts)
    ep = e // local
    total = n * k if ep == 1 else min(n * k, math.ceil(n * k / ep))
    return _quantile_plan(n, k / e, local, total, "spread")


def busy_expert_loads(
    num_tokens: int, num_experts: int, top_k: int, num_local_experts: int
) -> np.ndarray:
    """The busy plan: the busiest rank's load with a router's uneven loads.

    Returns an int32 numpy array of shape `(num_local_experts,)`, ascending, that
    sums to the balanced plan's total (module docstring); every entry is at most
    `num_tokens`. Deterministic: no key is involved. ValueError where the balanced plan
    is infeasible (the same total).
    """
    _check_shape_args(num_tokens, num_experts, top_k, num_local_experts, 0)
    n, e, k, local = int(num_tokens), int(num_experts), int(top_k), int(num_local_experts)
    total = _busiest_total(n, e, k, local)
    if total > n * local:
        raise ValueError(
            f"infeasible busy plan: num_tokens={n}, num_experts={e}, top_k={k}, "
            f"num_local_experts={local} put {total} slots on this rank, more than its "
            f"{local} experts can take from {n} tokens"
        )
    return _quantile_plan(n, total / (n * local), local, total, "busy")


def _quantile_plan(n: int, p: float, local: int, total: int, name: str) -> np.ndarray:
    """The `((j + 1/2) / local)`-quantiles of Binomial(n, p), capped at `n`, adjusted one
    row at a time to sum to `total` (the spread plan's rule), ascending int32."""
    quantiles = _binomial_quantiles(n, p, (np.arange(local) + 0.5) / local)
    plan = np.minimum(quantiles, n)
    diff = total - int(plan.sum())
    # One row at a time, cycling from the largest loads down (quantiles are ascending).
    while diff:
        step = 1 if diff > 0 else -1
        moved = False
        for j in range(local - 1, -1, -1):
            if diff == 0:
                break
            if 0 <= plan[j] + step <= n:
                plan[j] += step
                diff -= step
                moved = True
        if not moved:  # Unreachable: 0 <= total <= n * local.
            raise RuntimeError(f"{name} plan of {total} rows does not fit {local} experts")
    return np.sort(plan).astype(np.int32)


def planned_expert_loads(
    kind: str, num_tokens: int, num_experts: int, top_k: int, num_local_experts: int
) -> np.ndarray:
    """The plan of a planned distribution `kind` (`balanced`, `spread` or `busy`)."""
    if kind == "balanced":
        return balanced_expert_loads(num_tokens, num_experts, top_k, num_local_experts)
    if kind == "spread":
        return spread_expert_loads(num_tokens, num_experts, top_k, num_local_experts)
    if kind == "busy":
        return busy_expert_loads(num_tokens, num_experts, top_k, num_local_experts)
    raise ValueError(f"kind={kind!r}; expected one of {PLANNED_KINDS}")


def _random_orders(bits: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Random permutations of `range(shape[-1])` along the last axis, from uint32 bits.

    A stable argsort of random words: exact integer work, identical on every
    backend (ties, of probability ~n**2 / 2**33, resolve to index order).
    """
    return jnp.argsort(bits.reshape(shape), axis=-1, stable=True).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("num_tokens", "num_experts", "top_k", "local_expert_offset", "plan")
)
def _balanced_routing(
    key: jax.Array,
    *,
    num_tokens: int,
    num_experts: int,
    top_k: int,
    local_expert_offset: int,
    plan: tuple[int, ...],
) -> jax.Array:
    n, k, num_local = num_tokens, top_k, len(plan)
    num_remote = num_experts - num_local
    # One flat draw of random words, cut into the four uses below (one draw
    # compiles much faster than several).
    sizes = (num_local, n, n * num_remote, n * k)
    bits = jax.random.bits(key, (sum(sizes),), jnp.uint32)
    order_bits, token_bits, remote_bits, slot_bits = jnp.split(bits, np.cumsum(sizes)[:-1])

    # Steps 1-2: the run sequence wrapped column by column onto an (n, k) grid.
    order = _random_orders(order_bits, (num_local,))
    run_ends = jnp.cumsum(jnp.asarray(plan, dtype=jnp.int32)[order])  # run_ends[-1] == T
    column = jnp.arange(k, dtype=jnp.int32)
    seq_index = column[None, :] * n + jnp.arange(n, dtype=jnp.int32)[:, None]  # (n, k)
    # run_of[i] = number of runs ending at or before i = the run holding entry i
    # (a scatter-add of integers: exact in any order).
    run_ends_marks = jnp.zeros(n * k + 1, jnp.int32).at[run_ends].add(1)
    run = jnp.cumsum(run_ends_marks)[seq_index]
    is_local = seq_index < run_ends[-1]
    local = order[jnp.minimum(run, num_local - 1)] + local_expert_offset

    # Step 3: random tokens take the rows.
    token_perm = _random_orders(token_bits, (n,))
    local, is_local = local[token_perm], is_local[token_perm]

    # Step 4: distinct non-local experts after the c local slots of each row.
    if num_remote > 0:
        remote_ids = np.concatenate(
            [
                np.arange(local_expert_offset),
                np.arange(local_expert_offset + num_local, num_experts),
            ]
        ).astype(np.int32)
        width = min(k, num_remote)
        remote_order = _random_orders(remote_bits, (n, num_remote))[:, :width]
        remote = jnp.asarray(remote_ids)[remote_order]
        count = jnp.sum(is_local, axis=1, dtype=jnp.int32)
        pick = jnp.clip(column[None, :] - count[:, None], 0, width - 1)
        ids = jnp.where(is_local, local, jnp.take_along_axis(remote, pick, axis=1))
    else:
        ids = local

    # Step 5: shuffle the slots of each token.
    slot_perm = _random_orders(slot_bits, (n, k))
    return jnp.take_along_axis(ids, slot_perm, axis=1).astype(jnp.int32)


def balanced_routing(
    key: jax.Array,
    num_tokens: int,
    num_experts: int,
    top_k: int,
    *,
    num_local_experts: int | None = None,
    local_expert_offset: int = 0,
) -> jax.Array:
    """A routing whose local experts' loads follow the balanced plan.

    Args:
      key: a `jax.random` key (typed or raw uint32); may be traced.
      num_tokens, num_experts, top_k: static sizes N, E, k.
      num_local_experts: L, the experts of this rank; default E (no EP).
      local_expert_offset: this rank owns experts `[offset, offset + L)`.

    Returns:
      int32 `(num_tokens, top_k)` expert ids: each token has k distinct ids in
      `[0, E)`; local expert `offset + j` occurs in exactly
      `balanced_expert_loads(...)[j]` rows; the other slots hold distinct
      non-local experts. Bit-identical for a key on every backend.

    Raises ValueError for invalid arguments or an infeasible plan. Under
    `jax.jit` the sizes must be static.
    """
    return _planned_routing(
        "balanced",
        key,
        num_tokens,
        num_experts,
        top_k,
        num_local_experts=num_local_experts,
        local_expert_offset=local_expert_offset,
    )


def _planned_routing(
    kind: str,
    key: jax.Array,
    num_tokens: int,
    num_experts: int,
    top_k: int,
    *,
    num_local_experts: int | None,
    local_expert_offset: int,
) -> jax.Array:
    if num_local_experts is None:
        num_local_experts = num_experts
    _check_shape_args(num_tokens, num_experts, top_k, num_local_experts, local_expert_offset)
    plan = planned_expert_loads(kind, num_tokens, num_experts, top_k, num_local_experts)
    return _balanced_routing(
        key,
        num_tokens=int(num_tokens),
        num_experts=int(num_experts),
        top_k=int(top_k),
        local_expert_offset=int(local_expert_offset),
        plan=tuple(int(x) for x in plan),
    )


@dataclasses.dataclass(frozen=True)
class RoutingDistribution:
    """How profiling routings are drawn: `balanced`, `spread`, `busy`, `uniform` or `zipf:S`.

    `zipf_exponent` (S >= 0) is used by `zipf` only and must keep its default
    for the other kinds. `str()` and `parse()` are inverses.
    """

    kind: str = "balanced"
    zipf_exponent: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"RoutingDistribution.kind={self.kind!r}; expected one of {_KINDS}")
        exponent = self.zipf_exponent
        if isinstance(exponent, bool) or not isinstance(exponent, (int, float)):
            raise TypeError(f"RoutingDistribution.zipf_exponent={exponent!r}; expected a float")
        if not (math.isfinite(exponent) and exponent >= 0):
            raise ValueError(
                f"RoutingDistribution.zipf_exponent={exponent}; expected a finite value >= 0"
            )
        if self.kind != "zipf" and exponent != 1.0:
            raise ValueError(
                f"RoutingDistribution.zipf_exponent={exponent} is only meaningful for kind 'zipf'"
            )
        object.__setattr__(self, "zipf_exponent", float(exponent))

    @classmethod
    def parse(cls, text: str | RoutingDistribution) -> RoutingDistribution:
        """`'balanced'`, `'spread'`, `'busy'`, `'uniform'`, `'zipf'` (exponent 1) or
        `'zipf:1.2'`."""
        if isinstance(text, RoutingDistribution):
            return text
        if not isinstance(text, str):
            raise TypeError(f"distribution={text!r}; expected a str or RoutingDistribution")
        match = re.fullmatch(
            r"(balanced|spread|busy|uniform|zipf)(?::([0-9.eE+-]+))?", text.strip()
        )
        if match is None or (match.group(2) is not None and match.group(1) != "zipf"):
            raise ValueError(
                f"distribution={text!r}; expected 'balanced', 'spread', 'busy', 'uniform', 'zipf' "
                "or 'zipf:<exponent>'"
            )
        if match.group(2) is None:
            return cls(match.group(1))
        try:
            exponent = float(match.group(2))
        except ValueError:
            raise ValueError(f"distribution={text!r}: bad Zipf exponent") from None
        return cls("zipf", exponent)

    def __str__(self) -> str:
        if self.kind != "zipf":
            return self.kind
        exponent = repr(self.zipf_exponent)  # Shortest text that reads back exactly.
        return f"zipf:{exponent.removesuffix('.0')}"


def parse_profile(profile: str) -> tuple[str, tuple[str, ...], bool]:
    """`(primary, secondary, score_primary)` of a tuning profile.

    `'balanced+spread'`: the cells' routing (primary) and the robust choice's
    secondary routings (`SearchConfig.secondary`), all of them scored.
    `'balanced/spread+busy'`: the same routings, but the primary only picks the
    candidates that are timed again and the pair is scored over the secondary
    routings alone (`score_primary` False; `SearchConfig.score_primary`).
    Each routing is a `RoutingDistribution` (canonical text); they must differ.
    ValueError otherwise."""
    if not isinstance(profile, str):
        raise TypeError(f"profile={profile!r}; expected a str of routings joined by '+'")
    head, slash, tail = profile.partition("/")
    if slash and ("+" in head or "/" in tail or not tail.strip()):
        raise ValueError(
            f"profile={profile!r}; expected one routing before '/' and routings joined "
            "by '+' after it"
        )
    if not profile.strip():
        raise ValueError(f"profile={profile!r}; expected routings joined by '+'")
    texts = (head, *tail.split("+")) if slash else profile.split("+")
    try:
        parts = tuple(str(RoutingDistribution.parse(p)) for p in texts)
    except ValueError as error:
        raise ValueError(f"profile={profile!r}: {error}") from None
    if len(set(parts)) != len(parts):
        raise ValueError(f"profile={profile!r} names a routing twice")
    return parts[0], parts[1:], not slash


def split_profile(profile: str) -> tuple[str, tuple[str, ...]]:
    """`(primary, secondary)` routings of a profile (`parse_profile`)."""
    primary, secondary, _ = parse_profile(profile)
    return primary, secondary


def join_profile(primary: str, secondary: Sequence[str] = (), score_primary: bool = True) -> str:
    """The canonical profile text of `primary` and `secondary` routings (`parse_profile`)."""
    if score_primary:
        return "+".join((primary, *secondary))
    if not secondary:
        raise ValueError(f"a profile that does not score {primary!r} needs secondary routings")
    return f"{primary}/{'+'.join(secondary)}"


def canonical_profile(profile: str) -> str:
    """`profile` in canonical text (`parse_profile`, `join_profile`)."""
    return join_profile(*parse_profile(profile))


@functools.partial(jax.jit, static_argnames=("num_tokens", "num_experts", "top_k"))
def _uniform_routing(key: jax.Array, *, num_tokens: int, num_experts: int, top_k: int):
    bits = jax.random.bits(key, (num_tokens * num_experts,), jnp.uint32)
    return _random_orders(bits, (num_tokens, num_experts))[:, :top_k]


def _zipf_weights(num_experts: int, exponent: float) -> tuple[int, ...]:
    """Integer weights of ranks 0..E-1, each >= 1, summing to at most 2**24.

    Computed on the host (static under jit): `floor(share * (2**24 - E)) + 1`.
    """
    if num_experts > _ZIPF_MAX_EXPERTS:
        raise NotImplementedError(
            f"num_experts={num_experts}; the zipf distribution supports up to "
            f"{_ZIPF_MAX_EXPERTS} experts"
        )
    relative = np.arange(1, num_experts + 1, dtype=np.float64) ** -exponent
    scaled = np.floor(relative / relative.sum() * (_ZIPF_WEIGHT_TOTAL - num_experts)) + 1
    return tuple(int(w) for w in scaled)


def _uniform_below(high: jax.Array, low: jax.Array, bound: jax.Array) -> jax.Array:
    """`(high * 2**32 + low) mod bound` for uint32 words and `1 <= bound <= 2**24`.

    Horner's rule over the eight bytes keeps every intermediate below 2**32, so
    this is exact integer math; the result is uniform in `[0, bound)` up to a
    bias below 2**-40.
    """
    remainder = jnp.zeros_like(high)
    for word in (high, low):
        for shift in (24, 16, 8, 0):
            byte = (word >> shift) & 0xFF
            remainder = ((remainder << 8) | byte) % bound
    return remainder


@functools.partial(jax.jit, static_argnames=("num_tokens", "top_k", "rank_weights"))
def _zipf_routing(
    key: jax.Array, *, num_tokens: int, top_k: int, rank_weights: tuple[int, ...]
) -> jax.Array:
    num_experts = len(rank_weights)
    bits = jax.random.bits(key, (num_experts + top_k * num_tokens * 2,), jnp.uint32)
    # Expert e has the weight of rank rank_of[e]: the hot experts are random.
    rank_of = _random_orders(bits[:num_experts], (num_experts,))
    draws = bits[num_experts:].reshape(top_k, 2, num_tokens)
    weights = jnp.asarray(rank_weights, dtype=jnp.uint32)[rank_of]
    available = jnp.ones((num_tokens, num_experts), dtype=jnp.uint32)
    experts = jnp.arange(num_experts, dtype=jnp.int32)
    chosen = []
    for draw in range(top_k):
        # Draw expert e with probability weight[e] / (sum of available weights).
        cumulative = jnp.cumsum(weights[None, :] * available, axis=1, dtype=jnp.uint32)
        target = _uniform_below(draws[draw, 0], draws[draw, 1], cumulative[:, -1])
        pick = jnp.argmax(cumulative > target[:, None], axis=1).astype(jnp.int32)
        available = available * (experts[None, :] != pick[:, None]).astype(jnp.uint32)
        chosen.append(pick)
    return jnp.stack(chosen, axis=1)


def profile_routing(
    key: jax.Array,
    num_tokens: int,
    num_experts: int,
    top_k: int,
    *,
    distribution: str | RoutingDistribution = "balanced",
    num_local_experts: int | None = None,
    local_expert_offset: int = 0,
) -> jax.Array:
    """int32 `(num_tokens, top_k)` expert ids drawn from `key` under `distribution`.

    `balanced` is `balanced_routing`, `spread` and `busy` the same generator with the
    spread and busy plans; `uniform` and `zipf:S` ignore the local range apart from validating it.
    Every token has top_k distinct ids in `[0, num_experts)`; the output is
    bit-identical for a key on every backend.
    """
    distribution = RoutingDistribution.parse(distribution)
    if num_local_experts is None:
        num_local_experts = num_experts
    _check_shape_args(num_tokens, num_experts, top_k, num_local_experts, local_expert_offset)
    if distribution.kind in PLANNED_KINDS:
        return _planned_routing(
            distribution.kind,
            key,
            num_tokens,
            num_experts,
            top_k,
            num_local_experts=num_local_experts,
            local_expert_offset=local_expert_offset,
        )
    if distribution.kind == "uniform":
        return _uniform_routing(
            key, num_tokens=int(num_tokens), num_experts=int(num_experts), top_k=int(top_k)
        )
    return _zipf_routing(
        key,
        num_tokens=int(num_tokens),
        top_k=int(top_k),
        rank_weights=_zipf_weights(int(num_experts), distribution.zipf_exponent),
    )


@dataclasses.dataclass(frozen=True)
class ProfileInputs:
    """Seeded inputs of one profiling problem.

    Attributes:
      hidden_states: `(num_tokens, hidden)` in the activation dtype, standard normal.
      topk_ids: int32 `(num_tokens, top_k)` from `profile_routing`.
      topk_weights: float32 `(num_tokens, top_k)`, positive, each row sums to 1.
    """

    hidden_states: jax.Array
    topk_ids: jax.Array
    topk_weights: jax.Array


def profile_inputs(
    key: jax.Array,
    num_tokens: int,
    hidden: int,
    num_experts: int,
    top_k: int,
    *,
    dtype: Any = jnp.bfloat16,
    distribution: str | RoutingDistribution = "balanced",
    num_local_experts: int | None = None,
    local_expert_offset: int = 0,
) -> ProfileInputs:
    """Hidden states, routing and router weights drawn from fixed keys derived from `key`.

    Each input uses its own `jax.random.fold_in(key, tag)` with a fixed tag, so
    the routing depends only on the routing arguments (not on `hidden` or
    `dtype`). The routing is bit-identical across backends; the floating-point
    inputs are reproducible on a given backend.
    """
    _check_int("hidden", hidden, 1)
    topk_ids = profile_routing(
        jax.random.fold_in(key, _ROUTING_STREAM),
        num_tokens,
        num_experts,
        top_k,
        distribution=distribution,
        num_local_experts=num_local_experts,
        local_expert_offset=local_expert_offset,
    )
    hidden_states = jax.random.normal(
        jax.random.fold_in(key, _HIDDEN_STREAM), (num_tokens, hidden), jnp.float32
    ).astype(dtype)
    logits = jax.random.normal(
        jax.random.fold_in(key, _WEIGHTS_STREAM), (num_tokens, top_k), jnp.float32
    )
    return ProfileInputs(hidden_states, topk_ids, jax.nn.softmax(logits, axis=-1))
