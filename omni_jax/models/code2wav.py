"""Code2Wav: 16-codebook codec frames (12.5 Hz) -> 24 kHz waveform, equal to transformers' Qwen3OmniMoeCode2Wav.

Pipeline (activations are [B, T, C], time-major, channels last):
  codes [B, Q, T] -> mean of Q offset embeddings -> 8-layer sliding-window (72) transformer with layer scale
  -> 2 x (causal transposed conv x2 + ConvNeXt block) -> causal conv -> 4 decoder blocks (SnakeBeta,
  transposed conv x8/x5/x4/x3, residual units with dilations 1/3/9) -> SnakeBeta -> causal conv -> clamp [-1, 1].

Length and delay. Each decoder transposed conv (kernel 2s, stride s) has both ends trimmed by s, so a block maps
L samples to (L-1)*s: the waveform of T frames has T*U - D samples (U = total_upsample = 1920, D =
`delay_samples` = 555 for the real model). Equivalently the whole network is *causal with a D-sample delay*:
waveform sample m depends only on frames f <= (m + D) // U. So after frames [0, b) arrived, samples [0, b*U - D)
are final.

Receptive field (exact, see `transformer_context_frames` / `conv_context_frames`). The transformer is causal;
each layer looks back sliding_window-1 = 71 frames, so L stacked layers look back L*71 frames (568 for the real
model, 142 for tiny). The conv stack (ConvNeXt depthwise convs, causal convs, dilated residual units) looks back
10 frames from the first sample of a frame: `required_left_context` = L*71 + 10 frames (578 real, 152 tiny).

Streaming never re-reads that context. Applied with the "cache" collection mutable, the module decodes the next
frames of each row from carried state: each transformer layer's last sliding_window-1 keys and values, and every
causal conv's, transposed conv's and ConvNeXt block's last input steps at its own time resolution (a few steps
each). The cost of a chunk is then independent of how much audio came before it.

The module takes masking arguments (`tf_valid`, `conv_valid`, `conv_skip`) so that padded windows decode
exactly like unpadded sequences; the decoding procedures built on them (full, HF-chunked, streamed) are
omni_jax.runtime.vocoder.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config import Code2WavConfig, OmniConfig
from omni_jax.models.rules import Rule, bias_to_heads, heads_to_linear, identity, linear, linear_to_heads
from omni_jax.nn.attention import dot_attention
from omni_jax.nn.decoder import layer_name, scan_layers
from omni_jax.nn.mlp import GatedMLP, logical_dense
from omni_jax.nn.norm import RMSNorm
from omni_jax.nn.rope import apply_rope, rope_cos_sin
from omni_jax.sharding.rules import constrain

_INIT = nn.initializers.normal(0.02)
_CONV_AXES = ("kernel", "conv_in", "conv_out")
_RES_DILATIONS = (1, 3, 9)
_RES_KERNEL = 7
_CONV_KERNEL = 7
_SNAKE_EPS = 1e-9


def _c2w(config: OmniConfig | Code2WavConfig) -> Code2WavConfig:
    return config.code2wav if isinstance(config, OmniConfig) else config


def _mask_before(x: jax.Array, valid_start: jax.Array | None) -> jax.Array:
    """Zero x[b, t] for t < valid_start[b]: what a sequence that starts at valid_start sees as causal zero padding."""
    if valid_start is None:
        return x
    keep = jnp.arange(x.shape[1])[None, :] >= valid_start[:, None]
    return jnp.where(keep[..., None], x, jnp.zeros((), x.dtype))


def _streaming(module: nn.Module) -> bool:
    """Streaming mode is a mutable "cache" collection (the Linen decode idiom): see `init_stream`."""
    return module.is_mutable_collection("cache")


def _left_context(module: nn.Module, x: jax.Array, valid_start: jax.Array | None, need: int) -> tuple[jax.Array, int]:
    """The input a causal layer reading `need` steps back convolves, and the zero padding it still needs.

    Whole sequence: x itself with `need` steps of zero padding. Streaming: the last `need` input steps of
    the previous chunk (the "buffer" cache variable, at this layer's own time resolution) prepended, no
    padding. valid_start is then minus the global index of x's first step, so steps before the stream's
    start (a fresh row's empty buffer, and the first chunk's outputs of the trimmed transposed convs that
    precede sample 0) are zeroed exactly as the whole sequence's padding: a row restarts by resetting its
    frame count, with no buffer to clear.
    """
    if not _streaming(module) or need == 0:
        return _mask_before(x, valid_start), need
    buf = module.variable("cache", "buffer", jnp.zeros, (x.shape[0], need, x.shape[-1]), x.dtype)
    x = _mask_before(jnp.concatenate([buf.value, x], axis=1), valid_start + need)
    buf.value = x[:, x.shape[1] - need:]
    return x, 0


def _upsampled_valid(module: nn.Module, valid_start: jax.Array | None, m: int, s: int) -> jax.Array | None:
    """valid_start after a trimmed transposed conv (kernel m*s, stride s). Streaming, its outputs start at
    the buffer's first step, m-1 input steps before the chunk's."""
    if valid_start is None:
        return None
    return (valid_start + (m - 1 if _streaming(module) else 0)) * s


# ---------------------------------------------------------------------------------------------- building blocks


class CausalConv(nn.Module):
    """Stride-1 causal Conv1d: left pad (k-1)*dilation zeros (HF's extra right padding is 0 at stride 1)."""

    features: int
    kernel_size: int
    dilation: int = 1
    groups: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid_start: jax.Array | None = None) -> jax.Array:
        cin = x.shape[-1]
        if cin % self.groups:
            raise ValueError(f"CausalConv: groups={self.groups} does not divide {cin} input channels")
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(_INIT, _CONV_AXES),
            (self.kernel_size, cin // self.groups, self.features), self.param_dtype,
        )
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                          (self.features,), self.param_dtype)
        pad = (self.kernel_size - 1) * self.dilation
        x, pad = _left_context(self, x.astype(self.dtype), valid_start, pad)
        y = jax.lax.conv_general_dilated(
            x, kernel.astype(self.dtype), window_strides=(1,), padding=[(pad, 0)], rhs_dilation=(self.dilation,),
            dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=self.groups,
        )
        return y + bias.astype(self.dtype)


class CausalTransConv(nn.Module):
    """ConvTranspose1d(kernel=m*stride, stride) with (m-1)*stride trimmed from both ends: L -> (L-m+1)*stride.

    Written as m matmuls over shifted inputs: output block j = sum_q x[j + m-1-q] @ W[q*s:(q+1)*s].
    """

    features: int
    kernel_size: int
    stride: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid_start: jax.Array | None = None) -> jax.Array:
        s, k = self.stride, self.kernel_size
        if k % s:
            raise ValueError(f"CausalTransConv: kernel_size={k} must be a multiple of stride={s}")
        m = k // s
        cin = x.shape[-1]
        kernel = self.param("kernel", nn.with_logical_partitioning(_INIT, _CONV_AXES), (k, cin, self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                          (self.features,), self.param_dtype)
        x, _ = _left_context(self, x.astype(self.dtype), valid_start, m - 1)
        b, length, _ = x.shape
        n = length - m + 1
        if n <= 0:
            raise ValueError(f"CausalTransConv: {length} input steps is too short for kernel {k}, stride {s}")
        w = kernel.astype(self.dtype).reshape(m, s, cin, self.features)
        y = sum(jnp.einsum("btc,rcd->btrd", x[:, m - 1 - q: m - 1 - q + n], w[q]) for q in range(m))
        return y.reshape(b, n * s, self.features) + bias.astype(self.dtype)


class SnakeBeta(nn.Module):
    """x + sin^2(x * e^alpha) / (e^beta + 1e-9), per channel (alpha, beta stored in log scale as in HF)."""

    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        init = nn.with_logical_partitioning(nn.initializers.zeros, ("channels",))
        alpha = jnp.exp(self.param("alpha", init, (c,), self.param_dtype).astype(x.dtype))
        beta = jnp.exp(self.param("beta", init, (c,), self.param_dtype).astype(x.dtype))
        return x + (1.0 / (beta + _SNAKE_EPS)) * jnp.square(jnp.sin(x * alpha))


class ConvNeXtBlock(nn.Module):
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid_start: jax.Array | None) -> jax.Array:
        dim = x.shape[-1]
        h = CausalConv(dim, _CONV_KERNEL, groups=dim, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="dwconv")(x, valid_start)
        h = nn.LayerNorm(
            epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name="norm",
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        )(h)

        def dense(features, axes, name):
            return logical_dense(features, axes, name, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)

        h = dense(4 * dim, ("embed", "mlp"), "pwconv1")(h)
        h = jax.nn.gelu(h, approximate=False)  # torch nn.GELU() default: exact erf
        h = dense(dim, ("mlp", "embed"), "pwconv2")(h)
        gamma = self.param("gamma", nn.with_logical_partitioning(nn.initializers.constant(1e-6), ("embed",)),
                           (dim,), self.param_dtype)
        return x + gamma.astype(self.dtype) * h


class ResidualUnit(nn.Module):
    dilation: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid_start: jax.Array | None) -> jax.Array:
        dim = x.shape[-1]
        h = SnakeBeta(self.param_dtype, name="act1")(x)
        h = CausalConv(dim, _RES_KERNEL, self.dilation, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="conv1")(h, valid_start)
        h = SnakeBeta(self.param_dtype, name="act2")(h)
        # kernel 1: reads no neighbours, so no masking is needed.
        h = CausalConv(dim, 1, dtype=self.dtype, param_dtype=self.param_dtype, name="conv2")(h)
        return x + h


class DecoderBlock(nn.Module):
    features: int
    rate: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid_start: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        h = SnakeBeta(self.param_dtype, name="act")(x)
        h = CausalTransConv(self.features, 2 * self.rate, self.rate, self.dtype, self.param_dtype,
                            name="upsample")(h, valid_start)
        valid_start = _upsampled_valid(self, valid_start, 2, self.rate)
        for i, d in enumerate(_RES_DILATIONS):
            h = ResidualUnit(d, self.dtype, self.param_dtype, name=f"res_{i}")(h, valid_start)
        return h, valid_start


class SlidingAttention(nn.Module):
    """Full-sequence multi-head attention with RoPE under a precomputed [B, T, T] mask (no cache, no q/k norm)."""

    cfg: Code2WavConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.cfg

        def proj(heads, axis, name):
            return nn.DenseGeneral(
                (heads, cfg.head_dim), use_bias=cfg.attention_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(_INIT, ("embed", axis, "head_dim")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis, "head_dim")), name=name,
            )

        q = apply_rope(proj(cfg.num_attention_heads, "heads", "q_proj")(x), cos, sin)
        k = apply_rope(proj(cfg.num_key_value_heads, "kv_heads", "k_proj")(x), cos, sin)
        v = proj(cfg.num_key_value_heads, "kv_heads", "v_proj")(x)
        keep = cfg.sliding_window - 1
        if _streaming(self) and keep:  # the window's last `keep` keys and values (RoPE applied) before this chunk
            shape = (x.shape[0], keep) + k.shape[2:]
            ck = self.variable("cache", "key", jnp.zeros, shape, k.dtype)
            cv = self.variable("cache", "value", jnp.zeros, shape, v.dtype)
            k, v = jnp.concatenate([ck.value, k], axis=1), jnp.concatenate([cv.value, v], axis=1)
            ck.value, cv.value = k[:, k.shape[1] - keep:], v[:, v.shape[1] - keep:]
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        out = dot_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask, cfg.head_dim**-0.5)
        return nn.DenseGeneral(
            x.shape[-1], axis=(-2, -1), use_bias=cfg.attention_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(_INIT, ("heads", "head_dim", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name="o_proj",
        )(out)


class LayerScale(nn.Module):
    init_scale: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.constant(self.init_scale), ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        return scale.astype(x.dtype) * x


class TransformerLayer(nn.Module):
    cfg: Code2WavConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        cfg = self.cfg
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="input_layernorm")(x)
        h = SlidingAttention(cfg, self.dtype, self.param_dtype, name="self_attn")(h, cos, sin, mask)
        x = x + LayerScale(cfg.layer_scale_initial_scale, self.param_dtype, name="self_attn_layer_scale")(h)
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")(x)
        h = GatedMLP(cfg.intermediate_size, self.dtype, self.param_dtype, name="mlp")(h)
        x = x + LayerScale(cfg.layer_scale_initial_scale, self.param_dtype, name="mlp_layer_scale")(h)
        return constrain(x, ("batch", "length", "embed")), None


def stream_mask(positions: jax.Array, window: int) -> jax.Array:
    """[B, n, window-1+n] for a streamed chunk at global frames positions [B, n]: the keys are the cached
    window-1 frames before the chunk and the chunk's own; frames before the stream's start are never visible."""
    n = positions.shape[1]
    q = positions[:, :, None]
    k = (positions[:, :1] - (window - 1))[:, :, None] + jnp.arange(window - 1 + n)[None, None, :]
    return (k <= q) & (k > q - window) & (k >= 0)


def sliding_mask(length: int, window: int, valid_start: jax.Array | None, batch: int) -> jax.Array:
    """[B, T, T]: key j visible to query i iff i - window < j <= i and j >= valid_start[b] (HF's sliding mask)."""
    i = jnp.arange(length)[:, None]
    j = jnp.arange(length)[None, :]
    mask = (j <= i) & (j > i - window)
    mask = jnp.broadcast_to(mask[None], (batch, length, length))
    if valid_start is not None:
        mask &= j[None] >= valid_start[:, None, None]
    return mask


class PreTransformer(nn.Module):
    cfg: Code2WavConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, valid_start: jax.Array | None) -> jax.Array:
        cfg = self.cfg
        b, t, _ = x.shape
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        if _streaming(self):
            mask = stream_mask(positions, cfg.sliding_window)
        else:
            mask = sliding_mask(t, cfg.sliding_window, valid_start, b)
        if self.has_variable("params", layer_name(0)):  # the unrolled layout (`unroll`): one CPU device
            for i in range(cfg.num_hidden_layers):
                x, _ = TransformerLayer(cfg, self.dtype, self.param_dtype, name=layer_name(i))(x, cos, sin, mask)
        else:
            layers = scan_layers(TransformerLayer, cfg.num_hidden_layers)(cfg, self.dtype, self.param_dtype,
                                                                          name="layers")
            x, _ = layers(x, cos, sin, mask)
        return RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="norm")(x)


class Code2Wav(nn.Module):
    """codes [B, Q, T] -> waveform [B, T*U - D] in [-1, 1] (see module docstring for U, D and the masking args)."""

    config: Code2WavConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        codes: jax.Array,
        positions: jax.Array,
        tf_valid: jax.Array | None = None,
        conv_valid: jax.Array | None = None,
        conv_skip: int = 0,
    ) -> jax.Array:
        """positions [B, T] RoPE positions; tf_valid [B]: frames before it are padding (masked as attention keys);
        conv_skip (static): transformer-output frames dropped before the conv stack; conv_valid [B]: frames (after
        the skip) before it are padding (zeroed at every conv input, i.e. the conv stack starts there).

        Streaming (applied with the "cache" collection mutable, see `init_stream`): codes are the next T frames
        of each row, positions their global frame indices (row b's stream so far has positions[b, 0] frames),
        the masking arguments are unused, and the result is samples [p*U - D, (p+T)*U - D) with p = positions[:, 0]
        (a fresh row's first D samples precede the waveform: drop them)."""
        cfg = self.config
        q, cb = cfg.num_quantizers, cfg.codebook_size
        if codes.ndim != 3 or codes.shape[1] != q:
            raise ValueError(f"Code2Wav expects codes [batch, {q}, frames], got shape {codes.shape}")
        embed = nn.Embed(
            q * cb, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="code_embedding",
            embedding_init=nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
        )
        offsets = (jnp.arange(q, dtype=jnp.int32) * cb)[None, :, None]
        x = jnp.mean(embed(codes.astype(jnp.int32) + offsets).astype(jnp.float32), axis=1).astype(self.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        x = PreTransformer(cfg, self.dtype, self.param_dtype, name="pre_transformer")(x, positions, tf_valid)
        x = x[:, conv_skip:]

        valid = -positions[:, 0] if _streaming(self) else conv_valid
        for i, r in enumerate(cfg.upsampling_ratios):
            x = CausalTransConv(cfg.hidden_size, r, r, self.dtype, self.param_dtype, name=f"upsample_{i}")(x, valid)
            valid = _upsampled_valid(self, valid, 1, r)
            x = ConvNeXtBlock(self.dtype, self.param_dtype, name=f"convnext_{i}")(x, valid)

        x = CausalConv(cfg.decoder_dim, _CONV_KERNEL, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="decoder_in")(x, valid)
        for i, r in enumerate(cfg.upsample_rates):
            x, valid = DecoderBlock(cfg.decoder_dim // 2 ** (i + 1), r, self.dtype, self.param_dtype,
                                    name=f"decoder_block_{i}")(x, valid)
        x = SnakeBeta(self.param_dtype, name="decoder_act")(x)
        x = CausalConv(1, _CONV_KERNEL, dtype=self.dtype, param_dtype=self.param_dtype, name="decoder_out")(x, valid)
        return jnp.clip(x[..., 0], -1.0, 1.0)


# ---------------------------------------------------------------------------------------------- geometry


def wav_length(config: OmniConfig | Code2WavConfig, frames: int) -> int:
    """Samples the full decode of `frames` frames returns (HF's exact length)."""
    cfg = _c2w(config)
    n = frames
    for r in cfg.upsampling_ratios:
        n *= r
    for r in cfg.upsample_rates:
        n = (n - 1) * r
    return n


def delay_samples(config: OmniConfig | Code2WavConfig) -> int:
    """D = frames*U - wav_length(frames), independent of frames (555 for the real and tiny configs)."""
    cfg = _c2w(config)
    return cfg.total_upsample - wav_length(cfg, 1)


def transformer_context_frames(config: OmniConfig | Code2WavConfig) -> int:
    """Frames the stacked sliding-window transformer looks back: layers * (window - 1)."""
    cfg = _c2w(config)
    return cfg.num_hidden_layers * (cfg.sliding_window - 1)


def conv_context_frames(config: OmniConfig | Code2WavConfig) -> int:
    """Frames the conv stack looks back from sample a*U - D (the first sample that frame a completes).

    Walks the earliest needed index back through every layer, in full-decode indexing of each stage.
    """
    cfg = _c2w(config)
    u, a = cfg.total_upsample, 1 << 20
    e = a * u - delay_samples(cfg)
    e -= _CONV_KERNEL - 1  # decoder_out
    for r in reversed(cfg.upsample_rates):
        e -= sum((_RES_KERNEL - 1) * d for d in _RES_DILATIONS)  # residual units (conv2 has kernel 1)
        e //= r  # trimmed transposed conv: output t reads inputs t//r .. t//r + 1
    e -= _CONV_KERNEL - 1  # decoder_in
    for r in reversed(cfg.upsampling_ratios):
        e -= _CONV_KERNEL - 1  # ConvNeXt depthwise conv
        e //= r  # kernel == stride: output t reads input t//r only
    return a - e


def required_left_context(config: OmniConfig | Code2WavConfig) -> int:
    """Frames back that one sample depends on (578 real, 152 tiny): what a stateless window decode would re-read."""
    return transformer_context_frames(config) + conv_context_frames(config)


# ---------------------------------------------------------------------------------------------- params


def unroll(config: OmniConfig, params: dict, split_experts: bool = True, consume: bool = False) -> dict:
    """Code2Wav params with the pre-transformer's layer stack unstacked (`registry.unroll`, chosen by the layout
    step on one CPU device): XLA:CPU copies every layer's slice of a stacked weight on every call, a fixed cost
    that dominates a streamed chunk of a few frames. split_experts does not apply (no experts)."""
    del split_experts
    if "layers" not in params["pre_transformer"]:
        return params  # already unrolled (params taken from a pipeline that prepared them)
    pre = dict(params["pre_transformer"])
    stack = pre.pop("layers")
    n = _c2w(config).num_hidden_layers
    for i in range(n):
        pre[layer_name(i)] = jax.tree_util.tree_map(lambda a, i=i: a[i], stack)
    if consume:
        stack.clear()
    return {**params, "pre_transformer": pre}


def build(config: OmniConfig | Code2WavConfig, dtype=jnp.float32) -> tuple[Code2Wav, tuple]:
    """The module and the arguments its init traces with (read by omni_jax.models.registry)."""
    cfg = _c2w(config)
    frames = 2  # the trimmed transposed convs need >= 2 input steps
    codes = jnp.zeros((1, cfg.num_quantizers, frames), jnp.int32)
    return Code2Wav(cfg, dtype=dtype, param_dtype=dtype), (codes, jnp.zeros((1, frames), jnp.int32))


# ---------------------------------------------------------------------------------------------- HF conversion


def _conv(a: np.ndarray) -> np.ndarray:
    """torch Conv1d weight [out, in/groups, k] -> [k, in/groups, out]."""
    return a.transpose(2, 1, 0)


def _trans_conv(a: np.ndarray) -> np.ndarray:
    """torch ConvTranspose1d weight [in, out, k] -> [k, in, out]."""
    return a.transpose(2, 0, 1)


def hf_rules(config: OmniConfig | Code2WavConfig) -> list[Rule]:
    """Rules for every `code2wav.*` checkpoint key onto the param tree rooted at 'code2wav'."""
    cfg = _c2w(config)
    root = ("code2wav",)
    d = cfg.head_dim
    nb = len(cfg.upsample_rates)

    def at(*path: str, layer: bool = False):
        return lambda m: (root + path, (int(m.group(1)),) if layer else ())

    def fixed(pattern: str, path: Sequence[str], fn=identity) -> Rule:
        return Rule(r"code2wav\." + pattern, lambda m: (root + tuple(path), ()), fn)

    lp = r"code2wav\.pre_transformer\.layers\.(\d+)\."
    tf = ("pre_transformer", "layers")
    rules = [fixed(r"code_embedding\.weight", ("code_embedding", "embedding"))]
    for name, fn in (("q_proj", linear_to_heads(d)), ("k_proj", linear_to_heads(d)), ("v_proj", linear_to_heads(d)),
                     ("o_proj", heads_to_linear(d))):
        rules.append(Rule(lp + rf"self_attn\.{name}\.weight", at(*tf, "self_attn", name, "kernel", layer=True), fn))
        bias_fn = identity if name == "o_proj" else bias_to_heads(d)
        rules.append(Rule(lp + rf"self_attn\.{name}\.bias", at(*tf, "self_attn", name, "bias", layer=True), bias_fn))
    for name in ("input_layernorm", "post_attention_layernorm"):
        rules.append(Rule(lp + rf"{name}\.weight", at(*tf, name, "scale", layer=True), identity))
    for name in ("self_attn_layer_scale", "mlp_layer_scale"):
        rules.append(Rule(lp + rf"{name}\.scale", at(*tf, name, "scale", layer=True), identity))
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules.append(Rule(lp + rf"mlp\.{name}\.weight", at(*tf, "mlp", name, "kernel", layer=True), linear))
    rules.append(fixed(r"pre_transformer\.norm\.weight", ("pre_transformer", "norm", "scale")))

    for i in range(len(cfg.upsampling_ratios)):
        up, nx = f"upsample_{i}", f"convnext_{i}"
        rules += [
            fixed(rf"upsample\.{i}\.0\.conv\.weight", (up, "kernel"), _trans_conv),
            fixed(rf"upsample\.{i}\.0\.conv\.bias", (up, "bias")),
            fixed(rf"upsample\.{i}\.1\.dwconv\.conv\.weight", (nx, "dwconv", "kernel"), _conv),
            fixed(rf"upsample\.{i}\.1\.dwconv\.conv\.bias", (nx, "dwconv", "bias")),
            fixed(rf"upsample\.{i}\.1\.norm\.weight", (nx, "norm", "scale")),
            fixed(rf"upsample\.{i}\.1\.norm\.bias", (nx, "norm", "bias")),
            fixed(rf"upsample\.{i}\.1\.pwconv1\.weight", (nx, "pwconv1", "kernel"), linear),
            fixed(rf"upsample\.{i}\.1\.pwconv1\.bias", (nx, "pwconv1", "bias")),
            fixed(rf"upsample\.{i}\.1\.pwconv2\.weight", (nx, "pwconv2", "kernel"), linear),
            fixed(rf"upsample\.{i}\.1\.pwconv2\.bias", (nx, "pwconv2", "bias")),
            fixed(rf"upsample\.{i}\.1\.gamma", (nx, "gamma")),
        ]

    rules += [
        fixed(r"decoder\.0\.conv\.weight", ("decoder_in", "kernel"), _conv),
        fixed(r"decoder\.0\.conv\.bias", ("decoder_in", "bias")),
        Rule(rf"code2wav\.decoder\.{nb + 1}\.(alpha|beta)", lambda m: (root + ("decoder_act", m.group(1)), ()),
             identity),
        fixed(rf"decoder\.{nb + 2}\.conv\.weight", ("decoder_out", "kernel"), _conv),
        fixed(rf"decoder\.{nb + 2}\.conv\.bias", ("decoder_out", "bias")),
    ]
    for i in range(nb):
        blk = f"decoder_block_{i}"
        p = rf"code2wav\.decoder\.{i + 1}\.block\."
        rules += [
            Rule(p + r"0\.(alpha|beta)", lambda m, blk=blk: (root + (blk, "act", m.group(1)), ()), identity),
            Rule(p + r"1\.conv\.weight", lambda m, blk=blk: (root + (blk, "upsample", "kernel"), ()), _trans_conv),
            Rule(p + r"1\.conv\.bias", lambda m, blk=blk: (root + (blk, "upsample", "bias"), ()), identity),
            Rule(p + r"([2-9])\.(act1|act2)\.(alpha|beta)",
                 lambda m, blk=blk: (root + (blk, f"res_{int(m.group(1)) - 2}", m.group(2), m.group(3)), ()), identity),
            Rule(p + r"([2-9])\.(conv1|conv2)\.conv\.weight",
                 lambda m, blk=blk: (root + (blk, f"res_{int(m.group(1)) - 2}", m.group(2), "kernel"), ()), _conv),
            Rule(p + r"([2-9])\.(conv1|conv2)\.conv\.bias",
                 lambda m, blk=blk: (root + (blk, f"res_{int(m.group(1)) - 2}", m.group(2), "bias"), ()), identity),
        ]
    return rules
