"""Rotary position embeddings: plain 1-D RoPE and Qwen3-Omni's interleaved multimodal RoPE.

M-RoPE gives each position three coordinates (time, height, width). For text all three are
equal, so the result equals 1-D RoPE; the 3-axis form is kept so audio/vision positions can
be fed later without touching the attention code.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def inv_freq(head_dim: int, theta: float) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))


def mrope_axis_map(head_dim: int, mrope_section: Sequence[int], interleaved: bool) -> np.ndarray:
    """For each of head_dim//2 frequencies, which position axis (0=t, 1=h, 2=w) drives it."""
    half = head_dim // 2
    axis = np.zeros(half, dtype=np.int32)
    if interleaved:
        # Reference layout: h takes indices 1,4,7,... below 3*h_section, w takes 2,5,8,... below 3*w_section.
        for dim, offset in ((1, 1), (2, 2)):
            axis[offset : mrope_section[dim] * 3 : 3] = dim
    else:
        start = 0
        for dim, size in enumerate(mrope_section):
            axis[start : start + size] = dim
            start += size
    return axis


def rope_cos_sin(
    positions: jax.Array,
    head_dim: int,
    theta: float,
    mrope_section: Sequence[int] | None = None,
    interleaved: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape [B, T, head_dim] in float32.

    positions: [B, T] for 1-D RoPE, or [3, B, T] for M-RoPE (a [B, T] input is broadcast to 3 axes).
    """
    freqs = jnp.asarray(inv_freq(head_dim, theta))
    if mrope_section is None:
        if positions.ndim == 3:
            positions = positions[0]
        angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, half]
    else:
        if positions.ndim == 2:
            positions = jnp.broadcast_to(positions[None], (3,) + positions.shape)
        per_axis = positions.astype(jnp.float32)[..., None] * freqs  # [3, B, T, half]
        axis = jnp.asarray(mrope_axis_map(head_dim, mrope_section, interleaved))
        angles = jnp.where(axis == 0, per_axis[0], jnp.where(axis == 1, per_axis[1], per_axis[2]))
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, N, D]; cos/sin: [B, T, D]. Cast to x's dtype first, as the reference does."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
