"""One object that loads a model once and turns prompts into text and 24 kHz speech.

Thinker (ThinkerEngine: compiled prefill/decode over a static cache) -> talker input assembly ->
TalkerGenerator (compiled talker step + one-call code-predictor frames) -> Code2Wav. Used by
`launch/infer.py`, `launch/batch.py` and the notebook.

Batching never changes a row's result: every row reproduces transformers' single-sequence
`Qwen3OmniMoeForConditionalGeneration.generate` for its prompt (same text tokens, codec frames and
waveform), whatever else shares the batch. (HF's own batched generate differs from its
single-sequence one in two quirks — a row that ends early keeps its EOS embedding in the talker's
trailing text, and its talker repetition penalty skips as many codes as it has left padding — which
we do not copy.)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.errors import UsageError
from omni_jax.runtime import layout as layout_lib
from omni_jax.runtime import prompt as prompt_lib
from omni_jax.runtime import vocoder
from omni_jax.runtime.audio_encoder import AudioEncoderSteps
from omni_jax.runtime.loading import LoadedModel, load_model
from omni_jax.runtime.sampling import SamplingParams, TalkerSampling
from omni_jax.runtime.streaming import SpeechStream
from omni_jax.runtime.talker_engine import TalkerGenerator
from omni_jax.runtime.talker_inputs import tts_token_ids
from omni_jax.runtime.thinker_engine import GenerationResult, ThinkerEngine
from omni_jax.runtime.types import MIN_SPEECH_TOKENS, Request, Result

#: HF `Code2Wav.chunked_decode` settings used by `generate(..., return_audio=True)`.
CHUNK_SIZE, LEFT_CONTEXT = vocoder.CHUNK_SIZE, vocoder.LEFT_CONTEXT


class OmniPipeline:
    """Loads params once; `generate` answers a batch of requests with text (+ speech)."""

    def __init__(self, loaded: LoadedModel, *, max_len: int = 2048, buckets: Sequence[int] | None = None,
                 moe_impl: str = "auto", mesh: Any = None, prefill_chunk: int | None = None):
        """mesh: a jax.sharding.Mesh (omni_jax.sharding.mesh.make_mesh): thinker and talker run sharded (expert-parallel
        MoE, rules table; Code2Wav params too). None: one device."""
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.dtype = loaded.dtype
        self.max_len = max_len
        self.mesh = mesh
        self.layout = layout_lib.choose(mesh, moe_impl)
        params = self.layout.prepare(self.config, dict(loaded.params))  # a no-op when load() already did it
        self.engine = ThinkerEngine(
            self.config, params["thinker"], max_len=max_len, buckets=buckets,
            eos_ids=self.tokenizer.eos_token_ids, pad_id=self.tokenizer.pad_token_id, dtype=self.dtype,
            mesh=mesh, prefill_chunk=prefill_chunk, layout=self.layout,
        )
        params["thinker"] = self.engine.params  # the engine's (possibly re-placed) copy
        self.has_speech = "talker" in params and "code2wav" in params
        self.talker = None
        if self.has_speech:
            self.talker = TalkerGenerator(self.config, self.dtype, mesh=mesh, layout=self.layout)
            if mesh is not None:
                from omni_jax.sharding import rules

                params["talker"] = rules.place(params["talker"], self.talker.param_shardings())
        # The audio encoder (when the checkpoint has one) runs as one plain jit: replicated under a mesh.
        self.audio = AudioEncoderSteps(self.config.thinker.audio, self.dtype) if "audio_tower" in params else None
        self.params = params
        self.loaded = dataclasses.replace(loaded, params=params)  # no second reference to unplaced arrays

    @classmethod
    def load(cls, checkpoint: str | None = None, *, dtype: Any = None, config: Any = None, max_len: int = 2048,
             buckets: Sequence[int] | None = None, moe_impl: str = "auto", mesh: Any = None,
             prefill_chunk: int | None = None) -> "OmniPipeline":
        """`checkpoint`: an Orbax dir written by launch/convert.py; None = the tiny default with random weights.
        With a mesh, params are restored straight into their shardings."""
        loaded = load_model(checkpoint, dtype, config, mesh=mesh)
        # Nothing else holds these params: the layout step converts them in place, segment by segment.
        layout_lib.choose(mesh, moe_impl).prepare(loaded.config, loaded.params, consume=True)
        return cls(loaded, max_len=max_len, buckets=buckets, moe_impl=moe_impl, mesh=mesh, prefill_chunk=prefill_chunk)

    @property
    def random_weights(self) -> bool:
        return self.loaded.random_weights

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def speakers(self) -> list[str]:
        return [name for name, _ in self.config.talker.speaker_id]

    def encode(self, request: Request | str) -> list[int]:
        """The request's prompt ids (chat template applied; each audio clip's placeholder expanded to its rows)."""
        return self.prepare(request)[0]

    def prepare(self, request: Request | str) -> tuple[list[int], list[np.ndarray]]:
        """(prompt ids, log-mel features [mels, frames] of each audio clip in order): the clips are read, checked
        and resampled here, so bad audio fails before anything runs."""
        request = Request(prompt=request) if isinstance(request, str) else request
        messages = request.to_messages()
        if self.audio is None and prompt_lib.audio_sources(messages):
            raise UsageError("the request has audio, but this checkpoint has no audio encoder (thinker.audio_tower)")
        return prompt_lib.encode_messages(self.tokenizer, self.config, messages)

    def generate(self, requests: Sequence[Request | str], *, text_only: bool = False,
                 callback: Callable[[int, int], None] | None = None, **options: Any) -> list[Result]:
        """Answer every request (chat template applied); rows share one compiled batch. callback(row, token_id)
        streams text tokens; options are `generate_ids`'s (max_new_tokens, talker_max_new_tokens, sampling,
        talker_sampling, seed, eos_ids)."""
        requests = [Request(prompt=r) if isinstance(r, str) else r for r in requests]
        if not requests:
            raise UsageError("no requests given")
        prepared = [self.prepare(r) for r in requests]
        return self.generate_ids([ids for ids, _ in prepared], [r.speaker for r in requests], text_only=text_only,
                                 callback=callback, audio=[feats for _, feats in prepared], **options)

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        speakers: str | Sequence[str] = "ethan",
        *,
        text_only: bool = False,
        max_new_tokens: int = 256,
        talker_max_new_tokens: int = 1024,
        sampling: SamplingParams | None = None,
        talker_sampling: TalkerSampling | None = None,
        seed: int = 0,
        eos_ids: Sequence[int] | None = None,
        callback: Callable[[int, int], None] | None = None,
        audio: Sequence[Sequence[np.ndarray]] | None = None,
    ) -> list[Result]:
        """Answer exact prompt token ids (no template; speech needs an '<|im_start|>assistant' header in each).

        audio: per row, the log-mel features [mels, frames] of its clips in order; the ids then hold each clip's
        `<|audio_pad|>` expanded to its encoder rows (`prepare` gives both).
        speakers: one name for all rows or one per row (case-insensitive). eos_ids: ids ending the text (default:
        the tokenizer's); they also place the talker's end-of-text marker, like HF's `thinker_eos_token_id`.
        A reply shorter than MIN_SPEECH_TOKENS gets no audio (0 frames, empty waveform).
        NaN/Inf in a stage's logits or audio raises omni_jax.errors.NumericalError naming the stage (thinker,
        talker, code predictor, code2wav); the flags are reduced on device and read once per stage.
        """
        prompts = [[int(t) for t in p] for p in prompt_ids]
        if not prompts:
            raise UsageError("no prompts given")
        names = [speakers] * len(prompts) if isinstance(speakers, str) else list(speakers)
        if len(names) != len(prompts):
            raise UsageError(f"got {len(names)} speakers for {len(prompts)} prompts")
        speech = not text_only
        if speech:
            if not self.has_speech:
                raise UsageError("this checkpoint has no talker/code2wav weights; use text_only=True (--text_only)")
            for name in names:
                self.config.talker.speaker(name)  # unknown speaker -> ValueError listing the known ones
        eos = tuple(int(e) for e in (self.tokenizer.eos_token_ids if eos_ids is None else eos_ids))
        t0 = time.perf_counter()
        mm_rows = self.encode_audio(prompts, audio, max_new_tokens)
        t_audio = time.perf_counter() - t0
        out = self.engine.generate(prompts, max_new_tokens, sampling or SamplingParams.greedy(), seed=seed,
                                   callback=callback, collect_hidden=speech, eos_ids=eos, mm_rows=mm_rows)
        t_thinker = time.perf_counter() - t0 - t_audio
        results = []
        for b, toks in enumerate(out.tokens):
            text, reasoning = self._answer_and_reasoning(toks, eos)
            results.append(Result(
                text=text, reasoning=reasoning, prompt_ids=prompts[b], token_ids=list(toks),
                finish_reason=out.finish_reasons[b], sample_rate=self.sample_rate, timings={"thinker_s": t_thinker},
                audio_embeds=None if mm_rows is None else mm_rows[b],
                prompt_logits=None if out.prompt_logits is None else out.prompt_logits[b]))
        if mm_rows is not None:
            for r in results:
                r.timings["audio_encoder_s"] = t_audio
        if speech:
            self._speak(results, out, names, eos, talker_max_new_tokens, talker_sampling or TalkerSampling(), seed)
        return results

    def _answer_and_reasoning(self, ids: Sequence[int], eos: Sequence[int]) -> tuple[str, str | None]:
        """(answer text, a Thinking model's `<think>` text or None), EOS left out of both."""
        thought, answer = self.tokenizer.split_reasoning(ids)
        decode = lambda part: self.tokenizer.decode([t for t in part if t not in eos],  # noqa: E731
                                                    skip_special_tokens=True)
        return decode(answer), None if thought is None else decode(thought).strip()

    def encode_audio(self, prompts: list[list[int]], audio: Sequence[Sequence[np.ndarray]] | None,
                     max_new_tokens: int) -> list[np.ndarray | None] | None:
        """Per row, its clips' encoder rows [n, H] concatenated in order (None: a row without audio), after
        checking that each row fits the cache with the reply budget (the engine matches rows to placeholders)."""
        if audio is None or not any(len(a) for a in audio):
            return None
        if len(audio) != len(prompts):
            raise UsageError(f"got audio for {len(audio)} prompts, expected {len(prompts)}")
        if self.audio is None:
            raise UsageError("the request has audio, but this checkpoint has no audio encoder (thinker.audio_tower)")
        for b, (ids, feats) in enumerate(zip(prompts, audio)):
            prompt_lib.check_fits(self.config, len(ids), feats, max_new_tokens, self.max_len, f"prompt {b}")
        params = self.params["audio_tower"]
        return [np.concatenate(self.audio.encode(params, list(feats))) if feats else None for feats in audio]

    def _speak(self, results: list[Result], out: GenerationResult, speakers: list[str], eos: tuple[int, ...],
               max_new: int, sampling: TalkerSampling, seed: int) -> None:
        """Talker + Code2Wav for every row with a reply long enough to voice; fills codes/wav/timings in place."""
        groups = self.config.talker.num_code_groups
        rows = [b for b, r in enumerate(results) if len(r.token_ids) >= MIN_SPEECH_TOKENS]
        for r in results:
            r.codes, r.wav = np.zeros((groups, 0), np.int32), np.zeros((0,), np.float32)
        if not rows:
            return
        t0 = time.perf_counter()
        inputs = self.talker.build_inputs(
            self.params["talker"], [np.asarray(results[b].prompt_ids) for b in rows],
            [np.asarray(results[b].token_ids) for b in rows],
            [out.embeds[b, : out.total_lengths[b]] for b in rows],
            [out.accept_hidden[b, : out.total_lengths[b]] for b in rows],
            self._tts_embeds(), [speakers[b] for b in rows], thinker_eos_ids=eos,
        )
        # penalty_from=None: every code counts for the repetition penalty, as in HF's single-sequence generate.
        talk = self.talker.generate(self.params["talker"], inputs, max_new, sampling,
                                    rng=jax.random.PRNGKey(seed + 1), penalty_from=None)
        t1 = time.perf_counter()
        wavs = self.vocode(talk.codes, talk.lengths)
        t2 = time.perf_counter()
        for i, b in enumerate(rows):
            results[b].codes = talk.codes[i, :, : talk.lengths[i]]
            results[b].wav = wavs[i]
        for r in results:
            r.timings.update(talker_s=t1 - t0, code2wav_s=t2 - t1)

    def _tts_embeds(self) -> np.ndarray:
        table = self.params["thinker"]["embed_tokens"]["embedding"]
        return np.asarray(jnp.take(table, jnp.asarray(tts_token_ids(self.config)), axis=0), np.float32)

    def vocode(self, codes: np.ndarray, lengths: Sequence[int], *, chunk_size: int = CHUNK_SIZE,
               left_context_size: int = LEFT_CONTEXT) -> list[np.ndarray]:
        """codes [B, 16, T] -> one waveform per row (`vocoder.vocode`: HF's chunked decode of each row)."""
        return vocoder.vocode(self.params["code2wav"], codes, lengths, self.config, chunk_size=chunk_size,
                              left_context_size=left_context_size, dtype=self.dtype)

    def stream(self, prompt_or_request: Request | str | Sequence[int], **options: Any) -> SpeechStream:
        """Stream one request (batch 1): an iterator of `omni_jax.runtime.types.StreamEvent` (text deltas as tokens
        arrive, audio chunks of `chunk_frames` codec frames while the thinker is still writing); same tokens,
        frames and (up to float order) waveform as `generate`. A str/Request gets the chat template; a list of
        ints is used as exact prompt ids. options: `SpeechStream`'s (speaker, max_new_tokens,
        talker_max_new_tokens, sampling, talker_sampling, seed, chunk_frames, first_chunk_frames, eos_ids).
        After exhaustion `.result` is the `Result`, `.stats` the schedule."""
        return SpeechStream(self, prompt_or_request, **options)
