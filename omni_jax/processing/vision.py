"""Images -> the vision encoder's pixel patches, as transformers' Qwen2-VL image processor (PIL backend) makes them.

An image is resized (Pillow bicubic, on the 8-bit RGB image) to the `smart_resize` size: both sides multiples
of patch x merge, the pixel count within [min_pixels, max_pixels], the aspect ratio kept. Then it is rescaled by
1/255, normalised with the processor's mean and std, and cut into patches ordered by 2 x 2 merge block; each
patch holds the image twice (temporal patch 2), flattened (channel, time, row, col).

The processor values come from the checkpoint's `preprocessor_config.json` (the converter copies it); the
released checkpoints' values are the defaults.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import Any, Mapping

import numpy as np

from omni_jax.errors import UsageError

MAX_ASPECT = 200  # transformers' smart_resize rejects images more elongated than this


@dataclasses.dataclass(frozen=True)
class VisionProcessorConfig:
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    min_pixels: int = 3136
    max_pixels: int = 12845056
    # video: frames sampled per second of video and their count bounds, per-frame pixel bounds (transformers'
    # Qwen2-VL video processor defaults; fps 2 as the released model card samples)
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, tree: Mapping[str, Any]) -> "VisionProcessorConfig":
        """A preprocessor_config.json tree (its `size` edges or the older min/max_pixels keys)."""
        size = tree.get("size") or {}
        d = cls()
        return cls(
            patch_size=int(tree.get("patch_size", d.patch_size)),
            temporal_patch_size=int(tree.get("temporal_patch_size", d.temporal_patch_size)),
            merge_size=int(tree.get("merge_size", d.merge_size)),
            image_mean=tuple(float(v) for v in tree.get("image_mean", d.image_mean)),
            image_std=tuple(float(v) for v in tree.get("image_std", d.image_std)),
            min_pixels=int(tree.get("min_pixels", size.get("shortest_edge", d.min_pixels))),
            max_pixels=int(tree.get("max_pixels", size.get("longest_edge", d.max_pixels))),
            fps=float(tree.get("fps", d.fps)), min_frames=int(tree.get("min_frames", d.min_frames)),
            max_frames=int(tree.get("max_frames", d.max_frames)),
            video_min_pixels=int(tree.get("video_min_pixels", d.video_min_pixels)),
            video_max_pixels=int(tree.get("video_max_pixels", d.video_max_pixels)),
        )

    @classmethod
    def load(cls, directory: str | None) -> "VisionProcessorConfig":
        """The checkpoint dir's preprocessor_config.json, or the released checkpoints' values when it has none."""
        path = os.path.join(directory, "preprocessor_config.json") if directory else None
        if path and os.path.exists(path):
            with open(path) as f:
                return cls.from_dict(json.load(f))
        return cls()


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) both multiples of factor, pixel count in [min_pixels, max_pixels], aspect ratio kept."""
    if min(height, width) <= 0:
        raise UsageError(f"image is {width}x{height} pixels; it needs at least one pixel each way")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise UsageError(f"image is {width}x{height} pixels: aspect ratio {max(height, width) / min(height, width):.0f} "
                         f"exceeds {MAX_ASPECT}; crop it")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def load_image(source: Any, what: str = "image"):
    """A PIL RGB image from a path, bytes, a PIL image or an [H, W, 3] uint8 array; transparency is composited
    onto white (as transformers does). UsageError naming the source when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[-1] not in (3, 4) or source.dtype != np.uint8:
            raise UsageError(f"{what}: an array image must be [H, W, 3 or 4] uint8, got {source.shape} {source.dtype}")
        img = Image.fromarray(source)
    else:
        name = "image bytes" if isinstance(source, (bytes, bytearray)) else str(source)
        try:
            img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
            img.load()
        except FileNotFoundError:
            raise UsageError(f"{what}: no such file {name!r}") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UsageError(f"{what}: cannot read {name!r} as an image ({e})") from None
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def image_grid(width: int, height: int, cfg: VisionProcessorConfig) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of a width x height image (its tokens: t*h*w / merge_size**2)."""
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return 1, h // cfg.patch_size, w // cfg.patch_size


def normalise(pixels: np.ndarray, cfg: VisionProcessorConfig) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 channel-first [..., 3, H, W], rescaled and normalised as transformers does
    (the 1/255 product in float64, then float32)."""
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return np.moveaxis(x, -1, -3)


def patchify(frames: np.ndarray, cfg: VisionProcessorConfig) -> np.ndarray:
    """[T, 3, H, W] float32 (T a multiple of the temporal patch) -> [T/tp * h * w, patch_dim], merge-block order."""
    t, c, hh, ww = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = hh // p, ww // p
    x = frames.reshape(t // tp, tp, c, gh // m, m, p, gw // m, m, p)
    # (grid t, block row, block col, in-block row, in-block col, channel, time, pixel row, pixel col)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(t // tp * gh * gw, c * tp * p * p))


def image_patches(source: Any, cfg: VisionProcessorConfig, what: str = "image") -> tuple[np.ndarray, tuple[int, int, int]]:
    """(patches [h*w, patch_dim] float32, grid (1, h, w)) of one image."""
    from PIL import Image

    img = load_image(source, what)
    try:
        _, gh, gw = image_grid(img.width, img.height, cfg)
    except UsageError as e:
        raise UsageError(f"{what}: {e}") from None
    resized = np.asarray(img.resize((gw * cfg.patch_size, gh * cfg.patch_size), resample=Image.Resampling.BICUBIC))
    frame = normalise(resized, cfg)[None]
    frames = np.repeat(frame, cfg.temporal_patch_size, axis=0)  # an image is its frame twice
    return patchify(frames, cfg), (1, gh, gw)


@dataclasses.dataclass(frozen=True)
class VisualInput:
    """One image or video after preprocessing: what the encoder, the prompt and the positions need of it."""

    kind: str  # "image" | "video"
    patches: np.ndarray  # [t*h*w, patch_dim] float32, merge-block order per frame group
    grid: tuple[int, int, int]  # (t, h, w) patch grid
    seconds_per_grid: float = 0.0  # video: temporal_patch / fps (an image: unused)
    audio: np.ndarray | None = None  # video: its audio track, 16 kHz mono float32 (use_audio_in_video)

    def tokens(self, merge_size: int) -> int:
        """Placeholder tokens (= merged encoder rows) of this item."""
        t, h, w = self.grid
        return t * h * w // (merge_size * merge_size)


def processor_for_model(directory: str | None, vision: Any) -> VisionProcessorConfig:
    """The checkpoint's processor values, checked against its vision encoder (patch, temporal patch, merge): a
    checkpoint without a preprocessor_config.json gets the encoder's own sizes and the released pixel bounds in
    tokens (scaled by the area of a merged token, so a small test encoder keeps the released token budgets)."""
    from omni_jax.config import ConfigError

    cfg = VisionProcessorConfig.load(directory)
    has_file = bool(directory) and os.path.exists(os.path.join(directory, "preprocessor_config.json"))
    model = dict(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                 merge_size=vision.spatial_merge_size)
    if not has_file:
        area = (vision.patch_size * vision.spatial_merge_size / cfg.factor) ** 2  # 1 for the released encoder
        bounds = {k: max(1, int(getattr(cfg, k) * area)) for k in ("min_pixels", "max_pixels", "video_min_pixels",
                                                                     "video_max_pixels")}
        return dataclasses.replace(cfg, **model, **bounds)
    for key, value in model.items():
        if getattr(cfg, key) != value:
            raise ConfigError(f"preprocessor_config.json: {key} is {getattr(cfg, key)}, but the vision encoder "
                              f"(thinker_config.vision_config) uses {value}")
    return cfg


def image_input(source: Any, cfg: VisionProcessorConfig, what: str = "image") -> VisualInput:
    patches, grid = image_patches(source, cfg, what)
    return VisualInput("image", patches, grid)
