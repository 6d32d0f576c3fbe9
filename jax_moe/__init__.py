"""jax_moe: NVFP4 Mixture-of-Experts layers for JAX.

Public entry points:

* :func:`fused_moe` - the MoE layer (GPU kernels on CUDA, a pure-JAX path elsewhere).
* :class:`MoEWeights`, :func:`quantize_moe_weights` - NVFP4 expert weights.
* :mod:`jax_moe.nvfp4` - the NVFP4 format.
* :mod:`jax_moe.routing` - router functions (top-k softmax, DeepSeek-V3).
* :mod:`jax_moe.reference` - the float32 reference MoE.
* :mod:`jax_moe.tuning` - tactic tables and profiling inputs.

Importing the package compiles nothing and queries no device.
"""

from jax_moe import models, nvfp4, reference, routing, tuning
from jax_moe.moe import fused_moe
from jax_moe.weights import MoEWeights, quantize_moe_weights

__version__ = "0.1.0"

__all__ = [
    "MoEWeights",
    "fused_moe",
    "models",
    "reference",
    "routing",
    "__version__",
    "nvfp4",
    "tuning",
    "quantize_moe_weights",
]
