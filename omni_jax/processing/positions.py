"""Rotary position ids: which (time, height, width) coordinates each token gets.

Qwen3-Omni's decoders use 3-axis M-RoPE positions [3, B, T]. For text all three axes carry the
running index, so the result equals 1-D RoPE; multimodal prompts give audio, image and video tokens
their own coordinates (and the text after them continues from the largest one, `rope_deltas`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def text_positions(start: jax.Array, length: int) -> jax.Array:
    """M-RoPE positions for plain text: all three axes equal the running index from start [B]. [3, B, T]."""
    pos = start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    return jnp.broadcast_to(pos[None], (3,) + pos.shape)
