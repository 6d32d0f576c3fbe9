"""Tests of the profiling routing generators and seeded profile inputs (CPU)."""

from __future__ import annotations

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_moe.tuning import (
    RoutingDistribution,
    balanced_expert_loads,
    balanced_routing,
    busy_expert_loads,
    profile_inputs,
    profile_routing,
    spread_expert_loads,
)
from jax_moe.tuning.routing_generator import (
    canonical_profile,
    join_profile,
    parse_profile,
    split_profile,
)

_SETTINGS = hypothesis.settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)


def _routing(key, num_tokens, num_experts, top_k, num_local, offset):
    return np.asarray(
        balanced_routing(
            key,
            num_tokens,
            num_experts,
            top_k,
            num_local_experts=num_local,
            local_expert_offset=offset,
        )
    )


def _check_valid(ids: np.ndarray, num_tokens: int, num_experts: int, top_k: int) -> None:
    assert ids.shape == (num_tokens, top_k)
    assert ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < num_experts
    sorted_ids = np.sort(ids, axis=1)
    assert np.all(np.diff(sorted_ids, axis=1) > 0), "a token has a repeated expert"


def _check_balanced(ids, num_tokens, num_experts, top_k, num_local, offset) -> None:
    _check_valid(ids, num_tokens, num_experts, top_k)
    plan = balanced_expert_loads(num_tokens, num_experts, top_k, num_local)
    loads = np.bincount(ids.ravel(), minlength=num_experts)[offset : offset + num_local]
    np.testing.assert_array_equal(loads, plan)
    assert np.all(loads[plan == 0] == 0), "an expert planned for 0 tokens was used"
    # Local slots per token differ by at most one: T // N or T // N + 1.
    is_local = (ids >= offset) & (ids < offset + num_local)
    per_token = is_local.sum(axis=1)
    total = int(plan.sum())
    assert per_token.min() >= total // num_tokens
    assert per_token.max() <= -(-total // num_tokens)


def _plan_is_feasible(num_tokens, num_experts, top_k, num_local) -> bool:
    try:
        balanced_expert_loads(num_tokens, num_experts, top_k, num_local)
    except ValueError:
        return False
    return True


@st.composite
def _balanced_cases(draw):
    ep = draw(st.integers(1, 32))
    num_local = draw(st.integers(1, 8))
    num_experts = ep * num_local
    top_k = draw(st.integers(1, min(num_experts, 8)))
    num_tokens = draw(st.one_of(st.integers(1, 48), st.sampled_from([127, 1000, 4096])))
    offset = draw(st.integers(0, num_experts - num_local))
    seed = draw(st.integers(0, 2**31 - 1))
    return num_tokens, num_experts, top_k, num_local, offset, seed


@_SETTINGS
@hypothesis.given(_balanced_cases())
def test_balanced_routing_invariants(case):
    num_tokens, num_experts, top_k, num_local, offset, seed = case
    key = jax.random.key(seed)
    if not _plan_is_feasible(num_tokens, num_experts, top_k, num_local):
        with pytest.raises(ValueError, match="infeasible balanced plan"):
            _routing(key, num_tokens, num_experts, top_k, num_local, offset)
        return
    ids = _routing(key, num_tokens, num_experts, top_k, num_local, offset)
    _check_balanced(ids, num_tokens, num_experts, top_k, num_local, offset)
    # Deterministic, and the same under an outer jit with static sizes.
    np.testing.assert_array_equal(
        ids, _routing(key, num_tokens, num_experts, top_k, num_local, offset)
    )
    jitted = jax.jit(
        balanced_routing,
        static_argnums=(1, 2, 3),
        static_argnames=("num_local_experts", "local_expert_offset"),
    )
    np.testing.assert_array_equal(
        ids,
        jitted(
            key,
            num_tokens,
            num_experts,
            top_k,
            num_local_experts=num_local,
            local_expert_offset=offset,
        ),
    )


@_SETTINGS
@hypothesis.given(
    num_tokens=st.integers(1, 4096),
    ep=st.integers(1, 32),
    num_local=st.integers(1, 64),
    top_k=st.integers(1, 16),
)
def test_plan_formula(num_tokens, ep, num_local, top_k):
    num_experts = ep * num_local
    hypothesis.assume(top_k <= num_experts)
    total = num_tokens * top_k
    if ep == 1:
        busiest = total
    else:
        avg = total / ep
        busiest = min(total, math.ceil(avg + math.sqrt(avg * math.log(ep))))
    if -(-busiest // num_local) > num_tokens:
        with pytest.raises(ValueError, match="infeasible"):
            balanced_expert_loads(num_tokens, num_experts, top_k, num_local)
        return
    plan = balanced_expert_loads(num_tokens, num_experts, top_k, num_local)
    assert plan.dtype == np.int32 and plan.shape == (num_local,)
    assert int(plan.sum()) == busiest
    assert plan.max() - plan.min() <= 1
    assert np.all(np.diff(plan) <= 0), "the first `rem` experts get one more"
    # The rank carries at least its mean share (what makes the fill feasible).
    assert busiest >= total / ep


@pytest.mark.parametrize("offset", range(0, 9))
def test_every_offset(offset):
    # N=5, E=12, k=3, L=4 (EP 3): every valid offset, including unaligned ones.
    ids = _routing(jax.random.key(offset), 5, 12, 3, 4, offset)
    _check_balanced(ids, 5, 12, 3, 4, offset)


# DeepSeek-V3: E=256, top_k=8. Derived by hand:
#   EP 1 (L=256): T = 8N.          N=1: T=8 -> 8 experts get 1.  N=128: T=1024 -> 4 each.
#                                  N=100: T=800 = 3*256 + 32 -> 32 get 4, 224 get 3.
#   EP 8 (L=32), ln 8 = 2.07944:   N=1: avg 1, sqrt(2.07944)=1.44202, T=ceil(2.44202)=3.
#                                  N=2: avg 2, sqrt(4.15888)=2.03933, T=ceil(4.03933)=5.
#                                  N=128: avg 128, sqrt(266.168)=16.3147, T=145 = 4*32+17.
#                                  N=4096: avg 4096, sqrt(8517.39)=92.2897, T=4189 = 130*32+29.
#   EP 16 (L=16), ln 16 = 2.77259: N=1: avg .5, sqrt(1.38629)=1.17741, T=ceil(1.67741)=2.
#                                  N=16: avg 8, sqrt(22.1807)=4.70964, T=13.
#                                  N=128: avg 64, sqrt(177.446)=13.3209, T=78 = 4*16+14.
#                                  N=4096: avg 2048, sqrt(5678.26)=75.3542, T=2124 = 132*16+12.
_DEEPSEEK_PLANS = [
    # (ep, num_tokens, busiest T, base, rem)
    (1, 1, 8, 0, 8),
    (1, 100, 800, 3, 32),
    (1, 128, 1024, 4, 0),
    (8, 1, 3, 0, 3),
    (8, 2, 5, 0, 5),
    (8, 128, 145, 4, 17),
    (8, 4096, 4189, 130, 29),
    (16, 1, 2, 0, 2),
    (16, 16, 13, 0, 13),
    (16, 128, 78, 4, 14),
    (16, 4096, 2124, 132, 12),
]


@pytest.mark.parametrize("ep,num_tokens,busiest,base,rem", _DEEPSEEK_PLANS)
def test_deepseek_v3_plan_and_routing(ep, num_tokens, busiest, base, rem):
    num_local = 256 // ep
    expected = np.array([base + 1] * rem + [base] * (num_local - rem), dtype=np.int32)
    plan = balanced_expert_loads(num_tokens, 256, 8, num_local)
    np.testing.assert_array_equal(plan, expected)
    assert int(plan.sum()) == busiest
    offset = num_local * (ep - 1)  # The last rank.
    ids = _routing(jax.random.key(3), num_tokens, 256, 8, num_local, offset)
    _check_balanced(ids, num_tokens, 256, 8, num_local, offset)


def test_key_sensitivity():
    keys = [jax.random.key(seed) for seed in range(6)]
    outputs = [_routing(key, 64, 32, 4, 8, 8) for key in keys]
    for i in range(len(outputs)):
        for j in range(i):
            assert not np.array_equal(outputs[i], outputs[j])
    # Raw uint32 keys work too and depend on the seed the same way.
    raw = _routing(jax.random.PRNGKey(0), 64, 32, 4, 8, 8)
    np.testing.assert_array_equal(raw, outputs[0])


def test_traced_key_under_vmap_and_jit():
    keys = jax.random.split(jax.random.key(7), 4)
    batched = jax.jit(jax.vmap(lambda k: balanced_routing(k, 9, 16, 3, num_local_experts=4)))(keys)
    for i in range(4):
        np.testing.assert_array_equal(batched[i], _routing(keys[i], 9, 16, 3, 4, 0))


def _float_ops(jaxpr) -> list[str]:
    found = []
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            if jnp.issubdtype(var.aval.dtype, jnp.floating):
                found.append(str(eqn.primitive))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found += _float_ops(inner)
    return found


@pytest.mark.parametrize("distribution", ["balanced", "spread", "busy", "uniform", "zipf:1.2"])
def test_routing_uses_integer_ops_only(distribution):
    # No floating-point op decides an assignment, so CPU and GPU agree bit for bit.
    fn = lambda key: profile_routing(  # noqa: E731
        key, 7, 12, 3, distribution=distribution, num_local_experts=4, local_expert_offset=4
    )
    jaxpr = jax.make_jaxpr(fn)(jax.random.key(0)).jaxpr
    assert _float_ops(jaxpr) == []


def test_zero_planned_experts_are_unused():
    # EP 16 with one token: T = 2 over 16 local experts; 14 are planned for 0.
    for seed in range(5):
        ids = _routing(jax.random.key(seed), 1, 256, 8, 16, 32)
        local = ids[(ids >= 32) & (ids < 48)]
        assert local.size == 2


def test_all_local_when_no_expert_parallelism():
    ids = _routing(jax.random.key(0), 33, 8, 8, 8, 0)  # Every token takes every expert.
    _check_balanced(ids, 33, 8, 8, 8, 0)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((0, 8, 2), {}, ValueError, "num_tokens=0"),
        ((4, 8, 9), {}, ValueError, "top_k=9"),
        ((4, 8, 0), {}, ValueError, "top_k=0"),
        ((4, 8, 2), {"num_local_experts": 3}, ValueError, "num_local_experts=3"),
        ((4, 8, 2), {"num_local_experts": 16}, ValueError, "num_local_experts=16"),
        ((4, 8, 2), {"num_local_experts": 4, "local_expert_offset": 5}, ValueError, "offset=5"),
        ((4, 8, 2), {"local_expert_offset": -1}, ValueError, "local_expert_offset=-1"),
        ((4.0, 8, 2), {}, TypeError, "num_tokens"),
        ((True, 8, 2), {}, TypeError, "num_tokens"),
        # E=8, L=1 (EP 8), k=8, one token: the rank's share T=3 > L*N=1.
        ((1, 8, 8), {"num_local_experts": 1}, ValueError, "infeasible balanced plan"),
    ],
)
def test_argument_validation(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        balanced_routing(jax.random.key(0), *args, **kwargs)


def test_plan_validation():
    with pytest.raises(ValueError, match="num_local_experts=5"):
        balanced_expert_loads(4, 8, 2, 5)
    with pytest.raises(ValueError, match="infeasible"):
        balanced_expert_loads(2, 16, 16, 8)


@pytest.mark.parametrize("distribution", ["uniform", "zipf", "zipf:0", "zipf:1.5"])
def test_other_distributions_are_valid_and_deterministic(distribution):
    key = jax.random.key(11)
    ids = np.asarray(profile_routing(key, 300, 24, 5, distribution=distribution))
    _check_valid(ids, 300, 24, 5)
    again = profile_routing(key, 300, 24, 5, distribution=RoutingDistribution.parse(distribution))
    np.testing.assert_array_equal(ids, again)
    other = profile_routing(jax.random.key(12), 300, 24, 5, distribution=distribution)
    assert not np.array_equal(ids, other)


def test_zipf_is_skewed_and_uniform_is_not():
    key = jax.random.key(5)
    num_tokens, num_experts, top_k = 4000, 32, 2
    mean = num_tokens * top_k / num_experts

    def loads(distribution):
        ids = profile_routing(key, num_tokens, num_experts, top_k, distribution=distribution)
        return np.bincount(np.asarray(ids).ravel(), minlength=num_experts)

    assert loads("zipf:1.5").max() > 4 * mean
    assert loads("zipf:0").max() < 1.3 * mean
    assert loads("uniform").max() < 1.3 * mean


def test_distribution_parse_and_str():
    for text in ["balanced", "spread", "busy", "uniform", "zipf:1", "zipf:1.2", "zipf:0"]:
        assert str(RoutingDistribution.parse(text)) == text
    assert RoutingDistribution.parse("zipf") == RoutingDistribution("zipf", 1.0)
    for bad in ["gaussian", "uniform:2", "spread:1", "busy:1", "zipf:x", "zipf:-1", ""]:
        with pytest.raises(ValueError):
            RoutingDistribution.parse(bad)
    with pytest.raises(ValueError, match="only meaningful"):
        RoutingDistribution("balanced", 2.0)
    with pytest.raises(TypeError):
        RoutingDistribution.parse(3)


def test_profile_inputs_are_seeded_and_derived():
    key = jax.random.key(21)
    inputs = profile_inputs(key, 16, 64, 32, 4, num_local_experts=8, local_expert_offset=16)
    assert inputs.hidden_states.shape == (16, 64)
    assert inputs.hidden_states.dtype == jnp.bfloat16
    assert inputs.topk_ids.shape == (16, 4) and inputs.topk_ids.dtype == jnp.int32
    assert inputs.topk_weights.shape == (16, 4) and inputs.topk_weights.dtype == jnp.float32
    _check_balanced(np.asarray(inputs.topk_ids), 16, 32, 4, 8, 16)
    weights = np.asarray(inputs.topk_weights)
    assert np.all(weights > 0)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
    assert float(jnp.std(inputs.hidden_states.astype(jnp.float32))) > 0.5

    same = profile_inputs(key, 16, 64, 32, 4, num_local_experts=8, local_expert_offset=16)
    for a, b in zip(
        (inputs.hidden_states, inputs.topk_ids, inputs.topk_weights),
        (same.hidden_states, same.topk_ids, same.topk_weights),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # The routing's key is derived independently of the hidden size and dtype.
    wider = profile_inputs(
        key, 16, 128, 32, 4, dtype=jnp.float32, num_local_experts=8, local_expert_offset=16
    )
    np.testing.assert_array_equal(wider.topk_ids, inputs.topk_ids)
    np.testing.assert_array_equal(wider.topk_weights, inputs.topk_weights)
    other = profile_inputs(jax.random.key(22), 16, 64, 32, 4, num_local_experts=8)
    assert not np.array_equal(
        np.asarray(other.hidden_states, np.float32), np.asarray(inputs.hidden_states, np.float32)
    )


def _binomial_cdf(n, p, i):
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(i + 1))


@pytest.mark.parametrize("kind", ["spread", "busy"])
@_SETTINGS
@hypothesis.given(case=_balanced_cases())
def test_quantile_plans_and_routing_invariants(kind, case):
    num_tokens, num_experts, top_k, num_local, offset, seed = case
    plan_of = spread_expert_loads if kind == "spread" else busy_expert_loads
    if kind == "busy":  # Feasible exactly where the balanced plan is (the same total).
        try:
            balanced_expert_loads(num_tokens, num_experts, top_k, num_local)
        except ValueError:
            with pytest.raises(ValueError, match="infeasible busy plan"):
                plan_of(num_tokens, num_experts, top_k, num_local)
            return
    plan = plan_of(num_tokens, num_experts, top_k, num_local)
    ep = num_experts // num_local
    total = num_tokens * top_k
    if kind == "spread":
        want = total if ep == 1 else min(total, math.ceil(total / ep))
    else:  # The busiest rank's load, the balanced plan's total.
        want = int(balanced_expert_loads(num_tokens, num_experts, top_k, num_local).sum())
    assert plan.dtype == np.int32 and plan.shape == (num_local,)
    assert int(plan.sum()) == want and plan.min() >= 0 and plan.max() <= num_tokens
    assert np.all(np.diff(plan) >= 0)
    np.testing.assert_array_equal(plan, plan_of(num_tokens, num_experts, top_k, num_local))
    ids = np.asarray(
        profile_routing(
            jax.random.key(seed),
            num_tokens,
            num_experts,
            top_k,
            distribution=kind,
            num_local_experts=num_local,
            local_expert_offset=offset,
        )
    )
    _check_valid(ids, num_tokens, num_experts, top_k)
    loads = np.bincount(ids.ravel(), minlength=num_experts)[offset : offset + num_local]
    np.testing.assert_array_equal(np.sort(loads), plan)


def test_spread_plan_follows_the_binomial_quantiles():
    # DeepSeek-V3 EP=8: a typical rank's one slot at N=1; uneven loads around 32 at N=1024.
    np.testing.assert_array_equal(spread_expert_loads(1, 256, 8, 32), [0] * 31 + [1])
    plan = spread_expert_loads(1024, 256, 8, 32)
    assert plan.sum() == 1024 and plan.min() < 26 and plan.max() > 40
    assert (plan <= 32).sum() >= 14  # about half the experts fit a 32-row tile
    # Small exact case: quantiles of Binomial(20, 2/8) at (j + 1/2) / 4, sum ceil(40 / 2).
    n, p = 20, 2 / 8
    quantiles = []
    for j in range(4):
        q = (j + 0.5) / 4
        quantiles.append(next(i for i in range(n + 1) if _binomial_cdf(n, p, i) >= q - 1e-12))
    plan = spread_expert_loads(n, 8, 2, 4)
    assert plan.sum() == 20
    assert np.abs(plan - np.array(quantiles)).sum() <= abs(20 - sum(quantiles)) + 0
    # No expert parallelism: every slot is local.
    assert spread_expert_loads(64, 128, 8, 128).sum() == 512


def test_busy_plan_spreads_the_busiest_load_unevenly():
    # DeepSeek-V3 EP=8, N=32: the balanced plan puts 41 slots on all 32 experts, the
    # spread plan 32 on 20; the busy plan 41 on 23 (Binomial(32, 41/1024) quantiles).
    plan = busy_expert_loads(32, 256, 8, 32)
    assert plan.sum() == balanced_expert_loads(32, 256, 8, 32).sum() == 41
    assert (plan > 0).sum() == 23 and (spread_expert_loads(32, 256, 8, 32) > 0).sum() == 20
    n, p = 32, 41 / (32 * 32)
    quantiles = [
        next(i for i in range(n + 1) if _binomial_cdf(n, p, i) >= (j + 0.5) / 32 - 1e-12)
        for j in range(32)
    ]
    assert np.abs(plan - np.array(quantiles)).sum() == abs(41 - sum(quantiles))
    # Without expert parallelism the busiest rank is the only one: the spread plan.
    np.testing.assert_array_equal(
        busy_expert_loads(64, 128, 8, 128), spread_expert_loads(64, 128, 8, 128)
    )


def test_profiles_split_and_join():
    assert split_profile("balanced") == ("balanced", ())
    assert split_profile("balanced+spread") == ("balanced", ("spread",))
    assert split_profile(" balanced + zipf:1.0 ") == ("balanced", ("zipf:1",))
    assert join_profile(*split_profile("balanced+spread+uniform")) == "balanced+spread+uniform"
    for bad in ["", "balanced+", "balanced+balanced", "balanced+bogus"]:
        with pytest.raises(ValueError):
            split_profile(bad)
    with pytest.raises(TypeError, match="profile"):
        split_profile(None)


def test_profiles_that_only_screen_with_the_primary_routing():
    assert parse_profile("balanced+spread") == ("balanced", ("spread",), True)
    assert parse_profile(" balanced / spread + busy ") == ("balanced", ("spread", "busy"), False)
    assert split_profile("balanced/spread+busy") == ("balanced", ("spread", "busy"))
    assert canonical_profile(" balanced / spread + busy ") == "balanced/spread+busy"
    assert join_profile("balanced", ("zipf:1",), score_primary=False) == "balanced/zipf:1"
    for bad in [
        "balanced/",
        "/spread",
        "balanced+spread/busy",
        "balanced/spread/busy",
        "balanced/balanced",
        "balanced/spread+",
    ]:
        with pytest.raises(ValueError):
            parse_profile(bad)
    with pytest.raises(ValueError, match="needs secondary"):
        join_profile("balanced", (), score_primary=False)
