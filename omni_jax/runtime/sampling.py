"""Token sampling as pure jnp functions (usable inside jit), matching transformers' logits processors,
and the settings of each stage: `SamplingParams` (thinker, code predictor) and `TalkerSampling`.

Processing order is HF's `generate`: repetition penalty -> suppressed tokens -> (greedy argmax |
temperature -> top-k -> top-p -> categorical draw). `SamplingParams` is a frozen, hashable
dataclass meant to be a *static* jit argument: each distinct setting compiles its own step, and
disabled features (penalty 1.0, top_p 1.0, ...) cost nothing in the compiled code.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from omni_jax import rng as rng_lib
from omni_jax.errors import UsageError

_NEG_INF = -jnp.inf


def bad_value(owner: str, field: str, value, rule: str) -> UsageError:
    """UsageError for an out-of-range setting; `.field`/`.rule`/`.value` let launchers name the flag that set it."""
    err = UsageError(f"{owner}.{field} {rule}, got {value!r}")
    err.field, err.rule, err.value = field, rule, value
    return err


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (argmax after penalty/suppression); top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    suppress_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "suppress_tokens", tuple(int(t) for t in self.suppress_tokens))
        if not self.temperature >= 0.0:
            raise bad_value("SamplingParams", "temperature", self.temperature, "must be >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0:
            raise bad_value("SamplingParams", "top_k", self.top_k, "must be a non-negative integer (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad_value("SamplingParams", "top_p", self.top_p, "must be in (0, 1] (1 = off)")
        if not self.repetition_penalty > 0.0:
            raise bad_value("SamplingParams", "repetition_penalty", self.repetition_penalty, "must be > 0 (1 = off)")

    @classmethod
    def greedy(cls, repetition_penalty: float = 1.0, suppress_tokens: Sequence[int] = ()) -> "SamplingParams":
        return cls(temperature=0.0, repetition_penalty=repetition_penalty, suppress_tokens=tuple(suppress_tokens))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_history(self) -> bool:
        """Whether sampling needs the seen-token mask (only the repetition penalty does)."""
        return self.repetition_penalty != 1.0


def seen_mask_from_ids(ids: jax.Array, vocab_size: int, valid: jax.Array | None = None) -> jax.Array:
    """[B, V] bool: which ids occur in ids [B, T] (only where valid [B, T] is True)."""
    b, t = ids.shape
    valid = jnp.ones((b, t), bool) if valid is None else valid
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    return jnp.zeros((b, vocab_size), bool).at[rows, ids].max(valid, mode="drop")


def update_seen(seen: jax.Array, ids: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Mark ids [B] as seen (where valid [B])."""
    valid = jnp.ones(ids.shape, bool) if valid is None else valid
    return seen.at[jnp.arange(ids.shape[0]), ids].max(valid, mode="drop")


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF RepetitionPenaltyLogitsProcessor: for seen ids, positive logits / penalty, negative * penalty."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def suppress_tokens(logits: jax.Array, ids: Sequence[int]) -> jax.Array:
    """Set the logits of `ids` to -inf (HF SuppressTokensLogitsProcessor)."""
    if not ids:
        return logits
    mask = jnp.zeros((logits.shape[-1],), bool).at[jnp.asarray(ids, jnp.int32)].set(True, mode="drop")
    return jnp.where(mask, _NEG_INF, logits)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """HF TopKLogitsWarper: drop every logit below the k-th largest (ties with it are kept)."""
    k = min(int(k), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, _NEG_INF, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """HF TopPLogitsWarper: in ascending order, drop tokens whose cumulative probability is <= 1 - p
    (always keeping the most likely one)."""
    order = jnp.argsort(logits, axis=-1)  # ascending, like torch.sort(descending=False)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cum <= 1.0 - p).at[..., -1].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, _NEG_INF, logits)


def process_logits(logits: jax.Array, params: SamplingParams, seen: jax.Array | None = None) -> jax.Array:
    """All logit transforms of `params` in HF order; the result is what greedy/categorical picks from.

    logits [B, V] (computed in float32); seen [B, V] bool, required iff repetition_penalty != 1.
    """
    logits = logits.astype(jnp.float32)
    if params.uses_history:
        if seen is None:
            raise ValueError("repetition_penalty != 1 needs the seen-token mask (seen [B, V])")
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    logits = suppress_tokens(logits, params.suppress_tokens)
    if params.is_greedy:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    return logits


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams, seen: jax.Array | None = None) -> jax.Array:
    """Next ids [B] int32 from logits [B, V]. Same key + same inputs -> same ids; temperature 0 -> argmax.
    key: one key [2] for the batch, or one per row [B, 2] (omni_jax.rng)."""
    processed = process_logits(logits, params, seen)
    if params.is_greedy:
        return jnp.argmax(processed, axis=-1).astype(jnp.int32)
    return rng_lib.categorical(key, processed).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Talker settings (HF generate's talker and code-predictor processors)
# ---------------------------------------------------------------------------------------------

NUM_SUPPRESSED_CODEC_IDS = 1024  # HF suppresses the top 1024 codec ids (special tokens) except codec EOS


@dataclasses.dataclass(frozen=True)
class TalkerSampling:
    """Talker decoding settings; defaults are HF `Qwen3OmniMoeForConditionalGeneration.generate`'s.

    The code predictor mirrors `do_sample` (HF copies the talker's onto it) and, when sampling,
    uses HF's hard-coded top_k=50, top_p=0.8 with its default temperature 1.0. Repetition penalty
    and token suppression apply to group 0 even when greedy, as in HF.
    """

    do_sample: bool = True
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    code_predictor_temperature: float = 1.0
    code_predictor_top_k: int = 50
    code_predictor_top_p: float = 0.8

    def __post_init__(self):
        # temperature 0 is not a talker setting: greedy is do_sample=False (TalkerSampling.greedy()).
        for name in ("temperature", "code_predictor_temperature", "repetition_penalty"):
            if not getattr(self, name) > 0:
                raise bad_value("TalkerSampling", name, getattr(self, name),
                                "must be > 0" + (" (for greedy use do_sample=False)" if "temp" in name else ""))
        for name in ("top_p", "code_predictor_top_p"):
            if not 0 < getattr(self, name) <= 1:
                raise bad_value("TalkerSampling", name, getattr(self, name), "must be in (0, 1] (1 = off)")
        for name in ("top_k", "code_predictor_top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 0:
                raise bad_value("TalkerSampling", name, v, "must be a non-negative integer (0 = off)")

    @classmethod
    def greedy(cls, repetition_penalty: float = 1.05) -> "TalkerSampling":
        return cls(do_sample=False, repetition_penalty=repetition_penalty)

    def talker_params(self, config) -> SamplingParams:
        """Group-0 settings: HF's talker logits processors incl. the suppressed top-1024 codec ids."""
        return SamplingParams(
            temperature=self.temperature if self.do_sample else 0.0,
            top_k=self.top_k, top_p=self.top_p, repetition_penalty=self.repetition_penalty,
            suppress_tokens=suppressed_codec_ids(config),
        )

    def code_predictor_params(self) -> SamplingParams:
        if not self.do_sample:
            return SamplingParams.greedy()
        return SamplingParams(temperature=self.code_predictor_temperature, top_k=self.code_predictor_top_k,
                              top_p=self.code_predictor_top_p)


def suppressed_codec_ids(config) -> tuple[int, ...]:
    """The top 1024 codec ids except codec EOS (HF generate's talker `suppress_tokens`)."""
    vocab = config.talker.text.vocab_size
    eos = config.talker.codec_eos_token_id
    return tuple(i for i in range(max(0, vocab - NUM_SUPPRESSED_CODEC_IDS), vocab) if i != eos)


# ---------------------------------------------------------------------------------------------
# Per-row settings (served slots): each row its own temperature / top-k / top-p and key, as data
# ---------------------------------------------------------------------------------------------


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """Next ids [B] from logits [B, V], row b with its own settings and key keys[b] ([B, 2]).

    The same transforms as `process_logits` (temperature, then top-k, then top-p, HF's order and tie rules),
    but with settings as arrays, so requests with different settings share one compiled step. A row with
    temperature 0 takes the argmax. The sort the filters need runs only when some row filters.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = temperature > 0
    scaled = logits / jnp.where(sampled, temperature, 1.0)[:, None]

    def filtered(x):
        v = x.shape[-1]
        order = jnp.argsort(x, axis=-1)  # ascending, as top_p_filter
        asc = jnp.take_along_axis(x, order, axis=-1)
        k = jnp.clip(top_k, 0, v)
        kth = jnp.take_along_axis(asc, jnp.clip(v - k, 0, v - 1)[:, None], axis=-1)  # the k-th largest
        x = jnp.where((k[:, None] > 0) & (x < kth), _NEG_INF, x)
        asc = jnp.take_along_axis(x, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
        remove_sorted = ((cum <= 1.0 - top_p[:, None]) & (top_p[:, None] < 1.0)).at[..., -1].set(False)
        rows = jnp.arange(x.shape[0])[:, None]
        remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
        return jnp.where(remove, _NEG_INF, x)

    needs_filter = jnp.any(sampled & ((top_k > 0) | (top_p < 1.0)))
    scaled = jax.lax.cond(needs_filter, filtered, lambda x: x, scaled)
    drawn = rng_lib.categorical(keys, scaled).astype(jnp.int32)
    return jnp.where(sampled, drawn, greedy)
