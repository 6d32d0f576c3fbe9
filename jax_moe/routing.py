"""Router functions: from router logits to each token's experts and weights.

Every router takes ``logits`` of shape ``(num_tokens, num_experts)`` and
returns ``(topk_ids, topk_weights)``:

``topk_ids``: ``int32 (num_tokens, top_k)``
    Global expert ids, distinct within a row, in descending order of the
    score the router ranks by; equal scores keep the lower expert id first.
``topk_weights``: ``float32 (num_tokens, top_k)``
    The router weight of each chosen expert, the multiplier of that expert's
    output in :func:`jax_moe.fused_moe`.

All arithmetic is float32 whatever the dtype of ``logits``. The functions are
jittable; ``top_k`` and the group parameters are static Python values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["deepseek_v3", "topk_softmax"]


def _check_logits(logits: jax.Array) -> jax.Array:
    if not hasattr(logits, "dtype") or not hasattr(logits, "shape"):
        raise TypeError(f"logits must be an array, got {type(logits).__name__}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must be a floating-point array, got {logits.dtype}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be (num_tokens, num_experts), got shape {logits.shape}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one expert, got shape {logits.shape}")
    return logits.astype(jnp.float32)


def _check_positive_int(name: str, value: object, upper: int, upper_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__} {value!r}")
    if not 1 <= value <= upper:
        raise ValueError(f"{name} must be in [1, {upper_name}={upper}], got {value}")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def topk_softmax(
    logits: jax.Array, top_k: int, renormalize: bool = True
) -> tuple[jax.Array, jax.Array]:
    """Softmax over all experts, then the ``top_k`` largest probabilities.

    This is the router of Mixtral and Qwen3-MoE. With ``renormalize`` the
    chosen probabilities are divided by their sum (so each row sums to 1,
    which equals a softmax over the chosen logits); without it they are the
    plain softmax probabilities.

    Args:
      logits: ``(num_tokens, num_experts)`` float router logits.
      top_k: experts per token, ``1 <= top_k <= num_experts``.
      renormalize: whether to rescale the chosen weights to sum to 1.

    Returns:
      ``topk_ids`` int32 ``(num_tokens, top_k)`` and ``topk_weights`` float32
      ``(num_tokens, top_k)``, in descending order of probability.
    """
    logits = _check_logits(logits)
    top_k = _check_positive_int("top_k", top_k, logits.shape[1], "num_experts")
    renormalize = _check_bool("renormalize", renormalize)
    return _topk_softmax_values(logits, top_k, renormalize)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _topk_softmax_values(
    logits: jax.Array, top_k: int, renormalize: bool
) -> tuple[jax.Array, jax.Array]:
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), weights.astype(jnp.float32)


def deepseek_v3(
    logits: jax.Array,
    correction_bias: jax.Array,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    *,
    renormalize: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """The DeepSeek-V3 router: sigmoid scores, group-limited top-k.

    With ``s = sigmoid(logits)`` and ``b = s + correction_bias``:

    1. the experts are split into ``n_group`` equal, contiguous groups; a
       group's score is the sum of its two largest ``b`` (its one ``b`` if a
       group has a single expert);
    2. the ``topk_group`` best groups are kept (equal scores: lower group first);
    3. the ``top_k`` experts with the largest ``b`` inside the kept groups are
       chosen (equal scores: lower id first);
    4. their weights are the unbiased scores ``s``, divided by their sum when
       ``renormalize`` (plus ``1e-20``), then multiplied by
       ``routed_scaling_factor``.

    The correction bias only steers the choice; it never enters the weights.

    Args:
      logits: ``(num_tokens, num_experts)`` float router logits.
      correction_bias: ``(num_experts,)`` float score correction bias.
      top_k: experts per token, at most ``topk_group * num_experts // n_group``.
      n_group: number of expert groups, dividing ``num_experts``.
      topk_group: groups kept per token, ``1 <= topk_group <= n_group``.
      routed_scaling_factor: positive multiplier of the final weights.
      renormalize: whether to divide the chosen scores by their sum (DeepSeek-V3
        does).

    Returns:
      ``topk_ids`` int32 ``(num_tokens, top_k)`` and ``topk_weights`` float32
      ``(num_tokens, top_k)``, in descending order of the biased score ``b``.
    """
    logits = _check_logits(logits)
    num_tokens, num_experts = logits.shape
    if not hasattr(correction_bias, "dtype") or not hasattr(correction_bias, "shape"):
        raise TypeError(f"correction_bias must be an array, got {type(correction_bias).__name__}")
    if not jnp.issubdtype(correction_bias.dtype, jnp.floating):
        raise TypeError(
            f"correction_bias must be a floating-point array, got {correction_bias.dtype}"
        )
    if tuple(correction_bias.shape) != (num_experts,):
        raise ValueError(
            f"correction_bias must have shape (num_experts,) = ({num_experts},), got "
            f"{correction_bias.shape}"
        )
    n_group = _check_positive_int("n_group", n_group, num_experts, "num_experts")
    if num_experts % n_group:
        raise ValueError(f"n_group={n_group} must divide num_experts={num_experts}")
    topk_group = _check_positive_int("topk_group", topk_group, n_group, "n_group")
    group_size = num_experts // n_group
    top_k = _check_positive_int(
        "top_k", top_k, topk_group * group_size, "topk_group * num_experts // n_group"
    )
    if isinstance(routed_scaling_factor, bool) or not isinstance(
        routed_scaling_factor, (int, float)
    ):
        raise TypeError(
            "routed_scaling_factor must be a Python float, got "
            f"{type(routed_scaling_factor).__name__} {routed_scaling_factor!r}"
        )
    if not routed_scaling_factor > 0 or routed_scaling_factor == float("inf"):
        raise ValueError(
            f"routed_scaling_factor must be positive and finite, got {routed_scaling_factor}"
        )
    renormalize = _check_bool("renormalize", renormalize)

    return _deepseek_v3_values(
        logits,
        correction_bias.astype(jnp.float32),
        top_k,
        n_group,
        topk_group,
        float(routed_scaling_factor),
        renormalize,
    )


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _deepseek_v3_values(
    logits: jax.Array,
    correction_bias: jax.Array,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renormalize: bool,
) -> tuple[jax.Array, jax.Array]:
    num_tokens, num_experts = logits.shape
    group_size = num_experts // n_group
    scores = jax.nn.sigmoid(logits)
    biased = scores + correction_bias[None, :]
    grouped = biased.reshape(num_tokens, n_group, group_size)
    best_in_group, _ = jax.lax.top_k(grouped, min(2, group_size))
    group_scores = jnp.sum(best_in_group, axis=-1)
    _, kept_groups = jax.lax.top_k(group_scores, topk_group)
    group_kept = jnp.any(kept_groups[:, :, None] == jnp.arange(n_group)[None, None, :], axis=1)
    expert_kept = jnp.repeat(group_kept, group_size, axis=1)
    candidates = jnp.where(expert_kept, biased, -jnp.inf)
    _, ids = jax.lax.top_k(candidates, top_k)
    weights = jnp.take_along_axis(scores, ids, axis=1)
    if renormalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    weights = weights * jnp.float32(routed_scaling_factor)
    return ids.astype(jnp.int32), weights.astype(jnp.float32)
