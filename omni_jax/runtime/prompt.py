"""Messages (text, audio, image and video parts) -> the thinker's prompt ids and each item's encoder input.

One function for every front door (OmniPipeline, the launchers' pre-load checks), so a launcher can reject a
bad file or an over-long clip before the weights load and then hand the same ids and features to the run.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from omni_jax.config import OmniConfig
from omni_jax.errors import UsageError
from omni_jax.models.audio_encoder import rows_for_frames
from omni_jax.processing import audio as audio_lib
from omni_jax.processing import video as video_lib
from omni_jax.processing import vision as vision_lib
from omni_jax.processing.vision import VisualInput


#: What each media part's value may be (the error when it is missing).
_HINTS = {"audio": "a file path or a (samples, sample_rate) pair",
          "image": "a file path, bytes, a PIL image or an [H, W, 3] uint8 array",
          "video": "a file path, bytes or (frames [N, H, W, 3] uint8, fps)"}


def media_parts(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, Any]]:
    """(kind, value) of every audio, image and video content part, in prompt order."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, Mapping) else None
        if not isinstance(content, (list, tuple)):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind in _HINTS:
                if part.get(kind) is None:
                    raise UsageError(f"message {i}: {kind} part {j} has no {kind!r} ({_HINTS[kind]})")
                out.append((kind, part[kind]))
    return out


def audio_sources(messages: Sequence[Mapping[str, Any]]) -> list:
    """The `audio` of every audio content part, in prompt order: a path or a (samples, sample_rate) pair."""
    return [src for kind, src in media_parts(messages) if kind == "audio"]


def visual_sources(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, Any]]:
    """(kind, source) of every image and video content part, in prompt order."""
    return [(kind, src) for kind, src in media_parts(messages) if kind != "audio"]


class PromptInputs(NamedTuple):
    """A conversation ready to run: prompt ids (each placeholder expanded to its encoder rows), the log-mel
    features [mels, frames] of every audio span in prompt order (a video's own track, with use_audio_in_video,
    where that video is), and each image / video preprocessed, in prompt order."""

    ids: list[int]
    audio: list[np.ndarray]
    visual: list[VisualInput]


def encode_messages(tokenizer: Any, config: OmniConfig, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True,
                    processor: vision_lib.VisionProcessorConfig | None = None,
                    use_audio_in_video: bool = False) -> PromptInputs:
    """The prompt ids with every `<|audio_pad|>`, `<|image_pad|>` and `<|video_pad|>` expanded to its item's
    encoder rows, and each item's encoder input. Every file is read, checked and resampled here (UsageError naming
    the file and the problem), so bad input fails before anything runs. processor: the image/video processor values
    (default: the released ones, at the vision encoder's patch sizes). use_audio_in_video: each video's own audio
    track joins the prompt, interleaved with its frames by time inside the video's span (a video without a track
    stays a plain video), as transformers' processor lays it out."""
    th = config.thinker
    parts = media_parts(messages)
    if any(kind == "audio" for kind, _ in parts) and th.audio is None:
        raise UsageError("the request has audio, but this model has no audio encoder (thinker.audio_tower)")
    kinds = sorted({kind for kind, _ in parts if kind != "audio"})
    if kinds and th.vision is None:
        raise UsageError(f"the request has {' and '.join(kinds)} input, but this model has no vision encoder "
                         "(thinker.visual)")
    if use_audio_in_video and "video" in kinds and th.audio is None:
        raise UsageError("use_audio_in_video needs an audio encoder (thinker.audio_tower); this model has none")
    if kinds:
        processor = processor or vision_lib.processor_for_model(None, th.vision)
    features, plain_rows, visual, counts = [], [], [], {"audio": 0, "image": 0, "video": 0}
    for kind, src in parts:
        counts[kind] += 1
        what = f"{kind} {counts[kind]}"
        if kind == "audio":
            features.append(audio_lib.log_mel(audio_lib.load_audio(src), th.audio.num_mel_bins))
            plain_rows.append(audio_rows(config, features[-1:])[0])
        elif kind == "image":
            visual.append(vision_lib.image_input(src, processor, what))
        else:
            visual.append(video_lib.video_input(src, processor, what, with_audio=use_audio_in_video))
            if visual[-1].audio is not None:
                try:
                    features.append(audio_lib.log_mel(visual[-1].audio, th.audio.num_mel_bins))
                except UsageError as e:
                    raise UsageError(f"{what}: its audio track: {e}") from None
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)
    if plain_rows:
        ids = audio_lib.expand_audio_pads(ids, th.audio_token_id, plain_rows)
    if visual:
        m = th.vision.spatial_merge_size
        images = [v for v in visual if v.kind == "image"]
        ids = audio_lib.expand_audio_pads(ids, th.image_token_id, [v.tokens(m) for v in images], "image")
        videos = [v for v in visual if v.kind == "video"]
        video_feats = iter(features[len(plain_rows):])  # the tracks, in video order
        spans = []
        for v in videos:
            if v.audio is None:
                spans.append([th.video_token_id] * v.tokens(m))
            else:
                spans.append(video_lib.audio_in_video_span(v, audio_rows(config, [next(video_feats)])[0], th))
        ids = audio_lib.expand_placeholders(ids, th.video_token_id, spans, "video")
    if any(v.audio is not None for v in visual):
        features = _prompt_order(ids, features, plain_rows, th)
    return PromptInputs(ids, features, visual)


def _prompt_order(ids: list[int], features: list[np.ndarray], plain_rows: list[int], th) -> list[np.ndarray]:
    """The clips' features in the order their audio spans appear in the prompt (plain clips and videos' tracks
    interleave when a turn mixes them); the engine fills audio placeholders in that order."""
    plain, tracks = iter(features[:len(plain_rows)]), iter(features[len(plain_rows):])
    out = []
    for i, t in enumerate(ids):
        if t == th.audio_start_token_id:
            from_video = i > 0 and ids[i - 1] == th.vision_start_token_id
            out.append(next(tracks) if from_video else next(plain))
    return out


def audio_rows(config: OmniConfig, features: Sequence[np.ndarray]) -> list[int]:
    """Encoder rows (= placeholder tokens) of each clip."""
    return [rows_for_frames(f.shape[1], config.thinker.audio.chunk_frames) for f in features]


def audio_tokens_per_second(config: OmniConfig) -> int:
    """Placeholder tokens one second of audio takes (13 for the released checkpoints)."""
    return rows_for_frames(audio_lib.SAMPLE_RATE // audio_lib.HOP, config.thinker.audio.chunk_frames)


def check_fits(config: OmniConfig, n_prompt: int, features: Sequence[np.ndarray], max_new_tokens: int, max_len: int,
               row: str = "the prompt", visual: Sequence[VisualInput] = ()) -> None:
    """UsageError when prompt + reply budget exceed the cache; with audio (`features`: the prompt's clips), the
    message says how many seconds fit, with images / videos how many tokens each takes."""
    need = n_prompt + max_new_tokens
    if need <= max_len:
        return
    head = (f"{row} is {n_prompt} tokens and --max_new_tokens={max_new_tokens}, together {need} tokens, longer than "
            f"--max_len={max_len}")
    if visual:
        m = config.thinker.vision.spatial_merge_size
        kinds = [v.kind for v in visual]
        sizes = ", ".join(f"{v.kind} {kinds[:i + 1].count(v.kind)}: {v.tokens(m)}" for i, v in enumerate(visual))
        rest = n_prompt - sum(v.tokens(m) for v in visual)
        raise UsageError(f"{head}: the images/videos take {sizes} tokens and the rest {rest}, so "
                         f"{max(0, max_len - max_new_tokens - rest)} tokens are left for them; raise --max_len to at "
                         f"least {need}, or use smaller images / shorter videos")
    audio_tokens = sum(audio_rows(config, features))
    if audio_tokens:
        per_second = audio_tokens_per_second(config)
        fit = max(0, max_len - max_new_tokens - (n_prompt - audio_tokens)) // per_second
        raise UsageError(f"{head}: {audio_tokens} of them are audio ({per_second} tokens per second), so about {fit} s "
                         "of audio fit; raise --max_len or shorten the audio")
    raise UsageError(f"{head}; raise --max_len to at least {need}, lower --max_new_tokens or shorten the prompt")
