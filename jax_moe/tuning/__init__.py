"""Tuning core: profiling inputs, problem keys, tactic tables and lookup.

- `balanced_routing`, `balanced_expert_loads`, `spread_expert_loads`, `busy_expert_loads`,
  `profile_routing`, `profile_inputs`, `RoutingDistribution`: deterministic
  profiling inputs from `jax.random` keys (routing_generator.py).
- `ProblemKey`, `token_bucket`, `token_buckets`: what a tactic is tuned for
  (problem.py).
- `TacticTable`, `TacticEntry`, `TableMetadata`, `TacticFileError`: the tuned
  tactics of a device and their JSON file (tactic_table.py).
- `lookup_tactic`, `load_tactic_table`, `device_identity`: trace-time lookup
  (lookup.py).

See docs/TUNING.md.
"""

from jax_moe.tuning.lookup import device_identity, load_tactic_table, lookup_tactic
from jax_moe.tuning.problem import DEFAULT_MAX_TOKENS, ProblemKey, token_bucket, token_buckets
from jax_moe.tuning.routing_generator import (
    ProfileInputs,
    RoutingDistribution,
    balanced_expert_loads,
    balanced_routing,
    busy_expert_loads,
    profile_inputs,
    profile_routing,
    spread_expert_loads,
)
from jax_moe.tuning.shipped import shipped_table
from jax_moe.tuning.tactic_table import (
    FILE_FORMAT,
    SCHEMA_VERSION,
    TableMetadata,
    TacticEntry,
    TacticFileError,
    TacticTable,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "FILE_FORMAT",
    "SCHEMA_VERSION",
    "ProblemKey",
    "ProfileInputs",
    "RoutingDistribution",
    "TableMetadata",
    "TacticEntry",
    "TacticFileError",
    "TacticTable",
    "balanced_expert_loads",
    "balanced_routing",
    "device_identity",
    "load_tactic_table",
    "lookup_tactic",
    "profile_inputs",
    "profile_routing",
    "shipped_table",
    "spread_expert_loads",
    "busy_expert_loads",
    "token_bucket",
    "token_buckets",
]
