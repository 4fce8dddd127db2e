"""Linear projection whose kernel is stored either [in..., out...] (checkpoint and scanned layout) or
[out..., in...] (`out_in`: the unrolled single-CPU layout).

Why two layouts: XLA:CPU's matrix-vector and few-row products read a weight faster when the contracted
dimension is its minor one. Measured on the 2-core bench VM, five code-predictor-sized layers (1024 wide,
3072 MLP) run as a dependent chain of 1-row products: 28.7 GB/s with [in, out] kernels, 39.0 GB/s with
[out, in] (launch/bench.py's talker phase is that chain, 15 times per audio frame). Converting is one
transpose per kernel at load time (`out_in`), done where layers are unrolled (omni_jax.nn.decoder).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_INIT = nn.initializers.normal(0.02)


class Linear(nn.Module):
    """y = x · W (+ b), contracting x's last `in_axes` dims; W carries logical axis names `axes`, given in
    [in..., out...] order whichever layout is stored."""

    features: int | Sequence[int]
    axes: tuple
    in_axes: int = 1
    use_bias: bool = False
    out_in: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        feats = tuple(self.features) if isinstance(self.features, Sequence) else (self.features,)
        n_in, n_out = self.in_axes, len(feats)
        in_shape = x.shape[x.ndim - n_in:]
        if len(self.axes) != n_in + n_out:
            raise ValueError(f"{self.name}: {len(self.axes)} axis names for {n_in} input + {n_out} output dims")
        if self.out_in:
            shape, axes = feats + in_shape, self.axes[n_in:] + self.axes[:n_in]
        else:
            shape, axes = in_shape + feats, self.axes
        kernel = self.param("kernel", nn.with_logical_partitioning(_INIT, axes), shape, self.param_dtype)
        w, x = kernel.astype(self.dtype), x.astype(self.dtype)
        if self.out_in:  # as one 2-D dot: XLA:CPU turns a multi-dim contraction of it into a transposing copy
            n_i = math.prod(in_shape)
            flat = x.reshape(x.shape[:x.ndim - n_in] + (n_i,))
            y = jax.lax.dot_general(flat, w.reshape(-1, n_i), (((flat.ndim - 1,), (1,)), ((), ())))
            y = y.reshape(y.shape[:-1] + feats)
        else:  # DenseGeneral's contraction (what the sharded, scanned layers lower)
            y = jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[n_in:]), feats,
                              self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def out_in(kernel: jax.Array, in_axes: int = 1) -> jax.Array:
    """A [in..., out...] kernel (the checkpoint layout) in `Linear(out_in=True)`'s [out..., in...] layout."""
    nd = kernel.ndim
    return jnp.transpose(kernel, tuple(range(in_axes, nd)) + tuple(range(in_axes)))
