"""Talker generation: pure prefill / step functions over an explicit `TalkerState`, and their driver.

  * `talker_prefill`: runs the talker prompt (omni_jax.runtime.talker_inputs) and samples the first
    group-0 code.
  * `talker_step`: the whole code-predictor frame for the previous group-0 code (groups 1..15, one
    traced computation: omni_jax.models.code_predictor.predict_frame), then one talker token. A jitted
    step compiles once per (batch, cache length, trailing length).
  * `TalkerGenerator` jits them (sharded under a mesh) and runs the host loop; launch/plan.py lowers
    the same `step` for the full-size memory plan.

Layout note: HF left-pads the talker prompt and masks the pads; we right-pad instead and keep
per-row lengths, so every row's tokens sit at cache rows 0..n-1 and get RoPE positions 0..n-1,
which is what HF computes (positions are cumsum(attention_mask)-1 and decode positions add
rope_deltas = -padding). Pads after a row's end are never attended by that row's real tokens
and are overwritten by its decode steps.
"""

from __future__ import annotations

import functools
from typing import Iterator, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax import buckets
from omni_jax import rng as rng_lib
from omni_jax.config import OmniConfig
from omni_jax.errors import UsageError, check_finite as _check_flags
from omni_jax.models import registry
from omni_jax.models.code_predictor import predict_frame
from omni_jax.models.talker import Talker
from omni_jax.nn.kv_cache import KVCache
from omni_jax.processing.positions import text_positions
from omni_jax.runtime import layout as layout_lib
from omni_jax.runtime.sampling import TalkerSampling, sample
from omni_jax.runtime.talker_inputs import TalkerInputs, build_talker_inputs, compiled_projection
from omni_jax.sharding import jit as sjit
from omni_jax.sharding import rules


@flax.struct.dataclass
class TalkerState:
    cache: KVCache
    hidden: jax.Array  # [B, H] normed last hidden state of the previous talker token
    code0: jax.Array  # [B] int32 last sampled group-0 code (its residual groups are not computed yet)
    seen: jax.Array  # [B, V] bool group-0 codes emitted so far (repetition penalty)
    index: jax.Array  # [B] int32 cache row of the next talker token
    rope_delta: jax.Array  # [B] float32 RoPE position = cache row + rope_delta (0 for text-only prompts)
    step: jax.Array  # [] int32 decode steps done (column of `trailing` the next step adds)
    penalty_from: jax.Array  # [B] int32 group-0 tokens with a lower index are left out of the repetition penalty
    done: jax.Array  # [B] bool row has emitted codec EOS
    rng: jax.Array  # one key [2] for the batch, or one per row [B, 2] (served slots: omni_jax.rng)
    # Numerical guard, checked once on the host when the stage ends (`check_finite`), never per step:
    finite: jax.Array  # [B] bool every talker logit of the row so far was finite (while it was live)
    cp_finite: jax.Array  # [B] bool every code-predictor logit of the row so far was finite


def check_finite(state: TalkerState) -> None:
    """Raise NumericalError naming the stage if the talker or code predictor produced NaN/Inf logits."""
    finite, cp_finite = jax.device_get((state.finite, state.cp_finite))
    _check_flags(("talker", "talker logits", finite), ("code predictor", "code predictor logits", cp_finite))


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
    rng, key = rng_lib.split_keys(rng, 2)
    seen = jnp.zeros((b, logits.shape[-1]), bool)
    code0 = sample(logits, key, sampling.talker_params(model.config), seen)
    return TalkerState(
        cache=cache.replace(lengths=lengths.astype(jnp.int32)),
        hidden=last,
        code0=code0,
        seen=_mark_seen(seen, code0, 0, penalty_from),
        index=lengths.astype(jnp.int32),
        rope_delta=rope_delta.astype(jnp.float32),
        step=jnp.zeros((), jnp.int32),
        penalty_from=penalty_from.astype(jnp.int32),
        done=code0 == model.config.talker.codec_eos_token_id,
        rng=rng,
        finite=jnp.all(jnp.isfinite(logits), axis=-1),
        cp_finite=jnp.ones((b,), bool),
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
    rng, k_cp, k_c0 = rng_lib.split_keys(state.rng, 3)  # one key for the batch, or one per row
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
        finite=state.finite & jnp.all(jnp.isfinite(logits) | ~live[:, None], axis=-1),
        cp_finite=state.cp_finite & (cp_finite | ~live),
    )
    return new, codes, live


class TalkerCodes(NamedTuple):
    codes: np.ndarray  # [B, G, T] int32; frames at or past a row's length are 0 (as HF masks them)
    lengths: np.ndarray  # [B] int32 frames per row (the frame of codec EOS and later are excluded)


class TalkerGenerator:
    """Jitted talker prefill/step (compiled once per batch / length bucket) and the host decode loop."""

    def __init__(self, config: OmniConfig, dtype=jnp.float32, mesh=None, layout: layout_lib.Layout | None = None,
                 donate: bool | None = None):
        """mesh: a jax.sharding.Mesh (omni_jax.sharding.mesh.make_mesh) to run prefill/step sharded
        (expert-parallel MoE); place params with `param_shardings()` first. None: one device. layout: default
        `layout.choose(mesh)` (its MoE dispatch; the params decide scanned vs unrolled). donate: donate the
        carried cache/state; None: everywhere but XLA:CPU (which cannot, and warns per call). launch/plan.py
        passes True to lower the accelerator's program (state aliased in place) on CPU."""
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh
        self.layout = layout_lib.choose(mesh) if layout is None else layout
        self.model = Talker(config, self.dtype, self.dtype, self.layout.dispatch)
        donate = jax.default_backend() != "cpu" if donate is None else donate
        jit = jax.jit if mesh is None else functools.partial(sjit.sharded_jit, mesh=mesh)
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
        self.project = compiled_projection(config, self.dtype)

    def param_shardings(self, rules_table=rules.DEFAULT_RULES):
        """NamedShardings of the talker params (checkpoint layout) from their logical axes."""
        boxed = registry.boxed_abstract_params(self.config, self.dtype, ("talker",))["talker"]
        return rules.param_shardings(boxed, self.mesh, rules_table)

    def abstract_step_args(self, batch: int, max_len: int, trailing_len: int, sampling: TalkerSampling):
        """(params, state, trailing) of `step` as ShapeDtypeStructs (with shardings under a mesh): the inputs
        launch/plan.py lowers it on; the state is what `prefill` returns for a max_len-row cache."""
        boxed = registry.boxed_abstract_params(self.config, self.dtype, ("talker",))["talker"]
        params = nn.unbox(boxed)
        t = self.config.talker.text
        sds = jax.ShapeDtypeStruct
        rows = sds((batch,), jnp.int32)
        state = jax.eval_shape(
            functools.partial(talker_prefill, self.model, sampling=sampling), params,
            sds((batch, 1, t.hidden_size), self.dtype), rows, sds((3, batch, 1), jnp.int32), rows,
            KVCache.abstract(t, batch, max_len, self.dtype), rows, jax.random.PRNGKey(0))
        trailing = sds((batch, trailing_len, t.hidden_size), self.dtype)
        if self.mesh is not None:
            params = rules.with_shardings(params, self.param_shardings())
            state = rules.with_shardings(state, sjit.state_shardings(state, batch, self.mesh))
            trailing = rules.with_shardings(trailing, sjit.state_shardings(trailing, batch, self.mesh))
        return params, state, trailing

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
        cache_len: int | None = None,
    ) -> tuple[TalkerState, jax.Array]:
        """Prefill; returns (state, padded trailing) for `step`.

        positions [3,B,T] / rope_delta [B] override the text-only default (multimodal prompts: HF
        get_rope_index over inputs.input_ids, with deltas relative to the unpadded row).
        penalty_from [B]: each row's repetition penalty skips its first penalty_from group-0 codes.
        "hf" reproduces HF batches, whose RepetitionPenaltyLogitsProcessor skips as many codes as the
        row has left padding in the batched talker prompt (max(lengths) - length; 0 for a single row);
        None penalizes every code (HF's single-sequence behaviour for every row).
        cache_len: the KV cache's rows (default: the padded prompt + the padded budget); the serving slots
        pass their own, so a prefilled row can be copied into them.
        """
        if max_new_tokens < 1:
            raise UsageError(f"talker max_new_tokens must be >= 1, got {max_new_tokens}")
        b, t, _ = inputs.embeds.shape
        lengths = np.asarray(inputs.lengths, np.int32)
        tb = buckets.bucket(t)
        embeds = jnp.pad(inputs.embeds.astype(self.dtype), ((0, 0), (0, tb - t), (0, 0)))
        # float32 either way (a video's times need not be whole): text and multimodal prompts share one compile.
        if positions is None:
            positions = text_positions(np.zeros((b,), np.int32), tb).astype(jnp.float32)
        else:
            positions = np.asarray(positions, np.float32)
            # pads continue each row's last position (never attended by its real tokens)
            positions = jnp.asarray(np.pad(positions, ((0, 0), (0, 0), (0, tb - positions.shape[-1])), mode="edge"))
        rope_delta = np.zeros((b,), np.float32) if rope_delta is None else np.asarray(rope_delta, np.float32)
        if isinstance(penalty_from, str):
            if penalty_from != "hf":
                raise ValueError(f"penalty_from must be 'hf', None or per-row counts, got {penalty_from!r}")
            penalty_from = lengths.max() - lengths
        elif penalty_from is None:
            penalty_from = np.zeros((b,), np.int32)
        ttr = inputs.trailing.shape[1]
        trailing = jnp.concatenate(
            [inputs.trailing.astype(self.dtype),
             jnp.broadcast_to(inputs.tts_pad.astype(self.dtype), (b, buckets.bucket(ttr) - ttr, inputs.tts_pad.shape[-1]))],
            axis=1,
        )
        rows = tb + buckets.bucket(max_new_tokens) if cache_len is None else int(cache_len)
        if rows < tb + max_new_tokens:
            raise UsageError(f"talker cache of {rows} rows cannot hold a prompt of {t} (padded {tb}) + "
                             f"{max_new_tokens} frames")
        cache = KVCache.create(self.config.talker.text, b, rows, self.dtype)
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
