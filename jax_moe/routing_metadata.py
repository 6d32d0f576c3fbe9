"""Routing metadata for the grouped GEMMs and the combine step, in jitted JAX.

Slots: slot `s = n * top_k + j` is token `n`'s `j`-th choice. A slot is local
if `local_expert_offset <= topk_ids[n, j] < local_expert_offset + L` (`L` =
number of local experts); its local expert is `topk_ids[n, j] -
local_expert_offset`. For a static row tile `block_m`:

* `sorted_slots`: int32 `(m_pad,)` with `m_pad = round_up(N*top_k + min(L, N*top_k) *
  (block_m - 1), block_m)`,
  a static upper bound. The local slots grouped by local expert
  (expert 0 first), ascending slot order inside an expert; each expert's
  segment is padded with -1 to a multiple of `block_m` (an expert with no slots
  has an empty segment); the entries after the last segment are -1.
* `tile_expert`: int32 `(m_pad // block_m,)`: the local expert of each row
  tile, -1 for tiles after the last used one.
* `slot_row`: int32 `(N*top_k,)`: the row of each slot in `sorted_slots`, -1
  for non-local slots. `sorted_slots[slot_row[s]] == s` for every local slot.

A segment padded to a multiple of `block_m` is also padded to a multiple of every
divisor `b` of it, so the same `sorted_slots` serves a GEMM with row tiles of `b`
rows: `finer_tile_expert` gives their `tile_expert` (a tile holding only padding
gets -1, so its CTAs do nothing).

Example (`top_k = 2`, `L = 2`, offset 0, `block_m = 4`, `topk_ids = [[1, 0], [1, 5]]`):
slots 0..3 have experts 1, 0, 1, (5: not local); `m_pad = round_up(4 + 2*3, 4) = 12`;
`sorted_slots = [1, -1, -1, -1, 0, 2, -1, -1, -1, -1, -1, -1]`,
`tile_expert = [0, 1, -1]`, `slot_row = [4, 0, 5, -1]`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_moe._checks import check_int as _check_int

_INT32_MAX = 2**31 - 1

__all__ = [
    "RoutingMetadata",
    "check_metadata_args",
    "finer_tile_expert",
    "ids_as_int32",
    "padded_rows",
    "routing_metadata",
]


class RoutingMetadata(NamedTuple):
    """Routing metadata of one call; see the module docstring."""

    sorted_slots: jax.Array  # int32 (m_pad,)
    tile_expert: jax.Array  # int32 (m_pad // block_m,)
    slot_row: jax.Array  # int32 (num_tokens * top_k,)


def padded_rows(num_slots: int, num_local_experts: int, block_m: int) -> int:
    """`m_pad = round_up(num_slots + min(num_local_experts, num_slots) * (block_m - 1), block_m)`.

    At most `min(num_local_experts, num_slots)` experts receive a slot, and each pads
    its segment by at most `block_m - 1` rows, so this bounds the used rows.
    """
    num_slots = _check_int("num_slots", num_slots, 0)
    num_local_experts = _check_int("num_local_experts", num_local_experts, 1)
    block_m = _check_int("block_m", block_m, 1)
    rows = num_slots + min(num_local_experts, num_slots) * (block_m - 1)
    return -(-rows // block_m) * block_m


def routing_metadata(
    topk_ids: jax.Array,
    *,
    num_local_experts: int,
    block_m: int,
    local_expert_offset: int = 0,
) -> RoutingMetadata:
    """Builds `RoutingMetadata` from router choices; traceable under `jax.jit`.

    Args:
      topk_ids: `(num_tokens, top_k)` integer global expert ids.
      num_local_experts: `L`, experts held by this rank (>= 1).
      block_m: row tile of the grouped GEMM (>= 1, any value).
      local_expert_offset: global id of the first local expert (>= 0).

    Returns:
      `RoutingMetadata(sorted_slots, tile_expert, slot_row)`, all int32.
    """
    num_local, block_m, offset = check_metadata_args(
        topk_ids, num_local_experts, block_m, local_expert_offset
    )
    return _routing_metadata(topk_ids, num_local, block_m, offset)


def check_metadata_args(
    topk_ids: jax.Array, num_local_experts: int, block_m: int, local_expert_offset: int
) -> tuple[int, int, int]:
    """Validates the arguments of `routing_metadata` (shared with the CUDA kernel's
    wrapper); returns `(num_local_experts, block_m, local_expert_offset)` as ints."""
    if not hasattr(topk_ids, "ndim") or topk_ids.ndim != 2:
        raise ValueError(
            f"topk_ids has shape {getattr(topk_ids, 'shape', None)}; expected (num_tokens, top_k)"
        )
    if not jnp.issubdtype(topk_ids.dtype, jnp.integer):
        raise TypeError(f"topk_ids has dtype {topk_ids.dtype}; expected an integer dtype")
    num_local_experts = _check_int("num_local_experts", num_local_experts, 1)
    block_m = _check_int("block_m", block_m, 1)
    local_expert_offset = _check_int("local_expert_offset", local_expert_offset, 0)
    if topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids has shape {topk_ids.shape}; expected top_k >= 1")
    if local_expert_offset + num_local_experts > _INT32_MAX:
        raise ValueError(
            f"local_expert_offset={local_expert_offset} + num_local_experts="
            f"{num_local_experts} exceeds int32; expert ids are int32"
        )
    return num_local_experts, block_m, local_expert_offset


def ids_as_int32(topk_ids: jax.Array, num_local_experts: int, offset: int) -> jax.Array:
    """`topk_ids` flattened to int32 `(num_slots,)`, every slot as local as before.

    Ids of a dtype that int32 holds exactly are converted. Wider ids (int64, uint32,
    uint64) are compared with `[offset, offset + num_local_experts)` in their own dtype
    first, and non-local ones become -1, so that no id can wrap onto a local expert.
    Needs `offset + num_local_experts < 2^31` (checked by `check_metadata_args`).
    """
    ids = topk_ids.reshape(-1)
    if jnp.can_cast(ids.dtype, jnp.int32, casting="safe"):
        return ids.astype(jnp.int32)
    local = (ids >= offset) & (ids < offset + num_local_experts)
    return jnp.where(local, (ids - offset).astype(jnp.int32) + offset, -1)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _routing_metadata(
    topk_ids: jax.Array, num_local: int, block_m: int, offset: int
) -> RoutingMetadata:
    num_slots = topk_ids.shape[0] * topk_ids.shape[1]
    m_pad = padded_rows(num_slots, num_local, block_m)
    num_tiles = m_pad // block_m

    # Local expert of each slot; non-local slots go to the sentinel bucket `num_local`.
    expert = ids_as_int32(topk_ids, num_local, offset) - offset
    is_local = (expert >= 0) & (expert < num_local)
    bucket = jnp.where(is_local, expert, num_local).astype(jnp.int32)

    counts = jnp.zeros((num_local + 1,), jnp.int32).at[bucket].add(1, mode="drop")
    padded = (counts[:num_local] + (block_m - 1)) // block_m * block_m
    segment_end = jnp.cumsum(padded, dtype=jnp.int32)
    segment_start = segment_end - padded

    # Rank of each slot inside its expert, in ascending slot order (stable sort).
    order = jnp.argsort(bucket, stable=True).astype(jnp.int32)
    sorted_bucket = bucket[order]
    bucket_start = jnp.cumsum(counts, dtype=jnp.int32) - counts  # in the sorted order
    rank = jnp.arange(num_slots, dtype=jnp.int32) - bucket_start[sorted_bucket]
    local_sorted = sorted_bucket < num_local
    row_sorted = jnp.where(
        local_sorted, segment_start[jnp.minimum(sorted_bucket, num_local - 1)] + rank, -1
    )

    slot_row = jnp.full((num_slots,), -1, jnp.int32).at[order].set(row_sorted)
    target = jnp.where(local_sorted, row_sorted, m_pad)  # m_pad: dropped
    sorted_slots = jnp.full((m_pad,), -1, jnp.int32).at[target].set(order, mode="drop")

    tile_start = jnp.arange(num_tiles, dtype=jnp.int32) * block_m
    # "compare_all": one broadcast comparison, (num_tiles, num_local) booleans; the
    # default binary search is a while loop, which on GPUs costs a host round trip
    # per iteration.
    tile_owner = jnp.searchsorted(
        segment_end, tile_start, side="right", method="compare_all"
    ).astype(jnp.int32)
    tile_expert = jnp.where(tile_owner < num_local, tile_owner, -1)
    return RoutingMetadata(sorted_slots, tile_expert, slot_row)


def finer_tile_expert(sorted_slots: jax.Array, tile_expert: jax.Array, block_m: int) -> jax.Array:
    """`tile_expert` of row tiles of `block_m` rows over the same `sorted_slots`.

    `sorted_slots` / `tile_expert` are metadata built for row tiles of a multiple of
    `block_m` rows. Tile `t` of `block_m` rows lies inside tile `t // ratio` of the
    coarse ones; it belongs to that tile's expert unless its first row is padding, in
    which case (the real slots of a segment come first) every row of it is padding
    and it gets -1, like a tile after the last segment.
    """
    block_m = _check_int("block_m", block_m, 1)
    m_pad = sorted_slots.shape[0]
    coarse = m_pad // tile_expert.shape[0] if tile_expert.shape[0] else block_m
    if tile_expert.shape[0] * coarse != m_pad or coarse % block_m:
        raise ValueError(
            f"tile_expert has {tile_expert.shape[0]} tiles over {m_pad} rows; expected row "
            f"tiles of a multiple of block_m={block_m}"
        )
    ratio = coarse // block_m
    first = sorted_slots[::block_m]
    return jnp.where(first >= 0, jnp.repeat(tile_expert, ratio), -1).astype(jnp.int32)
