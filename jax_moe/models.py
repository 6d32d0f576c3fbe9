"""MoE layer shapes of real models, and random weights and routing for them.

:data:`PRESETS` maps a name to a :class:`MoEConfig`:

=================  =======  =====  ======  ============  ===========================
name               experts  top_k  hidden  intermediate  router
=================  =======  =====  ======  ============  ===========================
``deepseek_v3``    256      8      7168    2048          sigmoid, 8 groups, keep 4
``qwen3_30b_a3b``  128      8      2048    768           softmax, renormalized
``mixtral_8x7b``   8        2      4096    14336         softmax, renormalized
``tiny``           8        2      256     128           softmax, renormalized
=================  =======  =====  ======  ============  ===========================

(``intermediate`` is the per-expert size of the routed experts; shared experts
and dense layers are outside this library.)

:func:`random_moe_weights` draws NVFP4 weights for a config, expert by expert
from ``fold_in(key, global_expert_id)``, so the experts of an expert-parallel
slice are bit-identical to the same experts of the whole layer and peak memory
is the quantized slice plus one expert's dense weights.
:func:`random_router` and :func:`route` produce ``(topk_ids, topk_weights)``
from hidden states with the config's router.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jax_moe import nvfp4, routing
from jax_moe.weights import MoEWeights

__all__ = [
    "PRESETS",
    "MoEConfig",
    "RouterParams",
    "expert_slice",
    "get_preset",
    "random_moe_weights",
    "random_router",
    "route",
]

_ROUTERS = ("softmax", "deepseek_v3")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Shape and router of one MoE layer.

    Attributes:
      name: a readable name (the preset name for presets).
      num_experts: routed experts of the layer (all ranks together).
      top_k: experts per token.
      hidden: model hidden size, a multiple of 16.
      intermediate: per-expert intermediate size, a multiple of 16.
      router: ``"softmax"`` (:func:`jax_moe.routing.topk_softmax`) or
        ``"deepseek_v3"`` (:func:`jax_moe.routing.deepseek_v3`).
      n_group: expert groups (``deepseek_v3`` router; 1 otherwise).
      topk_group: groups kept per token (``deepseek_v3`` router; 1 otherwise).
      routed_scaling_factor: multiplier of the router weights (``deepseek_v3``).
      renormalize: whether the chosen router weights are rescaled to sum to 1.
    """

    name: str
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    router: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    renormalize: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty str, got {self.name!r}")
        for field in ("num_experts", "top_k", "hidden", "intermediate", "n_group", "topk_group"):
            _positive_int(field, getattr(self, field))
        for field in ("hidden", "intermediate"):
            if getattr(self, field) % nvfp4.BLOCK_SIZE:
                raise ValueError(
                    f"{field} must be a multiple of {nvfp4.BLOCK_SIZE}, got {getattr(self, field)}"
                )
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.router not in _ROUTERS:
            raise ValueError(f"router must be one of {_ROUTERS}, got {self.router!r}")
        if self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide num_experts={self.num_experts}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(
                f"top_k={self.top_k} exceeds the experts of the kept groups "
                f"({self.topk_group} x {self.num_experts // self.n_group})"
            )
        scaling = self.routed_scaling_factor
        if (
            isinstance(scaling, bool)
            or not isinstance(scaling, (int, float))
            or not (0 < scaling < math.inf)
        ):
            raise ValueError(
                f"routed_scaling_factor must be a positive finite float, got {scaling!r}"
            )
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"renormalize must be a bool, got {self.renormalize!r}")

    @property
    def expert_params(self) -> int:
        """Parameters of one expert: ``3 * hidden * intermediate``."""
        return 3 * self.hidden * self.intermediate

    @property
    def expert_nvfp4_bytes(self) -> int:
        """Bytes of one expert in NVFP4: codes, block scales and two global scales."""
        return self.expert_params // 2 + self.expert_params // nvfp4.BLOCK_SIZE + 8


PRESETS: dict[str, MoEConfig] = {
    "deepseek_v3": MoEConfig(
        name="deepseek_v3",
        num_experts=256,
        top_k=8,
        hidden=7168,
        intermediate=2048,
        router="deepseek_v3",
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        renormalize=True,
    ),
    "qwen3_30b_a3b": MoEConfig(
        name="qwen3_30b_a3b", num_experts=128, top_k=8, hidden=2048, intermediate=768
    ),
    "mixtral_8x7b": MoEConfig(
        name="mixtral_8x7b", num_experts=8, top_k=2, hidden=4096, intermediate=14336
    ),
    "tiny": MoEConfig(name="tiny", num_experts=8, top_k=2, hidden=256, intermediate=128),
}
"""The MoE layer shapes of supported models, by name."""


def get_preset(name: str) -> MoEConfig:
    """Returns the preset ``name`` (see :data:`PRESETS`)."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model preset {name!r}; valid names: {', '.join(sorted(PRESETS))}"
        ) from None


def expert_slice(config: MoEConfig, ep_size: int, rank: int) -> tuple[int, int]:
    """``(num_local_experts, local_expert_offset)`` of ``rank`` out of ``ep_size`` ranks.

    The experts are split into ``ep_size`` equal contiguous slices.
    """
    _positive_int("ep_size", ep_size)
    if config.num_experts % ep_size:
        raise ValueError(
            f"ep_size={ep_size} must divide num_experts={config.num_experts} of {config.name}"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < ep_size:
        raise ValueError(f"rank must be an int in [0, ep_size={ep_size}), got {rank!r}")
    num_local = config.num_experts // ep_size
    return num_local, rank * num_local


def random_moe_weights(
    key: jax.Array,
    config: MoEConfig,
    num_local_experts: int | None = None,
    local_expert_offset: int = 0,
    dtype: Any = jnp.bfloat16,
) -> MoEWeights:
    """Random NVFP4 weights of the local experts of ``config``.

    Expert ``g`` (global id) is drawn from ``fold_in(key, g)``: dense weights in
    ``dtype`` with ``w13 ~ N(0, 1/hidden)`` and ``w2 ~ N(0, 1/intermediate)``
    (so activations keep unit scale), then quantized with
    :func:`jax_moe.nvfp4.quantize`, one expert at a time.

    Args:
      key: a ``jax.random`` key.
      config: the layer.
      num_local_experts: experts to draw; defaults to all of them.
      local_expert_offset: global id of the first one.
      dtype: dtype of the dense weights before quantization.

    Returns:
      :class:`MoEWeights` with ``w13 (L, 2I, H)`` and ``w2 (L, H, I)``.
    """
    if num_local_experts is None:
        num_local_experts = config.num_experts - local_expert_offset
    _positive_int("num_local_experts", num_local_experts)
    if (
        isinstance(local_expert_offset, bool)
        or not isinstance(local_expert_offset, int)
        or local_expert_offset < 0
    ):
        raise ValueError(
            f"local_expert_offset must be a non-negative int, got {local_expert_offset!r}"
        )
    if local_expert_offset + num_local_experts > config.num_experts:
        raise ValueError(
            f"local experts [{local_expert_offset}, {local_expert_offset + num_local_experts}) "
            f"exceed num_experts={config.num_experts} of {config.name}"
        )
    if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    ids = jnp.arange(local_expert_offset, local_expert_offset + num_local_experts)
    weights = _random_experts(key, ids, config.hidden, config.intermediate, jnp.dtype(dtype))
    weights.check()
    return weights


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _random_experts(
    key: jax.Array, expert_ids: jax.Array, hidden: int, intermediate: int, dtype: Any
) -> MoEWeights:
    def one_expert(expert_id: jax.Array) -> tuple[nvfp4.Nvfp4Tensor, nvfp4.Nvfp4Tensor]:
        k13, k2 = jax.random.split(jax.random.fold_in(key, expert_id))
        w13 = jax.random.normal(k13, (2 * intermediate, hidden), jnp.float32)
        w2 = jax.random.normal(k2, (hidden, intermediate), jnp.float32)
        w13 = (w13 / math.sqrt(hidden)).astype(dtype)
        w2 = (w2 / math.sqrt(intermediate)).astype(dtype)
        return nvfp4.quantize(w13), nvfp4.quantize(w2)

    w13, w2 = jax.lax.map(one_expert, expert_ids)
    return MoEWeights(w13=w13, w2=w2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RouterParams:
    """Router parameters of one MoE layer.

    Attributes:
      weight: ``float32 (hidden, num_experts)``; ``logits = hidden_states @ weight``.
      correction_bias: ``float32 (num_experts,)`` for the ``deepseek_v3`` router,
        ``None`` otherwise.
    """

    weight: jax.Array
    correction_bias: jax.Array | None = None


def random_router(key: jax.Array, config: MoEConfig) -> RouterParams:
    """A random router for ``config``: ``weight ~ N(0, 1/hidden)`` (unit-scale logits
    for unit-scale hidden states) and, for ``deepseek_v3``, ``correction_bias ~ N(0, 0.1^2)``.
    """
    k_w, k_b = jax.random.split(key)
    weight = jax.random.normal(k_w, (config.hidden, config.num_experts), jnp.float32)
    weight = weight / math.sqrt(config.hidden)
    bias = None
    if config.router == "deepseek_v3":
        bias = 0.1 * jax.random.normal(k_b, (config.num_experts,), jnp.float32)
    return RouterParams(weight=weight, correction_bias=bias)


def route(
    config: MoEConfig, hidden_states: jax.Array, router: RouterParams
) -> tuple[jax.Array, jax.Array]:
    """Routes tokens with the config's router.

    Args:
      config: the layer.
      hidden_states: ``(num_tokens, hidden)`` float.
      router: the router parameters (see :func:`random_router`).

    Returns:
      ``topk_ids`` int32 and ``topk_weights`` float32, both ``(num_tokens, top_k)``.
    """
    if not isinstance(router, RouterParams):
        raise TypeError(f"router must be a RouterParams, got {type(router).__name__}")
    if hidden_states.ndim != 2 or hidden_states.shape[1] != config.hidden:
        raise ValueError(
            f"hidden_states must be (num_tokens, hidden={config.hidden}), got shape "
            f"{hidden_states.shape}"
        )
    if tuple(router.weight.shape) != (config.hidden, config.num_experts):
        raise ValueError(
            f"router.weight must have shape (hidden, num_experts) = "
            f"{(config.hidden, config.num_experts)}, got {router.weight.shape}"
        )
    logits = jnp.einsum(
        "nh,he->ne",
        hidden_states.astype(jnp.float32),
        router.weight.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    if config.router == "softmax":
        return routing.topk_softmax(logits, config.top_k, renormalize=config.renormalize)
    if router.correction_bias is None:
        raise ValueError(f"the deepseek_v3 router of {config.name} needs router.correction_bias")
    return routing.deepseek_v3(
        logits,
        router.correction_bias,
        config.top_k,
        config.n_group,
        config.topk_group,
        float(config.routed_scaling_factor),
        renormalize=config.renormalize,
    )
