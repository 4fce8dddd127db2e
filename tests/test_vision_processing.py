"""Image preprocessing against transformers' Qwen2-VL image processor, PIL backend (the one Qwen3-Omni's
processor auto-selects without torchvision), with the released checkpoints' values: the same grid and the
same pixel patches, bit for bit, on images of several sizes, aspect ratios and modes; bad images fail with
one clear line."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from omni_jax.errors import UsageError
from omni_jax.processing import vision as vp

# (width, height, PIL mode, max_pixels): plain, very wide, below min_pixels (upscaled), transparent (composited
# onto white), above max_pixels (downscaled), grey and tall
CASES = [(100, 80, "RGB", None), (1000, 50, "RGB", None), (33, 33, "RGB", None), (120, 90, "RGBA", None),
         (640, 480, "RGB", 128 * 128), (17, 300, "L", None)]


def _image(w, h, mode, seed):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if mode == "L" else arr)


@pytest.mark.parametrize("w, h, mode, max_pixels", CASES)
def test_patches_equal_transformers(w, h, mode, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = vp.VisionProcessorConfig() if max_pixels is None else vp.VisionProcessorConfig(max_pixels=max_pixels)
    img = _image(w, h, mode, w * h)
    hf = Qwen2VLImageProcessorPil(patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size,
                                  merge_size=cfg.merge_size, image_mean=list(cfg.image_mean),
                                  image_std=list(cfg.image_std), min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    ref = hf(images=[img], return_tensors="np")
    patches, grid = vp.image_patches(img, cfg)
    assert [list(grid)] == ref["image_grid_thw"].tolist()
    np.testing.assert_array_equal(patches, ref["pixel_values"])


def test_file_sources_and_preprocessor_config(tmp_path):
    img = _image(64, 48, "RGB", 1)
    path = tmp_path / "a.png"
    img.save(path)
    from_path, grid = vp.image_patches(str(path), vp.VisionProcessorConfig())
    from_bytes, _ = vp.image_patches(path.read_bytes(), vp.VisionProcessorConfig())
    np.testing.assert_array_equal(from_path, from_bytes)
    (tmp_path / "preprocessor_config.json").write_text('{"size": {"shortest_edge": 100, "longest_edge": 4096}, '
                                                       '"patch_size": 8}')
    cfg = vp.VisionProcessorConfig.load(str(tmp_path))
    assert (cfg.patch_size, cfg.min_pixels, cfg.max_pixels) == (8, 100, 4096)
    assert vp.VisionProcessorConfig.load(None) == vp.VisionProcessorConfig()


@pytest.mark.parametrize("source, match", [
    (b"not an image", "cannot read 'image bytes' as an image"),
    ("/nonexistent/x.png", "no such file"),
    (np.zeros((4, 1000, 3), np.uint8), "aspect ratio 250 exceeds 200"),
])
def test_bad_images_raise_usage_errors(source, match):
    with pytest.raises(UsageError, match=match):
        vp.image_patches(source, vp.VisionProcessorConfig())


def test_truncated_file_is_a_usage_error(tmp_path):
    buf = io.BytesIO()
    _image(64, 64, "RGB", 2).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[:200])
    with pytest.raises(UsageError, match="cannot read"):
        vp.image_patches(str(path), vp.VisionProcessorConfig())
