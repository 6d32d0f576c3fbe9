"""Tests of the float32 reference MoE against a naive per-token numpy loop."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

import jax_moe
from jax_moe import nvfp4, reference

EXPERTS, HIDDEN, INTER = 8, 64, 32


@functools.cache
def layer_weights(experts: int = EXPERTS, hidden: int = HIDDEN, inter: int = INTER):
    rng = np.random.default_rng(experts * 1000 + hidden + inter)
    w13 = rng.normal(size=(experts, 2 * inter, hidden)) / np.sqrt(hidden)
    w2 = rng.normal(size=(experts, hidden, inter)) / np.sqrt(inter)
    return jax_moe.quantize_moe_weights(jnp.asarray(w13, jnp.float32), jnp.asarray(w2, jnp.float32))


def random_routing(seed, num_tokens, num_experts, top_k, id_range=None):
    """Distinct random ids per token (drawn from ``id_range``) and positive weights."""
    rng = np.random.default_rng(seed)
    lo, hi = id_range if id_range is not None else (0, num_experts)
    ids = np.stack([rng.choice(np.arange(lo, hi), top_k, replace=False) for _ in range(num_tokens)])
    weights = rng.uniform(0.1, 1.0, size=(num_tokens, top_k))
    return jnp.asarray(ids, jnp.int32), jnp.asarray(weights, jnp.float32)


def naive_moe(hidden, weights, topk_ids, topk_weights, local_expert_offset=0):
    """One token, one slot at a time, in float64 numpy."""
    w13 = np.asarray(nvfp4.dequantize(weights.w13), np.float64)
    w2 = np.asarray(nvfp4.dequantize(weights.w2), np.float64)
    x = np.asarray(jnp.asarray(hidden).astype(jnp.float32), np.float64)
    ids = np.asarray(topk_ids)
    router = np.asarray(topk_weights, np.float64)
    inter = w2.shape[2]
    out = np.zeros(x.shape, np.float64)
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[n, j]) - local_expert_offset
            if not 0 <= e < w13.shape[0]:
                continue
            gate_up = w13[e] @ x[n]
            gate, up = gate_up[:inter], gate_up[inter:]
            act = gate / (1.0 + np.exp(-gate)) * up
            out[n] += router[n, j] * (w2[e] @ act)
    return out


def hidden_states(seed, num_tokens, hidden=HIDDEN, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), (num_tokens, hidden), jnp.float32).astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(("num_tokens", "top_k"), [(1, 1), (13, 2), (24, 4)])
def test_reference_matches_naive_loop(num_tokens, top_k, dtype):
    weights = layer_weights()
    x = hidden_states(num_tokens, num_tokens, dtype=dtype)
    ids, router = random_routing(num_tokens + top_k, num_tokens, EXPERTS, top_k)
    out = reference.fused_moe(x, weights, ids, router)
    assert out.dtype == jnp.float32 and out.shape == (num_tokens, HIDDEN)
    assert_close(out, naive_moe(x, weights, ids, router), jnp.float32)


def test_reference_under_jit_matches_eager():
    weights = layer_weights()
    x = hidden_states(1, 16, dtype=jnp.bfloat16)
    ids, router = random_routing(1, 16, EXPERTS, 2)
    eager = reference.fused_moe(x, weights, ids, router)
    jitted = jax.jit(reference.fused_moe)(x, weights, ids, router)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ep_size", [2, 4])
def test_expert_parallel_slices_sum_to_the_whole_layer(ep_size):
    weights = layer_weights()
    x = hidden_states(2, 20)
    ids, router = random_routing(2, 20, EXPERTS, 3)
    whole = reference.fused_moe(x, weights, ids, router)
    per_rank = EXPERTS // ep_size
    total = np.zeros(whole.shape, np.float64)
    for rank in range(ep_size):
        offset = rank * per_rank
        local = jax.tree.map(lambda a, o=offset: a[o : o + per_rank], weights)
        out = reference.fused_moe(
            x, local, ids, router, num_local_experts=per_rank, local_expert_offset=offset
        )
        assert_close(out, naive_moe(x, local, ids, router, offset), jnp.float32)
        # Tokens with no expert on this rank get exact zeros.
        ids_np = np.asarray(ids)
        no_local = ~np.any((ids_np >= offset) & (ids_np < offset + per_rank), axis=1)
        np.testing.assert_array_equal(np.asarray(out)[no_local], 0.0)
        total += np.asarray(out, np.float64)
    assert_close(total, whole, jnp.float32)


def test_token_without_local_expert_gives_zero():
    weights = layer_weights()
    local = jax.tree.map(lambda a: a[2:4], weights)
    x = hidden_states(3, 3)
    ids = jnp.asarray([[0, 5], [2, 7], [6, 1]], jnp.int32)
    router = jnp.asarray([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]], jnp.float32)
    out = np.asarray(
        reference.fused_moe(x, local, ids, router, num_local_experts=2, local_expert_offset=2)
    )
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[2], 0.0)
    assert np.all(np.abs(out[1]) > 0) or np.any(out[1] != 0)
    assert_close(out, naive_moe(x, local, ids, router, 2), jnp.float32)


def test_ids_outside_the_layer_and_repeated_ids():
    weights = layer_weights()
    x = hidden_states(4, 4)
    # -1 and out-of-range ids select nothing; a repeated id gets both weights.
    ids = jnp.asarray([[-1, 3], [3, 3], [100, 2], [5, 1]], jnp.int32)
    router = jnp.asarray([[0.9, 0.2], [0.2, 0.5], [0.8, 0.6], [0.3, 0.4]], jnp.float32)
    out = np.asarray(reference.fused_moe(x, weights, ids, router))
    assert_close(out, naive_moe(x, weights, ids, router), jnp.float32)
    single = np.asarray(
        reference.fused_moe(x, weights, jnp.asarray([[3]] * 4), jnp.full((4, 1), 0.7))
    )
    assert_close(out[1], single[1], jnp.float32)


def test_router_weights_scale_linearly_and_ids_dtype_is_free():
    weights = layer_weights()
    x = hidden_states(5, 6)
    ids, router = random_routing(5, 6, EXPERTS, 2)
    base = np.asarray(reference.fused_moe(x, weights, ids, router))
    doubled = np.asarray(reference.fused_moe(x, weights, ids.astype(jnp.int16), 2.0 * router))
    assert_close(doubled, 2.0 * base, jnp.float32)


def test_swiglu():
    rng = np.random.default_rng(6)
    gate_up = rng.normal(size=(5, 2, 24)).astype(np.float32)
    out = np.asarray(reference.swiglu(jnp.asarray(gate_up)))
    gate, up = gate_up[..., :12].astype(np.float64), gate_up[..., 12:].astype(np.float64)
    np.testing.assert_allclose(out, gate / (1 + np.exp(-gate)) * up, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="gate_up must have an even last dim"):
        reference.swiglu(jnp.ones((3, 5)))


def test_local_slot_weights():
    ids = jnp.asarray([[0, 4, 5], [7, 2, 6], [-1, 8, 4]], jnp.int32)
    weights = jnp.asarray(np.linspace(0.1, 0.9, 9).reshape(3, 3), jnp.bfloat16)
    local_ids, local_weights = reference.local_slot_weights(ids, weights, 3, 4)
    np.testing.assert_array_equal(np.asarray(local_ids), [[-1, 0, 1], [-1, -1, 2], [-1, -1, 0]])
    assert local_ids.dtype == jnp.int32 and local_weights.dtype == jnp.float32
    expected = np.where(np.asarray(local_ids) >= 0, np.asarray(weights, np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(local_weights), expected)


def _call(**overrides):
    weights = layer_weights()
    args = dict(
        hidden_states=hidden_states(0, 4),
        weights=weights,
        topk_ids=jnp.asarray([[0, 1]] * 4, jnp.int32),
        topk_weights=jnp.full((4, 2), 0.5, jnp.float32),
    )
    args.update(overrides)
    return reference.fused_moe(**args)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (dict(hidden_states=jnp.ones(64)), ValueError, "hidden_states must be"),
        (dict(hidden_states=jnp.ones((4, 64), jnp.int32)), TypeError, "hidden_states"),
        (dict(hidden_states=jnp.ones((4, 32))), ValueError, "hidden size"),
        (dict(hidden_states=np.ones((4, 64), np.float64).tolist()), TypeError, "array"),
        (dict(weights="w"), TypeError, "weights must be a jax_moe.MoEWeights"),
        (dict(topk_ids=jnp.ones((4, 2), jnp.float32)), TypeError, "topk_ids must be an integer"),
        (dict(topk_ids=jnp.ones((3, 2), jnp.int32)), ValueError, "topk_ids must be"),
        (dict(topk_ids=jnp.ones((4, 0), jnp.int32)), ValueError, "topk_ids must be"),
        (dict(topk_weights=jnp.ones((4, 3))), ValueError, "topk_weights must have the shape"),
        (dict(topk_weights=jnp.ones((4, 2), jnp.int32)), TypeError, "topk_weights must be"),
        (dict(num_local_experts=4), ValueError, "num_local_experts=4 but weights hold 8"),
        (dict(num_local_experts=8.0), TypeError, "num_local_experts"),
        (dict(local_expert_offset=-1), ValueError, "local_expert_offset"),
        (dict(local_expert_offset=True), TypeError, "local_expert_offset"),
    ],
)
def test_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_malformed_weights_are_rejected():
    weights = layer_weights()
    bad = jax_moe.MoEWeights(w13=weights.w13, w2=jax.tree.map(lambda a: a[:2], weights.w2))
    with pytest.raises(ValueError, match="weights.w2 must have logical shape"):
        _call(weights=bad)
