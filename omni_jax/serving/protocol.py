"""The OpenAI chat-completions wire format: request bodies in, checked field by field; responses out.

Pure Python (no HTTP, no jax): `parse_chat` turns a decoded JSON body into `ChatParams` and the runtime's
message list, or raises `ApiError` naming the field; the response builders make the JSON the official
`openai` client reads. Unknown fields are ignored, as OpenAI-compatible servers do; known fields with a
wrong type or value, and features this server does not have, are a 400.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import time
import uuid
from typing import Any, Mapping, Sequence

import numpy as np

from omni_jax.cli.output import to_pcm16 as pcm16

AUDIO_INPUT_FORMATS = ("wav", "mp3", "flac")
AUDIO_OUTPUT_FORMATS = ("wav", "pcm16")
MODALITIES = (("text",), ("text", "audio"), ("audio", "text"))


class ApiError(Exception):
    """An error the client caused (or a server state it should know about), in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):  # noqa: A002 - OpenAI's field name
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,  # noqa: A002
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclasses.dataclass
class ChatParams:
    """What a chat-completions request asks for, checked."""

    messages: list[dict]  # the runtime's message list (omni_jax.runtime.types.Request.messages)
    model: str | None = None
    speech: bool = False
    voice: str = "ethan"
    audio_format: str = "wav"
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    use_audio_in_video: bool = False  # an extra: each video's own audio track joins the prompt


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


def _number(body: Mapping, name: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, f"must be a number, got {type(v).__name__} {v!r}")
    if not (lo < v if lo_open else lo <= v) or v > hi or v != v:
        raise _bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return float(v)


def _integer(body: Mapping, name: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"must be an integer, got {type(v).__name__} {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise _bad(name, f"must be >= {lo}" + (f" and <= {hi}" if hi is not None else "") + f", got {v}")
    return v


def decode_audio(data: Any, fmt: Any, param: str, max_seconds: float) -> tuple[np.ndarray, int]:
    """Base64 audio of a content part -> (samples [n] or [n, channels] float32, rate), checked."""
    import soundfile as sf

    if fmt not in AUDIO_INPUT_FORMATS:
        raise _bad(f"{param}.format", f"must be one of {', '.join(AUDIO_INPUT_FORMATS)}, got {fmt!r}")
    if not isinstance(data, str) or not data:
        raise _bad(f"{param}.data", "must be a non-empty base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{param}.data", "is not valid base64") from None
    try:
        samples, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=False)
    except Exception as e:  # noqa: BLE001 - libsndfile's errors (and format-specific ones) all mean the same
        raise _bad(f"{param}.data", f"could not be decoded as {fmt} audio ({type(e).__name__})") from None
    if samples.size == 0:
        raise _bad(f"{param}.data", "holds no audio samples")
    seconds = samples.shape[0] / rate
    if seconds > max_seconds:
        raise ApiError(400, f"{param}: {seconds:.1f} s of audio is more than this server takes "
                       f"({max_seconds:g} s, --max_audio_seconds)", param=param, code="audio_too_long")
    return samples, int(rate)


def decode_media_url(url: Any, kind: str, param: str, media_dir: str | None) -> bytes | str:
    """An image_url / video_url `url`: a base64 data: URL -> its bytes, or a local path (plain or file://) under
    --media_dir -> the path. Nothing is fetched from the network. The bytes are decoded later with the rest of the
    prompt (Pillow / PyAV), where a bad file is a 400 too."""
    if not isinstance(url, str) or not url:
        raise _bad(param, "must be a non-empty string: a data: URL or a local path")
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise _bad(param, f"a data: URL must be base64 ('data:{kind}/...;base64,...')")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(param, "is not valid base64") from None
        if not raw:
            raise _bad(param, "holds no bytes")
        return raw
    if "://" in url and not url.startswith("file://"):
        raise ApiError(400, f"{param}: this server fetches nothing from the network; send a data: URL",
                       param=param, code="unsupported_url")
    if media_dir is None:
        raise ApiError(400, f"{param}: local paths are off on this server (start it with --media_dir); send a data: "
                       "URL", param=param, code="unsupported_url")
    path = os.path.realpath(url[len("file://"):] if url.startswith("file://") else url)
    root = os.path.realpath(media_dir)
    if os.path.commonpath([path, root]) != root:
        raise _bad(param, f"local paths must be under --media_dir ({media_dir})")
    if not os.path.isfile(path):
        raise _bad(param, f"no such file under --media_dir: {url!r}")
    return path


def _content(content: Any, where: str, role: str, max_audio_seconds: float,
             media_dir: str | None = None) -> str | list[dict]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _bad(f"{where}.content", "must be a string or a non-empty list of content parts")
    parts: list[dict] = []
    for j, part in enumerate(content):
        p = f"{where}.content[{j}]"
        if not isinstance(part, Mapping):
            raise _bad(p, "must be an object with a 'type'")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"{p}.text", "must be a string")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_audio":
            if role != "user":
                raise _bad(p, f"input_audio goes in user messages, not {role}")
            audio = part.get("input_audio")
            if not isinstance(audio, Mapping):
                raise _bad(f"{p}.input_audio", "must be an object {data, format}")
            parts.append({"type": "audio", "audio": decode_audio(audio.get("data"), audio.get("format"),
                                                                  f"{p}.input_audio", max_audio_seconds)})
        elif kind in ("image_url", "video_url"):
            if role != "user":
                raise _bad(p, f"{kind} goes in user messages, not {role}")
            media, ref = kind[:-4], part.get(kind)
            url = ref.get("url") if isinstance(ref, Mapping) else ref
            parts.append({"type": media, media: decode_media_url(url, media, f"{p}.{kind}.url", media_dir)})
        else:
            raise _bad(f"{p}.type", f"must be 'text', 'input_audio', 'image_url' or 'video_url', got {kind!r}")
    return parts


def parse_messages(messages: Any, max_audio_seconds: float, transcripts: Mapping[str, str],
                   media_dir: str | None = None) -> list[dict]:
    """OpenAI messages -> the runtime's message list. transcripts: audio id -> text of earlier replies, so an
    assistant turn given as `{"audio": {"id": ...}}` (the openai client's way to pass a spoken reply back) works."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise _bad(where, "must be an object with 'role' and 'content'")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise _bad(f"{where}.role", f"must be system, developer, user or assistant, got {role!r}")
        content = m.get("content")
        if content is None and role == "assistant" and isinstance(m.get("audio"), Mapping):
            audio_id = m["audio"].get("id")
            if audio_id not in transcripts:
                raise _bad(f"{where}.audio.id", f"unknown or expired audio id {audio_id!r}; pass the reply's text "
                           "as content instead")
            content = transcripts[audio_id]
        out.append({"role": role, "content": _content(content, where, role, max_audio_seconds, media_dir)})
    if out[-1]["role"] != "user":
        raise _bad(f"messages[{len(out) - 1}].role", "the last message must be the user's")
    return out


def parse_chat(body: Any, *, voices: Sequence[str], max_audio_seconds: float,
               transcripts: Mapping[str, str] | None = None, media_dir: str | None = None) -> ChatParams:
    """A decoded chat-completions body -> ChatParams, or ApiError(400) naming the first bad field."""
    if not isinstance(body, Mapping):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "must be a string")
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise ApiError(400, f"n: only n=1 is supported, got {n}", param="n", code="unsupported_parameter")
    for name in ("tools", "functions", "logprobs", "response_format"):
        if body.get(name):
            raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", f"must be a boolean, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise _bad("stream_options", "must be an object")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _bad("stream_options.include_usage", "must be a boolean")
    modalities = body.get("modalities") or ["text"]
    if not isinstance(modalities, list) or tuple(modalities) not in MODALITIES:
        raise _bad("modalities", f"must be [\"text\"] or [\"text\", \"audio\"], got {modalities!r}")
    speech = "audio" in modalities
    voice, fmt = "ethan", "wav"
    audio = body.get("audio")
    if audio is not None:
        if not isinstance(audio, Mapping):
            raise _bad("audio", "must be an object {voice, format}")
        voice = audio.get("voice", voice)
        if not isinstance(voice, str) or voice.lower() not in [v.lower() for v in voices]:
            raise ApiError(400, f"audio.voice: unknown voice {voice!r}; this model has {', '.join(voices)}",
                           param="audio.voice", code="unknown_voice")
        fmt = audio.get("format", "pcm16" if stream else "wav")
        if fmt not in AUDIO_OUTPUT_FORMATS:
            raise _bad("audio.format", f"must be one of {', '.join(AUDIO_OUTPUT_FORMATS)}, got {fmt!r}")
        if stream and fmt != "pcm16":
            raise _bad("audio.format", "streamed audio is pcm16 (24 kHz mono s16le chunks); ask for format pcm16")
    elif speech and stream:
        fmt = "pcm16"
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    seed = _integer(body, "seed", 0, 2**31 - 2)
    use_audio_in_video = body.get("use_audio_in_video", False)
    if not isinstance(use_audio_in_video, bool):
        raise _bad("use_audio_in_video", f"must be a boolean, got {use_audio_in_video!r}")
    return ChatParams(
        messages=parse_messages(body.get("messages"), max_audio_seconds, transcripts or {}, media_dir), model=model,
        use_audio_in_video=use_audio_in_video,
        speech=speech, voice=voice.lower(), audio_format=fmt, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_number(body, "top_p", 1.0, 0.0, 1.0, True),
        top_k=_integer(body, "top_k", 0) or 0, seed=seed, stream=stream, include_usage=include_usage)


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def audio_id() -> str:
    return "audio_" + uuid.uuid4().hex


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """A 16-bit WAV file of float samples, quantised exactly as the streamed pcm16 chunks are."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.frombuffer(pcm16(samples), "<i2"), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def finish_reason(reason: str) -> str:
    return "stop" if reason == "eos" else "length"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, created: int, text: str, reason: str, prompt_tokens: int, completion_tokens: int,
               audio: dict | None = None) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if audio is not None:
        message["audio"] = audio
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(reason), "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, created: int, delta: dict, reason: str | None = None,
          usage_: dict | None = None) -> dict:
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": 0, "delta": delta,
                                        "finish_reason": None if reason is None else finish_reason(reason)}]}
    if usage_ is not None:
        out["choices"], out["usage"] = [], usage_
    return out


def audio_payload(aid: str, data: bytes, transcript: str, expires_in: int = 3600) -> dict:
    return {"id": aid, "data": base64.b64encode(data).decode("ascii"), "expires_at": int(time.time()) + expires_in,
            "transcript": transcript}
