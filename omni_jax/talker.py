"""The Talker: thinker text/hidden states -> 16-group codec codes (HF `Qwen3OmniMoeTalkerForConditionalGeneration`).

Pieces:
  * `Talker` (Flax): text/hidden ResizeMLP projections, the MoE talker LM (codec embedding,
    always-sparse decoder with shared expert, interleaved M-RoPE, final norm, codec head) and the
    `CodePredictor` for residual groups.
  * `build_talker_inputs`: the talker prompt exactly as HF `generate` assembles it (user turns,
    assistant header + codec specials, trailing text hidden states), from plain per-row arrays.
  * `talker_prefill` / `talker_step`: pure functions over an explicit `TalkerState`; one step runs
    the whole code-predictor frame for the previous group-0 code plus one talker token, so a
    jitted step compiles once. `TalkerGenerator` wraps them with jit and a host loop.

Layout note: HF left-pads the talker prompt and masks the pads; we right-pad instead and keep
per-row lengths, so every row's tokens sit at cache rows 0..n-1 and get RoPE positions 0..n-1,
which is what HF computes (positions are cumsum(attention_mask)-1 and decode positions add
rope_deltas = -padding). Pads after a row's end are never attended by that row's real tokens
and are overwritten by its decode steps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, NamedTuple, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax import moe
from omni_jax.code_predictor import CodePredictor, frame_cache, predict_frame, split_lm_heads
from omni_jax.config import OmniConfig
from omni_jax.convert import Rule, decoder_rules, identity, linear
from omni_jax.decoder import DecoderStack, layer_name, unroll_default, unstack_layers
from omni_jax.kv_cache import KVCache
from omni_jax.mlp import logical_dense
from omni_jax.norm import RMSNorm
from omni_jax.errors import NumericalError, UsageError
from omni_jax.sampling import SamplingParams, bad_value, sample
from omni_jax.sharding import constrain

_INIT = nn.initializers.normal(0.02)
_NUM_SUPPRESSED = 1024  # HF suppresses the top 1024 codec ids (special tokens) except codec EOS


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class ResizeMLP(nn.Module):
    """Linear(thinker_hidden -> intermediate, bias) -> SiLU -> Linear(-> talker hidden, bias)."""

    intermediate_size: int
    out_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def dense(features, axes, name):
            return logical_dense(features, axes, name, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)

        h = dense(self.intermediate_size, ("embed", "mlp"), "linear_fc1")(x.astype(self.dtype))
        return dense(self.out_size, ("mlp", "embed"), "linear_fc2")(nn.silu(h))


class TalkerModel(nn.Module):
    """HF `talker.model`: codec embedding + decoder stack + final norm (returns normed hidden)."""

    config: OmniConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    moe_impl: str = "auto"
    unroll_layers: bool = False

    def setup(self):
        text = self.config.talker.text
        self.codec_embedding = nn.Embed(
            text.vocab_size, text.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
        )
        self.layers = DecoderStack(text, (), self.dtype, self.param_dtype, self.moe_impl, self.unroll_layers)
        self.norm = RMSNorm(text.rms_norm_eps, self.param_dtype)

    def embed(self, codes: jax.Array) -> jax.Array:
        return self.codec_embedding(codes)

    def __call__(self, x, positions, cache_k, cache_v, start):
        x = constrain(x.astype(self.dtype), ("batch", "length", "embed"))
        h, _, cache_k, cache_v = self.layers(x, positions, cache_k, cache_v, start)
        return self.norm(h), cache_k, cache_v


class Talker(nn.Module):
    """Param tree: text_projection, hidden_projection, model{codec_embedding, layers, norm}, codec_head,
    code_predictor{layers, norm, codec_embedding[G-1,V,H], lm_head[G-1,H,V]}."""

    config: OmniConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    moe_impl: str = "auto"
    unroll_layers: bool = False  # params from `unroll_layer_params` (omni_jax.decoder: why)

    def setup(self):
        tk = self.config.talker
        text = tk.text
        self.text_projection = ResizeMLP(text.intermediate_size, text.hidden_size, self.dtype, self.param_dtype)
        self.hidden_projection = ResizeMLP(text.intermediate_size, text.hidden_size, self.dtype, self.param_dtype)
        self.model = TalkerModel(self.config, self.dtype, self.param_dtype, self.moe_impl, self.unroll_layers)
        self.codec_head = nn.Dense(
            text.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(_INIT, ("embed", "vocab")),
        )
        self.code_predictor = CodePredictor(tk.code_predictor, tk.num_code_groups, self.dtype, self.param_dtype,
                                            self.unroll_layers)

    def project_text(self, embeds: jax.Array) -> jax.Array:
        return self.text_projection(embeds)

    def project(self, embeds: jax.Array, hidden: jax.Array, mm_mask: jax.Array) -> jax.Array:
        """hidden_projection(accept-layer hidden) at multimodal positions, text_projection(embeds) elsewhere."""
        return jnp.where(mm_mask[..., None], self.hidden_projection(hidden), self.text_projection(embeds))

    def embed_codec(self, codes: jax.Array) -> jax.Array:
        return self.model.embed(codes)

    def forward(self, x: jax.Array, positions: jax.Array, cache: KVCache, start: jax.Array):
        """x [B,T,H]; positions [3,B,T]; start [B] cache row of x[:,0]. Returns (normed hidden, cache)."""
        h, k, v = self.model(x, positions, cache.k, cache.v, start)
        return h, cache.replace(k=k, v=v)

    def head(self, h: jax.Array) -> jax.Array:
        return self.codec_head(h).astype(jnp.float32)

    def cp(self, name: str, *args):
        return getattr(self.code_predictor, name)(*args)

    def __call__(self, thinker_embeds, thinker_hidden, x, positions, cache, start):
        """Init path touching every parameter."""
        mm = jnp.zeros(thinker_embeds.shape[:-1], bool)
        x = x + self.project(thinker_embeds, thinker_hidden, mm) + self.embed_codec(jnp.zeros(x.shape[:2], jnp.int32))
        h, cache = self.forward(x, positions, cache, start)
        logits = self.head(h)
        tk = self.config.talker
        ck, cv = frame_cache(tk.code_predictor, x.shape[0], tk.num_code_groups, self.dtype)
        cp_pos = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32)[None], x.shape[:2])
        cp_logits, _, _ = self.code_predictor(h, cp_pos, ck, cv, start)
        return logits, cp_logits, cache


# ---------------------------------------------------------------------------------------------
# Params, cache, conversion
# ---------------------------------------------------------------------------------------------


def init_cache(config: OmniConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    t = config.talker.text
    return KVCache.create(t.num_hidden_layers, batch, max_len, t.num_key_value_heads, t.head_dim, dtype)


def text_positions(batch: int, length: int) -> jax.Array:
    """Talker M-RoPE positions for a text-only prompt: 0..length-1 on all three axes. [3, B, T]."""
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (batch, length))
    return jnp.broadcast_to(pos[None], (3, batch, length))


def _init_args(config: OmniConfig):
    tk = config.talker
    start = jnp.zeros((1,), jnp.int32)
    th = jnp.zeros((1, 1, tk.thinker_hidden_size), jnp.float32)
    x = jnp.zeros((1, 1, tk.text.hidden_size), jnp.float32)
    return (th, th, x, text_positions(1, 1), init_cache(config, 1, 1), start)


def boxed_abstract_params(config: OmniConfig, dtype=jnp.float32):
    """Abstract talker params with logical-axis metadata (nn.Partitioned boxes); allocates nothing."""
    model = Talker(config, dtype=dtype, param_dtype=dtype)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *_init_args(config)))["params"]


def init_params(config: OmniConfig, rng: jax.Array, dtype=jnp.float32):
    model = Talker(config, dtype=dtype, param_dtype=dtype)
    return nn.unbox(jax.jit(lambda r: model.init(r, *_init_args(config)))(rng)["params"])


def unroll_layer_params(config: OmniConfig, params: dict, split_experts: bool = True, consume: bool = False) -> dict:
    """Talker params for `Talker(unroll_layers=True)`: talker and code-predictor stacks unstacked (and,
    by default, every talker expert in its own arrays: `omni_jax.moe.split_experts`), the code predictor's
    heads split (`code_predictor.split_lm_heads`). consume: empty the input's layer stacks segment by
    segment as it goes (`decoder.unstack_layers`)."""
    tk = config.talker
    model = {**params["model"],
             "layers": unstack_layers(params["model"]["layers"], tk.text, (), split_experts, consume)}
    cp = {**split_lm_heads(params["code_predictor"]),
          "layers": unstack_layers(params["code_predictor"]["layers"], tk.code_predictor, (), False, consume)}
    return {**params, "model": model, "code_predictor": cp}


def hf_rules(config: OmniConfig) -> list[Rule]:
    """Every `talker.*` checkpoint key onto the param tree rooted at "talker"."""
    tk = config.talker
    rules = decoder_rules("talker.model", ("talker", "model", "layers"), tk.text)
    rules += decoder_rules("talker.code_predictor.model", ("talker", "code_predictor", "layers"), tk.code_predictor)
    rules += [
        Rule(r"talker\.model\.codec_embedding\.weight",
             lambda m: (("talker", "model", "codec_embedding", "embedding"), ()), identity),
        Rule(r"talker\.codec_head\.weight", lambda m: (("talker", "codec_head", "kernel"), ()), linear),
        Rule(r"talker\.(text_projection|hidden_projection)\.(linear_fc1|linear_fc2)\.weight",
             lambda m: (("talker", m.group(1), m.group(2), "kernel"), ()), linear),
        Rule(r"talker\.(text_projection|hidden_projection)\.(linear_fc1|linear_fc2)\.bias",
             lambda m: (("talker", m.group(1), m.group(2), "bias"), ()), identity),
        Rule(r"talker\.code_predictor\.model\.codec_embedding\.(\d+)\.weight",
             lambda m: (("talker", "code_predictor", "codec_embedding"), (int(m.group(1)),)), identity),
        Rule(r"talker\.code_predictor\.lm_head\.(\d+)\.weight",
             lambda m: (("talker", "code_predictor", "lm_head"), (int(m.group(1)),)), linear),
    ]
    return rules


# ---------------------------------------------------------------------------------------------
# Sampling settings (the processors themselves are omni_jax.sampling, shared with the thinker)
# ---------------------------------------------------------------------------------------------


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

    def talker_params(self, config: OmniConfig) -> SamplingParams:
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


def suppressed_codec_ids(config: OmniConfig) -> tuple[int, ...]:
    """The top 1024 codec ids except codec EOS (HF generate's talker `suppress_tokens`)."""
    vocab = config.talker.text.vocab_size
    eos = config.talker.codec_eos_token_id
    return tuple(i for i in range(max(0, vocab - _NUM_SUPPRESSED), vocab) if i != eos)


# ---------------------------------------------------------------------------------------------
# Talker input assembly (HF generate: _get_talker_user_parts / _get_talker_assistant_parts)
# ---------------------------------------------------------------------------------------------


class TalkerInputs(NamedTuple):
    embeds: jax.Array  # [B, T, H] talker prompt embeddings, right-padded with zeros
    lengths: np.ndarray  # [B] int32 real prompt length per row
    trailing: jax.Array  # [B, Ttr, H] text hidden added at decode step s (column s); ends with >= 1 tts_pad column
    tts_pad: jax.Array  # [H] text_projection(tts_pad) (what every step past Ttr adds)
    input_ids: np.ndarray  # [B, T] HF `talker_input_ids` (user ids, then tts_pad x 9), right-padded with 0


def tts_token_ids(config: OmniConfig) -> tuple[int, int, int]:
    """Thinker ids whose embeddings `build_talker_inputs` needs, in order (tts_bos, tts_eos, tts_pad)."""
    return (config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id)


def _user_positions(ids: np.ndarray, config: OmniConfig) -> np.ndarray:
    """Prompt positions whose turn (token after the latest <|im_start|> at or before it) is `user`."""
    n = ids.shape[0]
    pos = np.arange(n)
    prev = np.maximum.accumulate(np.where(ids == config.im_start_token_id, pos, -1))
    role = ids[np.minimum(np.maximum(prev, 0) + 1, n - 1)]
    return pos[role == config.user_token_id]


def _assistant_start(ids: np.ndarray, config: OmniConfig, row: int) -> int:
    hits = np.nonzero((ids[:-1] == config.im_start_token_id) & (ids[1:] == config.assistant_token_id))[0]
    if hits.size == 0:
        raise UsageError(f"row {row}: prompt has no '<|im_start|>assistant' header; the talker needs one "
                         "(apply the chat template with add_generation_prompt=True, or use text_only)")
    return int(hits[-1])


def pow2_bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (at least `minimum`): padded lengths that share one compiled shape."""
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))


def build_talker_inputs(
    config: OmniConfig,
    params,
    prompt_ids: Sequence[np.ndarray],
    generated_ids: Sequence[np.ndarray],
    thinker_embeds: Sequence[np.ndarray],
    accept_hidden: Sequence[np.ndarray] | None,
    tts_embeds: np.ndarray,
    speaker: str | Sequence[str],
    thinker_eos_ids: Sequence[int] | None = "default",
    dtype=jnp.float32,
    project_fn=None,
) -> TalkerInputs:
    """Talker prompt + trailing text hidden states, as HF `generate` builds them, per row.

    params: the "talker" param subtree. Per row b (unpadded): prompt_ids[b] [Lp], generated_ids[b]
    [G] (thinker output, may include EOS and anything after it), thinker_embeds[b] [Lp+G-1 or Lp+G,
    Hth] the thinker's input token embeddings, accept_hidden[b] [>=Lp, Hth] output of layer
    `accept_hidden_layer` (only read at audio/image/video positions; may be None for text-only).
    tts_embeds [3, Hth]: thinker embeddings of `tts_token_ids(config)`. speaker: name or one per row.
    thinker_eos_ids: ids ending a row's text (default: <|im_end|>, HF's default); the trailing text
    gets tts_eos right after the first one and tts_pad beyond. None disables that move, as in HF.

    As in HF, only the first Lp+G-1 embeddings are used (the last generated token is never fed to the
    thinker). HF batches pad every row's generated ids to a common G, which makes a row that ended
    early keep its EOS token's embedding in the trailing text; pass padded rows to reproduce that,
    or rows cut after their EOS to reproduce HF's single-sequence result.
    """
    b = len(prompt_ids)
    if not (len(generated_ids) == len(thinker_embeds) == b) or (accept_hidden is not None and len(accept_hidden) != b):
        raise ValueError("prompt_ids, generated_ids, thinker_embeds (and accept_hidden) need one entry per row")
    if b == 0:
        raise ValueError("build_talker_inputs needs at least one row")
    if thinker_eos_ids == "default":
        thinker_eos_ids = (config.im_end_token_id,)
    speakers = [speaker] * b if isinstance(speaker, str) else list(speaker)
    if len(speakers) != b:
        raise ValueError(f"got {len(speakers)} speakers for {b} rows")
    speaker_ids = [config.talker.speaker(s) for s in speakers]
    tk = config.talker
    hth = tk.thinker_hidden_size
    mm_ids = np.array([config.thinker.audio_token_id, config.thinker.image_token_id, config.thinker.video_token_id])

    # Gather every token that needs projecting into one flat batch (one compiled call).
    flat_e, flat_h, flat_mm, rows = [], [], [], []
    for r in range(b):
        ids_p = np.asarray(prompt_ids[r]).astype(np.int64).reshape(-1)
        gen = np.asarray(generated_ids[r]).astype(np.int64).reshape(-1)
        emb = np.asarray(thinker_embeds[r], np.float32)
        lp, g = ids_p.shape[0], gen.shape[0]
        fed = lp + g - 1  # tokens the thinker consumed
        if emb.ndim != 2 or emb.shape[0] not in (fed, fed + 1) or emb.shape[1] != hth:
            raise ValueError(f"row {r}: thinker_embeds shape {emb.shape} must be ({fed} or {fed + 1}, {hth}) "
                             f"for {lp} prompt + {g} generated tokens")
        emb = emb[:fed]
        if lp < 2:
            raise ValueError(f"row {r}: prompt has {lp} tokens; it needs at least '<|im_start|>assistant'")
        users = _user_positions(ids_p, config)
        a = _assistant_start(ids_p, config, r)
        if fed - a < 4:
            raise ValueError(f"row {r}: need the 3-token assistant header and 2 generated tokens after it "
                             f"(HF takes the first one into the prompt and the rest as trailing text)")
        mm = np.isin(ids_p[users], mm_ids)
        if mm.any():
            if accept_hidden is None:
                raise ValueError(f"row {r}: prompt has multimodal tokens, so accept_hidden is required")
            hid = np.asarray(accept_hidden[r], np.float32)
            if hid.ndim != 2 or hid.shape[0] < lp or hid.shape[1] != hth:
                raise ValueError(f"row {r}: accept_hidden shape {hid.shape} must be (>= {lp}, {hth})")
            user_hidden = hid[users]
        else:
            user_hidden = np.zeros((users.shape[0], hth), np.float32)
        flat_e += [emb[users], emb[a:]]
        flat_h += [user_hidden, np.zeros((fed - a, hth), np.float32)]
        flat_mm += [mm, np.zeros((fed - a,), bool)]
        rows.append((gen, ids_p[users], fed - a))
    specials = np.asarray(tts_embeds, np.float32)
    if specials.shape != (3, hth):
        raise ValueError(f"tts_embeds shape {specials.shape} != (3, {hth}) (tts_bos, tts_eos, tts_pad)")
    flat_e.append(specials)
    flat_h.append(np.zeros_like(specials))
    flat_mm.append(np.zeros((3,), bool))

    e, h, mm = np.concatenate(flat_e), np.concatenate(flat_h), np.concatenate(flat_mm)
    n = e.shape[0]
    pad = pow2_bucket(n, 64) - n
    if project_fn is None:
        project_fn = _project_fn(config, jnp.dtype(dtype))
    proj = project_fn(
        params, jnp.asarray(np.pad(e, ((0, pad), (0, 0))), dtype), jnp.asarray(np.pad(h, ((0, pad), (0, 0))), dtype),
        jnp.asarray(np.pad(mm, (0, pad))),
    )
    proj = np.asarray(proj.astype(jnp.float32))[:n]
    tts_bos, tts_eos, tts_pad = proj[n - 3], proj[n - 2], proj[n - 1]

    codec_table = params["model"]["codec_embedding"]["embedding"]
    eos_set = np.asarray(list(thinker_eos_ids) if thinker_eos_ids is not None else [], np.int64)
    seqs, trails, tids = [], [], []
    off = 0
    for r, (gen, user_ids, na) in enumerate(rows):
        nu = user_ids.shape[0]
        user_part, ah = proj[off:off + nu], proj[off + nu:off + nu + na]
        off += nu + na
        text = np.concatenate([ah[:3], np.repeat(tts_pad[None], 4, 0), tts_bos[None], ah[3:4]])
        special = np.array([tk.codec_nothink_id, tk.codec_think_bos_id, tk.codec_think_eos_id, speaker_ids[r],
                            tk.codec_pad_id, tk.codec_bos_id])
        codec = np.concatenate([np.zeros((3, text.shape[1]), np.float32),
                                np.asarray(jnp.take(codec_table, jnp.asarray(special), axis=0), np.float32)])
        seqs.append(np.concatenate([user_part, text + codec]))
        trailing = np.concatenate([ah[4:], tts_eos[None]])
        if eos_set.size:
            hits = np.nonzero(np.isin(gen, eos_set))[0]
            first = int(hits[0]) if hits.size else gen.shape[0]
            j = np.arange(trailing.shape[0])
            trailing = np.where((j > first)[:, None], tts_pad, trailing)
            trailing = np.where((j == first)[:, None], tts_eos, trailing)
        trails.append(trailing)
        tids.append(np.concatenate([user_ids, np.full((9,), config.tts_pad_token_id, np.int64)]))

    lengths = np.array([s.shape[0] for s in seqs], np.int32)
    t = int(lengths.max())
    ttr = max(x.shape[0] for x in trails) + 1
    embeds = np.zeros((b, t, proj.shape[1]), np.float32)
    trailing = np.broadcast_to(tts_pad, (b, ttr, proj.shape[1])).copy()
    input_ids = np.zeros((b, t), np.int64)
    for r in range(b):
        embeds[r, :lengths[r]] = seqs[r]
        trailing[r, :trails[r].shape[0]] = trails[r]
        input_ids[r, :lengths[r]] = tids[r]
    return TalkerInputs(
        jnp.asarray(embeds, dtype), lengths, jnp.asarray(trailing, dtype), jnp.asarray(tts_pad, dtype), input_ids
    )


# ---------------------------------------------------------------------------------------------
# Generation: pure prefill / step over an explicit state
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TalkerState:
    cache: KVCache
    hidden: jax.Array  # [B, H] normed last hidden state of the previous talker token
    code0: jax.Array  # [B] int32 last sampled group-0 code (its residual groups are not computed yet)
    seen: jax.Array  # [B, V] bool group-0 codes emitted so far (repetition penalty)
    index: jax.Array  # [B] int32 cache row of the next talker token
    rope_delta: jax.Array  # [B] int32 RoPE position = cache row + rope_delta (0 for text-only prompts)
    step: jax.Array  # [] int32 decode steps done (column of `trailing` the next step adds)
    penalty_from: jax.Array  # [B] int32 group-0 tokens with a lower index are left out of the repetition penalty
    done: jax.Array  # [B] bool row has emitted codec EOS
    rng: jax.Array
    # Numerical guard, checked once on the host when the stage ends (`check_finite`), never per step:
    finite: jax.Array  # [] bool every talker logit of a live row so far was finite
    cp_finite: jax.Array  # [] bool every code-predictor logit of a live row so far was finite


def check_finite(state: TalkerState) -> None:
    """Raise NumericalError naming the stage if the talker or code predictor produced NaN/Inf logits."""
    finite, cp_finite = jax.device_get((state.finite, state.cp_finite))
    if not finite:
        raise NumericalError("talker", "talker logits")
    if not cp_finite:
        raise NumericalError("code predictor", "code predictor logits")


def _mark_seen(seen: jax.Array, code: jax.Array, token_index: jax.Array | int, penalty_from: jax.Array) -> jax.Array:
    rows = jnp.arange(seen.shape[0])
    return seen.at[rows, code].set(seen[rows, code] | (token_index >= penalty_from))


def talker_prefill(
    model: Talker,
    params,
    embeds: jax.Array,
    lengths: jax.Array,
    positions: jax.Array,
    rope_delta: jax.Array,
    cache: KVCache,
    penalty_from: jax.Array,
    rng: jax.Array,
    *,
    sampling: TalkerSampling,
) -> TalkerState:
    """Run the talker prompt (rows right-padded; lengths [B]) and sample the first group-0 code."""
    v = {"params": params}
    b = embeds.shape[0]
    h, cache = model.apply(v, embeds, positions, cache, jnp.zeros((b,), jnp.int32), method=Talker.forward)
    last = h[jnp.arange(b), lengths - 1]
    logits = model.apply(v, last, method=Talker.head)
    rng, key = jax.random.split(rng)
    seen = jnp.zeros((b, logits.shape[-1]), bool)
    code0 = sample(logits, key, sampling.talker_params(model.config), seen)
    return TalkerState(
        cache=cache.replace(lengths=lengths.astype(jnp.int32)),
        hidden=last,
        code0=code0,
        seen=_mark_seen(seen, code0, 0, penalty_from),
        index=lengths.astype(jnp.int32),
        rope_delta=rope_delta.astype(jnp.int32),
        step=jnp.zeros((), jnp.int32),
        penalty_from=penalty_from.astype(jnp.int32),
        done=code0 == model.config.talker.codec_eos_token_id,
        rng=rng,
        finite=jnp.all(jnp.isfinite(logits)),
        cp_finite=jnp.ones((), bool),
    )


def code_predictor_frame(
    model: Talker, params, hidden: jax.Array, code0: jax.Array, rng: jax.Array, sampling: TalkerSampling,
    with_finite: bool = False,
):
    """All groups of one frame: (codes [B, G] with group 0 = code0, next talker input embedding w/o text [B, H]).

    The embedding is talker_codec_embedding(code0) + sum_g code_predictor_embedding[g-1](code_g), as HF sums them.
    with_finite: also return finite [B] bool (every code-predictor logit of the row was finite).
    """
    v = {"params": params}
    tk = model.config.talker

    def apply(name, *args):
        return model.apply(v, name, *args, method=Talker.cp)

    e0 = model.apply(v, code0, method=Talker.embed_codec)
    cp_params = sampling.code_predictor_params()
    residual, emb, finite = predict_frame(apply, tk.code_predictor, tk.num_code_groups, hidden, e0, rng,
                                          lambda logits, key: sample(logits, key, cp_params), model.dtype,
                                          with_finite=True)
    codes, emb = jnp.concatenate([code0[:, None], residual], axis=1), e0.astype(jnp.float32) + emb
    return (codes, emb, finite) if with_finite else (codes, emb)


def talker_step(
    model: Talker, params, state: TalkerState, trailing: jax.Array, *, sampling: TalkerSampling
) -> tuple[TalkerState, jax.Array, jax.Array]:
    """One decode step: the full frame of `state.code0` (code predictor), then one talker token.

    Returns (new state, frame codes [B, G] int32, valid [B]: the frame belongs to the row's audio,
    i.e. the row had not emitted codec EOS before). trailing [B, Ttr, H] must end with a tts_pad column.
    """
    v = {"params": params}
    b = state.code0.shape[0]
    rng, k_cp, k_c0 = jax.random.split(state.rng, 3)
    codes, emb, cp_finite = code_predictor_frame(model, params, state.hidden, state.code0, k_cp, sampling,
                                                 with_finite=True)
    live = ~state.done  # finished rows still run (static shapes); only live rows count for the guard
    col = jnp.minimum(state.step, trailing.shape[1] - 1)
    text = jax.lax.dynamic_index_in_dim(trailing, col, 1, keepdims=False)
    x = (emb.astype(model.dtype) + text.astype(model.dtype))[:, None]
    pos = state.index + state.rope_delta
    positions = jnp.broadcast_to(pos[None, :, None], (3, b, 1))
    h, cache = model.apply(v, x, positions, state.cache, state.index, method=Talker.forward)
    logits = model.apply(v, h[:, 0], method=Talker.head)
    code0 = sample(logits, k_c0, sampling.talker_params(model.config), state.seen)
    new = state.replace(
        cache=cache.replace(lengths=state.index + 1),
        hidden=h[:, 0],
        code0=code0,
        seen=_mark_seen(state.seen, code0, state.step + 1, state.penalty_from),
        index=state.index + 1,
        step=state.step + 1,
        done=state.done | (code0 == model.config.talker.codec_eos_token_id),
        rng=rng,
        finite=state.finite & jnp.all(jnp.isfinite(logits) | ~live[:, None]),
        cp_finite=state.cp_finite & jnp.all(cp_finite | ~live),
    )
    return new, codes, live


def _project(model: Talker, params, embeds, hidden, mm):
    return model.apply({"params": params}, embeds, hidden, mm, method=Talker.project)


@functools.lru_cache(maxsize=None)
def _project_fn(config: OmniConfig, dtype):
    return jax.jit(functools.partial(_project, Talker(config, dtype, dtype)))


class TalkerCodes(NamedTuple):
    codes: np.ndarray  # [B, G, T] int32; frames at or past a row's length are 0 (as HF masks them)
    lengths: np.ndarray  # [B] int32 frames per row (the frame of codec EOS and later are excluded)


class TalkerGenerator:
    """Jitted talker prefill/step (compiled once per batch / length bucket) and the host decode loop."""

    def __init__(self, config: OmniConfig, dtype=jnp.float32, moe_impl: str = "auto", mesh=None,
                 unroll_layers: bool | None = None):
        """mesh: a jax.sharding.Mesh (omni_jax.mesh.make_mesh) to run prefill/step sharded (expert-parallel
        MoE); place params with omni_jax.parallel.talker_param_shardings first. None: one device.
        unroll_layers (default: on a single CPU device): the params passed to every call must then come
        from `prepare_params` (see omni_jax.decoder for why)."""
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.moe_impl = moe_impl
        self.unroll_layers = unroll_default(mesh) if unroll_layers is None else bool(unroll_layers)
        self.model = Talker(config, self.dtype, self.dtype, moe_impl, self.unroll_layers)
        donate = jax.default_backend() != "cpu"  # XLA:CPU cannot donate; avoid a warning per call
        if mesh is None:
            jit = jax.jit
        else:
            from omni_jax.parallel import sharded_jit

            jit = functools.partial(sharded_jit, mesh=mesh)
        self.prefill = jit(
            functools.partial(talker_prefill, self.model), static_argnames=("sampling",),
            donate_argnames=("cache",) if donate else (),
        )
        self.step = jit(
            functools.partial(talker_step, self.model), static_argnames=("sampling",),
            donate_argnames=("state",) if donate else (),
        )
        self.frame = jax.jit(functools.partial(code_predictor_frame, self.model),
                             static_argnames=("sampling", "with_finite"))
        self.project = _project_fn(config, self.dtype)

    def prepare_params(self, params: dict) -> dict:
        """The checkpoint's (scanned) talker params in the layout this generator's model reads."""
        if not self.unroll_layers:
            return params
        return unroll_layer_params(self.config, params, split_experts=moe.runs_split(self.moe_impl))

    def _check_layout(self, params: dict) -> None:
        unrolled = layer_name(0) in params["model"]["layers"]
        if unrolled != self.unroll_layers:
            have, want = ("unrolled", "scanned") if unrolled else ("scanned", "unrolled")
            raise ValueError(f"talker params have {have} layers but this generator runs {want} ones: pass "
                             "generator.prepare_params(checkpoint_params) (once) instead of the checkpoint's tree")

    def build_inputs(self, params, *args, **kwargs) -> TalkerInputs:
        """`build_talker_inputs` with this generator's dtype and compiled projection."""
        return build_talker_inputs(self.config, params, *args, dtype=self.dtype, project_fn=self.project, **kwargs)

    def start(
        self,
        params,
        inputs: TalkerInputs,
        max_new_tokens: int,
        sampling: TalkerSampling = TalkerSampling(),
        rng: jax.Array | None = None,
        positions: jax.Array | None = None,
        rope_delta: jax.Array | None = None,
        penalty_from: np.ndarray | str | None = "hf",
    ) -> tuple[TalkerState, jax.Array]:
        """Prefill; returns (state, padded trailing) for `step`.

        positions [3,B,T] / rope_delta [B] override the text-only default (multimodal prompts: HF
        get_rope_index over inputs.input_ids, with deltas relative to the unpadded row).
        penalty_from [B]: each row's repetition penalty skips its first penalty_from group-0 codes.
        "hf" reproduces HF batches, whose RepetitionPenaltyLogitsProcessor skips as many codes as the
        row has left padding in the batched talker prompt (max(lengths) - length; 0 for a single row);
        None penalizes every code (HF's single-sequence behaviour for every row).
        """
        if max_new_tokens < 1:
            raise UsageError(f"talker max_new_tokens must be >= 1, got {max_new_tokens}")
        self._check_layout(params)
        b, t, _ = inputs.embeds.shape
        lengths = np.asarray(inputs.lengths, np.int32)
        tb = pow2_bucket(t)
        embeds = jnp.pad(inputs.embeds.astype(self.dtype), ((0, 0), (0, tb - t), (0, 0)))
        if positions is None:
            positions = text_positions(b, tb)
        else:
            positions = jnp.pad(jnp.asarray(positions, jnp.int32), ((0, 0), (0, 0), (0, tb - positions.shape[-1])))
        rope_delta = jnp.zeros((b,), jnp.int32) if rope_delta is None else jnp.asarray(rope_delta, jnp.int32)
        if isinstance(penalty_from, str):
            if penalty_from != "hf":
                raise ValueError(f"penalty_from must be 'hf', None or per-row counts, got {penalty_from!r}")
            penalty_from = lengths.max() - lengths
        elif penalty_from is None:
            penalty_from = np.zeros((b,), np.int32)
        ttr = inputs.trailing.shape[1]
        trailing = jnp.concatenate(
            [inputs.trailing.astype(self.dtype),
             jnp.broadcast_to(inputs.tts_pad.astype(self.dtype), (b, pow2_bucket(ttr) - ttr, inputs.tts_pad.shape[-1]))],
            axis=1,
        )
        cache = init_cache(self.config, b, tb + pow2_bucket(max_new_tokens), self.dtype)
        rng = jax.random.PRNGKey(0) if rng is None else rng
        state = self.prefill(params, embeds, jnp.asarray(lengths), positions, rope_delta, cache,
                             jnp.asarray(penalty_from, jnp.int32), rng, sampling=sampling)
        return state, trailing

    def iter_frames(
        self, params, inputs: TalkerInputs, max_new_tokens: int, sampling: TalkerSampling = TalkerSampling(),
        rng: jax.Array | None = None, **start_options,
    ) -> Iterator[tuple[jax.Array, jax.Array]]:
        """Yields (codes [B, G], valid [B]) per frame, at most max_new_tokens - 1 frames (HF: the last sampled
        group-0 code never gets its residual groups), until every row has emitted codec EOS.
        start_options: positions, rope_delta, penalty_from (see `start`).
        Raises NumericalError ("talker" / "code predictor") after the last frame if any logit was NaN/Inf
        (`generate` collects every frame first, so then nothing comes out)."""
        state, trailing = self.start(params, inputs, max_new_tokens, sampling, rng, **start_options)
        for _ in range(max_new_tokens - 1):
            if bool(jnp.all(state.done)):
                break
            state, codes, valid = self.step(params, state, trailing, sampling=sampling)
            yield codes, valid
        check_finite(state)

    def generate(
        self, params, inputs: TalkerInputs, max_new_tokens: int, sampling: TalkerSampling = TalkerSampling(),
        rng: jax.Array | None = None, **start_options,
    ) -> TalkerCodes:
        """All frames: codes [B, G, T] (zero past each row's length) and per-row lengths."""
        frames = list(self.iter_frames(params, inputs, max_new_tokens, sampling, rng, **start_options))
        b, g = inputs.embeds.shape[0], self.config.talker.num_code_groups
        if not frames:
            return TalkerCodes(np.zeros((b, g, 0), np.int32), np.zeros((b,), np.int32))
        codes = np.stack([np.asarray(c) for c, _ in frames], axis=-1)
        valid = np.stack([np.asarray(v) for _, v in frames], axis=-1)
        codes = np.where(valid[:, None, :], codes, 0).astype(np.int32)
        return TalkerCodes(codes, valid.sum(axis=1).astype(np.int32))
