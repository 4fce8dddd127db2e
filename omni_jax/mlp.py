"""SiLU-gated feed-forward block (dense layers, shared expert, code predictor)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_INIT = nn.initializers.normal(0.02)


def logical_dense(features: int, axes: tuple, name: str, *, use_bias: bool, dtype, param_dtype) -> nn.Dense:
    """nn.Dense whose kernel (and bias, on the output axis) carry logical axis names for the sharding rules."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(_INIT, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
    )


class GatedMLP(nn.Module):
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def dense(features, axes, name):
            return logical_dense(features, axes, name, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)

        gate = dense(self.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(self.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        return dense(x.shape[-1], ("mlp", "embed"), "down_proj")(nn.silu(gate) * up)
