"""Streaming speech: text deltas and audio chunks while the Thinker is still writing (batch 1).

transformers' `generate` runs the thinker to completion, then the talker, then Code2Wav. Here one host
loop interleaves the three, using the same compiled functions as the non-streaming path:

  * Thinker: `ThinkerEngine.start` (compiled prefill) then one `decode_fn` call per token.
  * Talker: `TalkerGenerator.start` (prefill) then one `step` call per codec frame. Talker step s adds
    trailing text column s, which HF fills with text_projection(embedding of generated token s+1),
    then tts_eos in place of the last generated token (EOS, or the token that spent the budget; HF never
    feeds it to the thinker), then tts_pad forever. So column s is known as soon as token s+1 exists.
    The talker prompt itself needs only the prompt and generated token 0, so the talker starts right
    after the thinker's prefill.
  * Code2Wav: one `vocoder.stream_step` for the first `first_chunk_frames` frames (1 by default: the first
    audio leaves one frame after the talker starts), then one per `chunk_frames` new frames
    (`vocoder.AudioChunker`), from a carried state, so every chunk costs the same however long the reply
    has been.

Schedule (talker first): the talker takes its next frame whenever its column is available; when it has
caught up with the thinker (column s needs token s+1, not generated yet) the scheduler *waits*, i.e.
runs one thinker step, and every new token is emitted as a text delta at once. While the text lasts
this alternates thinker step / talker frame, so the first audio chunk needs only first_chunk_frames + 1
tokens; once the thinker is done the talker runs alone, and once the talker is done (codec EOS or
budget) the thinker finishes its text. `SpeechStream.stats` counts and logs every decision.

Equality with the non-streaming path (`OmniPipeline.generate`): same token ids and codec frames (same
compiled steps, same PRNG chains), and the concatenated audio equals Code2Wav's full decode of all
frames up to float summation order (the carried state holds exactly what the next chunk reads). For at most
300 frames that is also what the non-streaming path returns; beyond 300 frames the non-streaming path
reproduces HF's `chunked_decode` seams (25-frame left context, D samples lost per chunk), while
streaming keeps equalling the exact full decode.

Compiles: the thinker prefill/decode step and talker prefill are the non-streaming path's; the talker
step compiles once more for a one-column trailing (see `_ColumnSource`); Code2Wav compiles one stream
step per chunk size (the first chunk's and the later chunks'; a short last chunk is padded to its size).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config import OmniConfig
from omni_jax.errors import UsageError
from omni_jax.models.talker import Talker
from omni_jax.runtime.sampling import SamplingParams, TalkerSampling
from omni_jax.runtime.talker_engine import check_finite as check_talker_finite
from omni_jax.runtime import prompt as prompt_lib
from omni_jax.runtime.talker_inputs import talker_positions, tts_token_ids
from omni_jax.runtime.thinker_engine import check_finite as check_thinker_finite
from omni_jax.runtime.types import (DEFAULT_CHUNK_FRAMES, DEFAULT_FIRST_CHUNK_FRAMES, PromptRows, Request, Result,
                                    StreamEvent, check_chunk_frames)
from omni_jax.runtime.vocoder import AudioChunker


@dataclasses.dataclass
class StreamStats:
    """What the scheduler did. log entries: ("token", j) thinker produced reply token j; ("wait", s) talker
    step s was due but token s+1 did not exist yet, so a thinker step ran; ("frame", s) talker step s ran;
    ("audio", f) audio up to frame f was emitted."""

    thinker_steps: int = 0  # decode steps after prefill
    talker_frames: int = 0
    waits: int = 0
    frames_after_thinker_done: int = 0
    tokens_after_talker_done: int = 0
    audio_chunks: int = 0
    log: list[tuple[str, int]] = dataclasses.field(default_factory=list)


class TextDeltas:
    """Incremental detokenizer: decodes the whole reply so far and emits the new suffix, holding back
    trailing U+FFFD (an incomplete multi-byte UTF-8 character split across tokens) until it completes."""

    def __init__(self, tokenizer, skip_ids: Sequence[int] = ()):
        self._tok = tokenizer
        self._skip = frozenset(int(i) for i in skip_ids)
        self._ids: list[int] = []
        self.text = ""  # emitted so far

    def push(self, token_id: int) -> str:
        if int(token_id) in self._skip:
            return ""
        self._ids.append(int(token_id))
        stable = self._tok.decode(self._ids, skip_special_tokens=True).rstrip("\ufffd")
        # Byte-level decoding of a longer id list only changes the trailing U+FFFD run of a shorter one, so
        # `stable` extends what was emitted; the startswith check only guards against other tokenizers.
        if len(stable) <= len(self.text) or not stable.startswith(self.text):
            return ""
        delta, self.text = stable[len(self.text):], stable
        return delta

    def flush(self) -> str:
        """The rest of the final text (incl. any replacement characters that never completed)."""
        full = self._tok.decode(self._ids, skip_special_tokens=True)
        delta = full[len(_common_prefix(full, self.text)):]
        self.text = full
        return delta


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


@functools.lru_cache(maxsize=None)
def _text_column_fn(config: OmniConfig, dtype):
    """Compiled talker text projection of thinker token embeddings: ids [B] -> trailing column [B, 1, H]."""
    model = Talker(config, dtype, dtype)

    def column(talker_params, embed_table, ids):
        emb = jnp.take(embed_table, ids, axis=0).astype(dtype)  # == the thinker's nn.Embed lookup
        return model.apply({"params": talker_params}, emb, method=Talker.project_text)[:, None, :].astype(dtype)

    return jax.jit(column)


@functools.lru_cache(maxsize=None)
def _embed_fn(dtype):
    return jax.jit(lambda table, ids: jnp.take(table, ids, axis=0).astype(dtype))


class _ColumnSource:
    """Trailing text columns for the talker, one per step, as [1, 1, H] device arrays.

    `talker_step` reads column min(step, Ttr - 1) of the trailing it is given (checked in talker.py), so a
    one-column trailing is read at every step: we pass exactly the column that step needs, which keeps one
    compiled shape however long the reply gets and transfers nothing per step.
    """

    def __init__(self, fn, talker_params, embed_table, tts_eos: jax.Array, tts_pad: jax.Array):
        self._fn, self._params, self._table = fn, talker_params, embed_table
        self.tts_eos, self.tts_pad = tts_eos, tts_pad

    def text(self, token_device: jax.Array) -> jax.Array:
        return self._fn(self._params, self._table, token_device)


class SpeechStream:
    """Iterator over `StreamEvent`s for one request (batch 1); see the module docstring for the schedule.

    After exhaustion, `result` holds the pipeline `Result` (text, ids, codes, wav, timings) and `stats`
    what the scheduler did. Stopping early (closing the iterator) releases the thinker cache too.
    """

    def __init__(
        self,
        pipe,
        prompt_or_request: Any,
        *,
        speaker: str | None = None,
        max_new_tokens: int = 256,
        talker_max_new_tokens: int = 1024,
        sampling: SamplingParams | None = None,
        talker_sampling: TalkerSampling | None = None,
        seed: int = 0,
        chunk_frames: int = DEFAULT_CHUNK_FRAMES,
        first_chunk_frames: int = DEFAULT_FIRST_CHUNK_FRAMES,
        eos_ids: Sequence[int] | None = None,
        audio: Sequence[np.ndarray] | None = None,
        visual: Sequence[Any] | None = None,
    ):
        if not pipe.has_speech:
            raise UsageError("this checkpoint has no talker/code2wav weights; streaming speech needs them")
        self.chunk_frames = check_chunk_frames(chunk_frames)  # before the prompt is rendered or audio read
        self.first_chunk_frames = check_chunk_frames(first_chunk_frames, "first_chunk_frames")
        if isinstance(prompt_or_request, str):
            prompt_or_request = Request(prompt=prompt_or_request)
        t_front = time.perf_counter()
        if isinstance(prompt_or_request, Request):
            if audio is not None or visual is not None:
                raise UsageError("audio= / visual= go with exact prompt ids; a Request carries its audio, images and "
                                 "videos in content parts")
            self.prompt_ids, audio, visual = pipe.prepare(prompt_or_request)
            speaker = speaker or prompt_or_request.speaker
        else:
            self.prompt_ids = [int(t) for t in prompt_or_request]
        self.audio = list(audio or [])
        self.visual = list(visual or [])
        self.front_end_s = time.perf_counter() - t_front  # template + reading and featurizing the audio
        self.speaker = speaker or "ethan"
        pipe.config.talker.speaker(self.speaker)  # unknown speaker -> ValueError listing the known ones
        if talker_max_new_tokens < 1:
            raise UsageError(f"talker_max_new_tokens must be >= 1, got {talker_max_new_tokens}")
        self.pipe = pipe
        self.max_new_tokens = int(max_new_tokens)
        self.talker_max_new_tokens = int(talker_max_new_tokens)
        self.sampling = sampling or SamplingParams.greedy()
        self.talker_sampling = talker_sampling or TalkerSampling()
        self.seed = int(seed)
        self.eos = tuple(int(e) for e in (pipe.tokenizer.eos_token_ids if eos_ids is None else eos_ids))
        self.stats = StreamStats()
        self.result = None
        self._events = self._run()

    def __iter__(self) -> Iterator[StreamEvent]:
        return self

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def close(self) -> None:
        self._events.close()

    # -- the scheduler ---------------------------------------------------------------------------
    def _run(self) -> Iterator[StreamEvent]:
        pipe, engine, stats, log = self.pipe, self.pipe.engine, self.stats, self.stats.log
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        now = lambda: time.perf_counter() - t0  # noqa: E731
        detok = TextDeltas(pipe.tokenizer, self.eos)
        tokens: list[int] = []
        token_dev: list[jax.Array] = []  # device [1] arrays of each token (column inputs, never read back)

        timings["front_end_s"] = self.front_end_s  # before t0: the stream's clock starts at the encoder
        mm_rows = pipe.encode_inputs([self.prompt_ids], [self.audio], self.max_new_tokens, [self.visual])
        if mm_rows is not None:
            timings["encoders_s"] = now()  # the audio and vision encoders
        pre = engine.start([self.prompt_ids], self.max_new_tokens, self.sampling, self.seed, collect_hidden=True,
                           eos_ids=self.eos, mm_rows=mm_rows)
        state = pre.state
        prompt_logits = jnp.copy(state.logits)  # on device: the decode steps donate the state
        thinker_done = False

        def take(tok_dev: jax.Array) -> StreamEvent:
            nonlocal thinker_done
            tok = int(np.asarray(tok_dev)[0])
            tokens.append(tok)
            token_dev.append(tok_dev)
            thinker_done = tok in self.eos or len(tokens) >= self.max_new_tokens
            log.append(("token", len(tokens) - 1))
            delta = detok.push(tok)
            if thinker_done:
                delta += detok.flush()
            t = now()
            timings.setdefault("time_to_first_token_s", t)
            return StreamEvent(text_delta=delta, token_ids=[tok], t=t)

        try:
            # Numerical guard: the device-side flags are read once here and once per audio chunk (never per token).
            check_thinker_finite(state)
            yield take(pre.first)
            talker = chunker = None
            if not thinker_done:  # the reply has >= MIN_SPEECH_TOKENS tokens: it gets speech
                talker, cols, tstate = self._start_talker(state, tokens[0])
                jax.block_until_ready(tstate)
                timings["talker_prefill_s"] = now()  # the talker prompt's prefill: codebook 0 of frame 0
                chunker = AudioChunker(pipe.params["code2wav"], pipe.config, self.chunk_frames, pipe.dtype,
                                       self.first_chunk_frames)
            wav_parts: list[np.ndarray] = []
            talker_done = (talker is None or self.talker_max_new_tokens <= 1
                           or bool(np.asarray(tstate.done)[0]))
            frames = 0

            def audio_event(out) -> StreamEvent:
                check_thinker_finite(state)  # no audio leaves a stream whose stages produced NaN/Inf
                check_talker_finite(tstate)
                wav, codes = out
                wav_parts.append(wav)
                stats.audio_chunks += 1
                log.append(("audio", chunker.decoded))
                t = now()
                timings.setdefault("time_to_first_audio_s", t)
                return StreamEvent(audio=wav, frames=codes.shape[1], codes=codes, t=t)

            while True:
                if not talker_done:
                    s = frames
                    j = s + 1  # column s carries reply token s+1
                    col = None
                    if j < len(tokens):
                        last = thinker_done and j == len(tokens) - 1
                        col = cols.tts_eos if last else cols.text(token_dev[j])
                    elif thinker_done:
                        col = cols.tts_pad
                    if col is not None:
                        tstate, codes, valid = talker.step(pipe.params["talker"], tstate, col,
                                                           sampling=self.talker_sampling)
                        codes, valid = np.asarray(codes)[0], bool(np.asarray(valid)[0])
                        if not valid:  # cannot happen: we stop at codec EOS before stepping again
                            raise RuntimeError("talker produced a frame after codec EOS")
                        frames += 1
                        timings.setdefault("time_to_first_frame_s", now())
                        stats.talker_frames += 1
                        stats.frames_after_thinker_done += int(thinker_done)
                        log.append(("frame", s))
                        out = chunker.push(codes)
                        if out is not None:
                            yield audio_event(out)
                        # HF: at most max_new - 1 frames (the last group-0 code never gets its residual groups).
                        talker_done = bool(np.asarray(tstate.done)[0]) or frames >= self.talker_max_new_tokens - 1
                        if talker_done:
                            out = chunker.flush()
                            if out is not None:
                                yield audio_event(out)
                        continue
                    stats.waits += 1
                    log.append(("wait", s))
                if thinker_done:
                    break
                state, toks, _, _ = engine.decode_fn(engine.params, state, sampling=pre.sampling, collect_hidden=True)
                stats.thinker_steps += 1
                stats.tokens_after_talker_done += int(talker_done and talker is not None)
                yield take(toks)

            check_thinker_finite(state)
            if talker is not None:
                check_talker_finite(tstate)
            timings["total_s"] = now()
            q = pipe.config.talker.num_code_groups
            all_codes = chunker.codes if chunker else np.zeros((q, 0), np.int32)
            self.result = Result(
                text=detok.text, prompt_ids=list(self.prompt_ids), token_ids=list(tokens),
                finish_reason="eos" if tokens and tokens[-1] in self.eos else "length", codes=all_codes,
                wav=np.concatenate(wav_parts) if wav_parts else np.zeros((0,), np.float32),
                sample_rate=pipe.sample_rate, timings=timings,
                prompt_logits=np.asarray(prompt_logits)[0],
                **PromptRows.result_fields(None if mm_rows is None else mm_rows[0], self.prompt_ids,
                                           pipe.config.thinker),
            )
        finally:
            engine.release(state)

    def _start_talker(self, thinker_state, first_token: int):
        tstate, tts_eos, tts_pad = start_talker_row(
            self.pipe, self.prompt_ids, thinker_state, first_token, self.speaker, self.eos, self.talker_max_new_tokens,
            self.talker_sampling, jax.random.PRNGKey(self.seed + 1), visual=self.visual, audio=self.audio)
        pipe = self.pipe
        cols = _ColumnSource(_text_column_fn(pipe.config, pipe.talker.dtype), pipe.params["talker"],
                             pipe.params["thinker"]["embed_tokens"]["embedding"], tts_eos=tts_eos, tts_pad=tts_pad)
        return pipe.talker, cols, tstate


def start_talker_row(pipe, prompt_ids: Sequence[int], thinker_state, first_token: int, speaker: str,
                     eos: Sequence[int], max_new_tokens: int, sampling: TalkerSampling, rng: jax.Array,
                     cache_len: int | None = None, visual: Sequence[Any] = (), audio: Sequence[np.ndarray] = ()):
    """Talker prefill for one request whose thinker has written reply token 0 (row 0 of `thinker_state`, a
    prefill with collect_hidden): the prompt's thinker embeddings and accept-layer hidden states plus token 0.

    Returns (talker state, tts_eos column [1, 1, H], tts_pad column [1, 1, H]): the trailing text columns that
    end every reply. Later columns are the projections of reply tokens 1.. as they arrive."""
    engine, talker, params = pipe.engine, pipe.talker, pipe.params
    lp = len(prompt_ids)
    bucket = engine.bucket_for(lp)  # slice by bucket: a bounded number of slice shapes
    emb = np.asarray(thinker_state.embeds[0, :bucket], np.float32)[:lp]
    acc = np.asarray(thinker_state.accept_hidden[0, :bucket], np.float32)[:lp]
    table = params["thinker"]["embed_tokens"]["embedding"]
    embed = _embed_fn(jnp.dtype(pipe.dtype))
    e0 = np.asarray(embed(table, np.asarray([first_token], np.int32)), np.float32)
    tts = np.asarray(embed(table, np.asarray(tts_token_ids(pipe.config), np.int32)), np.float32)
    # The prompt uses only reply token 0; build it as for the reply [token 0, EOS], whose trailing text is
    # [tts_eos] (column 0 below). Later columns come as tokens arrive.
    inputs = talker.build_inputs(
        params["talker"], [np.asarray(prompt_ids)], [np.asarray([first_token, eos[0]])],
        [np.concatenate([emb, e0])], [acc], tts, speaker, thinker_eos_ids=eos,
    )
    positions, deltas = talker_positions(pipe.config, [prompt_ids], inputs, [list(visual)],
                                         [prompt_lib.audio_rows(pipe.config, audio)] if len(audio) else [])
    tstate, _ = talker.start(params["talker"], inputs, max_new_tokens, sampling, rng=rng, penalty_from=None,
                             cache_len=cache_len, positions=positions, rope_delta=deltas)
    dt = talker.dtype
    return tstate, jnp.asarray(inputs.trailing[:, :1], dt), jnp.asarray(inputs.tts_pad, dt).reshape(1, 1, -1)
