"""One object that loads a model once and turns prompts into text and 24 kHz speech.

Thinker (ThinkerEngine: compiled prefill/decode over a static cache) -> talker input assembly ->
TalkerGenerator (compiled talker step + one-call code-predictor frames) -> Code2Wav. Used by
`launch/infer.py`, `launch/batch.py` and the notebook.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax import code2wav as c2w
from omni_jax.engine import ThinkerEngine
from omni_jax.loading import LoadedModel, load_model
from omni_jax.sampling import SamplingParams
from omni_jax.talker import TalkerGenerator, TalkerSampling, tts_token_ids


@dataclasses.dataclass
class Request:
    """One conversation turn to answer: a prompt string or a ChatML message list."""

    prompt: str | None = None
    messages: list[dict] | None = None
    system: str | None = None
    speaker: str = "ethan"

    def to_messages(self) -> list[dict]:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a request needs exactly one of 'prompt' or 'messages'")
        msgs = list(self.messages) if self.messages is not None else [{"role": "user", "content": self.prompt}]
        if self.system is not None:
            if msgs and msgs[0].get("role") == "system":
                raise ValueError("request has both 'system' and a system message")
            msgs = [{"role": "system", "content": self.system}] + msgs
        return msgs


@dataclasses.dataclass
class Result:
    text: str
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids (EOS included when produced)
    finish_reason: str
    codes: np.ndarray | None = None  # [16, frames] int32
    wav: np.ndarray | None = None  # [samples] float32 in [-1, 1]
    sample_rate: int = 24000
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def audio_seconds(self) -> float:
        return 0.0 if self.wav is None else len(self.wav) / self.sample_rate


class OmniPipeline:
    """Loads params once; `generate` answers a batch of requests with text (+ speech)."""

    def __init__(self, loaded: LoadedModel, *, max_len: int = 2048, buckets: Sequence[int] | None = None,
                 moe_impl: str = "auto"):
        self.loaded = loaded
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.params = loaded.params
        self.dtype = loaded.dtype
        self.max_len = max_len
        self.engine = ThinkerEngine(
            self.config, self.params["thinker"], max_len=max_len, buckets=buckets,
            eos_ids=self.tokenizer.eos_token_ids, pad_id=self.tokenizer.pad_token_id, dtype=self.dtype, moe_impl=moe_impl,
        )
        self.has_speech = "talker" in self.params and "code2wav" in self.params
        self.talker = TalkerGenerator(self.config, self.dtype, moe_impl) if self.has_speech else None

    @classmethod
    def load(cls, checkpoint: str | None = None, *, dtype: Any = None, config: Any = None, max_len: int = 2048,
             buckets: Sequence[int] | None = None, moe_impl: str = "auto") -> "OmniPipeline":
        """`checkpoint`: an Orbax dir written by launch/convert.py; None = the tiny default with random weights."""
        return cls(load_model(checkpoint, dtype, config), max_len=max_len, buckets=buckets, moe_impl=moe_impl)

    @property
    def random_weights(self) -> bool:
        return self.loaded.random_weights

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def speakers(self) -> list[str]:
        return [name for name, _ in self.config.talker.speaker_id]

    def encode(self, request: Request | str) -> list[int]:
        request = Request(prompt=request) if isinstance(request, str) else request
        return self.tokenizer.apply_chat_template(request.to_messages(), add_generation_prompt=True)

    def _tts_embeds(self) -> np.ndarray:
        table = self.params["thinker"]["embed_tokens"]["embedding"]
        return np.asarray(jnp.take(table, jnp.asarray(tts_token_ids(self.config)), axis=0), np.float32)

    def generate(
        self,
        requests: Sequence[Request | str],
        *,
        text_only: bool = False,
        max_new_tokens: int = 256,
        talker_max_new_tokens: int = 1024,
        sampling: SamplingParams | None = None,
        talker_sampling: TalkerSampling | None = None,
        seed: int = 0,
        callback: Callable[[int, int], None] | None = None,
    ) -> list[Result]:
        """Answer every request; rows share one compiled batch. callback(row, token_id) streams text tokens."""
        requests = [Request(prompt=r) if isinstance(r, str) else r for r in requests]
        if not requests:
            raise ValueError("no requests given")
        speech = not text_only
        if speech and not self.has_speech:
            raise ValueError("this checkpoint has no talker/code2wav weights; use text_only=True")
        if speech:
            for r in requests:
                self.config.talker.speaker(r.speaker)  # unknown speaker -> ValueError listing the known ones
        prompts = [self.encode(r) for r in requests]
        t0 = time.perf_counter()
        out = self.engine.generate(prompts, max_new_tokens, sampling or SamplingParams.greedy(), seed=seed,
                                   callback=callback, collect_hidden=speech)
        t_thinker = time.perf_counter() - t0
        results = []
        for b, toks in enumerate(out.tokens):
            text_ids = [t for t in toks if t not in self.tokenizer.eos_token_ids]
            results.append(Result(
                text=self.tokenizer.decode(text_ids, skip_special_tokens=True), prompt_ids=prompts[b],
                token_ids=list(toks), finish_reason=out.finish_reasons[b], sample_rate=self.sample_rate,
                timings={"thinker_s": t_thinker},
            ))
        if not speech:
            return results
        codes, lengths, t_talker = self._talk(requests, prompts, out, talker_max_new_tokens, talker_sampling, seed)
        t1 = time.perf_counter()
        wavs = self.vocode(codes, lengths)
        t_c2w = time.perf_counter() - t1
        for b, res in enumerate(results):
            res.codes = codes[b, :, : lengths[b]]
            res.wav = wavs[b]
            res.timings.update(talker_s=t_talker, code2wav_s=t_c2w)
        return results

    def _talk(self, requests, prompts, out, max_new, sampling, seed):
        t0 = time.perf_counter()
        n = len(requests)
        embeds = [out.embeds[b, : out.total_lengths[b]] for b in range(n)]
        hidden = [out.accept_hidden[b, : out.total_lengths[b]] for b in range(n)]
        inputs = self.talker.build_inputs(
            self.params["talker"], prompts, [np.asarray(t) for t in out.tokens], embeds, hidden,
            self._tts_embeds(), [r.speaker for r in requests],
        )
        res = self.talker.generate(
            self.params["talker"], inputs, max_new, sampling or TalkerSampling(),
            rng=jax.random.PRNGKey(seed + 1),
        )
        return res.codes, res.lengths, time.perf_counter() - t0

    def vocode(self, codes: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
        """codes [B, 16, T] (zero past each row's length) -> one waveform per row, as HF cuts them."""
        codes = np.asarray(codes, np.int32)
        b, _, t = codes.shape
        wavs = []
        if t == 0:
            return [np.zeros((0,), np.float32) for _ in range(b)]
        for row in range(b):
            n = int(lengths[row])
            if n == 0:
                wavs.append(np.zeros((0,), np.float32))
                continue
            wav = c2w.chunked_decode(self.params["code2wav"], jnp.asarray(codes[row : row + 1, :, :n]), self.config,
                                     dtype=self.dtype)
            wavs.append(np.asarray(wav[0], np.float32))
        return wavs
