"""Code2Wav decoding: codes -> 24 kHz waveform, whole, HF-chunked, or incrementally while a reply streams.

  * `code2wav`: the full decode (HF `Code2Wav.forward`), one compile per (B, T).
  * `chunked_decode`: HF `Code2Wav.chunked_decode` (chunks of 300 frames with 25 frames of left context,
    RoPE restarting per chunk); every chunk runs in one padded window, so it compiles once.
  * `decode_incremental`: the samples frames [a, b) complete, from just enough left context to equal
    the full decode; `AudioChunker` drives it frame by frame for streaming.
  * `vocode`: what `OmniPipeline.generate` returns per row (HF's chunked decode of each row's frames).

Padded windows decode exactly like unpadded sequences: frames before a valid start are masked as
attention keys and zeroed at every conv input (the module's tf_valid / conv_valid / conv_skip).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax import buckets
from omni_jax.config import Code2WavConfig, OmniConfig
from omni_jax.errors import NumericalError, UsageError
from omni_jax.models import code2wav as c2w
from omni_jax.models.code2wav import Code2Wav

#: HF `Code2Wav.chunked_decode` settings used by `generate(..., return_audio=True)`.
CHUNK_SIZE = 300
LEFT_CONTEXT = 25
#: Frames per streamed audio chunk allowed: below 4 the fixed per-chunk cost (context transformer, dispatch)
#: dominates; above 25 (2 s of audio) the first chunk stops being "early".
MIN_CHUNK_FRAMES, MAX_CHUNK_FRAMES = 4, 25
DEFAULT_CHUNK_FRAMES = 4


def as_code2wav_config(config: OmniConfig | Code2WavConfig) -> Code2WavConfig:
    return config.code2wav if isinstance(config, OmniConfig) else config


def _check_params(params: Any) -> None:
    if "code_embedding" not in params:
        raise ValueError(
            "code2wav params must be the 'code2wav' subtree (with 'code_embedding', 'pre_transformer', ...); "
            f"got keys {sorted(params)[:6]}"
        )


def _apply(params, codes, positions, tf_valid, conv_valid, config: Code2WavConfig, conv_skip: int, dtype):
    _check_params(params)
    dtype = dtype or params["code_embedding"]["embedding"].dtype
    model = Code2Wav(config, dtype=dtype, param_dtype=params["code_embedding"]["embedding"].dtype)
    wav = model.apply({"params": params}, codes, positions, tf_valid, conv_valid, conv_skip)
    return wav.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _code2wav_jit(params, codes, config: Code2WavConfig, dtype=None):
    b, _, t = codes.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    return _apply(params, codes, positions, None, None, config, 0, dtype)


def code2wav(params: Any, codes: jax.Array, config: OmniConfig | Code2WavConfig, dtype=None) -> jax.Array:
    """Full decode (HF `Code2Wav.forward`): codes [B, Q, T] int -> wav [B, T*U - D] float32.

    params: the 'code2wav' param subtree; compute dtype defaults to the params' dtype. Codes must lie in
    [0, codebook_size) (not checked: out-of-range gathers clamp under jit).
    """
    return _code2wav_jit(params, jnp.asarray(codes), as_code2wav_config(config), dtype)


@functools.partial(jax.jit, static_argnames=("config", "conv_skip", "dtype"))
def decode_window(params, codes, pos_offset, tf_valid, conv_valid, config: Code2WavConfig, conv_skip: int = 0,
                  dtype=None) -> jax.Array:
    """Decode a padded window: codes [B, Q, W]; positions are arange(W) + pos_offset[b]; frames before tf_valid[b]
    are padding for the transformer; conv stack runs on frames [conv_skip, W) with frames before conv_valid[b]
    (counted after the skip) treated as padding. Returns [B, (W - conv_skip)*U - D] float32."""
    b, _, w = codes.shape
    positions = jnp.arange(w, dtype=jnp.int32)[None, :] + jnp.asarray(pos_offset, jnp.int32).reshape(-1, 1)
    positions = jnp.broadcast_to(positions, (b, w))
    tf_valid = jnp.broadcast_to(jnp.asarray(tf_valid, jnp.int32), (b,))
    conv_valid = jnp.broadcast_to(jnp.asarray(conv_valid, jnp.int32), (b,))
    return _apply(params, codes, positions, tf_valid, conv_valid, config, conv_skip, dtype)


def _window(codes: np.ndarray, first: int, end: int, width: int) -> np.ndarray:
    """codes[:, :, first:first+width] on the host, with frames < 0 or >= end replaced by code 0 (masked later).

    Built in numpy so varying offsets never trigger eager-op compiles; only the [B, Q, width] result is transferred.
    """
    b, q, _ = codes.shape
    out = np.zeros((b, q, width), np.int32)
    lo, hi = max(first, 0), min(end, first + width)
    if hi > lo:
        out[:, :, lo - first:hi - first] = codes[:, :, lo:hi]
    return out


def chunk_plan(frames: int, chunk_size: int, left_context_size: int) -> list[tuple[int, int, int]]:
    """HF chunked_decode's chunks as (start, end, context): codes[start-context:end] decoded, first context*U dropped."""
    if chunk_size <= 0 or left_context_size < 0:
        raise ValueError(f"chunk_size must be > 0 and left_context_size >= 0, got {chunk_size}, {left_context_size}")
    plan, start = [], 0
    while start < frames:
        end = min(start + chunk_size, frames)
        context = left_context_size if start - left_context_size > 0 else start
        plan.append((start, end, context))
        start = end
    return plan


def chunked_decode(
    params: Any, codes: jax.Array, config: OmniConfig | Code2WavConfig, chunk_size: int = 300,
    left_context_size: int = 25, dtype=None,
) -> jax.Array:
    """HF `Code2Wav.chunked_decode`: each chunk decoded with up to left_context_size frames of left context (RoPE
    positions restart at 0 per chunk, like HF) and the context's samples dropped. Every chunk (HF drops D samples
    at the end of each) runs in one padded window, so this compiles once. Returns [B, T*U - D*num_chunks]."""
    cfg = as_code2wav_config(config)
    b, q, t = codes.shape
    if t <= chunk_size:
        return code2wav(params, codes, cfg, dtype)
    u, d = cfg.total_upsample, c2w.delay_samples(cfg)
    window = left_context_size + chunk_size
    host = np.asarray(codes)
    out = []
    for start, end, context in chunk_plan(t, chunk_size, left_context_size):
        pad_left = left_context_size - context
        win = _window(host, start - left_context_size, end, window)
        wav = decode_window(params, win, -pad_left, pad_left, pad_left, cfg, 0, dtype)
        out.append(wav[:, left_context_size * u:(left_context_size + end - start) * u - d])
    return jnp.concatenate(out, axis=-1)


def decode_incremental(
    params: Any, codes: jax.Array, start: int, end: int, config: OmniConfig | Code2WavConfig,
    context: int | None = None, pad_frames_to: int | None = None, dtype=None,
) -> jax.Array:
    """Samples of the full decode that frames [start, end) complete: [start*U - D, end*U - D) (from 0 if start == 0),
    using only codes[:, :, start-context:end]. Concatenating the results over consecutive ranges gives the full
    decode; with context >= required_left_context(config) (the default) they equal it exactly.

    RoPE uses global frame positions (as the full decode does). The transformer runs over context + frames; the conv
    stack only over min(context, conv_context_frames) + frames. pad_frames_to right-pads the window to a fixed frame
    count so a short last chunk reuses the compiled shape.
    """
    cfg = as_code2wav_config(config)
    b, q, t = codes.shape
    if not 0 <= start < end <= t:
        raise ValueError(f"decode_incremental: need 0 <= start < end <= frames={t}, got start={start}, end={end}")
    context = c2w.required_left_context(cfg) if context is None else int(context)
    if context < 1 and start > 0:
        raise ValueError("decode_incremental: context must be >= 1 frame when start > 0 (the model delays by D samples)")
    n = end - start
    width = n if pad_frames_to is None else int(pad_frames_to)
    if width < n:
        raise ValueError(f"decode_incremental: pad_frames_to={pad_frames_to} is smaller than end-start={n}")
    conv_ctx = min(context, c2w.conv_context_frames(cfg))
    conv_skip = context - conv_ctx
    pad_left = max(0, context - start)
    win = _window(np.asarray(codes), start - context, end, context + width)
    wav = decode_window(params, win, start - context, pad_left, max(0, pad_left - conv_skip), cfg, conv_skip, dtype)
    u, d = cfg.total_upsample, c2w.delay_samples(cfg)
    first = conv_ctx * u - (d if start > 0 else 0)
    return wav[:, first:(conv_ctx + n) * u - d]

def vocode(params: Any, codes: np.ndarray, lengths: Sequence[int], config: OmniConfig | Code2WavConfig, *,
           chunk_size: int = CHUNK_SIZE, left_context_size: int = LEFT_CONTEXT, dtype=None) -> list[np.ndarray]:
    """codes [B, 16, T] -> one waveform per row: HF's `chunked_decode` of that row's first lengths[b] frames.

    Code2Wav is causal, so one batched decode (frames past each row's length zeroed, as HF's batched
    generate does) cut per row equals decoding each row alone. Batches of at most chunk_size frames are
    zero-padded to a power-of-two frame bucket, so nearby lengths share one compiled decode; longer ones go
    through `chunked_decode` (one compiled window), where each chunk of a row loses the decoder delay.
    Raises NumericalError("code2wav") if a waveform is not finite.
    """
    cfg = as_code2wav_config(config)
    codes = np.asarray(codes, np.int32)
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    b, q, _ = codes.shape
    if lengths.shape[0] != b:
        raise ValueError(f"got {lengths.shape[0]} lengths for {b} rows of codes")
    n = int(lengths.max(initial=0))
    if n == 0:
        return [np.zeros((0,), np.float32) for _ in range(b)]
    if n > codes.shape[-1]:
        raise ValueError(f"length {n} exceeds the {codes.shape[-1]} frames given")
    codes = np.where(np.arange(n)[None, None, :] < lengths[:, None, None], codes[:, :, :n], 0)
    if n <= chunk_size:
        width = buckets.bucket(n, 16, cap=chunk_size)
        padded = np.pad(codes, ((0, 0), (0, 0), (0, width - n)))
        wav = code2wav(params, padded, cfg, dtype=dtype)
        cuts = [c2w.wav_length(cfg, int(m)) if m else 0 for m in lengths]
    else:
        wav = chunked_decode(params, codes, cfg, chunk_size, left_context_size, dtype=dtype)
        u, d = cfg.total_upsample, c2w.delay_samples(cfg)
        cuts = [int(m) * u - d * math.ceil(int(m) / chunk_size) for m in lengths]
    wav = np.asarray(wav, np.float32)
    out = [wav[r, : cuts[r]].copy() for r in range(b)]
    bad = [r for r, w in enumerate(out) if not np.isfinite(w).all()]
    if bad:
        raise NumericalError("code2wav", f"waveform of row(s) {bad}")
    return out


def check_chunk_frames(chunk_frames: int) -> int:
    if not MIN_CHUNK_FRAMES <= int(chunk_frames) <= MAX_CHUNK_FRAMES:
        raise UsageError(f"chunk_frames must be in [{MIN_CHUNK_FRAMES}, {MAX_CHUNK_FRAMES}], got {chunk_frames}")
    return int(chunk_frames)


class AudioChunker:
    """Incremental Code2Wav: frames in, final waveform samples out, equal to the full decode of all frames.

    Code2Wav is causal with a D-sample delay (D = `c2w.delay_samples`, 555): once frames [0, b) are known,
    samples [0, b*U - D) (U = 1920 samples per frame) are final. Each chunk of `chunk_frames` new frames
    [a, b) is decoded by `decode_incremental` with the exact left context `c2w.required_left_context`
    = layers * 71 + 10 frames (578 for the real model, 152 for the tiny config: the sliding-window
    transformer's receptive field plus the conv stack's) and yields samples [a*U - D, b*U - D) (from 0 for
    the first). The window is always padded to context + chunk_frames frames, so every chunk (the short
    last one too) reuses one compiled shape; the first chunk, with no left context, compiles its own.
    `flush` decodes the remaining frames, completing the waveform [0, T*U - D) of T frames.
    """

    def __init__(self, params, config: OmniConfig, chunk_frames: int = DEFAULT_CHUNK_FRAMES, dtype=None):
        self.params = params
        self.config = config
        self.chunk_frames = check_chunk_frames(chunk_frames)
        self.dtype = dtype
        self.context = c2w.required_left_context(config)
        q = config.code2wav.num_quantizers
        self._codes = np.zeros((1, q, 64), np.int32)
        self.frames = 0  # frames received
        self.decoded = 0  # frames whose samples were emitted

    @property
    def codes(self) -> np.ndarray:
        """Every frame received so far: [Q, frames] int32."""
        return self._codes[0, :, :self.frames].copy()

    def push(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Add one frame [Q]; returns (samples, codes [Q, n]) once chunk_frames new frames are pending."""
        if self.frames == self._codes.shape[-1]:
            self._codes = np.concatenate([self._codes, np.zeros_like(self._codes)], axis=-1)
        self._codes[0, :, self.frames] = np.asarray(frame, np.int32)
        self.frames += 1
        if self.frames - self.decoded >= self.chunk_frames:
            return self._decode(self.decoded + self.chunk_frames)
        return None

    def flush(self) -> tuple[np.ndarray, np.ndarray] | None:
        return self._decode(self.frames) if self.frames > self.decoded else None

    def _decode(self, end: int) -> tuple[np.ndarray, np.ndarray]:
        start = self.decoded
        # The first chunk has nothing to its left: a context-free window (its own compiled shape) instead of
        # context + chunk_frames frames of padding, so the first audio waits for chunk_frames frames only.
        wav = decode_incremental(self.params, self._codes[:, :, :end], start, end, self.config,
                                     context=self.context if start else 0, pad_frames_to=self.chunk_frames,
                                     dtype=self.dtype)
        self.decoded = end
        wav = np.asarray(wav[0], np.float32)
        if not np.isfinite(wav).all():
            raise NumericalError("code2wav", f"audio of frames [{start}, {end})")
        return wav, self._codes[0, :, start:end].copy()
