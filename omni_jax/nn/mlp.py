"""SiLU-gated feed-forward block (dense layers, shared expert, code predictor)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.nn.linear import Linear

#: Input dims each projection contracts (for converting kernels to the `out_in` layout).
KERNEL_IN_AXES = {"gate_proj": 1, "up_proj": 1, "down_proj": 1}


def logical_dense(features: int, axes: tuple, name: str, *, use_bias: bool, dtype, param_dtype,
                  out_in: bool = False) -> Linear:
    """A 2-D projection whose kernel (and bias, on the output axis) carry logical axis names for the sharding rules."""
    return Linear(features, axes, use_bias=use_bias, out_in=out_in, dtype=dtype, param_dtype=param_dtype, name=name)


class GatedMLP(nn.Module):
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    out_in: bool = False  # kernels in omni_jax.nn.linear's [out, in] layout (unrolled layers)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def dense(features, axes, name):
            return logical_dense(features, axes, name, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                 out_in=self.out_in)

        gate = dense(self.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(self.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        return dense(x.shape[-1], ("mlp", "embed"), "down_proj")(nn.silu(gate) * up)
