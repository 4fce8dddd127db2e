"""Video preprocessing: PyAV decoding (frames, rate, the audio track), frame sampling, per-frame patches against
transformers' PIL image processor, the audio-in-video placeholder layout against transformers' processor, and
bad-input errors.

transformers' video processor itself needs torchvision, which has no CPU build for this torch here (the 0.28.0
wheel fails to load: `operator torchvision::nms does not exist`), so the frames are checked through the PIL image
processor: a video whose frames come in equal pairs must give, per temporal patch, that frame's image patches at
the video's pixel bounds."""

from __future__ import annotations

import types

import numpy as np
import pytest

from omni_jax.config import load_config
from omni_jax.errors import UsageError
from omni_jax.processing import video as video_lib
from omni_jax.processing.vision import VisionProcessorConfig, VisualInput


def write_video(path: str, frames: np.ndarray, fps: int, audio: np.ndarray | None = None, rate: int = 16000) -> str:
    """An MP4 (MPEG-4 video, AAC audio) written with PyAV."""
    import av

    with av.open(path, "w") as c:
        vs = c.add_stream("mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        a = None
        if audio is not None:
            a = c.add_stream("aac", rate=rate)
            a.layout = "mono"
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if a is not None:
            size = a.codec_context.frame_size or 1024
            for k in range(0, len(audio), size):
                fr = av.AudioFrame.from_ndarray(audio[None, k:k + size].astype(np.float32), format="fltp",
                                                layout="mono")
                fr.sample_rate = rate
                for p in a.encode(fr):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)
    return path


@pytest.mark.parametrize("total,fps,expected", [
    (20, 10.0, [0, 5, 10, 15]),  # 2 s at 2 fps: 4 frames
    (300, 30.0, list(range(0, 300, 15))),  # 10 s: 20 frames
    (9, 3.0, [0, 1, 3, 4, 6, 7]),  # 3 s at 2 fps: 6 frames, steps of 1.5 truncated
    (6, 6.0, [0, 1, 3, 4]),  # 1 s would be 2 frames at 2 fps: min_frames 4
    (3, 30.0, [0, 1]),  # fewer frames than min_frames: the even count that exists
    (1, 30.0, [0, 0]),  # one frame: repeated to fill a temporal patch
])
def test_sample_indices(total, fps, expected):
    assert video_lib.sample_indices(total, fps, VisionProcessorConfig()).tolist() == expected


def test_frame_patches_equal_transformers_image_processor():
    """Frames in equal pairs: each temporal patch equals the PIL image processor's patches of that frame at the
    video's per-frame pixel bounds (resize, rescale, normalise and the merge-block patch order all checked)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = VisionProcessorConfig(patch_size=4, video_min_pixels=64, video_max_pixels=24 * 24)
    rng = np.random.default_rng(3)
    distinct = rng.integers(0, 256, (3, 37, 29, 3), dtype=np.uint8)
    frames = np.repeat(distinct, 2, axis=0)  # 6 frames at 2 fps: all kept
    got = video_lib.frames_input(frames, 2.0, cfg)
    t, h, w = got.grid
    assert t == 3 and got.seconds_per_grid == 1.0 and got.audio is None
    proc = Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, size={"shortest_edge": 64, "longest_edge": 24 * 24})
    per = h * w
    for g in range(3):
        ref = proc(images=[distinct[g]], return_tensors="np")
        assert tuple(ref["image_grid_thw"][0]) == (1, h, w)
        np.testing.assert_array_equal(got.patches[g * per:(g + 1) * per], ref["pixel_values"])


def test_audio_in_video_layout_equals_transformers_processor():
    """The ids replacing a video pad with its track: transformers' `replace_video_with_audio_token` (unbound, on a
    stub) at a fractional grid time step and with audio outlasting the frames and the other way round."""
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor

    th = load_config("tiny").thinker
    stub = types.SimpleNamespace(video_processor=types.SimpleNamespace(merge_size=2), audio_bos_token="<AS>",
                                 audio_eos_token="<AE>", video_token="<V>", audio_token="<A>")
    names = {th.audio_start_token_id: "<AS>", th.audio_end_token_id: "<AE>", th.video_token_id: "<V>",
             th.audio_token_id: "<A>"}
    for grid, spg, rows in (((3, 4, 6), 0.75, 40), ((4, 2, 2), 1.0, 9), ((2, 4, 4), 2.0, 120)):
        video = VisualInput("video", np.zeros((0, 1), np.float32), grid, spg)
        ours = "".join(names[t] for t in video_lib.audio_in_video_span(video, rows, th))
        ref = Qwen3OmniMoeProcessor.replace_video_with_audio_token(
            stub, {"video_grid_thw": [np.array(grid)], "video_second_per_grid": [spg]}, 0,
            {"num_audio_tokens": [rows]}, 0, position_id_per_seconds=th.position_id_per_seconds)
        assert ours == ref
        assert ours.count("<A>") == rows and ours.count("<V>") == grid[0] * grid[1] * grid[2] // 4


def test_video_file_with_audio_track(tmp_path):
    """PyAV decodes the frames and the track (16 kHz mono), the prompt expands the video with its track
    interleaved, and without use_audio_in_video the track is ignored."""
    from omni_jax.runtime import prompt as prompt_lib
    from omni_jax.runtime.loading import load_tokenizer

    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, (8, 40, 56, 3), dtype=np.uint8)
    t = np.arange(32000) / 16000
    path = write_video(str(tmp_path / "clip.mp4"), frames, 4, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    got, rate, audio = video_lib.read_video(path, with_audio=True)
    assert got.shape == frames.shape and rate == 4.0
    assert 32000 <= audio.size <= 32000 + 2048 and 0.25 < np.abs(audio).max() < 0.35  # AAC adds priming samples
    config = load_config("tiny")
    th = config.thinker
    tok = load_tokenizer()
    msgs = [{"role": "user", "content": [{"type": "video", "video": path}, {"type": "text", "text": "what?"}]}]
    plain = prompt_lib.encode_messages(tok, config, msgs)
    assert plain.audio == [] and plain.visual[0].audio is None
    assert plain.ids.count(th.video_token_id) == plain.visual[0].tokens(2) and th.audio_token_id not in plain.ids
    joint = prompt_lib.encode_messages(tok, config, msgs, use_audio_in_video=True)
    rows = prompt_lib.audio_rows(config, joint.audio)[0]
    assert len(joint.audio) == 1 and joint.visual[0].audio is not None
    assert joint.ids.count(th.audio_token_id) == rows and joint.ids.count(th.video_token_id) == plain.visual[0].tokens(2)
    i = joint.ids.index(th.vision_start_token_id)
    assert joint.ids[i + 1] == th.audio_start_token_id  # <|vision_start|><|audio_start|> ... <|audio_end|><|vision_end|>
    end = joint.ids.index(th.vision_end_token_id)
    assert joint.ids[end - 1] == th.audio_end_token_id


@pytest.mark.parametrize("make,match", [
    (lambda d: str(d / "missing.mp4"), "no such file"),
    (lambda d: str(d), "is a directory"),
    (lambda d: (d / "bad.mp4").write_bytes(b"not a video at all" * 50) and str(d / "bad.mp4"), "cannot read"),
    (lambda d: b"\x00\x01garbage" * 100, "cannot read 'video bytes'"),
    (lambda d: write_video(str(d / "thin.mp4"), np.zeros((4, 2, 600, 3), np.uint8), 2), "aspect ratio"),
])
def test_bad_videos_raise_usage_errors(tmp_path, make, match):
    with pytest.raises(UsageError, match=match):
        video_lib.video_input(make(tmp_path), VisionProcessorConfig(), "video 1")
