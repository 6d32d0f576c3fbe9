"""Tests of the router functions against plain numpy, and of the model presets' routing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_moe import models, routing

# --- plain numpy routers (float64, one token at a time) ---


def topk_softmax_numpy(logits, top_k, renormalize):
    logits = np.asarray(logits, np.float64)
    ids = np.zeros((logits.shape[0], top_k), np.int64)
    weights = np.zeros((logits.shape[0], top_k), np.float64)
    for n, row in enumerate(logits):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = sorted(range(row.size), key=lambda e, p=probs: (-p[e], e))[:top_k]
        ids[n] = order
        weights[n] = probs[order]
        if renormalize:
            weights[n] /= weights[n].sum()
    return ids, weights


def deepseek_v3_numpy(logits, bias, top_k, n_group, topk_group, scaling, renormalize=True):
    logits = np.asarray(logits, np.float64)
    bias = np.asarray(bias, np.float64)
    num_tokens, num_experts = logits.shape
    size = num_experts // n_group
    ids = np.zeros((num_tokens, top_k), np.int64)
    weights = np.zeros((num_tokens, top_k), np.float64)
    for n in range(num_tokens):
        scores = 1.0 / (1.0 + np.exp(-logits[n]))
        biased = scores + bias
        group_scores = []
        for g in range(n_group):
            members = sorted(biased[g * size : (g + 1) * size], reverse=True)
            group_scores.append(sum(members[:2]))
        groups = sorted(range(n_group), key=lambda g, s=group_scores: (-s[g], g))[:topk_group]
        candidates = [e for g in groups for e in range(g * size, (g + 1) * size)]
        chosen = sorted(candidates, key=lambda e, b=biased: (-b[e], e))[:top_k]
        ids[n] = chosen
        weights[n] = scores[chosen]
        if renormalize:
            weights[n] /= weights[n].sum()
        weights[n] *= scaling
    return ids, weights


def distinct_logits(seed, num_tokens, num_experts, spacing=0.05):
    """Random logits whose values in a row are at least ``spacing`` apart (no near-ties)."""
    rng = np.random.default_rng(seed)
    ranks = np.stack([rng.permutation(num_experts) for _ in range(num_tokens)])
    offset = rng.normal(size=(num_tokens, 1))
    return (ranks * spacing + offset - num_experts * spacing / 2).astype(np.float32)


# --- topk_softmax ---


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (64, 8), (16, 1), (6, 6)])
def test_topk_softmax_matches_numpy(num_experts, top_k, renormalize):
    logits = distinct_logits(num_experts + top_k, 33, num_experts)
    ids, weights = routing.topk_softmax(jnp.asarray(logits), top_k, renormalize)
    want_ids, want_weights = topk_softmax_numpy(logits, top_k, renormalize)
    assert ids.shape == weights.shape == (33, top_k)
    assert ids.dtype == jnp.int32 and weights.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(weights), want_weights, rtol=2e-6, atol=1e-7)
    if renormalize:
        np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
    else:
        assert np.all(np.asarray(weights).sum(-1) < 1.0 + 1e-6)


def test_topk_softmax_ties_keep_lower_expert_first():
    logits = np.array([[1.0, 3.0, 3.0, 0.5, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], np.float32)
    ids, weights = routing.topk_softmax(jnp.asarray(logits), 3)
    np.testing.assert_array_equal(np.asarray(ids), [[1, 2, 4], [0, 1, 2]])
    np.testing.assert_allclose(np.asarray(weights), 1.0 / 3.0, rtol=1e-6)


def test_topk_softmax_low_precision_logits_use_float32_math():
    logits = jnp.asarray(distinct_logits(3, 16, 32, spacing=0.125), jnp.bfloat16)
    ids, weights = routing.topk_softmax(logits, 4)
    logits = np.asarray(logits.astype(jnp.float32))
    want_ids, want_weights = topk_softmax_numpy(logits, 4, True)
    assert weights.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(weights), want_weights, rtol=2e-6)


def test_topk_softmax_under_jit():
    logits = jnp.asarray(distinct_logits(4, 8, 16))
    eager = routing.topk_softmax(logits, 4, False)
    jitted = jax.jit(routing.topk_softmax, static_argnums=(1, 2))(logits, 4, False)
    np.testing.assert_array_equal(np.asarray(jitted[0]), np.asarray(eager[0]))
    np.testing.assert_allclose(np.asarray(jitted[1]), np.asarray(eager[1]), rtol=1e-6)


@pytest.mark.parametrize(
    ("logits", "top_k", "renormalize", "error", "match"),
    [
        (np.ones((4, 8), np.float32), 0, True, ValueError, "top_k"),
        (np.ones((4, 8), np.float32), 9, True, ValueError, "top_k"),
        (np.ones((4, 8), np.float32), 2.0, True, TypeError, "top_k"),
        (np.ones((4, 8), np.float32), True, True, TypeError, "top_k"),
        (np.ones((4, 8), np.float32), 2, 1, TypeError, "renormalize"),
        (np.ones(8, np.float32), 2, True, ValueError, "logits"),
        (np.ones((2, 4, 8), np.float32), 2, True, ValueError, "logits"),
        (np.ones((4, 8), np.int32), 2, True, TypeError, "logits"),
        (np.ones((4, 0), np.float32), 1, True, ValueError, "logits"),
    ],
)
def test_topk_softmax_errors(logits, top_k, renormalize, error, match):
    with pytest.raises(error, match=match):
        routing.topk_softmax(jnp.asarray(logits), top_k, renormalize)


def test_topk_softmax_rejects_non_array():
    with pytest.raises(TypeError, match="logits must be an array"):
        routing.topk_softmax([[1.0, 2.0]], 1)


# --- deepseek_v3 ---


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(
    ("num_experts", "top_k", "n_group", "topk_group"),
    [(256, 8, 8, 4), (64, 6, 8, 3), (32, 4, 4, 2), (16, 3, 16, 5), (24, 4, 1, 1)],
)
def test_deepseek_v3_matches_numpy(num_experts, top_k, n_group, topk_group, renormalize):
    seed = num_experts * 100 + top_k
    logits = distinct_logits(seed, 24, num_experts, spacing=0.02)
    bias = np.random.default_rng(seed).normal(0.0, 0.1, num_experts).astype(np.float32)
    ids, weights = routing.deepseek_v3(
        jnp.asarray(logits),
        jnp.asarray(bias),
        top_k,
        n_group,
        topk_group,
        2.5,
        renormalize=renormalize,
    )
    want_ids, want_weights = deepseek_v3_numpy(
        logits, bias, top_k, n_group, topk_group, 2.5, renormalize
    )
    assert ids.shape == weights.shape == (24, top_k)
    assert ids.dtype == jnp.int32 and weights.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(weights), want_weights, rtol=2e-6)
    if renormalize:
        np.testing.assert_allclose(np.asarray(weights).sum(-1), 2.5, rtol=1e-6)
    # Every chosen expert lies in one of at most topk_group groups.
    groups = np.asarray(ids) // (num_experts // n_group)
    assert all(len(set(row)) <= topk_group for row in groups)
    assert all(len(set(row)) == top_k for row in np.asarray(ids))


def test_deepseek_v3_group_limit_excludes_best_single_expert():
    # Group 0 holds the best single expert but a weak second; group 1 has two good ones.
    logits = np.full((1, 8), -4.0, np.float32)
    logits[0, 0] = 4.0  # group 0: sigmoid ~0.98 + ~0.02
    logits[0, 2], logits[0, 3] = 2.0, 1.5  # group 1: ~0.88 + ~0.82
    bias = np.linspace(-0.01, 0.01, 8).astype(np.float32)
    ids, weights = routing.deepseek_v3(jnp.asarray(logits), jnp.asarray(bias), 2, 4, 1, 1.0)
    np.testing.assert_array_equal(np.asarray(ids), [[2, 3]])
    # With two groups kept, expert 0 wins.
    ids, _ = routing.deepseek_v3(jnp.asarray(logits), jnp.asarray(bias), 2, 4, 2, 1.0)
    np.testing.assert_array_equal(np.asarray(ids), [[0, 2]])


def test_deepseek_v3_bias_steers_choice_but_not_weights():
    logits = distinct_logits(7, 4, 16)
    bias = np.full(16, -0.001, np.float32)
    bias[11] = 10.0  # always chosen, ranked first
    ids, weights = routing.deepseek_v3(
        jnp.asarray(logits), jnp.asarray(bias), 3, 1, 1, 1.0, renormalize=False
    )
    np.testing.assert_array_equal(np.asarray(ids)[:, 0], 11)
    sig = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    np.testing.assert_allclose(
        np.asarray(weights), np.take_along_axis(sig, np.asarray(ids), 1), rtol=1e-6
    )


def test_deepseek_v3_ties_keep_lower_index_first():
    logits = np.zeros((1, 8), np.float32) + 0.5
    bias = np.array([0.0, 0.0, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0], np.float32)
    ids, weights = routing.deepseek_v3(jnp.asarray(logits), jnp.asarray(bias), 3, 4, 2, 1.0)
    # Groups 1 and 2 tie on score and are both kept; experts 2..5 tie: lowest ids first.
    np.testing.assert_array_equal(np.asarray(ids), [[2, 3, 4]])
    np.testing.assert_allclose(np.asarray(weights), 1.0 / 3.0, rtol=1e-6)


def test_deepseek_v3_under_jit():
    logits = jnp.asarray(distinct_logits(8, 8, 64))
    bias = jnp.asarray(np.random.default_rng(8).normal(0, 0.1, 64).astype(np.float32))
    eager = routing.deepseek_v3(logits, bias, 6, 8, 3, 2.5)
    jitted = jax.jit(routing.deepseek_v3, static_argnums=(2, 3, 4, 5))(logits, bias, 6, 8, 3, 2.5)
    np.testing.assert_array_equal(np.asarray(jitted[0]), np.asarray(eager[0]))
    np.testing.assert_allclose(np.asarray(jitted[1]), np.asarray(eager[1]), rtol=1e-6)


_LOGITS = np.ones((4, 16), np.float32)
_BIAS = np.zeros(16, np.float32)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(correction_bias=np.zeros(8, np.float32)), ValueError, "correction_bias"),
        (dict(correction_bias=np.zeros(16, np.int32)), TypeError, "correction_bias"),
        (dict(correction_bias=[0.0] * 16), TypeError, "correction_bias"),
        (dict(n_group=3), ValueError, "n_group=3 must divide"),
        (dict(n_group=0), ValueError, "n_group"),
        (dict(topk_group=5), ValueError, "topk_group"),
        (dict(top_k=9), ValueError, "top_k"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k=2.0), TypeError, "top_k"),
        (dict(routed_scaling_factor=0.0), ValueError, "routed_scaling_factor"),
        (dict(routed_scaling_factor=float("nan")), ValueError, "routed_scaling_factor"),
        (dict(routed_scaling_factor=float("inf")), ValueError, "routed_scaling_factor"),
        (dict(routed_scaling_factor="2.5"), TypeError, "routed_scaling_factor"),
        (dict(renormalize=None), TypeError, "renormalize"),
        (dict(logits=np.ones((4, 16), np.int32)), TypeError, "logits"),
        (dict(logits=np.ones(16, np.float32)), ValueError, "logits"),
    ],
)
def test_deepseek_v3_errors(kwargs, error, match):
    args = dict(
        logits=_LOGITS,
        correction_bias=_BIAS,
        top_k=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
    )
    args.update(kwargs)
    for name in ("logits", "correction_bias"):
        if isinstance(args[name], np.ndarray):
            args[name] = jnp.asarray(args[name])
    with pytest.raises(error, match=match):
        routing.deepseek_v3(**args)


# --- presets and models.route ---


def test_presets_have_the_real_shapes():
    ds = models.get_preset("deepseek_v3")
    assert (ds.num_experts, ds.top_k, ds.hidden, ds.intermediate) == (256, 8, 7168, 2048)
    assert (ds.router, ds.n_group, ds.topk_group, ds.routed_scaling_factor) == (
        "deepseek_v3",
        8,
        4,
        2.5,
    )
    qwen = models.get_preset("qwen3_30b_a3b")
    assert (qwen.num_experts, qwen.top_k, qwen.hidden, qwen.intermediate) == (128, 8, 2048, 768)
    assert qwen.router == "softmax" and qwen.renormalize
    mixtral = models.get_preset("mixtral_8x7b")
    assert (mixtral.num_experts, mixtral.top_k, mixtral.hidden, mixtral.intermediate) == (
        8,
        2,
        4096,
        14336,
    )
    assert set(models.PRESETS) == {"deepseek_v3", "qwen3_30b_a3b", "mixtral_8x7b", "tiny"}
    assert ds.expert_params == 3 * 7168 * 2048


def test_get_preset_error_lists_valid_names():
    with pytest.raises(ValueError, match="deepseek_v3, mixtral_8x7b, qwen3_30b_a3b, tiny"):
        models.get_preset("llama")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_experts=0), "num_experts"),
        (dict(top_k=9), "top_k"),
        (dict(hidden=100), "hidden must be a multiple of 16"),
        (dict(intermediate=8), "intermediate"),
        (dict(router="sigmoid"), "router"),
        (dict(n_group=3), "n_group"),
        (dict(n_group=2, topk_group=3), "topk_group"),
        (dict(n_group=4, topk_group=1, top_k=3), "top_k=3 exceeds"),
        (dict(routed_scaling_factor=-1.0), "routed_scaling_factor"),
        (dict(renormalize="yes"), "renormalize"),
        (dict(name=""), "name"),
    ],
)
def test_config_validation(kwargs, match):
    args = dict(name="test", num_experts=8, top_k=2, hidden=64, intermediate=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        models.MoEConfig(**args)


def test_expert_slice():
    cfg = models.get_preset("deepseek_v3")
    assert models.expert_slice(cfg, 1, 0) == (256, 0)
    assert models.expert_slice(cfg, 32, 3) == (8, 24)
    with pytest.raises(ValueError, match="must divide"):
        models.expert_slice(cfg, 3, 0)
    with pytest.raises(ValueError, match="rank"):
        models.expert_slice(cfg, 4, 4)


@pytest.mark.parametrize("name", ["tiny", "qwen3_30b_a3b", "deepseek_v3"])
def test_route_uses_the_config_router(name):
    cfg = models.get_preset(name)
    router = models.random_router(jax.random.key(1), cfg)
    hidden = jax.random.normal(jax.random.key(2), (6, cfg.hidden), jnp.bfloat16)
    ids, weights = models.route(cfg, hidden, router)
    logits = np.asarray(hidden, np.float64) @ np.asarray(router.weight, np.float64)
    if cfg.router == "softmax":
        assert router.correction_bias is None
        want_ids, want_weights = topk_softmax_numpy(logits, cfg.top_k, cfg.renormalize)
    else:
        want_ids, want_weights = deepseek_v3_numpy(
            logits,
            router.correction_bias,
            cfg.top_k,
            cfg.n_group,
            cfg.topk_group,
            cfg.routed_scaling_factor,
        )
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(weights), want_weights, rtol=1e-4)


def test_route_errors():
    cfg = models.get_preset("tiny")
    router = models.random_router(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match="hidden_states"):
        models.route(cfg, jnp.ones((4, 128), jnp.float32), router)
    with pytest.raises(TypeError, match="RouterParams"):
        models.route(cfg, jnp.ones((4, 256), jnp.float32), router.weight)
    ds = models.get_preset("deepseek_v3")
    no_bias = models.RouterParams(weight=jnp.ones((ds.hidden, ds.num_experts), jnp.float32))
    with pytest.raises(ValueError, match="correction_bias"):
        models.route(ds, jnp.ones((2, ds.hidden), jnp.float32), no_bias)
