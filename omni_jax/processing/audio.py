"""Audio input: files to 16 kHz mono samples, samples to the encoder's log-mel features, and the expansion of
each clip's `<|audio_pad|>` to its encoder rows (omni_jax.models.audio_encoder.rows_for_frames).

The features are Whisper's (transformers' WhisperFeatureExtractor with feature_size=128, which
Qwen3-Omni's processor calls with padding=True, truncation=False): a 400-point periodic-Hann STFT every
160 samples with centre reflect padding, power spectrum, 128 Slaney mel filters over 0-8 kHz, the last
frame dropped, log10 of the clamp at 1e-10, floored at max - 8, then (x + 4) / 4. No 30 s pad: a clip
keeps its own length (samples // 160 frames). numpy only: no torch at run time.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from omni_jax.errors import UsageError

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 128
MEL_FLOOR = 1e-10


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    mel = 3.0 * f / 200.0
    log_region = f >= 1000.0
    mel = np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), mel)
    return mel


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    f = 200.0 * m / 3.0
    return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), f)


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                fmin: float = 0.0, fmax: float = 8000.0) -> np.ndarray:
    """[n_fft // 2 + 1, n_mels] triangular filters, Slaney-normalised (each filter's area is constant)."""
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    width = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / width[:-1]
    up = slopes[:, 2:] / width[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (edges[2:n_mels + 2] - edges[:n_mels]))[None, :]


@functools.lru_cache(maxsize=None)
def _window(n_fft: int) -> np.ndarray:
    return np.hanning(n_fft + 1)[:-1]  # periodic Hann


def log_mel(samples: np.ndarray, n_mels: int = N_MELS) -> np.ndarray:
    """[n_mels, len(samples) // HOP] float32 features of one 16 kHz mono clip (module docstring); n_mels is the
    encoder's num_mel_bins (128 in every released checkpoint)."""
    x = np.asarray(samples, np.float64).reshape(-1)
    frames_out = len(x) // HOP
    if frames_out == 0:
        raise UsageError(f"the audio is {len(x)} samples long; at least {HOP} (10 ms at 16 kHz) are needed")
    padded = np.pad(x, N_FFT // 2, mode="reflect")
    n = 1 + (len(padded) - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n)[:, None]
    spec = np.abs(np.fft.rfft(padded[idx] * _window(N_FFT), n=N_FFT, axis=-1)) ** 2  # [frames, freqs]
    mel = mel_filters(n_mels).T @ spec.T  # [mels, frames]
    logs = np.log10(np.maximum(mel, MEL_FLOOR))[:, :frames_out]  # the last STFT frame is dropped
    logs = np.maximum(logs, logs.max() - 8.0)
    return ((logs + 4.0) / 4.0).astype(np.float32)


def _check_samples(samples: np.ndarray, name: str) -> np.ndarray:
    if samples.ndim == 2 and samples.shape[1] == 0:
        raise UsageError(f"audio {name} has zero channels")
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.ndim != 1:
        raise UsageError(f"audio {name} has shape {samples.shape}; want [samples] or [samples, channels]")
    if samples.size == 0:
        raise UsageError(f"audio {name} has zero samples")
    if not np.isfinite(samples).all():
        raise UsageError(f"audio {name} has NaN or Inf samples")
    return samples


def resample(samples: np.ndarray, rate: int, name: str = "array") -> np.ndarray:
    """Mono float32 samples at `rate` -> SAMPLE_RATE with soxr (high quality)."""
    if rate <= 0:
        raise UsageError(f"audio {name}: sample rate {rate} is not positive")
    if rate == SAMPLE_RATE:
        return samples.astype(np.float32)
    import soxr

    return soxr.resample(samples.astype(np.float32), rate, SAMPLE_RATE, quality="HQ").astype(np.float32)


def load_audio(source: Any) -> np.ndarray:
    """16 kHz mono float32 samples from a path (anything soundfile reads) or a (samples, sample_rate) pair.
    Bad input raises UsageError naming the file and the problem."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise UsageError(f"audio file {path} does not exist")
        if os.path.isdir(path):
            raise UsageError(f"audio file {path} is a directory")
        import soundfile as sf

        try:
            samples, rate = sf.read(path, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            raise UsageError(f"audio file {path} is not audio soundfile can read ({e})") from None
        return resample(_check_samples(samples, path), rate, path)
    try:
        samples, rate = source
    except (TypeError, ValueError):
        raise UsageError("audio must be a file path or a (samples, sample_rate) pair") from None
    samples = _check_samples(np.asarray(samples, np.float32), "array")
    return resample(samples, int(rate))


def expand_audio_pads(ids: list[int], pad_id: int, rows: list[int], what: str = "audio") -> list[int]:
    """Prompt ids with the i-th pad (`<|audio_pad|>`, or an image's / video's) repeated rows[i] times (what
    transformers' processor does to the rendered template): one pad per item in, one pad per encoder row out."""
    return expand_placeholders(ids, pad_id, [[pad_id] * n for n in rows], what)


def expand_placeholders(ids: list[int], pad_id: int, spans: list[list[int]], what: str) -> list[int]:
    """ids with the i-th `pad_id` replaced by spans[i]; UsageError when the pad count is not len(spans)."""
    found = sum(1 for t in ids if t == pad_id)
    if found != len(spans):
        noun = "clip" if what == "audio" else "item"
        raise UsageError(f"the prompt has {found} {what} placeholder(s) for {len(spans)} {what} {noun}(s)")
    out, it = [], iter(spans)
    for t in ids:
        out.extend(next(it) if t == pad_id else (t,))
    return out
