"""3-D M-RoPE positions of multimodal prompts against transformers' `get_rope_index`: text + image, several
images, a video at a fractional time step, a video with its audio track interleaved, and mixed turns (audio,
image and video in one prompt). Prompts are built the way transformers' processor lays the placeholders out."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch

from omni_jax.config import VisionEncoderConfig, load_config
from omni_jax.models.audio_encoder import rows_for_frames
from omni_jax.processing.positions import mrope_positions

VS, VE, AS, AE, IMG, VID, AUD = 900, 901, 902, 903, 904, 905, 906  # placeholder ids for this test


@pytest.fixture(scope="module")
def thinker():
    base = load_config("tiny").thinker
    vision = VisionEncoderConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                                 patch_size=4, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                                 num_position_embeddings=16, deepstack_visual_indexes=(0,))
    return dataclasses.replace(base, vision=vision, vision_start_token_id=VS, vision_end_token_id=VE,
                               audio_start_token_id=AS, audio_end_token_id=AE, image_token_id=IMG,
                               video_token_id=VID, audio_token_id=AUD, position_id_per_seconds=13.0)


def _hf_rope_index(th, ids, images, videos, seconds, audio_frames, use_audio_in_video):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoePreTrainedModelForConditionalGeneration as Base)

    cfg = types.SimpleNamespace(image_token_id=IMG, video_token_id=VID, audio_token_id=AUD, vision_start_token_id=VS,
                                audio_start_token_id=AS, position_id_per_seconds=th.position_id_per_seconds,
                                audio_config=types.SimpleNamespace(n_window=50))
    me = types.SimpleNamespace(config=cfg, spatial_merge_size=2)
    me.get_llm_pos_ids_for_vision = lambda *a: Base.get_llm_pos_ids_for_vision(me, *a)
    t = torch.tensor([ids])
    pos, delta = Base.get_rope_index(
        me, t, torch.tensor(images) if images else None, torch.tensor(videos) if videos else None,
        attention_mask=torch.ones_like(t), use_audio_in_video=use_audio_in_video,
        audio_seqlens=torch.tensor(audio_frames) if audio_frames else None,
        second_per_grids=torch.tensor(seconds) if seconds else None)
    return pos[:, 0].numpy(), float(delta[0, 0])


def _text(rng, n):
    return [int(x) for x in rng.integers(0, 800, n)]


def _video_with_audio(grid, spg, rows, pps=13.0):
    """The processor's interleave of one video's pads with its audio track's (video first on ties)."""
    t, h, w = grid
    vt = np.repeat(np.arange(t) * spg * pps, h * w // 4)
    out, vi, ai = [VS, AS], 0, 0
    while vi < len(vt) and ai < rows:
        if vt[vi] <= ai:
            out.append(VID)
            vi += 1
        else:
            out.append(AUD)
            ai += 1
    return out + [VID] * (len(vt) - vi) + [AUD] * (rows - ai) + [AE, VE]


CASES = {
    "text_image": lambda r: dict(ids=_text(r, 5) + [VS] + [IMG] * 6 + [VE] + _text(r, 4), images=[(1, 4, 6)]),
    "three_images": lambda r: dict(ids=[VS] + [IMG] * 4 + [VE] + _text(r, 2) + [VS] + [IMG] * 8 + [VE] + [VS]
                                   + [IMG] * 2 + [VE] + _text(r, 3), images=[(1, 4, 4), (1, 4, 8), (1, 2, 4)]),
    "video_fractional": lambda r: dict(ids=_text(r, 3) + [VS] + [VID] * 12 + [VE] + _text(r, 2), videos=[(3, 4, 4)],
                                       seconds=[2 / 3]),
    "video_with_audio": lambda r: dict(ids=_text(r, 3) + _video_with_audio((4, 4, 4), 1.0, rows_for_frames(300, 100))
                                       + _text(r, 2), videos=[(4, 4, 4)], seconds=[1.0], audio_frames=[300],
                                       use_audio_in_video=True),
    "mixed_turns": lambda r: dict(ids=_text(r, 2) + [AS] + [AUD] * rows_for_frames(150, 100) + [AE] + _text(r, 3)
                                  + [VS] + [IMG] * 6 + [VE] + [VS] + [VID] * 8 + [VE] + _text(r, 4),
                                  images=[(1, 6, 4)], videos=[(2, 4, 4)], seconds=[1.0], audio_frames=[150]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_positions_match_get_rope_index(thinker, name):
    c = CASES[name](np.random.default_rng(len(name)))
    images, videos, seconds = c.get("images", []), c.get("videos", []), c.get("seconds", [])
    frames = c.get("audio_frames", [])
    ours, delta = mrope_positions(c["ids"], thinker, images, videos, seconds, [rows_for_frames(f, 100) for f in frames],
                                  c.get("use_audio_in_video", False))
    ref, ref_delta = _hf_rope_index(thinker, c["ids"], images, videos, seconds, frames,
                                    c.get("use_audio_in_video", False))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    assert delta == pytest.approx(ref_delta, abs=1e-4)
    assert not np.array_equal(ours[0], ours[1])  # a real 3-D layout, not text positions


def test_text_only_positions_run_and_items_are_counted(thinker):
    ids = list(range(7))
    pos, delta = mrope_positions(ids, thinker)
    assert (pos == np.arange(7)).all() and delta == 0
    with pytest.raises(ValueError, match="more image spans"):
        mrope_positions([VS, IMG, VE], thinker)
