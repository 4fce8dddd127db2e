"""What goes in and comes out of the runtime: requests, results and streamed events.

Plain data (numpy, no jax), shared by the pipeline, the streaming scheduler and the launchers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from omni_jax.errors import UsageError

#: The talker prompt takes the first reply token and its trailing text starts at the second, so a reply needs two.
MIN_SPEECH_TOKENS = 2
#: Codec frames (80 ms each) per streamed audio chunk: one-frame packets up to 25 (2 s of audio, past which
#: the first chunk is no longer early). The default is measured: see the README's streaming section.
MIN_CHUNK_FRAMES, MAX_CHUNK_FRAMES = 1, 25
DEFAULT_CHUNK_FRAMES = 4
#: The first chunk of a stream: one frame, so the first audio waits for one frame and one small vocoder step.
DEFAULT_FIRST_CHUNK_FRAMES = 1
#: A stream's time-to-first-audio marks (`Result.timings` keys, seconds on the stream's clock) in the order the
#: stages finish: front end (before the clock starts), audio encoder, thinker first token, talker prefill
#: (codebook 0 of frame 0), code predictor (the whole first frame), first vocoder chunk.
STREAM_STAGES = ("front_end_s", "encoders_s", "time_to_first_token_s", "talker_prefill_s",
                 "time_to_first_frame_s", "time_to_first_audio_s")


def check_chunk_frames(chunk_frames: int, what: str = "chunk_frames") -> int:
    """chunk_frames as an int, or UsageError naming `what` (a flag, an argument) if it is not one in range."""
    ok = isinstance(chunk_frames, (int, np.integer)) and not isinstance(chunk_frames, bool)
    if not ok or not MIN_CHUNK_FRAMES <= int(chunk_frames) <= MAX_CHUNK_FRAMES:
        raise UsageError(f"{what} must be an integer in [{MIN_CHUNK_FRAMES}, {MAX_CHUNK_FRAMES}] (codec frames of "
                         f"80 ms per audio chunk), got {chunk_frames!r}")
    return int(chunk_frames)


@dataclasses.dataclass
class Request:
    """One conversation turn to answer: a prompt string or a ChatML message list."""

    prompt: str | None = None
    messages: list[dict] | None = None
    system: str | None = None
    speaker: str = "ethan"
    use_audio_in_video: bool = False  # each video's own audio track joins the prompt, interleaved with its frames

    def to_messages(self) -> list[dict]:
        if (self.prompt is None) == (self.messages is None):
            raise UsageError("a request needs exactly one of 'prompt' or 'messages'")
        if self.prompt is not None and not (isinstance(self.prompt, str) and self.prompt.strip()):
            raise UsageError(f"the prompt is empty ({self.prompt!r}); give some text to answer")
        if self.messages is not None and not self.messages:
            raise UsageError("the request's message list is empty; give at least one message")
        msgs = list(self.messages) if self.messages is not None else [{"role": "user", "content": self.prompt}]
        if self.system is not None:
            if msgs and msgs[0].get("role") == "system":
                raise UsageError("request has both 'system' and a system message")
            msgs = [{"role": "system", "content": self.system}] + msgs
        return msgs


@dataclasses.dataclass
class Result:
    text: str  # the answer (a Thinking model's reasoning is in `reasoning`)
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids (EOS included when produced)
    finish_reason: str
    codes: np.ndarray | None = None  # [16, frames] int32 (speech only; 0 frames for a reply too short to voice)
    wav: np.ndarray | None = None  # [samples] float32 in [-1, 1]
    sample_rate: int = 24000
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    audio_embeds: np.ndarray | None = None  # [audio tokens, thinker hidden] float32: the rows that replaced the pads
    vision_embeds: np.ndarray | None = None  # [image + video tokens, thinker hidden] float32, likewise, prompt order
    position_ids: np.ndarray | None = None  # [3, prompt length] float: M-RoPE positions (None: plain text's)
    prompt_logits: np.ndarray | None = None  # [vocab] float32: the thinker's logits at the last prompt position
    reasoning: str | None = None  # a Thinking model's `<think> ... </think>` text; None when there was none

    @property
    def audio_seconds(self) -> float:
        return 0.0 if self.wav is None else len(self.wav) / self.sample_rate


@dataclasses.dataclass
class StreamEvent:
    """One step of output, in order. A text event has token_ids (and maybe text_delta) and audio None; an
    audio event has audio [samples] float32 in [-1, 1] for `frames` new codec frames (codes [16, frames])."""

    text_delta: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    audio: np.ndarray | None = None
    frames: int = 0
    t: float = 0.0  # seconds since the stream started running
    codes: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class PromptRows:
    """One prompt's encoder outputs, ready for the thinker: the rows that replace its placeholders (each kind in
    prompt order, as transformers' masked_scatter places them), the deepstack rows that add to the first layers'
    outputs at its image/video placeholders, and its M-RoPE positions when they are not plain text's."""

    audio: np.ndarray | None = None  # [audio tokens, H]
    image: np.ndarray | None = None  # [image tokens, H]
    video: np.ndarray | None = None  # [video tokens, H]
    deepstack: np.ndarray | None = None  # [levels, image + video tokens, H], the visual placeholders in prompt order
    positions: np.ndarray | None = None  # [3, prompt length] float (None: text positions)

    @property
    def has_vision(self) -> bool:
        return self.image is not None or self.video is not None

    @staticmethod
    def result_fields(rows: "PromptRows | None", ids: Sequence[int], thinker: Any) -> dict:
        """Result's audio_embeds, vision_embeds and position_ids for a prompt with these rows (None: text only)."""
        if rows is None:
            return {"audio_embeds": None, "vision_embeds": None, "position_ids": None}
        return {"audio_embeds": rows.audio, "position_ids": rows.positions,
                "vision_embeds": rows.vision_rows(ids, thinker.image_token_id, thinker.video_token_id)}

    def vision_rows(self, ids: np.ndarray, image_id: int, video_id: int) -> np.ndarray | None:
        """[image + video tokens, H]: the merged rows at the visual placeholders, in prompt order (the dump)."""
        if not self.has_vision:
            return None
        ids = np.asarray(ids)
        at = ids[np.isin(ids, [image_id, video_id])]
        h = (self.image if self.image is not None else self.video).shape[1]
        out = np.zeros((at.size, h), np.float32)
        for kind, rows in ((image_id, self.image), (video_id, self.video)):
            if rows is not None:
                out[at == kind] = rows
        return out
