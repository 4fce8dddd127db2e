"""The Thinker's text decoder: embeddings -> MoE decoder stack -> norm -> LM head."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.config import OmniConfig
from omni_jax.decoder import DecoderStack, unstack_layers
from omni_jax.kv_cache import KVCache
from omni_jax.norm import RMSNorm
from omni_jax.sharding import constrain

_INIT = nn.initializers.normal(0.02)


class ThinkerOutput(NamedTuple):
    logits: jax.Array  # [B, T, vocab] float32
    embeds: jax.Array  # [B, T, H] token embeddings (talker's text_projection input)
    accept_hidden: jax.Array  # [B, T, H] output of layer accept_hidden_layer (talker's hidden_projection input)
    hidden: jax.Array  # [B, T, H] final normed hidden state
    cache: KVCache


class Thinker(nn.Module):
    config: OmniConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    moe_impl: str = "auto"
    unroll_layers: bool = False  # params from `unroll_layer_params` (omni_jax.decoder: why)
    fresh_cache: bool = False  # calls start at cache row 0 of an empty cache (omni_jax.attention: why)

    def setup(self):
        text = self.config.thinker.text
        self.embed_tokens = nn.Embed(
            text.vocab_size, text.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
        )
        self.layers = DecoderStack(
            text, (self.config.talker.accept_hidden_layer,), self.dtype, self.param_dtype, self.moe_impl,
            self.unroll_layers, self.fresh_cache,
        )
        self.norm = RMSNorm(text.rms_norm_eps, self.param_dtype)
        if not self.config.thinker.tie_word_embeddings:
            # [V, H] like the embedding table, not Dense's [H, V]: the batch-8 decode logits matmul ran 1.9x
            # faster on XLA:CPU with the vocab as the weight's major axis (same speed at batch 1).
            self.lm_head = self.param("lm_head", nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
                                      (text.vocab_size, text.hidden_size), self.param_dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embed_tokens(tokens)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        start: jax.Array,
        embeds: jax.Array | None = None,
        logits_index: jax.Array | None = None,
    ) -> ThinkerOutput:
        """tokens [B,T]; positions [3,B,T] (M-RoPE) or [B,T]; start [B]: cache row of the first new token.

        logits_index [B] (optional): compute logits only at that time step per row (-> [B,1,V]); prefill
        needs just the last prompt token, and full [B,T,V] logits would dominate prefill memory.
        """
        x = self.embed_tokens(tokens) if embeds is None else embeds.astype(self.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        h, taps, k, v = self.layers(x, positions, cache.k, cache.v, start)
        h = self.norm(h)
        h_out = h if logits_index is None else jnp.take_along_axis(h, logits_index[:, None, None], axis=1)
        if self.config.thinker.tie_word_embeddings:
            logits = self.embed_tokens.attend(h_out)
        else:
            logits = jnp.einsum("bth,vh->btv", h_out.astype(self.dtype), self.lm_head.astype(self.dtype))
        logits = constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        return ThinkerOutput(logits, x, taps[self.config.talker.accept_hidden_layer], h, cache.replace(k=k, v=v))


def text_positions(start: jax.Array, length: int) -> jax.Array:
    """M-RoPE positions for plain text: all three axes equal the running index. [3, B, T]."""
    pos = start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    return jnp.broadcast_to(pos[None], (3,) + pos.shape)


def init_cache(config: OmniConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    t = config.thinker.text
    return KVCache.create(t.num_hidden_layers, batch, max_len, t.num_key_value_heads, t.head_dim, dtype)


def _init_args(config: OmniConfig):
    start = jnp.zeros((1,), jnp.int32)
    return (jnp.zeros((1, 1), jnp.int32), text_positions(start, 1), init_cache(config, 1, 1), start)


def boxed_abstract_params(config: OmniConfig, dtype=jnp.float32):
    """Abstract params with their logical-axis metadata (nn.Partitioned boxes); allocates nothing."""
    model = Thinker(config, dtype=dtype, param_dtype=dtype)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *_init_args(config)))["params"]


def init_params(config: OmniConfig, rng: jax.Array, dtype=jnp.float32):
    model = Thinker(config, dtype=dtype, param_dtype=dtype)
    return nn.unbox(jax.jit(lambda r: model.init(r, *_init_args(config)))(rng)["params"])


def unroll_layer_params(config: OmniConfig, params: dict, split_experts: bool = True, consume: bool = False) -> dict:
    """Thinker params for `Thinker(unroll_layers=True)`: the same tree with the layer stack unstacked
    (and, by default, every expert in its own arrays: `omni_jax.moe.split_experts`). consume: empty
    params["layers"] segment by segment as it goes (`decoder.unstack_layers`)."""
    stack = unstack_layers(params["layers"], config.thinker.text, (config.talker.accept_hidden_layer,),
                           split_experts, consume)
    return {**params, "layers": stack}
