"""Videos -> the vision encoder's pixel patches (and the video's own audio track), with PyAV.

Frames are decoded with PyAV (FFmpeg in its wheels) and sampled as transformers' Qwen2-VL video processor samples
them: at `fps` frames per second of video (2 by default), at least `min_frames` and at most `max_frames`, an even
count (the temporal patch), indices `arange(0, total, total / n)` truncated. Each frame is resized like an image
(Pillow bicubic to the `smart_resize` size, with the video's per-frame pixel bounds), normalised, and consecutive
frame pairs become one temporal patch. `seconds_per_grid = temporal_patch / fps`: transformers' processor assumes
fps 1.0 when none is passed, which spaces the grids' M-RoPE times twice too far at the default 2 fps; we always
pass the fps the frames were sampled at.

The audio track (for `use_audio_in_video`) is decoded by PyAV, averaged to mono and resampled to 16 kHz with soxr.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np

from omni_jax.errors import UsageError
from omni_jax.processing import audio as audio_lib
from omni_jax.processing.vision import VisionProcessorConfig, VisualInput, normalise, patchify, smart_resize


def sample_indices(total: int, video_fps: float, cfg: VisionProcessorConfig, what: str = "video") -> np.ndarray:
    """Indices of the frames to keep out of `total` decoded at `video_fps` (transformers' `sample_frames`)."""
    tp = cfg.temporal_patch_size
    if total <= 0:
        raise UsageError(f"{what}: it has zero frames")
    if total < tp:  # too short for one temporal patch: the last frame repeats (as the processor pads odd counts)
        return np.minimum(np.arange(tp), total - 1)
    max_frames = math.floor(min(cfg.max_frames, total) / tp) * tp
    n = total / video_fps * cfg.fps if video_fps > 0 else total
    n = min(max(n, cfg.min_frames), max_frames, total)
    n = math.floor(n / tp) * tp
    return (np.arange(0, total, total / n)[:n]).astype(np.int64)


def _open(source: Any, what: str):
    import av

    if isinstance(source, (bytes, bytearray)):
        name, handle = "video bytes", io.BytesIO(source)
    else:
        name = os.fspath(source)
        if not os.path.exists(name):
            raise UsageError(f"{what}: no such file {name!r}")
        if os.path.isdir(name):
            raise UsageError(f"{what}: {name!r} is a directory")
        handle = name
    try:
        return av.open(handle), name
    except (av.FFmpegError, ValueError, OSError) as e:
        raise UsageError(f"{what}: cannot read {name!r} as a video ({e})") from None


def read_video(source: Any, what: str = "video", with_audio: bool = False
               ) -> tuple[np.ndarray, float, np.ndarray | None]:
    """(frames uint8 [N, H, W, 3], frames per second, 16 kHz mono audio or None) of a path or bytes. A video
    without an audio track gives None audio. UsageError naming the source when it cannot be decoded."""
    import av

    container, name = _open(source, what)
    try:
        if not container.streams.video:
            raise UsageError(f"{what}: {name!r} has no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        try:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        except (av.FFmpegError, ValueError) as e:
            raise UsageError(f"{what}: {name!r} is corrupt ({e})") from None
        if not frames:
            raise UsageError(f"{what}: {name!r} has zero frames")
        if rate <= 0:  # no stored rate: the container's duration, else one frame per second
            duration = container.duration / 1e6 if container.duration else 0.0
            rate = len(frames) / duration if duration > 0 else 1.0
        audio = None
        if with_audio and container.streams.audio:
            container.seek(0)
            audio = _audio_track(container, name, what)
    finally:
        container.close()
    return np.stack(frames), rate, audio


def _audio_track(container, name: str, what: str) -> np.ndarray | None:
    import av

    stream = container.streams.audio[0]
    parts, rate = [], stream.rate
    try:
        for frame in container.decode(stream):
            raw = frame.to_ndarray()
            x = raw.astype(np.float32)
            if np.issubdtype(raw.dtype, np.integer):  # s16 / s32 samples -> [-1, 1]
                x /= float(np.iinfo(raw.dtype).max)
            if frame.format.is_planar:  # [channels, samples]
                x = x.mean(axis=0)
            else:  # packed: [1, samples * channels]
                x = x.reshape(-1, len(frame.layout.channels)).mean(axis=1)
            parts.append(x)
            rate = frame.sample_rate or rate
    except (av.FFmpegError, ValueError) as e:
        raise UsageError(f"{what}: the audio track of {name!r} is corrupt ({e})") from None
    if not parts:
        return None
    return audio_lib.resample(np.concatenate(parts), int(rate), name)


def frames_input(frames: np.ndarray, video_fps: float, cfg: VisionProcessorConfig, what: str = "video",
                 audio: np.ndarray | None = None) -> VisualInput:
    """A VisualInput from decoded frames uint8 [N, H, W, 3] at `video_fps` (sampled, resized, patched)."""
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise UsageError(f"{what}: frames must be [N, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
    keep = frames[sample_indices(frames.shape[0], video_fps, cfg, what)]
    height, width = keep.shape[1:3]
    try:
        h, w = smart_resize(height, width, cfg.factor, cfg.video_min_pixels, cfg.video_max_pixels)
    except UsageError as e:
        raise UsageError(f"{what}: {e}".replace("image is", "frames are")) from None
    resized = np.stack([np.asarray(Image.fromarray(f).resize((w, h), resample=Image.Resampling.BICUBIC))
                        for f in keep])
    patches = patchify(normalise(resized, cfg), cfg)
    grid = (keep.shape[0] // cfg.temporal_patch_size, h // cfg.patch_size, w // cfg.patch_size)
    return VisualInput("video", patches, grid, cfg.temporal_patch_size / cfg.fps, audio)


def video_input(source: Any, cfg: VisionProcessorConfig, what: str = "video", with_audio: bool = False
                ) -> VisualInput:
    """A VisualInput from a video file or bytes, or (frames [N, H, W, 3] uint8, fps) as decoded elsewhere."""
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], np.ndarray):
        frames, rate = source
        return frames_input(frames, float(rate), cfg, what)
    frames, rate, audio = read_video(source, what, with_audio)
    return frames_input(frames, rate, cfg, what, audio)


def audio_in_video_span(video: VisualInput, audio_rows: int, thinker: Any) -> list[int]:
    """The ids replacing a video's `<|video_pad|>` when its audio track joins it: `<|audio_start|>`, its merged
    frame rows and its audio rows interleaved by time (a frame group at its start time, `seconds_per_grid *
    position_id_per_seconds` apart; audio one position per row; the video first on ties), `<|audio_end|>`, as
    transformers' processor lays them out."""
    t, h, w = video.grid
    m = thinker.vision.spatial_merge_size
    times = np.repeat(np.arange(t) * video.seconds_per_grid * thinker.position_id_per_seconds, h * w // (m * m))
    order = np.argsort(np.concatenate([times, np.arange(audio_rows, dtype=np.float64)]), kind="stable")
    kinds = np.where(order < times.size, thinker.video_token_id, thinker.audio_token_id)
    return [thinker.audio_start_token_id] + kinds.tolist() + [thinker.audio_end_token_id]
