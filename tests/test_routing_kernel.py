"""The routing-metadata kernel (`routing_sm90`) against the jitted JAX version.

The kernel must give the same three arrays bit for bit. GPU tests need a CUDA
GPU and the built extension; the argument checks (Python wrapper and the FFI
handler's CPU check target) run everywhere the extension is built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import requires_gpu

from jax_moe import _ffi
from jax_moe.kernels.routing_config import (
    DEFAULT_ROUTING_SM90_TACTIC,
    MAX_LOCAL_EXPERTS,
    MULTI_BLOCK_ROUTING_SLOTS,
    ROUTING_SM90_TACTICS,
    SMALL_ROUTING_SLOTS,
    RoutingSm90Tactic,
    routing_tactic,
)
from jax_moe.routing_metadata import padded_rows, routing_metadata

requires_extension = pytest.mark.skipif(
    not _ffi.is_available(), reason="the jax_moe CUDA extension is not built"
)


def _random_ids(seed: int, num_tokens: int, top_k: int, num_experts: int) -> np.ndarray:
    """Distinct experts per token, uniformly at random."""
    rng = np.random.default_rng(seed)
    keys = rng.random((num_tokens, num_experts))
    return np.argsort(keys, axis=1)[:, :top_k].astype(np.int32)


def _check_same(ids: np.ndarray, num_local: int, block_m: int, offset: int, variant=None) -> None:
    args = dict(num_local_experts=num_local, block_m=block_m, local_expert_offset=offset)
    want = jax.jit(lambda x: routing_metadata(x, **args))(jnp.asarray(ids))
    got = jax.jit(lambda x: _ffi.routing_metadata(x, **args, variant=variant))(jnp.asarray(ids))
    for name, w, g in zip(want._fields, want, got, strict=True):
        w, g = np.asarray(w), np.asarray(g)
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape)
        bad = np.flatnonzero(g != w)
        assert bad.size == 0, f"{name}: {bad.size} entries differ, first at {bad[:5]}"


# (num_tokens, top_k, num_experts, num_local, block_m, offset)
CASES = [
    (1, 8, 256, 32, 16, 0),  # DeepSeek-V3 EP=8, one token
    (1, 8, 256, 256, 16, 0),  # EP=1: every expert local, most empty
    (5, 8, 256, 32, 16, 96),  # rank 3 of 8
    (128, 8, 256, 32, 16, 0),
    (1000, 8, 256, 32, 64, 224),  # last rank, segments not multiples of block_m
    (333, 6, 64, 16, 32, 48),
    (2048, 8, 128, 128, 128, 0),  # Qwen3-like EP=1
    (16384, 8, 256, 32, 64, 0),  # 131072 slots: every warp walks many chunks
    (8192, 8, 128, 128, 64, 0),  # Qwen3 N=8192: 32 blocks of 2048 slots
    (513, 8, 256, 256, 128, 0),  # 4104 slots: two blocks, the last one longer
    (40000, 8, 256, 32, 16, 64),  # 320000 slots: ranges of 10240, a remainder
    (600, 7, 64, 64, 1, 0),  # 4200 slots, block_m = 1
    (4096, 2, 8, 8, 16, 0),  # Mixtral-like
    (3, 1, 4, 1, 1, 2),  # block_m = 1, one local expert
    (37, 4, 300, 256, 8, 44),  # 256 local experts of 300, offset
]


@requires_gpu
@pytest.mark.parametrize("variant", ROUTING_SM90_TACTICS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_kernel_matches_the_jax_metadata(case, variant):
    num_tokens, top_k, num_experts, num_local, block_m, offset = case
    ids = _random_ids(sum(case), num_tokens, top_k, num_experts)
    _check_same(ids, num_local, block_m, offset, variant)


@requires_gpu
@pytest.mark.parametrize("variant", (None, *ROUTING_SM90_TACTICS), ids=str)
def test_kernel_edge_routings(variant):
    # None: the default choice (routing_tactic).
    rng = np.random.default_rng(0)
    # Every token on the same local expert (first choice), the rest elsewhere.
    ids = np.stack([np.full(500, 3), 40 + rng.integers(0, 200, 500)], axis=1).astype(np.int32)
    _check_same(ids, 32, 16, 0, variant)
    # All slots on one expert, many blocks (the multi-block tactic by default).
    _check_same(np.full((3000, 4), 7, np.int32), 32, 64, 0, variant)
    # No local slot at all: every tile -1, every slot_row -1.
    _check_same((100 + rng.integers(0, 50, (64, 4))).astype(np.int32), 32, 16, 0, variant)
    _check_same((100 + rng.integers(0, 50, (2000, 4))).astype(np.int32), 32, 16, 0, variant)
    # Negative and huge ids are simply non-local.
    ids = rng.integers(0, 64, (2560, 4)).astype(np.int32)
    ids[::7, 0] = -5
    ids[::11, 1] = np.iinfo(np.int32).max
    _check_same(ids, 32, 32, 8, variant)
    # No tokens: every output empty.
    _check_same(np.zeros((0, 8), np.int32), 32, 16, 0, variant)


@requires_gpu
@pytest.mark.parametrize(
    "dtype, num_experts, num_local, offset",
    [(np.uint8, 256, 32, 224), (np.int8, 128, 200, 0), (np.uint32, 300, 100, 200)],
)
def test_kernel_takes_narrow_and_unsigned_ids(dtype, num_experts, num_local, offset):
    ids = _random_ids(num_local, 300, 4, num_experts)
    want = jax.jit(
        lambda x: routing_metadata(
            x, num_local_experts=num_local, block_m=16, local_expert_offset=offset
        )
    )(jnp.asarray(ids))  # int32 ids: the reference
    got = jax.jit(
        lambda x: _ffi.routing_metadata(
            x, num_local_experts=num_local, block_m=16, local_expert_offset=offset
        )
    )(jnp.asarray(ids.astype(dtype)))
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@requires_gpu
def test_kernel_is_deterministic_and_writes_every_entry():
    ids = jnp.asarray(_random_ids(7, 4096, 8, 256))
    fn = jax.jit(lambda x: _ffi.routing_metadata(x, num_local_experts=32, block_m=32))
    first = [np.asarray(a) for a in fn(ids)]
    for _ in range(5):
        # Fill the allocator's free memory with a pattern the kernel must overwrite.
        jax.block_until_ready(jnp.full((1 << 22,), 0x7EADBEEF, jnp.int32))
        again = [np.asarray(a) for a in fn(ids)]
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(a, b)


@requires_extension
def test_wrapper_rejects_bad_arguments():
    ids = jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(ValueError, match="expected \\(num_tokens, top_k\\)"):
        _ffi.routing_metadata(ids.reshape(-1), num_local_experts=4, block_m=16)
    with pytest.raises(TypeError, match="integer dtype"):
        _ffi.routing_metadata(ids.astype(jnp.float32), num_local_experts=4, block_m=16)
    with pytest.raises(ValueError, match="block_m"):
        _ffi.routing_metadata(ids, num_local_experts=4, block_m=0)
    with pytest.raises(ValueError, match="local_expert_offset"):
        _ffi.routing_metadata(ids, num_local_experts=4, block_m=16, local_expert_offset=-1)
    with pytest.raises(NotImplementedError, match=f"at most {MAX_LOCAL_EXPERTS}"):
        _ffi.routing_metadata(ids, num_local_experts=MAX_LOCAL_EXPERTS + 1, block_m=16)


def test_tactic_fields_are_validated():
    assert DEFAULT_ROUTING_SM90_TACTIC.warps == 32
    assert routing_tactic(1).warps == 4 and routing_tactic(SMALL_ROUTING_SLOTS).warps == 4
    assert routing_tactic(SMALL_ROUTING_SLOTS + 1).warps == 32
    assert routing_tactic(MULTI_BLOCK_ROUTING_SLOTS).blocks == 1
    assert routing_tactic(MULTI_BLOCK_ROUTING_SLOTS + 1).blocks == 32
    with pytest.raises(ValueError, match="threads=512"):
        RoutingSm90Tactic(threads=512)
    with pytest.raises(ValueError, match="blocks=2"):
        RoutingSm90Tactic(blocks=2)
    with pytest.raises(ValueError, match="max_local_experts=512"):
        RoutingSm90Tactic(max_local_experts=512)


def _raw_check(ids_len, m_pad, tiles, rows, num_local, block_m, offset, variant=0):
    cpu = jax.devices("cpu")[0]
    i32 = jnp.int32
    call = jax.ffi.ffi_call(
        "jax_moe_routing_check",
        (
            jax.ShapeDtypeStruct((m_pad,), i32),
            jax.ShapeDtypeStruct((tiles,), i32),
            jax.ShapeDtypeStruct((rows,), i32),
        ),
    )
    ids = jax.device_put(jnp.zeros((ids_len,), i32), cpu)
    fn = jax.jit(
        lambda x: call(
            x,
            num_local_experts=np.int32(num_local),
            block_m=np.int32(block_m),
            local_expert_offset=np.int32(offset),
            variant=np.int32(variant),
        )
    )
    try:
        jax.block_until_ready(fn(ids))
    except Exception as error:  # the runtime's error type differs between jax versions
        return str(error)
    return None


@requires_extension
def test_handler_checks_on_cpu():
    _ffi.register_cpu_checks()
    m_pad = padded_rows(16, 4, 8)  # 16 slots, 4 local experts, block_m 8: 48 rows
    assert _raw_check(16, m_pad, m_pad // 8, 16, 4, 8, 0) is None  # a good call
    bad = {
        "m_pad": ((16, m_pad + 8, m_pad // 8 + 1, 16, 4, 8, 0), "expected m_pad = 48"),
        "tiles": ((16, m_pad, m_pad // 8 - 1, 16, 4, 8, 0), "expected m_pad / block_m"),
        "rows": ((16, m_pad, m_pad // 8, 15, 4, 8, 0), "expected num_slots = 16"),
        "local": ((16, m_pad, m_pad // 8, 16, 257, 8, 0), "expected [1, 256]"),
        "zero_local": ((16, m_pad, m_pad // 8, 16, 0, 8, 0), "expected [1, 256]"),
        "block_m": ((16, m_pad, m_pad // 8, 16, 4, 0, 0), "block_m = 0"),
        "offset": ((16, m_pad, m_pad // 8, 16, 4, 8, -1), "local_expert_offset = -1"),
        "offset_past_int32": ((16, m_pad, m_pad // 8, 16, 4, 8, 2**31 - 2), "exceeds int32"),
        "variant": ((16, m_pad, m_pad // 8, 16, 4, 8, 0, 5), "variant = 5"),
    }
    for name, (args, expected) in bad.items():
        message = _raw_check(*args)
        assert message is not None, f"the handler accepted the bad call {name!r}"
        assert expected in message and "INVALID_ARGUMENT" in message, (name, message)


@requires_extension
def test_fused_moe_uses_the_kernel_up_to_its_expert_limit():
    from types import SimpleNamespace

    from jax_moe import gpu

    def problem(num_local, offset=0, num_tokens=64, top_k=8, num_experts=256):
        return SimpleNamespace(
            num_local_experts=num_local,
            local_expert_offset=offset,
            num_tokens=num_tokens,
            top_k=top_k,
            num_experts=num_experts,
        )

    assert gpu.uses_routing_kernel(problem(MAX_LOCAL_EXPERTS))
    assert gpu.uses_routing_kernel(problem(1, 255))
    assert not gpu.uses_routing_kernel(problem(MAX_LOCAL_EXPERTS + 1, num_experts=512))
    # ids past int32
    assert not gpu.uses_routing_kernel(problem(8, 2**31 - 4, num_experts=2**31 + 4))
    # Many local slots too (the multi-block tactic).
    assert gpu.uses_routing_kernel(problem(128, num_tokens=2**16, num_experts=128))
