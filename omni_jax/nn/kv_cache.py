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

from omni_jax import buckets

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
    def create(cls, cfg, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        """An empty cache for decoder config `cfg` (omni_jax.config.DecoderConfig)."""
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

    @classmethod
    def abstract(cls, cfg, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        """`create`'s shapes as ShapeDtypeStructs (allocates nothing)."""
        return jax.eval_shape(lambda: cls.create(cfg, batch, max_len, dtype))

    @staticmethod
    def logical_axes() -> "KVCache":
        """The cache's logical axes for the rules table (omni_jax.sharding.jit.state_shardings)."""
        return KVCache(k=CACHE_AXES, v=CACHE_AXES, lengths=("cache_batch",))

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
    return buckets.ladder(max_len, smallest, growth)


def read_layer(buf: jax.Array, layer: jax.Array, length: int) -> jax.Array:
    """buf[layer, :, :, :length] ([B, K, length, D]): copies only the rows asked for."""
    _, b, k, _, d = buf.shape
    return jax.lax.dynamic_slice(buf, (layer, 0, 0, 0, 0), (1, b, k, length, d))[0]
