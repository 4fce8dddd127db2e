"""Progressive audio output for streamed replies: a WAV that is valid after every chunk, raw PCM on stdout,
and the `--stream` driver that prints text and latencies as they come (jax-free)."""

from __future__ import annotations

import os
import sys
import wave
from typing import IO

import numpy as np

from omni_jax.runtime.types import STREAM_STAGES


def to_pcm16(audio: np.ndarray) -> bytes:
    """float [-1, 1] -> little-endian signed 16-bit PCM bytes."""
    return (np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")).tobytes()


class ProgressiveWav:
    """16-bit mono WAV that is a valid, complete file after every `write`: the stdlib `wave` writer patches
    the RIFF and data sizes in the header after each writeframes, and we flush the file each time."""

    def __init__(self, path: str, sample_rate: int):
        self._file = open(path, "wb")
        self._wav = wave.open(self._file, "wb")
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(sample_rate)
        self._wav.writeframes(b"")  # header now, so an empty stream is a valid 0-sample file too
        self._file.flush()

    def write(self, audio: np.ndarray) -> None:
        self._wav.writeframes(to_pcm16(audio))
        self._file.flush()

    def close(self) -> None:
        self._wav.close()
        self._file.close()


def stream_to_outputs(stream, output: str | None, sample_rate: int,
                      text_out: IO[str] | None = None) -> dict[str, float]:
    """Drive a stream: print text as it comes, write audio progressively (WAV file, or raw PCM s16le to stdout
    for output='-'; then text goes to stderr), and report latencies. Returns the measured numbers."""
    text_out = text_out or (sys.stderr if output == "-" else sys.stdout)
    sink = None
    if output == "-":
        sink = sys.stdout.buffer
    first_text = first_audio = None
    last_audio_t, rtfs, samples = 0.0, [], 0
    try:
        for ev in stream:
            if ev.token_ids and first_text is None:
                first_text = ev.t
            if ev.text_delta:
                text_out.write(ev.text_delta)
                text_out.flush()
            if ev.audio is not None and len(ev.audio):
                if first_audio is None:
                    first_audio = ev.t
                else:  # compute time of this chunk over its playback time
                    rtfs.append((ev.t - last_audio_t) / (len(ev.audio) / sample_rate))
                last_audio_t = ev.t
                samples += len(ev.audio)
                if sink is None and output and output != "-":  # opened at the first audio: a failure before it
                    sink = ProgressiveWav(output, sample_rate)  # leaves no file behind
                if sink is not None:
                    sink.write(to_pcm16(ev.audio) if output == "-" else ev.audio)
                    if output == "-":
                        sink.flush()
        if output and output != "-" and sink is None:
            sink = ProgressiveWav(output, sample_rate)  # a stream with no audio still writes a valid (empty) WAV
    except Exception:
        if isinstance(sink, ProgressiveWav):  # a failed stream (e.g. NumericalError) leaves no partial file
            sink.close()
            sink = None
            os.remove(output)
        raise
    finally:
        if isinstance(sink, ProgressiveWav):
            sink.close()
    res = stream.result
    report = {
        "time_to_first_text_s": first_text, "time_to_first_audio_s": first_audio,
        "total_s": res.timings.get("total_s") if res else None, "audio_s": samples / sample_rate,
        "chunk_rtf_median": float(np.median(rtfs)) if rtfs else None,
        "chunk_rtf_max": float(np.max(rtfs)) if rtfs else None,
        "tokens": len(res.token_ids) if res else None, "frames": int(res.codes.shape[1]) if res else None,
        "waits": stream.stats.waits,
        # the time-to-first-audio breakdown (seconds since the stream started; the front end ran before it)
        "breakdown": {k: res.timings.get(k) for k in STREAM_STAGES} if res else {},
    }
    text_out.write("\n")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    text_out.write(
        f"[stream: first text {fmt(first_text)} s, first audio {fmt(first_audio)} s, total {fmt(report['total_s'])} s, "
        f"{report['audio_s']:.2f} s audio in {stream.stats.audio_chunks} chunks of {stream.chunk_frames} frames, "
        f"per-chunk RTF median {fmt(report['chunk_rtf_median'])} max {fmt(report['chunk_rtf_max'])} "
        f"(first chunk excluded), talker waited {stream.stats.waits}x]\n")
    b = report["breakdown"]
    if b:
        text_out.write(f"[first audio: front end {fmt(b['front_end_s'])} s, then at encoders "
                       f"{fmt(b['encoders_s'])} / thinker first token {fmt(b['time_to_first_token_s'])} / talker "
                       f"prefill {fmt(b['talker_prefill_s'])} / code predictor (first frame) "
                       f"{fmt(b['time_to_first_frame_s'])} / first vocoder chunk "
                       f"{fmt(b['time_to_first_audio_s'])} s]\n")
    text_out.flush()
    return report
