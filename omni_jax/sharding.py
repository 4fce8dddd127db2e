"""Logical axis names and the one table mapping them to mesh axes.

Model code only names logical axes (on params via nn.with_logical_partitioning, on
activations via `constrain`). Which mesh axis shards what is decided here and nowhere else.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

# Mesh axis names.
DATA, TENSOR, EXPERT = "data", "tensor", "expert"

# Logical axis -> mesh axis (or None for replicated). Order matters only for duplicates.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", DATA),
    ("cache_batch", DATA),
    ("length", None),
    ("cache_length", None),
    ("layers", None),
    ("embed", None),
    ("norm", None),
    ("vocab", TENSOR),
    ("heads", TENSOR),
    ("kv_heads", TENSOR),
    ("cache_kv_heads", TENSOR),
    ("head_dim", None),
    ("mlp", TENSOR),
    ("experts", EXPERT),
    ("expert_mlp", TENSOR),
    ("router", None),
    ("codebooks", None),
    ("conv_in", None),
    ("conv_out", None),
    ("kernel", None),
    ("channels", None),
)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding hint for an activation; a no-op outside a mesh / rules context."""
    return nn.with_logical_constraint(x, tuple(axes))
