"""The AuT audio encoder (transformers `Qwen3OmniMoeAudioEncoder`): log-mel chunks -> thinker-width rows.

Mel frames are cut into chunks of 2 * n_window frames; each chunk goes through three stride-2 Conv2d
(+ exact GELU) over (mel, time), a bias-free Linear over the flattened (channel, mel) axis and sinusoidal
positions that restart in every chunk. The transformer attends inside windows of `chunks_per_window`
consecutive chunks of one clip (non-causal, never across windows or clips); then ln_post -> Linear ->
GELU -> Linear to the thinker's width.

Static shapes: the host lays the chunks of every clip on a grid [windows, chunks_per_window, frames],
each clip starting a new window; a chunk's `length` (valid mel frames, 0 for an empty grid slot) masks
attention keys. transformers zero-pads each chunk to the longest chunk of the call (`pad_to` here):
the convolutions see that padding, so valid rows near a short chunk's end depend on it. `pad_to`
reproduces it exactly on the fixed grid by zeroing every conv output past the padded length's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config import AudioEncoderConfig, OmniConfig
from omni_jax.models.rules import Rule, identity, linear


def conv_length(n):
    """Output length of one stride-2, kernel-3, pad-1 convolution (ints or arrays)."""
    return (n - 1) // 2 + 1


def chunk_rows(frames):
    """Encoder rows of one chunk of `frames` mel frames: the three convolutions' output length (0 for 0)."""
    return conv_length(conv_length(conv_length(frames)))


def rows_for_frames(frames: int, chunk_frames: int) -> int:
    """Encoder rows of a clip of `frames` mel frames (= its `<|audio_pad|>` count)."""
    return (frames // chunk_frames) * chunk_rows(chunk_frames) + chunk_rows(frames % chunk_frames)


def windows_needed(frames: list[int], cfg: AudioEncoderConfig) -> int:
    """Grid windows for clips of these mel-frame counts: each clip starts a new window."""
    chunks = (-(-n // cfg.chunk_frames) for n in frames)  # ceil divisions
    return sum(-(-c // cfg.chunks_per_window) for c in chunks)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """[length, channels] Whisper positions: sin of the first half of the timescales, cos of the second."""
    inc = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2, dtype=np.float32))
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def _dense(n: int, name: str, axes: tuple[str, str], dtype, param_dtype, use_bias: bool = True) -> nn.Dense:
    """A Dense whose params carry logical axes (the rules table replicates them: "audio_*" -> None)."""
    return nn.Dense(n, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))


def _layer_norm(name: str, param_dtype) -> nn.LayerNorm:
    axes = ("audio_embed",)
    return nn.LayerNorm(1e-5, dtype=jnp.float32, param_dtype=param_dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), axes),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes))


class EncoderLayer(nn.Module):
    cfg: AudioEncoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask):
        """x [W, S, D]; key_mask [W, S] bool (valid rows)."""
        c = self.cfg
        e, m = "audio_embed", "audio_mlp"
        dense = lambda n, name, axes=(e, e): _dense(n, name, axes, self.dtype, self.param_dtype)  # noqa: E731
        norm = lambda name: _layer_norm(name, self.param_dtype)  # noqa: E731
        w, s, d = x.shape
        h = norm("self_attn_layer_norm")(x).astype(self.dtype)
        split = lambda t: t.reshape(w, s, c.encoder_attention_heads, c.head_dim)  # noqa: E731
        q, k, v = (split(dense(d, n)(h)) for n in ("q_proj", "k_proj", "v_proj"))
        scores = jnp.einsum("wqhd,wkhd->whqk", q, k, preferred_element_type=jnp.float32) * c.head_dim ** -0.5
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        attn = jnp.einsum("whqk,wkhd->wqhd", probs, v).reshape(w, s, d)
        x = x + dense(d, "out_proj")(attn).astype(x.dtype)
        h = norm("final_layer_norm")(x).astype(self.dtype)
        h = dense(d, "fc2", (m, e))(nn.gelu(dense(c.encoder_ffn_dim, "fc1", (e, m))(h), approximate=False))
        return x + h.astype(x.dtype)


class AudioEncoder(nn.Module):
    cfg: AudioEncoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, mel, lengths, pad_to):
        """mel [W, P, mel_bins, F] (P = chunks_per_window, F = chunk_frames); lengths [W, P] int valid frames;
        pad_to [W, P] int (the padded length transformers gives that chunk). -> ([W, P*T, output_dim], valid
        [W, P*T]) with T rows per full chunk."""
        c = self.cfg
        wn, p, m, f = mel.shape
        x = mel.reshape(wn * p, m, f)[..., None].astype(self.dtype)  # NHWC: (mel, time, 1)
        limit = pad_to.reshape(-1)
        for i in (1, 2, 3):
            conv = ("audio_conv",) * 4
            x = nn.Conv(c.downsample_hidden_size, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                        dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv2d{i}",
                        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), conv),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), conv[-1:]))(x)
            x = nn.gelu(x, approximate=False)
            limit = conv_length(limit)
            keep = jnp.arange(x.shape[2])[None, :] < limit[:, None]  # transformers' tensor ends at `limit`
            x = jnp.where(keep[:, None, :, None], x, 0)
        n, fm, t, ch = x.shape
        x = x.transpose(0, 2, 3, 1).reshape(n, t, ch * fm)  # (channel, mel) flattened channel-major
        x = _dense(c.d_model, "conv_out", ("audio_conv", "audio_embed"), self.dtype, self.param_dtype,
                   use_bias=False)(x)
        x = x.astype(jnp.float32) + jnp.asarray(sinusoids(t, c.d_model))[None]
        valid = jnp.arange(t)[None, :] < chunk_rows(lengths.reshape(-1))[:, None]  # empty slots: 0 rows
        x, valid = x.reshape(wn, p * t, c.d_model), valid.reshape(wn, p * t)
        for i in range(c.encoder_layers):
            x = EncoderLayer(c, self.dtype, self.param_dtype, name=f"layers_{i}")(x, valid)
        x = _layer_norm("ln_post", self.param_dtype)(x).astype(self.dtype)
        x = _dense(c.d_model, "proj1", ("audio_embed", "audio_embed"), self.dtype, self.param_dtype)(x)
        x = _dense(c.output_dim, "proj2", ("audio_embed", "embed"), self.dtype,
                   self.param_dtype)(nn.gelu(x, approximate=False))
        return x.astype(jnp.float32), valid


@dataclasses.dataclass(frozen=True)
class ChunkGrid:
    """Host-side layout of a call's clips on the encoder grid, and where each clip's rows come out."""

    mel: np.ndarray  # [W, P, mel_bins, F] float32
    lengths: np.ndarray  # [W, P] int32
    pad_to: np.ndarray  # [W, P] int32
    rows: tuple[int, ...]  # encoder rows per clip

    def gather(self, out: np.ndarray, valid: np.ndarray) -> list[np.ndarray]:
        """Per clip, its [rows, output_dim] encoder rows in order."""
        flat = np.asarray(out)[np.asarray(valid)]
        splits = np.cumsum(self.rows)[:-1]
        return np.split(flat, splits)


def chunk_grid(features: list[np.ndarray], cfg: AudioEncoderConfig, windows: int | None = None) -> ChunkGrid:
    """Lay clips' [mel_bins, frames] features on the grid. Every chunk is padded to the longest chunk among
    these clips, as transformers pads one call's chunks. windows: pad the grid to this many windows (a
    static shape bucket); None: as many as needed."""
    fr, per = cfg.chunk_frames, cfg.chunks_per_window
    chunks: list[list[np.ndarray]] = []
    for feat in features:
        if feat.ndim != 2 or feat.shape[0] != cfg.num_mel_bins or feat.shape[1] == 0:
            raise ValueError(f"audio features must be [{cfg.num_mel_bins}, frames>0], got {feat.shape}")
        chunks.append([feat[:, i:i + fr] for i in range(0, feat.shape[1], fr)])
    longest = max(c.shape[1] for clip in chunks for c in clip)
    need = windows_needed([f.shape[1] for f in features], cfg)
    windows = need if windows is None else windows
    if windows < need:
        raise ValueError(f"these clips need {need} encoder windows, the grid has {windows}")
    mel = np.zeros((windows * per, cfg.num_mel_bins, fr), np.float32)
    lengths = np.zeros((windows * per,), np.int32)
    slot = 0
    for clip in chunks:
        for j, ch in enumerate(clip):
            mel[slot + j, :, :ch.shape[1]] = ch
            lengths[slot + j] = ch.shape[1]
        slot += -(-len(clip) // per) * per
    pad_to = np.where(lengths > 0, longest, 0).astype(np.int32)
    rows = tuple(rows_for_frames(f.shape[1], fr) for f in features)
    shape = (windows, per)
    return ChunkGrid(mel.reshape(*shape, cfg.num_mel_bins, fr), lengths.reshape(shape), pad_to.reshape(shape), rows)


# ---------------------------------------------------------------------------- registry hooks

def build(config: OmniConfig, dtype) -> tuple[nn.Module, tuple]:
    cfg = config.thinker.audio
    if cfg is None:
        raise ValueError("this config has no thinker_config.audio_config")
    per = cfg.chunks_per_window
    args = (jnp.zeros((1, per, cfg.num_mel_bins, cfg.chunk_frames), jnp.float32),
            jnp.ones((1, per), jnp.int32), jnp.ones((1, per), jnp.int32))
    return AudioEncoder(cfg, dtype, dtype), args


def _conv2d(a: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] -> flax Conv kernel [kh, kw, in, out]."""
    return a.transpose(2, 3, 1, 0)


def hf_rules(config: OmniConfig) -> list[Rule]:
    """Rules for every `thinker.audio_tower.*` checkpoint key onto the tree rooted at 'audio_tower'."""
    root, pre = ("audio_tower",), r"thinker\.audio_tower\."

    def fixed(pattern: str, path: tuple[str, ...], fn=identity) -> Rule:
        return Rule(pre + pattern, lambda m: (root + path, ()), fn)

    def layer(pattern: str, path: tuple[str, ...], fn=identity) -> Rule:
        return Rule(pre + r"layers\.(\d+)\." + pattern, lambda m: (root + (f"layers_{m.group(1)}",) + path, ()), fn)

    rules = [fixed(r"conv_out\.weight", ("conv_out", "kernel"), linear)]
    for i in (1, 2, 3):
        rules += [fixed(rf"conv2d{i}\.weight", (f"conv2d{i}", "kernel"), _conv2d),
                  fixed(rf"conv2d{i}\.bias", (f"conv2d{i}", "bias"))]
    for name in ("ln_post",):
        rules += [fixed(rf"{name}\.weight", (name, "scale")), fixed(rf"{name}\.bias", (name, "bias"))]
    for name in ("proj1", "proj2"):
        rules += [fixed(rf"{name}\.weight", (name, "kernel"), linear), fixed(rf"{name}\.bias", (name, "bias"))]
    for name in ("self_attn_layer_norm", "final_layer_norm"):
        rules += [layer(rf"{name}\.weight", (name, "scale")), layer(rf"{name}\.bias", (name, "bias"))]
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += [layer(rf"self_attn\.{name}\.weight", (name, "kernel"), linear),
                  layer(rf"self_attn\.{name}\.bias", (name, "bias"))]
    for name in ("fc1", "fc2"):
        rules += [layer(rf"{name}\.weight", (name, "kernel"), linear), layer(rf"{name}\.bias", (name, "bias"))]
    return rules
