"""The Talker (HF `Qwen3OmniMoeTalkerForConditionalGeneration`): thinker text/hidden states -> codec group 0.

  * `ResizeMLP` x2: text_projection / hidden_projection, thinker hidden 2048 -> 1024.
  * `TalkerModel`: codec embedding, an always-sparse MoE decoder with shared expert (interleaved M-RoPE),
    final norm; `codec_head` predicts codec group 0.
  * `CodePredictor` (omni_jax.models.code_predictor) fills groups 1..15 of every frame.

Generation over these modules (prompt assembly, prefill / step, sampling) is runtime code:
omni_jax.runtime.talker_inputs and omni_jax.runtime.talker_engine.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.config import OmniConfig
from omni_jax.models.code_predictor import CodePredictor, frame_cache, split_lm_heads
from omni_jax.models.rules import Rule, decoder_rules, fixed, identity, linear
from omni_jax.nn.decoder import DecoderStack, unstack_layers
from omni_jax.nn.kv_cache import KVCache
from omni_jax.nn.mlp import logical_dense
from omni_jax.nn.moe import Dispatch
from omni_jax.nn.norm import RMSNorm
from omni_jax.processing.positions import text_positions
from omni_jax.sharding.rules import constrain

_INIT = nn.initializers.normal(0.02)


class ResizeMLP(nn.Module):
    """Linear(thinker_hidden -> intermediate, bias) -> SiLU -> Linear(-> talker hidden, bias)."""

    intermediate_size: int
    out_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def dense(features, axes, name):
            return logical_dense(features, axes, name, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)

        h = dense(self.intermediate_size, ("embed", "mlp"), "linear_fc1")(x.astype(self.dtype))
        return dense(self.out_size, ("mlp", "embed"), "linear_fc2")(nn.silu(h))


class TalkerModel(nn.Module):
    """HF `talker.model`: codec embedding + decoder stack + final norm (returns normed hidden)."""

    config: OmniConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dispatch: Dispatch = Dispatch()

    def setup(self):
        text = self.config.talker.text
        self.codec_embedding = nn.Embed(
            text.vocab_size, text.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
        )
        self.layers = DecoderStack(text, (), self.dtype, self.param_dtype, self.dispatch)
        self.norm = RMSNorm(text.rms_norm_eps, self.param_dtype)

    def embed(self, codes: jax.Array) -> jax.Array:
        return self.codec_embedding(codes)

    def __call__(self, x, positions, cache_k, cache_v, start):
        x = constrain(x.astype(self.dtype), ("batch", "length", "embed"))
        h, _, cache_k, cache_v = self.layers(x, positions, cache_k, cache_v, start)
        return self.norm(h), cache_k, cache_v


class Talker(nn.Module):
    """Param tree: text_projection, hidden_projection, model{codec_embedding, layers, norm}, codec_head,
    code_predictor{layers, norm, codec_embedding[G-1,V,H], lm_head[G-1,H,V]}."""

    config: OmniConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dispatch: Dispatch = Dispatch()  # for stacked experts; the layers' layout follows the params

    def setup(self):
        tk = self.config.talker
        text = tk.text
        self.text_projection = ResizeMLP(text.intermediate_size, text.hidden_size, self.dtype, self.param_dtype)
        self.hidden_projection = ResizeMLP(text.intermediate_size, text.hidden_size, self.dtype, self.param_dtype)
        self.model = TalkerModel(self.config, self.dtype, self.param_dtype, self.dispatch)
        self.codec_head = nn.Dense(
            text.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(_INIT, ("embed", "vocab")),
        )
        self.code_predictor = CodePredictor(tk.code_predictor, tk.num_code_groups, self.dtype, self.param_dtype)

    def project_text(self, embeds: jax.Array) -> jax.Array:
        return self.text_projection(embeds)

    def project(self, embeds: jax.Array, hidden: jax.Array, mm_mask: jax.Array) -> jax.Array:
        """hidden_projection(accept-layer hidden) at multimodal positions, text_projection(embeds) elsewhere."""
        return jnp.where(mm_mask[..., None], self.hidden_projection(hidden), self.text_projection(embeds))

    def embed_codec(self, codes: jax.Array) -> jax.Array:
        return self.model.embed(codes)

    def forward(self, x: jax.Array, positions: jax.Array, cache: KVCache, start: jax.Array):
        """x [B,T,H]; positions [3,B,T]; start [B] cache row of x[:,0]. Returns (normed hidden, cache)."""
        h, k, v = self.model(x, positions, cache.k, cache.v, start)
        return h, cache.replace(k=k, v=v)

    def head(self, h: jax.Array) -> jax.Array:
        return self.codec_head(h).astype(jnp.float32)

    def cp(self, name: str, *args):
        return getattr(self.code_predictor, name)(*args)

    def __call__(self, thinker_embeds, thinker_hidden, x, positions, cache, start):
        """Init path touching every parameter."""
        mm = jnp.zeros(thinker_embeds.shape[:-1], bool)
        x = x + self.project(thinker_embeds, thinker_hidden, mm) + self.embed_codec(jnp.zeros(x.shape[:2], jnp.int32))
        h, cache = self.forward(x, positions, cache, start)
        logits = self.head(h)
        tk = self.config.talker
        ck, cv = frame_cache(tk.code_predictor, x.shape[0], tk.num_code_groups, self.dtype)
        cp_pos = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32)[None], x.shape[:2])
        cp_logits, _, _ = self.code_predictor(h, cp_pos, ck, cv, start)
        return logits, cp_logits, cache


# ---- what the registry (omni_jax.models.registry) reads ----

def build(config: OmniConfig, dtype=jnp.float32) -> tuple[Talker, tuple]:
    """The module in the checkpoint layout and the arguments its init traces with."""
    tk = config.talker
    start = jnp.zeros((1,), jnp.int32)
    th = jnp.zeros((1, 1, tk.thinker_hidden_size), dtype)
    x = jnp.zeros((1, 1, tk.text.hidden_size), dtype)
    args = (th, th, x, text_positions(start, 1), KVCache.create(tk.text, 1, 1, dtype), start)
    return Talker(config, dtype=dtype, param_dtype=dtype), args


def unroll(config: OmniConfig, params: dict, split_experts: bool = True, consume: bool = False) -> dict:
    """Talker params in the unrolled layout (omni_jax.nn.decoder): talker and code-predictor stacks
    unstacked (and, by default, every talker expert in its own arrays: `omni_jax.nn.moe.split_experts`),
    the code predictor's heads split (`code_predictor.split_lm_heads`). consume: empty the input's layer
    stacks segment by segment as it goes (`decoder.unstack_layers`)."""
    tk = config.talker
    model = {**params["model"],
             "layers": unstack_layers(params["model"]["layers"], tk.text, (), split_experts, consume)}
    cp = {**split_lm_heads(params["code_predictor"]),
          "layers": unstack_layers(params["code_predictor"]["layers"], tk.code_predictor, (), False, consume)}
    return {**params, "model": model, "code_predictor": cp}


def hf_rules(config: OmniConfig) -> list[Rule]:
    """Every `talker.*` checkpoint key onto the param tree rooted at "talker"."""
    tk = config.talker
    rules = decoder_rules("talker.model", ("talker", "model", "layers"), tk.text)
    rules += decoder_rules("talker.code_predictor.model", ("talker", "code_predictor", "layers"), tk.code_predictor)
    rules += [
        fixed(r"talker\.model\.codec_embedding\.weight", ("talker", "model", "codec_embedding", "embedding")),
        fixed(r"talker\.codec_head\.weight", ("talker", "codec_head", "kernel"), linear),
        Rule(r"talker\.(text_projection|hidden_projection)\.(linear_fc1|linear_fc2)\.weight",
             lambda m: (("talker", m.group(1), m.group(2), "kernel"), ()), linear),
        Rule(r"talker\.(text_projection|hidden_projection)\.(linear_fc1|linear_fc2)\.bias",
             lambda m: (("talker", m.group(1), m.group(2), "bias"), ()), identity),
        Rule(r"talker\.code_predictor\.model\.codec_embedding\.(\d+)\.weight",
             lambda m: (("talker", "code_predictor", "codec_embedding"), (int(m.group(1)),)), identity),
        Rule(r"talker\.code_predictor\.lm_head\.(\d+)\.weight",
             lambda m: (("talker", "code_predictor", "lm_head"), (int(m.group(1)),)), linear),
    ]
    return rules
