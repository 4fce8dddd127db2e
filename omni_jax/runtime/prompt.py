"""Messages (text and audio content parts) -> the thinker's prompt ids and each clip's log-mel features.

One function for every front door (OmniPipeline, the launchers' pre-load checks), so a launcher can reject a
bad file or an over-long clip before the weights load and then hand the same ids and features to the run.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from omni_jax.config import OmniConfig
from omni_jax.errors import UsageError
from omni_jax.models.audio_encoder import rows_for_frames
from omni_jax.processing import audio as audio_lib


def audio_sources(messages: Sequence[Mapping[str, Any]]) -> list:
    """The `audio` of every audio content part, in prompt order: a path or a (samples, sample_rate) pair."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, Mapping) else None
        if not isinstance(content, (list, tuple)):
            continue
        for j, part in enumerate(content):
            if isinstance(part, Mapping) and part.get("type") == "audio":
                if part.get("audio") is None:
                    raise UsageError(f"message {i}: audio part {j} has no 'audio' (a file path or a "
                                     "(samples, sample_rate) pair)")
                out.append(part["audio"])
    return out


def encode_messages(tokenizer: Any, config: OmniConfig, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True) -> tuple[list[int], list[np.ndarray]]:
    """(prompt ids with each clip's `<|audio_pad|>` expanded to its encoder rows, features [mels, frames] per clip).

    Every clip is read, checked and resampled here (UsageError naming the file and the problem)."""
    sources = audio_sources(messages)
    features = []
    if sources:
        if config.thinker.audio is None:
            raise UsageError("the request has audio, but this model has no audio encoder (thinker.audio_tower)")
        mels = config.thinker.audio.num_mel_bins
        features = [audio_lib.log_mel(audio_lib.load_audio(src), mels) for src in sources]
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)
    if features:
        ids = audio_lib.expand_audio_pads(ids, config.thinker.audio_token_id, audio_rows(config, features))
    return ids, features


def audio_rows(config: OmniConfig, features: Sequence[np.ndarray]) -> list[int]:
    """Encoder rows (= placeholder tokens) of each clip."""
    return [rows_for_frames(f.shape[1], config.thinker.audio.chunk_frames) for f in features]


def audio_tokens_per_second(config: OmniConfig) -> int:
    """Placeholder tokens one second of audio takes (13 for the released checkpoints)."""
    return rows_for_frames(audio_lib.SAMPLE_RATE // audio_lib.HOP, config.thinker.audio.chunk_frames)


def check_fits(config: OmniConfig, n_prompt: int, features: Sequence[np.ndarray], max_new_tokens: int, max_len: int,
               row: str = "the prompt") -> None:
    """UsageError when prompt + reply budget exceed the cache; with audio (`features`: the prompt's clips), the
    message says how many seconds fit."""
    need = n_prompt + max_new_tokens
    if need <= max_len:
        return
    head = (f"{row} is {n_prompt} tokens and --max_new_tokens={max_new_tokens}, together {need} tokens, longer than "
            f"--max_len={max_len}")
    audio_tokens = sum(audio_rows(config, features))
    if audio_tokens:
        per_second = audio_tokens_per_second(config)
        fit = max(0, max_len - max_new_tokens - (n_prompt - audio_tokens)) // per_second
        raise UsageError(f"{head}: {audio_tokens} of them are audio ({per_second} tokens per second), so about {fit} s "
                         "of audio fit; raise --max_len or shorten the audio")
    raise UsageError(f"{head}; raise --max_len to at least {need}, lower --max_new_tokens or shorten the prompt")
