"""The Thinker's text decoder: embeddings -> MoE decoder stack -> norm -> LM head."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.config import OmniConfig
from omni_jax.models.rules import Rule, decoder_rules, fixed
from omni_jax.nn.decoder import DecoderStack, unstack_layers
from omni_jax.nn.kv_cache import KVCache
from omni_jax.nn.moe import Dispatch
from omni_jax.nn.norm import RMSNorm
from omni_jax.processing.positions import text_positions
from omni_jax.sharding.rules import constrain

_INIT = nn.initializers.normal(0.02)


class ThinkerOutput(NamedTuple):
    logits: jax.Array  # [B, T, vocab] float32
    embeds: jax.Array  # [B, T, H] token embeddings (talker's text_projection input)
    accept_hidden: jax.Array  # [B, T, H] output of layer accept_hidden_layer (talker's hidden_projection input)
    hidden: jax.Array  # [B, T, H] final normed hidden state
    cache: KVCache


class Thinker(nn.Module):
    """Scanned or unrolled layers, as the params are (omni_jax.nn.decoder); `dispatch` for stacked experts."""

    config: OmniConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dispatch: Dispatch = Dispatch()
    fresh_cache: bool = False  # calls start at cache row 0 of an empty cache (omni_jax.nn.attention: why)

    def setup(self):
        text = self.config.thinker.text
        self.embed_tokens = nn.Embed(
            text.vocab_size, text.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
        )
        self.layers = DecoderStack(
            text, (self.config.talker.accept_hidden_layer,), self.dtype, self.param_dtype, self.dispatch,
            self.fresh_cache,
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
        deepstack: jax.Array | None = None,
    ) -> ThinkerOutput:
        """tokens [B,T]; positions [3,B,T] (M-RoPE) or [B,T]; start [B]: cache row of the first new token.

        deepstack [D, B, T, H] (optional): the vision encoder's deepstack rows at the image/video placeholders
        (zeros elsewhere), added to the outputs of layers 0..D-1 as transformers does.

        logits_index [B] (optional): compute logits only at that time step per row (-> [B,1,V]); prefill
        needs just the last prompt token, and full [B,T,V] logits would dominate prefill memory.
        """
        x = self.embed_tokens(tokens) if embeds is None else embeds.astype(self.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        h, taps, k, v = self.layers(x, positions, cache.k, cache.v, start, deepstack)
        h = self.norm(h)
        h_out = h if logits_index is None else jnp.take_along_axis(h, logits_index[:, None, None], axis=1)
        if self.config.thinker.tie_word_embeddings:
            logits = self.embed_tokens.attend(h_out)
        else:
            logits = jnp.einsum("bth,vh->btv", h_out.astype(self.dtype), self.lm_head.astype(self.dtype))
        logits = constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        return ThinkerOutput(logits, x, taps[self.config.talker.accept_hidden_layer], h, cache.replace(k=k, v=v))


# ---- what the registry (omni_jax.models.registry) reads ----

def build(config: OmniConfig, dtype=jnp.float32) -> tuple[Thinker, tuple]:
    """The module in the checkpoint layout and the arguments its init traces with."""
    start = jnp.zeros((1,), jnp.int32)
    args = (jnp.zeros((1, 1), jnp.int32), text_positions(start, 1), KVCache.create(config.thinker.text, 1, 1, dtype),
            start)
    return Thinker(config, dtype=dtype, param_dtype=dtype), args


def hf_rules(config: OmniConfig) -> list[Rule]:
    """Every `thinker.model.*` / `thinker.lm_head.*` checkpoint key onto the tree rooted at "thinker"."""
    text = config.thinker.text
    rules = decoder_rules("thinker.model", ("thinker", "layers"), text, (config.talker.accept_hidden_layer,))
    rules += [
        fixed(r"thinker\.model\.embed_tokens\.weight", ("thinker", "embed_tokens", "embedding")),
        fixed(r"thinker\.lm_head\.weight", ("thinker", "lm_head")),  # [V, H] as in HF
    ]
    return rules


def unroll(config: OmniConfig, params: dict, split_experts: bool = True, consume: bool = False) -> dict:
    """Thinker params in the unrolled layout (omni_jax.nn.decoder): the layer stack unstacked and, by
    default, every expert in its own arrays (`omni_jax.nn.moe.split_experts`). consume: empty
    params["layers"] segment by segment as it goes (`decoder.unstack_layers`)."""
    stack = unstack_layers(params["layers"], config.thinker.text, (config.talker.accept_hidden_layer,),
                           split_experts, consume)
    return {**params, "layers": stack}
