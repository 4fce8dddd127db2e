"""The talker's code predictor: a small dense decoder that fills in residual codec groups 1..G-1.

Per audio frame it reads [talker last hidden state, embedding of group-0 code] and then predicts
the remaining G-1 codes autoregressively, one group-specific embedding table and LM head per
step (HF `Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration`). `predict_frame` runs a
whole frame as one traced computation (prefill of 2 tokens + `lax.scan` over the remaining
groups) with its own tiny static KV cache, so a jitted caller compiles it once.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax import rng as rng_lib
from omni_jax.config import DecoderConfig
from omni_jax.nn.decoder import DecoderStack
from omni_jax.nn.linear import out_in
from omni_jax.nn.norm import RMSNorm

_INIT = nn.initializers.normal(0.02)

# (logits [B, V] float32, rng key) -> codes [B] int32
SampleFn = Callable[[jax.Array, jax.Array], jax.Array]


class CodePredictor(nn.Module):
    """Dense decoder with per-group codec embeddings [G-1, V, H] and LM heads [G-1, H, V] (stacked
    so a scan over groups can index them dynamically).

    In the unrolled layout (params from `split_lm_heads`) the heads are separate [V, H] arrays `lm_head_<g>`
    picked by `lax.switch`, because XLA:CPU copies a dynamic slice of the stack (8 MB at full size) before
    every step's matmul; [V, H] puts the contracted dim last (omni_jax.nn.linear: why)."""

    cfg: DecoderConfig
    num_code_groups: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg, n = self.cfg, self.num_code_groups - 1
        self.split_heads = self.has_variable("params", "lm_head_0")
        self.layers = DecoderStack(cfg, (), self.dtype, self.param_dtype)
        self.norm = RMSNorm(cfg.rms_norm_eps, self.param_dtype)
        self.codec_embedding = self.param(
            "codec_embedding", nn.with_logical_partitioning(_INIT, ("codebooks", "vocab", "embed")),
            (n, cfg.vocab_size, cfg.hidden_size), self.param_dtype,
        )
        if self.split_heads:
            self.lm_heads = [self.param(f"lm_head_{g}", nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
                                        (cfg.vocab_size, cfg.hidden_size), self.param_dtype) for g in range(n)]
        else:
            self.lm_head = self.param(
                "lm_head", nn.with_logical_partitioning(_INIT, ("codebooks", "embed", "vocab")),
                (n, cfg.hidden_size, cfg.vocab_size), self.param_dtype,
            )

    def forward(self, x, positions, cache_k, cache_v, start):
        """x [B,T,H]; positions [B,T] (1-D RoPE). Returns (normed hidden [B,T,H], cache_k, cache_v)."""
        h, _, cache_k, cache_v = self.layers(x.astype(self.dtype), positions, cache_k, cache_v, start)
        return self.norm(h), cache_k, cache_v

    def embed(self, codes: jax.Array, group: jax.Array | int) -> jax.Array:
        """Embedding of residual group `group+1`'s codes (table index `group`, 0-based)."""
        return self.codec_embedding[group, codes].astype(self.dtype)  # one gather: rows only, not the table

    def logits(self, h: jax.Array, group: jax.Array | int) -> jax.Array:
        """float32 logits of residual group `group+1` (head index `group`) from h [..., H]."""
        h = h.astype(self.dtype)
        if self.split_heads:
            branches = [lambda h, w=w: jnp.einsum("...h,vh->...v", h, w.astype(self.dtype)) for w in self.lm_heads]
            out = branches[group](h) if isinstance(group, int) else jax.lax.switch(group, branches, h)
            return out.astype(jnp.float32)
        head = jax.lax.dynamic_index_in_dim(self.lm_head, group, 0, keepdims=False).astype(self.dtype)
        return jnp.dot(h, head).astype(jnp.float32)

    def __call__(self, x, positions, cache_k, cache_v, start):
        """Init / teacher-forced path: touches every parameter. Returns logits of all groups [B,T,G-1,V]."""
        h, cache_k, cache_v = self.forward(x, positions, cache_k, cache_v, start)
        n = self.num_code_groups - 1
        return jnp.stack([self.logits(h, g) for g in range(n)], axis=2), cache_k, cache_v


def split_lm_heads(params: Mapping[str, Any]) -> dict[str, Any]:
    """CodePredictor params (stacked lm_head [G-1, H, V]) -> split heads (lm_head_<g> [V, H]).
    Already-split params are returned unchanged."""
    if "lm_head" not in params:
        return dict(params)
    out = {k: v for k, v in params.items() if k != "lm_head"}
    heads = params["lm_head"]
    out.update({f"lm_head_{g}": out_in(heads[g]) for g in range(heads.shape[0])})
    return out


def frame_cache(cfg: DecoderConfig, batch: int, num_code_groups: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Static K/V buffers for one frame: positions 0..G-1 (hidden, code 0, codes 1..G-2 as inputs)."""
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, num_code_groups, cfg.head_dim)  # kv_cache layout
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def predict_frame(
    apply: Callable,
    cfg: DecoderConfig,
    num_code_groups: int,
    hidden: jax.Array,
    code0_embed: jax.Array,
    rng: jax.Array,
    sample: SampleFn,
    dtype=jnp.float32,
    with_finite: bool = False,
) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, jax.Array]:
    """Residual codes of one frame and the sum of their embeddings.

    apply(method_name, *args) runs a CodePredictor method with bound params. hidden [B,H] is the
    talker's last (normed) hidden state; code0_embed [B,H] the talker codec embedding of the
    group-0 code. Returns (codes [B, G-1] int32 for groups 1..G-1, fp32 sum of their embeddings [B,H]);
    with_finite, also finite [B] bool: every logit of the row was finite (the numerical guard; costs one
    isfinite reduction per group, no host sync).
    """
    b = hidden.shape[0]
    n = num_code_groups - 1
    keys = rng_lib.split_keys(rng, n)  # one key, or one per row
    cache_k, cache_v = frame_cache(cfg, b, num_code_groups, dtype)
    x = jnp.stack([hidden.astype(dtype), code0_embed.astype(dtype)], axis=1)
    pos = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32)[None], (b, 2))
    h, cache_k, cache_v = apply("forward", x, pos, cache_k, cache_v, jnp.zeros((b,), jnp.int32))
    logits = apply("logits", h[:, -1], 0)
    first = sample(logits, keys[0])
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    emb_sum = apply("embed", first, 0).astype(jnp.float32)  # accumulate in fp32 like torch's sum

    def body(carry, xs):
        cache_k, cache_v, code, emb_sum, finite = carry
        group, key = xs  # input is code of residual `group` (table group-1); predicts residual group+1
        x = apply("embed", code, group - 1)[:, None]
        start = jnp.full((b,), group + 1, jnp.int32)
        h, cache_k, cache_v = apply("forward", x, start[:, None], cache_k, cache_v, start)
        logits = apply("logits", h[:, 0], group)
        nxt = sample(logits, key)
        finite = finite & jnp.all(jnp.isfinite(logits), axis=-1)
        return (cache_k, cache_v, nxt, emb_sum + apply("embed", nxt, group).astype(jnp.float32), finite), nxt

    groups = jnp.arange(1, n, dtype=jnp.int32)
    (_, _, _, emb_sum, finite), rest = jax.lax.scan(body, (cache_k, cache_v, first, emb_sum, finite),
                                                     (groups, keys[1:]))
    codes = jnp.concatenate([first[:, None], jnp.transpose(rest)], axis=1)
    return (codes, emb_sum, finite) if with_finite else (codes, emb_sum)
