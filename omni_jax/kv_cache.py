"""Static-shape KV cache: one stacked buffer per decoder stack, written in place.

Layout [layers, batch, kv_heads, max_len, head_dim]: each (row, head) is one contiguous [max_len,
head_dim] block, which is what attention's batched matmuls read (batch dims leading); with the
length axis before the heads, XLA:CPU copied (transposed) the whole layer's buffer at every decode
step. Shapes never change during generation, so prefill and decode compile once per (batch,
max_len); the buffers are donated by the compiled steps so XLA updates them in place.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

CACHE_AXES = ("layers", "cache_batch", "cache_kv_heads", "cache_length", "head_dim")


@flax.struct.dataclass
class KVCache:
    k: jax.Array
    v: jax.Array
    lengths: jax.Array  # [batch] int32: valid entries per row

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @classmethod
    def create(cls, layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
        shape = (layers, batch, kv_heads, max_len, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

    @classmethod
    def abstract(cls, layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
        shape = (layers, batch, kv_heads, max_len, head_dim)
        return cls(
            k=jax.ShapeDtypeStruct(shape, dtype),
            v=jax.ShapeDtypeStruct(shape, dtype),
            lengths=jax.ShapeDtypeStruct((batch,), jnp.int32),
        )

    def reset(self) -> "KVCache":
        """Forget every row's contents; stale entries are masked out, so no zeroing is needed."""
        return self.replace(lengths=jnp.zeros_like(self.lengths))


def write_layer(buf: jax.Array, layer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Scatter new [B, T, N, D] into buf[layer, b, :, start[b]:start[b]+T]; writes past max_len are dropped."""
    b, t = new.shape[:2]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    cols = start[:, None] + jnp.arange(t)[None, :]
    # Advanced indices split by a slice: the indexed view is [B, T, N, D], new's own layout.
    return buf.at[layer, rows, :, cols].set(new.astype(buf.dtype), mode="drop")


def length_buckets(max_len: int, smallest: int = 128, growth: int = 4) -> tuple[int, ...]:
    """Static key lengths attention may read: smallest, growth*smallest, ... below max_len, then max_len.

    Each bucket is one more attention branch to compile in every layer; growth 4 rather than 2 kept the
    tiny pipeline's first text+speech call (max_len 2048) at 14.0 s against 15.9 s (13.9 s unbucketed)."""
    out, n = [], smallest
    while n < max_len:
        out.append(n)
        n *= growth
    return tuple(out) + (max_len,)


def read_layer(buf: jax.Array, layer: jax.Array, length: int) -> jax.Array:
    """buf[layer, :, :, :length] ([B, K, length, D]): copies only the rows asked for."""
    _, b, k, _, d = buf.shape
    return jax.lax.dynamic_slice(buf, (layer, 0, 0, 0, 0), (1, b, k, length, d))[0]
