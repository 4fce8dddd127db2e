"""Running the audio encoder: clips' log-mel features -> their encoder rows, one compile per grid bucket.

The grid's window count is padded to a power of two (omni_jax.buckets.bucket), so a stream of clips of
any lengths compiles log2(max windows) programs; the encoder is stateless, so its step is a plain jit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.buckets import bucket
from omni_jax.config import AudioEncoderConfig
from omni_jax.models.audio_encoder import AudioEncoder, chunk_grid, windows_needed


class AudioEncoderSteps:
    """The encoder's compiled step for one (config, dtype)."""

    def __init__(self, cfg: AudioEncoderConfig, dtype: Any = jnp.float32):
        self.cfg, self.dtype = cfg, jnp.dtype(dtype)
        self.model = AudioEncoder(cfg, self.dtype, self.dtype)
        self.fn = jax.jit(self.model.apply)

    def windows_for(self, features: list[np.ndarray]) -> int:
        """The grid bucket these clips run in."""
        return bucket(windows_needed([f.shape[1] for f in features], self.cfg), smallest=1)

    def encode(self, params: Any, features: list[np.ndarray]) -> list[np.ndarray]:
        """Per clip, its float32 [rows, output_dim] encoder rows (rows = its `<|audio_pad|>` count). The clips of
        one call are padded together, as transformers pads one call's chunks: encode one request's clips per
        call so a request's rows do not depend on its batch neighbours."""
        if not features:
            return []
        grid = chunk_grid(features, self.cfg, windows=self.windows_for(features))
        out, valid = self.fn({"params": params}, grid.mel, grid.lengths, grid.pad_to)
        return grid.gather(out, valid)
