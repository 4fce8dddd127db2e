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
from omni_jax.processing.positions import mrope_positions
from omni_jax.processing.vision import VisualInput
from omni_jax.runtime import layout as layout_lib
from omni_jax.runtime import prompt as prompt_lib
from omni_jax.runtime import vocoder
from omni_jax.runtime.audio_encoder import AudioEncoderSteps
from omni_jax.runtime.loading import LoadedModel, load_model
from omni_jax.runtime.sampling import SamplingParams, TalkerSampling
from omni_jax.runtime.streaming import SpeechStream
from omni_jax.runtime.talker_engine import TalkerGenerator
from omni_jax.runtime.talker_inputs import talker_positions, tts_token_ids
from omni_jax.runtime.thinker_engine import GenerationResult, ThinkerEngine
from omni_jax.runtime.types import MIN_SPEECH_TOKENS, PromptRows, Request, Result
from omni_jax.runtime.vision_encoder import VisionEncoderSteps

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
        self.vision = VisionEncoderSteps(self.config.thinker.vision, self.dtype) if "visual" in params else None
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
        """The request's prompt ids (chat template applied; each audio / image / video placeholder expanded to its
        encoder rows)."""
        return self.prepare(request).ids

    def prepare(self, request: Request | str) -> prompt_lib.PromptInputs:
        """(prompt ids, log-mel features [mels, frames] of each audio clip, each image / video preprocessed), in
        prompt order: files are read, checked and resampled here, so bad input fails before anything runs."""
        request = Request(prompt=request) if isinstance(request, str) else request
        messages = request.to_messages()
        if self.audio is None and prompt_lib.audio_sources(messages):
            raise UsageError("the request has audio, but this checkpoint has no audio encoder (thinker.audio_tower)")
        if self.vision is None and prompt_lib.visual_sources(messages):
            raise UsageError("the request has an image or video, but this checkpoint has no vision encoder "
                             "(thinker.visual)")
        return prompt_lib.encode_messages(self.tokenizer, self.config, messages, processor=self.loaded.processor,
                                          use_audio_in_video=request.use_audio_in_video)

    def generate(self, requests: Sequence[Request | str], *, text_only: bool = False,
                 callback: Callable[[int, int], None] | None = None, **options: Any) -> list[Result]:
        """Answer every request (chat template applied); rows share one compiled batch. callback(row, token_id)
        streams text tokens; options are `generate_ids`'s (max_new_tokens, talker_max_new_tokens, sampling,
        talker_sampling, seed, eos_ids)."""
        requests = [Request(prompt=r) if isinstance(r, str) else r for r in requests]
        if not requests:
            raise UsageError("no requests given")
        prepared = [self.prepare(r) for r in requests]
        return self.generate_ids([p.ids for p in prepared], [r.speaker for r in requests], text_only=text_only,
                                 callback=callback, audio=[p.audio for p in prepared],
                                 visual=[p.visual for p in prepared], **options)

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
        visual: Sequence[Sequence[VisualInput]] | None = None,
    ) -> list[Result]:
        """Answer exact prompt token ids (no template; speech needs an '<|im_start|>assistant' header in each).

        audio: per row, the log-mel features [mels, frames] of its clips in order; the ids then hold each clip's
        `<|audio_pad|>` expanded to its encoder rows (`prepare` gives both). visual: per row, its images and
        videos in order, each placeholder expanded likewise; a video whose `audio` is set (use_audio_in_video) has its
        track's rows interleaved with its frames inside its span, and that track's features in `audio` at the
        track's place in the prompt (`prepare` lays both out).
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
        mm_rows = self.encode_inputs(prompts, audio, max_new_tokens, visual)
        t_encoders = time.perf_counter() - t0
        out = self.engine.generate(prompts, max_new_tokens, sampling or SamplingParams.greedy(), seed=seed,
                                   callback=callback, collect_hidden=speech, eos_ids=eos, mm_rows=mm_rows)
        t_thinker = time.perf_counter() - t0 - t_encoders
        results = []
        for b, toks in enumerate(out.tokens):
            text, reasoning = self._answer_and_reasoning(toks, eos)
            results.append(Result(
                text=text, reasoning=reasoning, prompt_ids=prompts[b], token_ids=list(toks),
                finish_reason=out.finish_reasons[b], sample_rate=self.sample_rate, timings={"thinker_s": t_thinker},
                **PromptRows.result_fields(None if mm_rows is None else mm_rows[b], prompts[b], self.config.thinker),
                prompt_logits=None if out.prompt_logits is None else out.prompt_logits[b]))
        if mm_rows is not None:
            for r in results:
                r.timings["encoders_s"] = t_encoders
        if speech:
            self._speak(results, out, names, eos, talker_max_new_tokens, talker_sampling or TalkerSampling(), seed,
                        visual, audio)
        return results

    def _answer_and_reasoning(self, ids: Sequence[int], eos: Sequence[int]) -> tuple[str, str | None]:
        """(answer text, a Thinking model's `<think>` text or None), EOS left out of both."""
        thought, answer = self.tokenizer.split_reasoning(ids)
        decode = lambda part: self.tokenizer.decode([t for t in part if t not in eos],  # noqa: E731
                                                    skip_special_tokens=True)
        return decode(answer), None if thought is None else decode(thought).strip()

    def encode_inputs(self, prompts: list[list[int]], audio: Sequence[Sequence[np.ndarray]] | None,
                      max_new_tokens: int, visual: Sequence[Sequence[VisualInput]] | None = None
                      ) -> list[PromptRows | None] | None:
        """Per row, its encoder outputs (`PromptRows`: audio rows, image / video rows and their deepstack rows, the
        M-RoPE positions of a prompt with vision) or None for a text-only row; None when no row has any. Each row is
        checked to fit the cache with its reply budget first (the engine matches rows to placeholders). A row's
        items are encoded in calls of their own, so its rows never depend on its batch neighbours."""
        has_audio = audio is not None and any(len(a) for a in audio)
        has_visual = visual is not None and any(len(v) for v in visual)
        if not (has_audio or has_visual):
            return None
        audio = audio if audio is not None else [[] for _ in prompts]
        visual = visual if visual is not None else [[] for _ in prompts]
        for what, got in (("audio", audio), ("images/videos", visual)):
            if len(got) != len(prompts):
                raise UsageError(f"got {what} for {len(got)} prompts, expected {len(prompts)}")
        if has_audio and self.audio is None:
            raise UsageError("the request has audio, but this checkpoint has no audio encoder (thinker.audio_tower)")
        if has_visual and self.vision is None:
            raise UsageError("the request has an image or video, but this checkpoint has no vision encoder "
                             "(thinker.visual)")
        for b, (ids, feats, vis) in enumerate(zip(prompts, audio, visual)):
            prompt_lib.check_fits(self.config, len(ids), feats, max_new_tokens, self.max_len, f"prompt {b}", vis)
        out: list[PromptRows | None] = []
        for ids, feats, vis in zip(prompts, audio, visual):
            if not feats and not vis:
                out.append(None)
                continue
            rows = np.concatenate(self.audio.encode(self.params["audio_tower"], list(feats))) if feats else None
            if not vis:
                out.append(PromptRows(audio=rows))
                continue
            enc = self.vision.encode(self.params["visual"], list(vis))
            kinds = [v.kind for v in vis]
            pick = lambda kind: (np.concatenate([r for (r, _), k in zip(enc, kinds) if k == kind])  # noqa: E731
                                 if kind in kinds else None)
            out.append(PromptRows(audio=rows, image=pick("image"), video=pick("video"),
                                  deepstack=_deepstack_in_prompt_order(ids, vis, enc, self.config),
                                  positions=self.positions(ids, vis, feats)[0]))
        return out

    def positions(self, ids: Sequence[int], visual: Sequence[VisualInput], audio: Sequence[np.ndarray] = ()
                  ) -> tuple[np.ndarray, float]:
        """(float [3, T] M-RoPE positions, decode delta) of prompt ids holding these items (transformers'
        get_rope_index; a video carrying its audio track is a use_audio_in_video span)."""
        return mrope_positions(
            ids, self.config.thinker, [v.grid for v in visual if v.kind == "image"],
            [v.grid for v in visual if v.kind == "video"],
            [v.seconds_per_grid for v in visual if v.kind == "video"],
            prompt_lib.audio_rows(self.config, audio) if len(audio) else (), any(v.audio is not None for v in visual))

    def _speak(self, results: list[Result], out: GenerationResult, speakers: list[str], eos: tuple[int, ...],
               max_new: int, sampling: TalkerSampling, seed: int, visual=None, audio=None) -> None:
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
        positions, deltas = talker_positions(
            self.config, [results[b].prompt_ids for b in rows], inputs,
            [list(visual[b]) if visual is not None else [] for b in rows],
            [prompt_lib.audio_rows(self.config, audio[b]) if audio is not None and len(audio[b]) else []
             for b in rows])
        # penalty_from=None: every code counts for the repetition penalty, as in HF's single-sequence generate.
        talk = self.talker.generate(self.params["talker"], inputs, max_new, sampling,
                                    rng=jax.random.PRNGKey(seed + 1), penalty_from=None, positions=positions,
                                    rope_delta=deltas)
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


def _deepstack_in_prompt_order(ids: Sequence[int], visual: Sequence[VisualInput], encoded, config) -> np.ndarray:
    """[levels, image + video tokens, H]: each item's deepstack rows at its placeholders, in prompt order (images
    and videos fill their own pads in order, as transformers' joint deepstack tensor does)."""
    th = config.thinker
    ids = np.asarray(ids)
    at = ids[np.isin(ids, [th.image_token_id, th.video_token_id])]
    levels, _, hidden = encoded[0][1].shape
    out = np.zeros((levels, at.size, hidden), np.float32)
    for kind, pad in (("image", th.image_token_id), ("video", th.video_token_id)):
        parts = [d for (_, d), v in zip(encoded, visual) if v.kind == kind]
        if parts:
            out[:, at == pad] = np.concatenate(parts, axis=1)
    return out
