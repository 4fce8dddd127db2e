"""Streaming (omni_jax.runtime.streaming): interleaved thinker / talker / streamed Code2Wav equals the non-streaming path.

Tiny config, random fp32 weights (both paths share them), greedy thinker and talker. Equality: identical text
tokens and codec frames, waveform within 1e-5 max abs of Code2Wav's full decode (<= 300 frames here, so that is
also what `OmniPipeline.generate` returns). Two schedules: a short reply with a long talker budget (the thinker
ends first; the talker then runs on tts_pad, far past Code2Wav's 152-frame receptive field),
and a long reply with a short talker budget (the talker keeps catching up and waits for every token).
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from omni_jax.cli.output import ProgressiveWav, to_pcm16
from omni_jax.models import code2wav as c2w
from omni_jax.runtime import vocoder
from omni_jax.runtime.sampling import TalkerSampling
from omni_jax.runtime.streaming import TextDeltas
from omni_jax.runtime.vocoder import AudioChunker

PROMPT = "Tell me about the sea."
WAV_TOL = 1e-5  # max abs sample difference; both decodes fp32, only the window/summation order differs


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


def _run_both(pipe, **kw):
    kw = dict(kw, talker_sampling=TalkerSampling.greedy())
    chunk = kw.pop("chunk_frames")
    (ref,) = pipe.generate_ids([pipe.encode(PROMPT)], "ethan", **kw)
    stream = pipe.stream(PROMPT, chunk_frames=chunk, **kw)
    events = list(stream)
    return ref, stream, events


def _check_equal(pipe, ref, stream, events, chunk):
    res = stream.result
    assert res.token_ids == ref.token_ids
    assert [t for e in events for t in e.token_ids] == ref.token_ids
    assert "".join(e.text_delta for e in events) == res.text == ref.text
    assert res.finish_reason == ref.finish_reason
    np.testing.assert_array_equal(res.codes, ref.codes)
    audio = [e for e in events if e.audio is not None]
    np.testing.assert_array_equal(np.concatenate([e.codes for e in audio], axis=1), ref.codes)
    sizes = [e.frames for e in audio]  # a small first chunk (1 frame by default), then chunks of `chunk`
    assert sizes[0] == min(stream.first_chunk_frames, ref.codes.shape[1])
    assert all(n == chunk for n in sizes[1:-1]) and 1 <= sizes[-1] <= chunk
    frames = ref.codes.shape[1]
    full = np.asarray(vocoder.code2wav(pipe.params["code2wav"], ref.codes[None], pipe.config))[0]
    assert res.wav.shape == full.shape == ref.wav.shape == (c2w.wav_length(pipe.config, frames),)
    err_full, err_ref = float(np.abs(res.wav - full).max()), float(np.abs(res.wav - ref.wav).max())
    print(f"tokens {len(res.token_ids)} frames {frames} chunks {len(audio)}: max|stream - full decode| {err_full:.1e}, "
          f"max|stream - generate| {err_ref:.1e}; waits {stream.stats.waits}; "
          f"first audio at {res.timings['time_to_first_audio_s']:.3f} s of {res.timings['total_s']:.3f} s")
    assert err_full <= WAV_TOL and err_ref <= WAV_TOL
    ts = [e.t for e in events]
    assert ts == sorted(ts)
    # the time-to-first-audio breakdown, stage by stage in the order they happen
    stages = ("time_to_first_token_s", "talker_prefill_s", "time_to_first_frame_s", "time_to_first_audio_s", "total_s")
    marks = [res.timings[k] for k in stages]
    assert marks == sorted(marks) and marks[0] > 0


def test_thinker_ends_first_eos(pipe):
    """Short reply ended by an EOS id, long talker budget: 169 frames, so late chunks start past the 152-frame
    receptive field (everything they read comes from the carried state) and most frames run after the
    thinker is done (tts_eos, then tts_pad)."""
    (probe,) = pipe.generate_ids([pipe.encode(PROMPT)], text_only=True, max_new_tokens=4)
    eos = probe.token_ids[2]
    assert eos not in probe.token_ids[:2]
    chunk = 4
    ref, stream, events = _run_both(pipe, max_new_tokens=8, talker_max_new_tokens=170, eos_ids=[eos],
                                    chunk_frames=chunk)
    assert ref.token_ids == probe.token_ids[:3] and ref.finish_reason == "eos"
    assert ref.codes.shape[1] > c2w.required_left_context(pipe.config) + chunk
    _check_equal(pipe, ref, stream, events, chunk)
    st = stream.stats
    assert st.frames_after_thinker_done == st.talker_frames - 1  # only frame 0 (column = token 1) ran before
    assert st.tokens_after_talker_done == 0 and st.thinker_steps == 2


def test_thinker_ends_first_length_partial_chunk(pipe):
    """Reply cut by the token budget (its last token becomes tts_eos); chunk 7 leaves a short last chunk."""
    chunk = 7
    ref, stream, events = _run_both(pipe, max_new_tokens=5, talker_max_new_tokens=31, chunk_frames=chunk)
    assert ref.finish_reason == "length" and len(ref.token_ids) == 5
    assert ref.codes.shape[1] % chunk != 0
    _check_equal(pipe, ref, stream, events, chunk)
    assert stream.stats.frames_after_thinker_done > 0


def test_talker_catches_up_and_waits(pipe):
    """Long reply, short talker budget: the talker consumes each token's column as soon as it exists, so it
    waits for the thinker before every frame; the thinker finishes its text after the talker stopped."""
    chunk = 4
    ref, stream, events = _run_both(pipe, max_new_tokens=40, talker_max_new_tokens=22, chunk_frames=chunk)
    _check_equal(pipe, ref, stream, events, chunk)
    st, log = stream.stats, stream.stats.log
    frames = ref.codes.shape[1]
    assert st.waits == frames  # once before every frame
    assert st.frames_after_thinker_done == 0 and st.tokens_after_talker_done > 0
    at = {entry: i for i, entry in enumerate(log)}
    for s in range(frames):
        # frame s needs token s+1; it waited for it, and ran before the thinker produced token s+2
        assert at[("wait", s)] < at[("token", s + 1)] < at[("frame", s)] < at[("token", s + 2)]
    # the first audio chunk came out while the thinker was still writing, long before its last token
    first_audio = next(i for i, e in enumerate(events) if e.audio is not None)
    later_tokens = sum(len(e.token_ids) for e in events[first_audio:])
    assert later_tokens >= len(ref.token_ids) - stream.first_chunk_frames - 2


def test_sampled_matches_generate(pipe):
    """Sampling (thinker top-k/top-p/penalty, HF-default sampled talker): same PRNG chains, so the same output."""
    from omni_jax.runtime.sampling import SamplingParams

    kw = dict(max_new_tokens=6, talker_max_new_tokens=15, sampling=SamplingParams(0.8, 20, 0.9, 1.1), seed=3)
    (ref,) = pipe.generate_ids([pipe.encode(PROMPT)], "chelsie", **kw)
    stream = pipe.stream(PROMPT, speaker="chelsie", chunk_frames=5, first_chunk_frames=5, **kw)
    events = list(stream)
    _check_equal(pipe, ref, stream, events, 5)


def test_text_deltas_hold_back_split_utf8(pipe):
    tok = pipe.tokenizer
    text = "你好,世界 🎉 ok"
    ids = tok.encode(text)
    deltas = TextDeltas(tok)
    out = [deltas.push(i) for i in ids]
    assert "".join(out) + deltas.flush() == text
    assert all("\ufffd" not in d for d in out)
    assert "" in out  # the emoji is split over byte tokens: held back until complete
    # A byte sequence that never completes stays as U+FFFD once later text arrives, and is not lost.
    broken = tok.encode(" 🎉")[:1] + tok.encode("a")
    deltas = TextDeltas(tok, skip_ids=[7])
    out = [deltas.push(i) for i in broken + [7]]
    assert "".join(out) + deltas.flush() == tok.decode(broken) == " \ufffda"


def test_chunk_range_and_progressive_wav(pipe, tmp_path):
    for bad in (0, 26):
        with pytest.raises(ValueError, match=r"chunk_frames must be an integer in \[1, 25\]"):
            pipe.stream(PROMPT, chunk_frames=bad)
        with pytest.raises(ValueError, match="chunk_frames"):
            AudioChunker(pipe.params["code2wav"], pipe.config, bad)
    path = str(tmp_path / "out.wav")
    writer = ProgressiveWav(path, 24000)
    assert sf.info(path).frames == 0
    rng = np.random.default_rng(0)
    written = []
    for n in (7125, 7680, 300):
        chunk = rng.uniform(-1.2, 1.2, n).astype(np.float32)
        writer.write(chunk)
        written.append(chunk)
        info = sf.info(path)  # the file is complete and valid while still open
        assert (info.frames, info.samplerate, info.channels, info.subtype) == (sum(map(len, written)), 24000, 1,
                                                                             "PCM_16")
        data, _ = sf.read(path, dtype="int16")
        np.testing.assert_array_equal(data, np.frombuffer(to_pcm16(np.concatenate(written)), "<i2"))
    writer.close()
    assert sf.info(path).frames == 7125 + 7680 + 300


def test_spoken_and_image_request_streams_like_generate(pipe):
    """A request with an audio part and an image part (the tiny model has tiny audio and vision towers) streams the
    same tokens, frames, encoder rows and 3-D positions as `generate`."""
    from omni_jax.runtime.types import Request

    rate = 16000
    clip = (0.3 * np.sin(2 * np.pi * 330 * np.arange(rate // 2) / rate)).astype(np.float32)
    yy, xx = np.mgrid[0:32, 0:32]
    image = np.stack([xx * 8, yy * 8, (xx + yy) * 4], axis=-1).astype(np.uint8)
    req = Request(messages=[{"role": "user", "content": [{"type": "audio", "audio": (clip, rate)},
                                                         {"type": "image", "image": image},
                                                         {"type": "text", "text": "what is it?"}]}])
    kw = dict(max_new_tokens=5, talker_max_new_tokens=9, talker_sampling=TalkerSampling.greedy())
    (ref,) = pipe.generate([req], **kw)
    stream = pipe.stream(req, chunk_frames=4, **kw)
    events = list(stream)
    _check_equal(pipe, ref, stream, events, 4)
    hidden = pipe.config.thinker.text.hidden_size
    assert ref.audio_embeds.shape == (7, hidden)  # 0.5 s: ceil(50 / 8) rows
    assert ref.vision_embeds.shape == (16, hidden)  # 32 x 32 px at 8 px per merged token
    np.testing.assert_array_equal(stream.result.audio_embeds, ref.audio_embeds)
    np.testing.assert_array_equal(stream.result.vision_embeds, ref.vision_embeds)
    np.testing.assert_array_equal(stream.result.position_ids, ref.position_ids)
    np.testing.assert_array_equal(stream.result.prompt_logits, ref.prompt_logits)
