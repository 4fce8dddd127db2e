"""Rotary position ids: which (time, height, width) coordinates each token gets.

Qwen3-Omni's decoders use 3-axis M-RoPE positions [3, B, T]. For text all three axes carry the
running index, so the result equals 1-D RoPE; multimodal prompts give audio, image and video tokens
their own coordinates (and the text after them continues from the largest one, `rope_deltas`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from omni_jax.config import ThinkerConfig


def text_positions(start: jax.Array, length: int) -> jax.Array:
    """M-RoPE positions for plain text: all three axes equal the running index from start [B]. [3, B, T]."""
    pos = start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    return jnp.broadcast_to(pos[None], (3,) + pos.shape)


def _block(start: float, t_index: np.ndarray, h: int, w: int) -> np.ndarray:
    """[3, len(t_index) * h * w] positions of a merged vision grid: t per group, rows and columns, all + start."""
    t = np.repeat(np.asarray(t_index, np.float64), h * w)
    hh = np.tile(np.repeat(np.arange(h, dtype=np.float64), w), len(t_index))
    ww = np.tile(np.arange(w, dtype=np.float64), len(t_index) * h)
    return np.stack([t, hh, ww]) + start


def mrope_positions(ids: Sequence[int], thinker: "ThinkerConfig", image_grids: Sequence[tuple[int, int, int]] = (),
                    video_grids: Sequence[tuple[int, int, int]] = (), video_seconds_per_grid: Sequence[float] = (),
                    audio_rows: Sequence[int] = (), use_audio_in_video: bool = False) -> tuple[np.ndarray, float]:
    """The thinker's 3-D positions of a prompt, as transformers' `get_rope_index` gives them: (float64 [3, T],
    delta = max position + 1 - T, what decode adds to the cache row on all three axes).

    Text and audio rows run on all three axes. An image's rows share its start time and take the merged grid's
    row and column; a video's grids are `seconds_per_grid * position_id_per_seconds` apart in time (not rounded).
    With use_audio_in_video, a `<|vision_start|><|audio_start|>` span holds a video's rows and its audio track's
    rows, which start together and were interleaved by time in the prompt; each keeps its own positions. After a
    multimodal item the next token continues from the largest position so far + 1. Grids are patch grids
    (t, h, w) as the processor reports them; the merge size comes from the vision config."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    th = thinker
    m = th.vision.spatial_merge_size if th.vision is not None else 2
    pps = th.position_id_per_seconds
    out = np.zeros((3, ids.shape[0]), np.float64)
    cur, i, n = 0.0, 0, ids.shape[0]
    images, videos, audios = list(image_grids), list(video_grids), list(audio_rows)
    secs = list(video_seconds_per_grid)
    ii = vi = ai = 0

    def take(kind, seq, idx):
        if idx >= len(seq):
            raise ValueError(f"the prompt has more {kind} spans than the {len(seq)} {kind} item(s) given")
        return seq[idx]

    def put(at: int, pos: np.ndarray) -> int:
        out[:, at:at + pos.shape[1]] = pos
        return at + pos.shape[1]

    while i < n:
        tok = ids[i]
        nxt = ids[i + 1] if i + 1 < n else -1
        if tok == th.vision_start_token_id and nxt == th.audio_start_token_id and use_audio_in_video:
            t, h, w = take("video", videos, vi)
            rows = take("audio", audios, ai)
            i = put(i, np.full((3, 2), cur) + np.arange(2))  # <|vision_start|><|audio_start|>
            cur += 2
            v = _block(cur, np.arange(t) * float(take("video timing", secs, vi)) * pps, h // m, w // m)
            a = np.broadcast_to(cur + np.arange(rows, dtype=np.float64), (3, rows))
            # the prompt interleaves them by time, video first on ties (the processor's order)
            order = np.argsort(np.concatenate([v[0], a[0]]), kind="stable")
            merged = np.concatenate([v, a], axis=1)[:, order]
            vi, ai = vi + 1, ai + 1
            i = put(i, merged)
            cur = merged.max() + 1
            i = put(i, np.full((3, 2), cur) + np.arange(2))  # <|audio_end|><|vision_end|>
            cur += 2
        elif tok == th.vision_start_token_id and nxt in (th.image_token_id, th.video_token_id):
            out[:, i] = cur
            i, cur = i + 1, cur + 1
            if nxt == th.image_token_id:
                t, h, w = take("image", images, ii)
                block = _block(cur, np.arange(t) * pps, h // m, w // m)
                ii += 1
            else:
                t, h, w = take("video", videos, vi)
                block = _block(cur, np.arange(t) * float(take("video timing", secs, vi)) * pps, h // m, w // m)
                vi += 1
            i = put(i, block)
            cur = block.max() + 1
        elif tok == th.audio_start_token_id:
            rows = take("audio", audios, ai)
            ai += 1
            i = put(i, np.broadcast_to(cur + np.arange(rows + 1, dtype=np.float64), (3, rows + 1)))
            cur += rows + 1
        else:
            out[:, i] = cur
            i, cur = i + 1, cur + 1
    return out, float(out.max() + 1 - n) if n else 0.0
