"""Code2Wav decoding: codes -> 24 kHz waveform, whole, HF-chunked, or incrementally while a reply streams.

  * `code2wav`: the full decode (HF `Code2Wav.forward`), one compile per (B, T).
  * `chunked_decode`: HF `Code2Wav.chunked_decode` (chunks of 300 frames with 25 frames of left context,
    RoPE restarting per chunk); every chunk runs in one padded window, so it compiles once.
  * `stream_step`: the next n frames of every row at constant cost, from a carried `VocoderState`
    (each layer's own left context); `VocoderStream` runs rows of replies over it and `AudioChunker`
    one reply frame by frame. The concatenated stream equals the full decode.
  * `vocode`: what `OmniPipeline.generate` returns per row (HF's chunked decode of each row's frames).

Padded windows decode exactly like unpadded sequences: frames before a valid start are masked as
attention keys and zeroed at every conv input (the module's tf_valid / conv_valid / conv_skip).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax import buckets
from omni_jax.config import Code2WavConfig, OmniConfig
from omni_jax.errors import NumericalError, UsageError
from omni_jax.models import code2wav as c2w
from omni_jax.models.code2wav import Code2Wav
from omni_jax.runtime.types import DEFAULT_CHUNK_FRAMES, check_chunk_frames

#: HF `Code2Wav.chunked_decode` settings used by `generate(..., return_audio=True)`.
CHUNK_SIZE = 300
LEFT_CONTEXT = 25


def as_code2wav_config(config: OmniConfig | Code2WavConfig) -> Code2WavConfig:
    return config.code2wav if isinstance(config, OmniConfig) else config


def _check_params(params: Any) -> None:
    if "code_embedding" not in params:
        raise ValueError(
            "code2wav params must be the 'code2wav' subtree (with 'code_embedding', 'pre_transformer', ...); "
            f"got keys {sorted(params)[:6]}"
        )


def _model(params, config: Code2WavConfig, dtype) -> Code2Wav:
    """The module for these params; compute dtype defaults to theirs."""
    _check_params(params)
    pdtype = params["code_embedding"]["embedding"].dtype
    return Code2Wav(config, dtype=dtype or pdtype, param_dtype=pdtype)


def _apply(params, codes, positions, tf_valid, conv_valid, config: Code2WavConfig, conv_skip: int, dtype):
    model = _model(params, config, dtype)
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


@flax.struct.dataclass
class VocoderState:
    """Everything the next chunk needs, batch-major: each pre-transformer layer's last sliding_window - 1
    keys and values, every causal conv's / transposed conv's last input steps at its own time resolution
    (the Code2Wav "cache" collection), and the frames each row has streamed. Its shapes depend on the
    batch only, so one state serves every chunk size."""

    cache: Any
    frames: jax.Array  # [B] int32


#: (config, batch, dtype, param dtype, param tree) -> a compiled maker of the zero state. Tracing the model for
#: the cache's shapes costs 0.3 s at the tiny config, which would otherwise sit on every stream's time to first
#: audio. The zeros are committed to the params' device like the step's own (donated) outputs: uncommitted
#: zeros gave the step's second call a second compile (2.0 s at real width).
_ZERO_STATE: dict[tuple, Any] = {}


def init_stream(params: Any, config: OmniConfig | Code2WavConfig, batch: int, dtype=None) -> VocoderState:
    """A zero state for `batch` rows, every row at frame 0 (the cache's shapes from an abstract step)."""
    cfg = as_code2wav_config(config)
    model = _model(params, cfg, dtype)
    key = (cfg, int(batch), jnp.dtype(model.dtype), jnp.dtype(model.param_dtype),
           jax.tree_util.tree_structure(params))  # the layout (stacked or unrolled layers) names the caches
    if key not in _ZERO_STATE:
        codes = jnp.zeros((batch, cfg.num_quantizers, 1), jnp.int32)
        positions = jnp.zeros((batch, 1), jnp.int32)
        shapes = jax.eval_shape(
            lambda p: model.apply({"params": p}, codes, positions, mutable=["cache"])[1]["cache"], params)
        _ZERO_STATE[key] = jax.jit(lambda: VocoderState(
            cache=jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes),
            frames=jnp.zeros((batch,), jnp.int32)))
    state = _ZERO_STATE[key]()
    devices = params["code_embedding"]["embedding"].devices()
    return jax.device_put(state, next(iter(devices))) if len(devices) == 1 else state


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("state",))
def _stream_step(params, state: VocoderState, codes, active, config: Code2WavConfig, dtype=None):
    model = _model(params, config, dtype)
    n = codes.shape[-1]
    positions = state.frames[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
    wav, mutated = model.apply({"params": params, "cache": state.cache}, codes, positions, mutable=["cache"])

    def keep_inactive(new, old):
        return jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    cache = jax.tree_util.tree_map(keep_inactive, mutated["cache"], state.cache)
    frames = jnp.where(active, state.frames + n, state.frames)
    return VocoderState(cache=cache, frames=frames), wav.astype(jnp.float32)


def stream_step(params: Any, state: VocoderState, codes: jax.Array, config: OmniConfig | Code2WavConfig,
                active: jax.Array | None = None, dtype=None) -> tuple[VocoderState, jax.Array]:
    """Decode the next n frames of every row: codes [B, Q, n] -> (state, samples [B, n*U]) at constant cost.

    Row b's samples are the full decode's [f*U - D, (f+n)*U - D) for f = state.frames[b]; a fresh row's
    first D samples precede the waveform (drop them). Code2Wav is causal with that delay, so frames past a
    reply's end (padding of a last, short chunk) change none of its samples before (f+r)*U - D. Rows where
    `active` is False keep their state (and get samples to ignore). One compile per (B, n); the state is
    donated. Reset a row by setting its frame count to 0 (`VocoderStream.reset`): nothing else is cleared.
    """
    cfg = as_code2wav_config(config)
    codes = jnp.asarray(codes, jnp.int32)
    if active is None:
        active = jnp.ones((codes.shape[0],), bool)
    return _stream_step(params, state, codes, jnp.asarray(active, bool), cfg, dtype)


class VocoderStream:
    """Rows of streamed audio over one `VocoderState`: each `decode` call feeds up to `width` (default
    chunk_frames) new frames per row and returns each row's final samples, equal to the full decode of
    that row's frames.

    A short chunk (a reply that ended mid-chunk) is padded to the width with code 0 and cut to its
    frames' samples, so every call reuses the one compiled (batch, width) step; the state is the same for
    every width (a small first chunk, then larger ones, share it).
    """

    def __init__(self, params, config: OmniConfig | Code2WavConfig, chunk_frames: int = DEFAULT_CHUNK_FRAMES,
                 batch: int = 1, dtype=None):
        self.params, self.config = params, as_code2wav_config(config)
        self.chunk_frames = check_chunk_frames(chunk_frames)
        self.dtype = dtype
        self.state = init_stream(params, self.config, batch, dtype)
        self.frames = np.zeros((batch,), np.int64)  # host copy of state.frames for active rows
        self.ended = np.zeros((batch,), bool)  # rows whose last chunk was short (padded): reset before reuse
        self.u, self.d = self.config.total_upsample, c2w.delay_samples(self.config)

    @property
    def batch(self) -> int:
        return int(self.frames.shape[0])

    def reset(self, rows: Sequence[int]) -> None:
        """Start new streams in these rows (a freed slot taking a new reply)."""
        rows = np.asarray(rows, np.int64)
        self.frames[rows] = 0
        self.ended[rows] = False
        self.state = self.state.replace(frames=self.state.frames.at[rows].set(0))

    def decode(self, codes: Sequence[np.ndarray | None], width: int | None = None) -> list[np.ndarray | None]:
        """codes[b]: row b's next [Q, r] frames (1 <= r <= width), or None to leave the row as it is.

        Returns row b's new samples (float32; None where codes[b] is None). A row given r < width frames
        has ended: reset it before streaming into it again."""
        if len(codes) != self.batch:
            raise ValueError(f"decode: got codes for {len(codes)} rows, the stream has {self.batch}")
        q = self.config.num_quantizers
        n = self.chunk_frames if width is None else check_chunk_frames(width, "width")
        window = np.zeros((self.batch, q, n), np.int32)
        counts = np.zeros((self.batch,), np.int64)
        for b, c in enumerate(codes):
            if c is None:
                continue
            c = np.asarray(c, np.int32)
            if c.ndim != 2 or c.shape[0] != q or not 1 <= c.shape[1] <= n:
                raise ValueError(f"decode: row {b} needs codes [{q}, 1..{n}], got shape {c.shape}")
            if self.ended[b]:
                raise ValueError(f"decode: row {b} ended with a short chunk (its padding is in the state); "
                                 "reset it before streaming a new reply into it")
            window[b, :, :c.shape[1]] = c
            counts[b] = c.shape[1]
        active = counts > 0
        self.state, wav = stream_step(self.params, self.state, window, self.config, active, self.dtype)
        wav = np.asarray(wav)
        out: list[np.ndarray | None] = []
        for b in range(self.batch):
            if not active[b]:
                out.append(None)
                continue
            lo = self.d if self.frames[b] == 0 else 0
            piece = wav[b, lo:int(counts[b]) * self.u]
            if not np.isfinite(piece).all():
                f = int(self.frames[b])
                raise NumericalError("code2wav", f"audio of row {b}, frames [{f}, {f + int(counts[b])})")
            out.append(piece.copy())
            self.frames[b] += n
            self.ended[b] = counts[b] < n
        return out


class AudioChunker:
    """One streamed reply: frames in one at a time, audio out after the first `first_chunk_frames` frames
    and then every chunk_frames frames (`VocoderStream` with one row), equal to the full decode of all
    frames; `flush` decodes a short last chunk. A small first chunk puts the first audio one talker frame
    and one small vocoder step after the first frame; larger later chunks cost less per second of audio."""

    def __init__(self, params, config: OmniConfig, chunk_frames: int = DEFAULT_CHUNK_FRAMES, dtype=None,
                 first_chunk_frames: int | None = None):
        self.chunk_frames = check_chunk_frames(chunk_frames)
        self.first_chunk_frames = (self.chunk_frames if first_chunk_frames is None
                                   else check_chunk_frames(first_chunk_frames, "first_chunk_frames"))
        self._stream = VocoderStream(params, config, self.chunk_frames, 1, dtype)
        self._codes = np.zeros((config.code2wav.num_quantizers, 64), np.int32)
        self.frames = 0  # frames received
        self.decoded = 0  # frames whose samples were emitted

    @property
    def codes(self) -> np.ndarray:
        """Every frame received so far: [Q, frames] int32."""
        return self._codes[:, :self.frames].copy()

    def push(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Add one frame [Q]; returns (samples, codes [Q, n]) once chunk_frames new frames are pending."""
        if self.frames == self._codes.shape[-1]:
            self._codes = np.concatenate([self._codes, np.zeros_like(self._codes)], axis=-1)
        self._codes[:, self.frames] = np.asarray(frame, np.int32)
        self.frames += 1
        return self._decode() if self.frames - self.decoded >= self._width() else None

    def flush(self) -> tuple[np.ndarray, np.ndarray] | None:
        return self._decode() if self.frames > self.decoded else None

    def _width(self) -> int:
        return self.first_chunk_frames if self.decoded == 0 else self.chunk_frames

    def _decode(self) -> tuple[np.ndarray, np.ndarray]:
        codes = self._codes[:, self.decoded:self.frames]
        (wav,) = self._stream.decode([codes], self._width())
        self.decoded = self.frames
        return wav, codes.copy()
