"""Decode slots for continuous batching: fixed-size batched states that requests are inserted into.

The serving scheduler (omni_jax.runtime.scheduler) keeps one batch of `slots` rows per stage, with shapes
that never change, and moves requests in and out of rows between steps (JetStream's prefill-and-insert):

  * `ThinkerSlots`: the thinker's KV cache [slots, max_len] and each row's last token, budget, settings
    (temperature / top-k / top-p as data) and PRNG key. A request is prefilled alone (batch 1, the
    offline engine's compiled prefill) and `thinker_insert` copies its cache row in and samples token 1;
    `thinker_step` feeds every live row's last token and samples the next.
  * the talker's `TalkerState` over the same rows: `talker_insert` copies a request's batch-1 talker
    prefill in; `talker_slots_step` runs the talker + code-predictor step for the rows whose next text
    column exists and leaves the others exactly as they were.

A row's numbers never depend on the other rows: per-row keys, per-row settings, no capacity-limited
expert dispatch, and free rows are masked. So a request's greedy (or seeded) tokens and codes are the same
alone or beside others, arriving at any time. All functions are pure and take the carried state first; the
scheduler jits them with the state donated.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from omni_jax import rng as rng_lib
from omni_jax.models.talker import Talker
from omni_jax.models.thinker import Thinker
from omni_jax.nn.kv_cache import KVCache
from omni_jax.processing.positions import text_positions
from omni_jax.runtime.sampling import TalkerSampling, sample_rows
from omni_jax.runtime.talker_engine import TalkerState, talker_step


@flax.struct.dataclass
class ThinkerSlots:
    cache: KVCache  # [slots, max_len]; lengths: each row's next cache row
    tokens: jax.Array  # [B] int32 last sampled token (the next step's input)
    num_generated: jax.Array  # [B] int32
    max_new_tokens: jax.Array  # [B] int32
    live: jax.Array  # [B] bool: the row holds a request that is still writing text
    rope_deltas: jax.Array  # [B] float32 M-RoPE position minus cache row
    keys: jax.Array  # [B, 2] uint32: each row's own PRNG key
    temperature: jax.Array  # [B] float32 (0: greedy)
    top_k: jax.Array  # [B] int32 (0: off)
    top_p: jax.Array  # [B] float32 (1: off)
    eos_ids: jax.Array  # [E] int32
    finite: jax.Array  # [B] bool every logit the row sampled from was finite

    @classmethod
    def create(cls, cache: KVCache, eos_ids) -> "ThinkerSlots":
        b = cache.batch
        zeros = lambda: jnp.zeros((b,), jnp.int32)  # noqa: E731 - distinct buffers: the state is donated
        return cls(cache=cache, tokens=zeros(), num_generated=zeros(), max_new_tokens=zeros(),
                   live=jnp.zeros((b,), bool), rope_deltas=jnp.zeros((b,), jnp.float32), keys=jnp.zeros((b, 2), jnp.uint32),
                   temperature=jnp.zeros((b,), jnp.float32), top_k=zeros(), top_p=jnp.ones((b,), jnp.float32),
                   eos_ids=jnp.asarray(eos_ids, jnp.int32), finite=jnp.ones((b,), bool))


def _is_eos(ids: jax.Array, eos_ids: jax.Array) -> jax.Array:
    return jnp.any(ids[..., None] == eos_ids, axis=-1)


def _put_row(buf: jax.Array, row: jax.Array, slot: jax.Array, axis: int = 0) -> jax.Array:
    """buf with row (buf's shape with 1 at `axis`) written at index `slot` of `axis`."""
    start = [0] * buf.ndim
    start[axis] = slot
    return jax.lax.dynamic_update_slice(buf, row.astype(buf.dtype), start)


def thinker_insert(slots: ThinkerSlots, cache: KVCache, logits: jax.Array, rope_delta: jax.Array, slot: jax.Array,
                   max_new_tokens: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                   top_p: jax.Array) -> tuple[ThinkerSlots, jax.Array, jax.Array]:
    """Put a prefilled request (batch-1 cache with its prompt, prompt logits [1, V]) into row `slot` and sample
    its token 1 with its own settings and key (split as the offline engine's prefill splits it).
    Returns (slots, token 1 [], done [])."""
    key, sub = jax.random.split(key)
    first = sample_rows(logits, sub[None], temperature[None], top_k[None], top_p[None])[0]
    done = _is_eos(first, slots.eos_ids) | (max_new_tokens <= 1)
    c = slots.cache
    new_cache = c.replace(k=_put_row(c.k, cache.k, slot, 1), v=_put_row(c.v, cache.v, slot, 1),
                          lengths=c.lengths.at[slot].set(cache.lengths[0]))
    at = lambda buf, value: buf.at[slot].set(value)  # noqa: E731
    slots = slots.replace(
        cache=new_cache, tokens=at(slots.tokens, first), num_generated=at(slots.num_generated, 1),
        max_new_tokens=at(slots.max_new_tokens, max_new_tokens), live=at(slots.live, ~done),
        rope_deltas=at(slots.rope_deltas, rope_delta), keys=at(slots.keys, key),
        temperature=at(slots.temperature, temperature), top_k=at(slots.top_k, top_k), top_p=at(slots.top_p, top_p),
        finite=at(slots.finite, jnp.all(jnp.isfinite(logits))),
    )
    return slots, first, done


def thinker_free(slots: ThinkerSlots, rows: jax.Array) -> ThinkerSlots:
    """Stop rows (bool [B]): a cancelled request; the row's contents are simply never read again."""
    return slots.replace(live=slots.live & ~rows)


def thinker_step(params, slots: ThinkerSlots, *, model: Thinker) -> tuple[ThinkerSlots, jax.Array, jax.Array]:
    """One token for every live row. Returns (slots, tokens [B], emitted [B] bool). Rows that are not live
    still run (static shapes) but neither advance, draw nor emit."""
    cache = slots.cache
    pos = cache.lengths
    out = model.apply({"params": params}, slots.tokens[:, None], text_positions(pos + slots.rope_deltas, 1), cache,
                      pos)
    live = slots.live
    keys = rng_lib.split_keys(slots.keys, 2)
    nxt = sample_rows(out.logits[:, 0], keys[1], slots.temperature, slots.top_k, slots.top_p)
    nxt = jnp.where(live, nxt, slots.tokens)
    num = slots.num_generated + live.astype(jnp.int32)
    done = live & (_is_eos(nxt, slots.eos_ids) | (num >= slots.max_new_tokens))
    finite = slots.finite & (jnp.all(jnp.isfinite(out.logits[:, 0]), axis=-1) | ~live)
    new = slots.replace(
        cache=out.cache.replace(lengths=pos + live.astype(jnp.int32)), tokens=nxt, num_generated=num,
        live=live & ~done, keys=jnp.where(live[:, None], keys[0], slots.keys), finite=finite,
    )
    return new, nxt, live


# ---------------------------------------------------------------------------------------------
# Talker rows
# ---------------------------------------------------------------------------------------------


def talker_slots(state: TalkerState, slots: int) -> TalkerState:
    """An empty slot state shaped like `slots` copies of a batch-1 talker prefill (every row done)."""

    def widen(x):
        return jnp.zeros((slots,) + x.shape[1:], x.dtype) if x.ndim and x.shape[0] == 1 else jnp.zeros_like(x)

    cache = state.cache
    shape = cache.k.shape[:1] + (slots,) + cache.k.shape[2:]
    empty = jax.tree_util.tree_map(widen, state.replace(cache=None, rng=None))
    return empty.replace(
        cache=KVCache(k=jnp.zeros(shape, cache.k.dtype), v=jnp.zeros(shape, cache.v.dtype),
                      lengths=jnp.zeros((slots,), jnp.int32)),
        rng=jnp.zeros((slots,) + state.rng.shape, state.rng.dtype), done=jnp.ones((slots,), bool),
        finite=jnp.ones((slots,), bool), cp_finite=jnp.ones((slots,), bool), step=jnp.zeros((), jnp.int32))


def talker_insert(slots: TalkerState, row: TalkerState, slot: jax.Array) -> TalkerState:
    """Copy a batch-1 talker prefill (same cache length) into row `slot`."""
    put = lambda buf, value: _put_row(buf, value, slot)  # noqa: E731
    c = slots.cache
    return slots.replace(
        cache=c.replace(k=_put_row(c.k, row.cache.k, slot, 1), v=_put_row(c.v, row.cache.v, slot, 1),
                        lengths=put(c.lengths, row.cache.lengths)),
        hidden=put(slots.hidden, row.hidden), code0=put(slots.code0, row.code0), seen=put(slots.seen, row.seen),
        index=put(slots.index, row.index), rope_delta=put(slots.rope_delta, row.rope_delta),
        penalty_from=put(slots.penalty_from, row.penalty_from), done=put(slots.done, row.done),
        rng=slots.rng.at[slot].set(row.rng), finite=put(slots.finite, row.finite),
        cp_finite=put(slots.cp_finite, row.cp_finite),
    )


def talker_slots_step(model: Talker, params, state: TalkerState, columns: jax.Array, active: jax.Array, *,
                      sampling: TalkerSampling) -> tuple[TalkerState, jax.Array, jax.Array]:
    """The talker + code-predictor step for rows where `active` [B] (their text column [B, 1, H] exists);
    the other rows keep their state exactly (their cache row at `index` is scratch: the row's next real
    step writes it before reading it). Returns (state, codes [B, G], valid [B]: a new frame of the row)."""
    new, codes, live = talker_step(model, params, state, columns, sampling=sampling)

    def pick(n, o):
        return jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    fields = ("hidden", "code0", "seen", "index", "done", "rng", "finite", "cp_finite")
    kept = {f: pick(getattr(new, f), getattr(state, f)) for f in fields}
    kept["cache"] = new.cache.replace(lengths=pick(new.cache.lengths, state.cache.lengths))
    return new.replace(**kept), codes, active & live
