"""CPU tests of jax_moe.routing_metadata against a direct numpy construction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_moe.routing_metadata import (
    RoutingMetadata,
    finer_tile_expert,
    padded_rows,
    routing_metadata,
)


def _numpy_metadata(topk_ids: np.ndarray, num_local: int, block_m: int, offset: int):
    """The contract, written as plainly as possible."""
    flat = topk_ids.reshape(-1)
    m_pad = padded_rows(flat.size, num_local, block_m)
    sorted_slots = np.full(m_pad, -1, np.int32)
    tile_expert = np.full(m_pad // block_m, -1, np.int32)
    slot_row = np.full(flat.size, -1, np.int32)
    row = 0
    for expert in range(num_local):
        slots = [s for s in range(flat.size) if flat[s] - offset == expert]
        for i, s in enumerate(slots):
            sorted_slots[row + i] = s
            slot_row[s] = row + i
        size = -(-len(slots) // block_m) * block_m
        tile_expert[row // block_m : (row + size) // block_m] = expert
        row += size
    return sorted_slots, tile_expert, slot_row


def _random_topk_ids(rng, num_tokens: int, top_k: int, num_experts: int) -> np.ndarray:
    ids = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(num_tokens)])
    return ids.reshape(num_tokens, top_k).astype(np.int32)


CASES = [
    # (num_tokens, top_k, num_experts, num_local, offset, block_m)
    (1, 1, 4, 4, 0, 1),
    (5, 2, 8, 8, 0, 4),
    (33, 8, 64, 16, 16, 8),
    (17, 4, 32, 8, 24, 3),
    (64, 8, 256, 32, 96, 16),
    (200, 2, 16, 4, 0, 64),
    (3, 6, 8, 2, 6, 128),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_numpy_construction(case):
    num_tokens, top_k, num_experts, num_local, offset, block_m = case
    rng = np.random.default_rng(sum(case))
    topk_ids = _random_topk_ids(rng, num_tokens, top_k, num_experts)
    got = routing_metadata(
        jnp.asarray(topk_ids),
        num_local_experts=num_local,
        block_m=block_m,
        local_expert_offset=offset,
    )
    want = _numpy_metadata(topk_ids, num_local, block_m, offset)
    assert isinstance(got, RoutingMetadata)
    for name, g, w in zip(RoutingMetadata._fields, got, want, strict=True):
        assert g.dtype == jnp.int32, name
        np.testing.assert_array_equal(np.asarray(g), w, err_msg=name)


def test_invariants_on_skewed_routing():
    """All tokens on a few experts, including experts with no tokens."""
    rng = np.random.default_rng(7)
    num_tokens, num_local, block_m = 50, 8, 16
    topk_ids = np.stack([rng.choice([1, 6], 2, replace=False) for _ in range(num_tokens)])
    sorted_slots, tile_expert, slot_row = (
        np.asarray(a)
        for a in routing_metadata(
            jnp.asarray(topk_ids), num_local_experts=num_local, block_m=block_m
        )
    )
    flat = topk_ids.reshape(-1)
    assert sorted_slots.shape == (padded_rows(flat.size, num_local, block_m),)
    local = np.flatnonzero(slot_row >= 0)
    np.testing.assert_array_equal(sorted_slots[slot_row[local]], local)
    assert np.count_nonzero(sorted_slots >= 0) == flat.size
    for t, expert in enumerate(tile_expert):
        rows = sorted_slots[t * block_m : (t + 1) * block_m]
        if expert < 0:
            assert np.all(rows == -1)
        else:
            assert np.all(flat[rows[rows >= 0]] == expert)
    assert sorted(set(tile_expert[tile_expert >= 0].tolist())) == [1, 6]


def test_no_local_slots_and_empty_batch():
    ids = jnp.asarray([[9, 10], [11, 12]], jnp.int32)
    got = routing_metadata(ids, num_local_experts=4, block_m=8, local_expert_offset=0)
    assert np.all(np.asarray(got.sorted_slots) == -1)
    assert np.all(np.asarray(got.tile_expert) == -1)
    assert np.all(np.asarray(got.slot_row) == -1)
    empty = routing_metadata(jnp.zeros((0, 2), jnp.int32), num_local_experts=3, block_m=4)
    assert empty.sorted_slots.shape == (padded_rows(0, 3, 4),)
    assert empty.slot_row.shape == (0,)
    assert np.all(np.asarray(empty.tile_expert) == -1)


def test_docstring_example():
    got = routing_metadata(jnp.asarray([[1, 0], [1, 5]]), num_local_experts=2, block_m=4)
    np.testing.assert_array_equal(got.sorted_slots, [1, -1, -1, -1, 0, 2] + [-1] * 6)
    np.testing.assert_array_equal(got.tile_expert, [0, 1, -1])
    np.testing.assert_array_equal(got.slot_row, [4, 0, 5, -1])


def test_under_jit_with_int64_ids():
    rng = np.random.default_rng(3)
    topk_ids = _random_topk_ids(rng, 9, 3, 12)
    fn = jax.jit(
        lambda ids: routing_metadata(ids, num_local_experts=6, block_m=5, local_expert_offset=6)
    )
    got = fn(jnp.asarray(topk_ids))
    want = _numpy_metadata(topk_ids, 6, 5, 6)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), w)


# (dtype, num_experts, num_local, offset): the last rank's range ends at the dtype's limit,
# or the local range is wider than the dtype.
NARROW_CASES = [
    (np.uint8, 256, 32, 224),
    (np.uint8, 256, 4, 252),
    (np.int8, 128, 200, 0),
    (np.int8, 128, 64, 64),
    (np.int16, 300, 100, 200),
    (np.uint16, 300, 100, 200),
    (np.uint32, 300, 100, 200),
]


@pytest.mark.parametrize("case", NARROW_CASES, ids=[str(c) for c in NARROW_CASES])
def test_narrow_and_unsigned_ids_give_the_int32_result(case):
    dtype, num_experts, num_local, offset = case
    rng = np.random.default_rng(num_local + offset)
    topk_ids = _random_topk_ids(rng, 40, 4, num_experts)
    want = _numpy_metadata(topk_ids, num_local, 8, offset)
    got = routing_metadata(
        jnp.asarray(topk_ids.astype(dtype)),
        num_local_experts=num_local,
        block_m=8,
        local_expert_offset=offset,
    )
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), w)


def test_offset_past_int32_is_rejected():
    with pytest.raises(ValueError, match="exceeds int32"):
        routing_metadata(
            jnp.zeros((2, 2), jnp.int32),
            num_local_experts=8,
            block_m=8,
            local_expert_offset=2**31 - 4,
        )


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"num_local_experts": 0, "block_m": 8}, ValueError),
        ({"num_local_experts": 2, "block_m": 0}, ValueError),
        ({"num_local_experts": 2, "block_m": 8, "local_expert_offset": -1}, ValueError),
        ({"num_local_experts": 2.0, "block_m": 8}, TypeError),
        ({"num_local_experts": 2, "block_m": True}, TypeError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        routing_metadata(jnp.zeros((2, 2), jnp.int32), **kwargs)


def test_bad_topk_ids():
    with pytest.raises(ValueError, match="topk_ids"):
        routing_metadata(jnp.zeros((4,), jnp.int32), num_local_experts=2, block_m=4)
    with pytest.raises(TypeError, match="topk_ids"):
        routing_metadata(jnp.zeros((2, 2), jnp.float32), num_local_experts=2, block_m=4)


@pytest.mark.parametrize("coarse, fine", [(128, 64), (128, 16), (64, 32), (32, 32)])
def test_finer_tile_expert_over_coarse_padding(coarse, fine):
    rng = np.random.default_rng(coarse + fine)
    num_local, offset = 6, 4
    # Skewed: expert 0 of the slice gets many slots, some experts none.
    ids = rng.choice([4, 4, 4, 5, 7, 9, 20], size=(150, 3)).astype(np.int32)
    meta = routing_metadata(
        jnp.asarray(ids), num_local_experts=num_local, block_m=coarse, local_expert_offset=offset
    )
    tiles = np.asarray(finer_tile_expert(meta.sorted_slots, meta.tile_expert, fine))
    slots = np.asarray(meta.sorted_slots).reshape(-1, fine)
    assert tiles.shape == (slots.shape[0],) and tiles.dtype == np.int32
    flat = ids.reshape(-1)
    for tile, rows in zip(tiles, slots, strict=True):
        real = rows[rows >= 0]
        if tile < 0:
            assert real.size == 0
        else:  # real slots first, all of the tile's expert
            assert rows[0] >= 0 and np.all(flat[real] - offset == tile)
            assert np.all(rows[: real.size] >= 0)
    # Every local slot lies in a tile that runs; same tiles as the coarse ones at ratio 1.
    assert np.sum(tiles >= 0) * fine >= np.sum(np.asarray(meta.sorted_slots) >= 0)
    if coarse == fine:
        np.testing.assert_array_equal(tiles, np.asarray(meta.tile_expert))
    finer = jax.jit(finer_tile_expert, static_argnums=2)
    np.testing.assert_array_equal(finer(meta.sorted_slots, meta.tile_expert, fine), tiles)


def test_finer_tile_expert_needs_a_divisor_of_the_row_tile():
    meta = routing_metadata(jnp.zeros((4, 2), jnp.int32), num_local_experts=2, block_m=32)
    with pytest.raises(ValueError, match="multiple of block_m=64"):
        finer_tile_expert(meta.sorted_slots, meta.tile_expert, 64)
    with pytest.raises(ValueError, match="multiple of block_m=24"):
        finer_tile_expert(meta.sorted_slots, meta.tile_expert, 24)
