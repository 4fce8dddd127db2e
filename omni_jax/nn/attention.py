"""Grouped-query self-attention with per-head q/k RMSNorm, RoPE and a static KV cache."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.nn import kv_cache
from omni_jax.nn.linear import Linear
from omni_jax.nn.norm import RMSNorm
from omni_jax.nn.rope import apply_rope
from omni_jax.sharding.rules import constrain

#: Input dims each projection contracts (for converting kernels to the `out_in` layout).
KERNEL_IN_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2}


def attention_mask(q_pos: jax.Array, kv_len: int, sliding_window: int | None = None) -> jax.Array:
    """[B, T, S] boolean: key j is visible to a query at cache index q_pos[b, t] iff j <= q_pos (causal, window)."""
    j = jnp.arange(kv_len)[None, None, :]
    q = q_pos[:, :, None]
    mask = j <= q
    if sliding_window is not None:
        mask &= j > q - sliding_window
    return mask


def dot_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """q [B,T,N,D], k/v [B,K,S,D] (the KV cache's layout) with N = K*G; softmax in float32 like the reference."""
    b, t, n, d = q.shape
    kh = k.shape[1]
    q = q.reshape(b, t, kh, n // kh, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(b, t, n, d)


def cached_attention(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer: jax.Array, q_pos: jax.Array,
                     sliding_window: int | None, scale: float, dtype, smallest: int = 128) -> jax.Array:
    """q [B,T,N,D] over cache rows [0, L) of `layer`, L the shortest of `kv_cache.length_buckets` that holds
    every query position (lax.switch over static lengths). Rows past a query's position are masked anyway,
    so this equals attending over all max_len rows; but a decode step then costs what the text so far
    needs, not what max_len allows. Bench config, batch 8, max_len 1024, ~50 positions: the full buffer's
    slice copies and [8 x 1024] score matmuls took about 10 ms of a 165 ms step."""
    def attend(length: int):
        def run(q, cache_k, cache_v, layer, q_pos):
            keys = kv_cache.read_layer(cache_k, layer, length).astype(dtype)
            values = kv_cache.read_layer(cache_v, layer, length).astype(dtype)
            return dot_attention(q, keys, values, attention_mask(q_pos, length, sliding_window), scale)
        return run

    buckets = kv_cache.length_buckets(cache_k.shape[3], smallest)
    args = (q, cache_k, cache_v, layer, q_pos)
    if len(buckets) == 1:
        return attend(buckets[0])(*args)
    need = jnp.max(q_pos) + 1
    return jax.lax.switch(jnp.sum(jnp.asarray(buckets[:-1]) < need), [attend(n) for n in buckets], *args)


class Attention(nn.Module):
    """Self-attention over a static cache.

    New keys/values for T tokens are written at cache rows start[b] .. start[b]+T-1 of layer
    `layer`, then queries attend over the layer's first rows (`cached_attention`: the shortest length
    bucket holding every query position) with a causal (and optional sliding-window) mask; stale
    entries past a row's position are masked, so the cache never needs clearing. `fresh_cache` skips
    reading the buffer back when nothing before `start` exists.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float = 1e-6
    use_qk_norm: bool = True
    use_bias: bool = False
    sliding_window: int | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    # The cache holds nothing this call may see (start == 0 for every row, e.g. a prompt's prefill):
    # attend over this call's keys only, [T, T] scores instead of [T, max_len].
    fresh_cache: bool = False
    out_in: bool = False  # kernels in omni_jax.nn.linear's [out..., in...] layout (unrolled layers)

    def _linear(self, features, axes: tuple, name: str, in_axes: int = 1) -> Linear:
        return Linear(features, axes, in_axes, self.use_bias, self.out_in, self.dtype, self.param_dtype, name=name)

    def _proj(self, heads: int, axis_name: str, name: str) -> Linear:
        return self._linear((heads, self.head_dim), ("embed", axis_name, "head_dim"), name)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        cache_k: jax.Array,
        cache_v: jax.Array,
        layer: jax.Array,
        start: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B,T,H]; cos/sin [B,T,D]; cache_* [L,B,K,S,D]; layer scalar; start [B]. Returns (out, cache_k, cache_v)."""
        q = self._proj(self.num_heads, "heads", "q_proj")(x)
        k = self._proj(self.num_kv_heads, "kv_heads", "k_proj")(x)
        v = self._proj(self.num_kv_heads, "kv_heads", "v_proj")(x)
        if self.use_qk_norm:
            q = RMSNorm(self.eps, self.param_dtype, axis_name="head_dim", name="q_norm")(q)
            k = RMSNorm(self.eps, self.param_dtype, axis_name="head_dim", name="k_norm")(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        # Pin the cache layout (rules table) so GSPMD never re-shards / all-gathers the whole buffer.
        cache_k = constrain(kv_cache.write_layer(cache_k, layer, k, start), kv_cache.CACHE_AXES)
        cache_v = constrain(kv_cache.write_layer(cache_v, layer, v, start), kv_cache.CACHE_AXES)
        q_pos = start[:, None] + jnp.arange(x.shape[1])[None, :]
        if self.fresh_cache:  # the keys as the cache stores them, without reading the cache back
            keys, values = (a.swapaxes(1, 2).astype(cache_k.dtype).astype(self.dtype) for a in (k, v))
            q_pos = jnp.broadcast_to(jnp.arange(x.shape[1])[None, :], q_pos.shape)
            mask = attention_mask(q_pos, keys.shape[2], self.sliding_window)
            out = dot_attention(q, keys, values, mask, self.head_dim**-0.5)
        else:
            out = cached_attention(q, cache_k, cache_v, layer, q_pos, self.sliding_window, self.head_dim**-0.5,
                                   self.dtype)
        out = self._linear(x.shape[-1], ("heads", "head_dim", "embed"), "o_proj", in_axes=2)(out)
        return out, cache_k, cache_v
