"""Running the vision encoder: preprocessed images / videos -> merged rows and deepstack rows per item.

Frames go on a [frames, patches] grid padded to the rungs of a ladder with four steps per octave
(omni_jax.buckets.fine_bucket: at most 25 % padding, where attention costs the square of a frame's length), so a
stream of inputs of any sizes compiles a few programs; the encoder is stateless, so its step is a plain jit. Items
of one call share a grid, but attention never crosses frames, so an item's rows do not depend on what it
was encoded with (padding rows are masked as keys and dropped).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.buckets import fine_bucket
from omni_jax.config import VisionEncoderConfig
from omni_jax.models.vision_encoder import VisionEncoder, frame_grid
from omni_jax.processing.vision import VisualInput


class VisionEncoderSteps:
    """The vision encoder's compiled step for one (config, dtype)."""

    def __init__(self, cfg: VisionEncoderConfig, dtype: Any = jnp.float32):
        self.cfg, self.dtype = cfg, jnp.dtype(dtype)
        self.model = VisionEncoder(cfg, self.dtype, self.dtype)
        self.fn = jax.jit(self.model.apply)

    def grid_for(self, items: Sequence[VisualInput]) -> tuple[int, int]:
        """(frames, patches per frame) of the grid bucket these items run in."""
        frames = sum(it.grid[0] for it in items)
        frame_len = max(it.grid[1] * it.grid[2] for it in items)
        return fine_bucket(frames), fine_bucket(frame_len, multiple=self.cfg.merge_unit)

    def encode(self, params: Any, items: Sequence[VisualInput]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per item, (rows [tokens, out] float32, deepstack [levels, tokens, out] float32)."""
        if not items:
            return []
        frames, frame_len = self.grid_for(items)
        grid = frame_grid([(it.patches, it.grid) for it in items], self.cfg, frames, frame_len)
        merged, deep = self.fn({"params": params}, grid.patches, grid.valid, grid.hw, grid.taps, grid.tap_weights)
        rows = grid.gather(np.asarray(merged), self.cfg.merge_unit)
        deep = np.asarray(deep)
        levels = [grid.gather(deep[i], self.cfg.merge_unit) for i in range(deep.shape[0])]
        out = []
        for j, r in enumerate(rows):
            d = np.stack([lv[j] for lv in levels]) if levels else np.zeros((0,) + r.shape, np.float32)
            out.append((np.asarray(r, np.float32), np.asarray(d, np.float32)))
        return out
