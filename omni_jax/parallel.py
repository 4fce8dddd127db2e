"""Sharded (SPMD) jitted steps: params, KV cache, tokens and outputs laid out by the rules table.

`sharded_jit` is the one primitive: a jax.jit whose trace runs under sharding.use_mesh, so
model code sees the mesh (activation constraints, the expert-parallel MoE) and the compiled
function takes / returns arrays with the NamedShardings derived from logical axes. With
mesh=None everything degrades to a plain single-device jit of the same function, which is
what the parity tests compare against.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from omni_jax import sharding
from omni_jax.config import OmniConfig
from omni_jax.kv_cache import CACHE_AXES, KVCache
from omni_jax.sharding import DEFAULT_RULES, MeshAxes
from omni_jax.thinker import Thinker, boxed_abstract_params, init_cache

# Logical axes of step inputs/outputs (params take theirs from the model's boxes).
TOKENS_AXES = ("batch", "length")
POSITIONS_AXES = (None, "batch", "length")  # M-RoPE [3, B, T]
ROW_AXES = ("batch",)
LOGITS_AXES = ("batch", "vocab")
CACHE_TREE_AXES = KVCache(k=CACHE_AXES, v=CACHE_AXES, lengths=("cache_batch",))


def sharded_jit(
    fn: Callable,
    mesh: Mesh | None,
    in_shardings: Any = None,
    out_shardings: Any = None,
    donate_argnums: Sequence[int] = (),
    rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
    **jit_kwargs: Any,
) -> Callable:
    """jax.jit(fn, ...) traced under sharding.use_mesh(mesh, rules); mesh=None: a plain jit.

    A drop-in for jax.jit (extra kwargs such as static_argnames pass through). in/out_shardings
    left None are inferred: inputs keep the shardings they arrive with (e.g. params placed with
    `sharding.place`), outputs get what GSPMD propagates (the KV cache is pinned by the model).
    """
    if donate_argnums:  # an explicit () would stop jax from deriving positions from donate_argnames
        jit_kwargs["donate_argnums"] = tuple(donate_argnums)
    if in_shardings is not None:
        jit_kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
        jit_kwargs["out_shardings"] = out_shardings
    if mesh is None:
        return jax.jit(fn, **jit_kwargs)

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with sharding.use_mesh(mesh, rules):
            return fn(*args, **kwargs)

    return jax.jit(traced, **jit_kwargs)


def _cache_shapes(config: OmniConfig, batch: int, max_len: int, dtype) -> KVCache:
    t = config.thinker.text
    return KVCache.abstract(t.num_hidden_layers, batch, max_len, t.num_key_value_heads, t.head_dim, dtype)


@dataclasses.dataclass(frozen=True)
class ThinkerLayout:
    """Shardings of everything the thinker steps take and return, for one (mesh, batch, max_len, chunk)."""

    mesh: Mesh
    params: Any  # tree of NamedSharding like the unboxed thinker params
    cache: KVCache  # of NamedSharding
    tokens: NamedSharding  # prefill tokens [B, T]
    positions: NamedSharding  # prefill positions [3, B, T]
    step_tokens: NamedSharding  # decode tokens [B, 1]
    step_positions: NamedSharding  # decode positions [3, B, 1]
    rows: NamedSharding  # per-row vectors [B]
    logits: NamedSharding  # [B, V]


def thinker_layout(
    config: OmniConfig,
    mesh: Mesh,
    batch: int,
    max_len: int,
    prefill_len: int,
    rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
    boxed_params: Any = None,
) -> ThinkerLayout:
    t = config.thinker.text
    boxed = boxed_abstract_params(config) if boxed_params is None else boxed_params
    s = lambda axes, shape, name: NamedSharding(mesh, sharding.logical_spec(axes, shape, mesh, rules, name))
    return ThinkerLayout(
        mesh=mesh,
        params=sharding.param_shardings(boxed, mesh, rules),
        cache=sharding.tree_shardings(_cache_shapes(config, batch, max_len, jnp.float32), CACHE_TREE_AXES, mesh, rules, "thinker_cache/"),
        tokens=s(TOKENS_AXES, (batch, prefill_len), "prefill_tokens"),
        positions=s(POSITIONS_AXES, (3, batch, prefill_len), "prefill_positions"),
        step_tokens=s(TOKENS_AXES, (batch, 1), "decode_tokens"),
        step_positions=s(POSITIONS_AXES, (3, batch, 1), "decode_positions"),
        rows=s(ROW_AXES, (batch,), "rows"),
        logits=s(LOGITS_AXES, (batch, t.vocab_size), "logits"),
    )


def thinker_param_shardings(config: OmniConfig, mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> Any:
    """NamedShardings for the thinker's param tree (root["thinker"]) from its logical axes."""
    return sharding.param_shardings(boxed_abstract_params(config), mesh, rules)


def thinker_cache(
    config: OmniConfig, batch: int, max_len: int, dtype, mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES
) -> KVCache:
    """A zero thinker KV cache created directly in its sharded layout (never materialized on one device)."""
    shard = sharding.tree_shardings(_cache_shapes(config, batch, max_len, dtype), CACHE_TREE_AXES, mesh, rules, "thinker_cache/")
    return jax.jit(lambda: init_cache(config, batch, max_len, dtype), out_shardings=shard)()


class ThinkerSteps(NamedTuple):
    prefill: Callable  # (params, tokens [B,T], positions [3,B,T], cache, lengths [B]) -> (logits [B,V], cache)
    decode: Callable  # (params, tokens [B,1], positions [3,B,1], cache) -> (logits [B,V], cache)
    layout: ThinkerLayout | None


def thinker_prefill_fn(model: Thinker) -> Callable:
    """Pure prefill: append T tokens per row at cache.lengths (right-padded; `lengths` valid), logits at the last valid one."""

    def prefill(params, tokens, positions, cache: KVCache, lengths):
        start = cache.lengths
        out = model.apply({"params": params}, tokens, positions, cache, start, logits_index=jnp.maximum(lengths - 1, 0))
        return out.logits[:, 0], out.cache.replace(lengths=start + lengths)

    return prefill


def thinker_decode_fn(model: Thinker) -> Callable:
    """Pure decode step: one token per row at cache.lengths."""

    def decode(params, tokens, positions, cache: KVCache):
        start = cache.lengths
        out = model.apply({"params": params}, tokens, positions, cache, start)
        return out.logits[:, 0], out.cache.replace(lengths=start + 1)

    return decode


def make_thinker_steps(
    config: OmniConfig,
    mesh: Mesh | None,
    *,
    batch: int,
    max_len: int,
    prefill_len: int,
    dtype=jnp.float32,
    moe_impl: str = "auto",
    rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
) -> ThinkerSteps:
    """Jitted thinker prefill/decode, sharded over `mesh` (None: single device). Caches are donated."""
    model = Thinker(config, dtype=dtype, param_dtype=dtype, moe_impl=moe_impl)
    prefill, decode = thinker_prefill_fn(model), thinker_decode_fn(model)
    if mesh is None:
        return ThinkerSteps(jax.jit(prefill, donate_argnums=(3,)), jax.jit(decode, donate_argnums=(3,)), None)
    lay = thinker_layout(config, mesh, batch, max_len, prefill_len, rules)
    return ThinkerSteps(
        sharded_jit(
            prefill, mesh, (lay.params, lay.tokens, lay.positions, lay.cache, lay.rows), (lay.logits, lay.cache), (3,), rules
        ),
        sharded_jit(decode, mesh, (lay.params, lay.step_tokens, lay.step_positions, lay.cache), (lay.logits, lay.cache), (3,), rules),
        lay,
    )


def abstract_thinker_args(
    config: OmniConfig, layout: ThinkerLayout, batch: int, max_len: int, prefill_len: int, dtype=jnp.bfloat16
) -> tuple[tuple, tuple]:
    """ShapeDtypeStructs (with shardings) for (prefill args, decode args); allocates nothing."""
    params = sharding.with_shardings(nn.unbox(boxed_abstract_params(config, dtype)), layout.params, dtype)
    cache = sharding.with_shardings(_cache_shapes(config, batch, max_len, dtype), layout.cache)
    i32 = jnp.int32
    sds = jax.ShapeDtypeStruct
    prefill = (
        params,
        sds((batch, prefill_len), i32, sharding=layout.tokens),
        sds((3, batch, prefill_len), i32, sharding=layout.positions),
        cache,
        sds((batch,), i32, sharding=layout.rows),
    )
    decode = (params, sds((batch, 1), i32, sharding=layout.step_tokens), sds((3, batch, 1), i32, sharding=layout.step_positions), cache)
    return prefill, decode


# ----------------------------------------------------------------------------- talker


def _row_axes(x: Any, batch: int) -> tuple | None:
    """Per-row state ([B, ...]) follows the batch; anything else (step counter, rng key) is replicated."""
    shape = getattr(x, "shape", ())
    if len(shape) >= 1 and shape[0] == batch:
        return ("batch",) + (None,) * (len(shape) - 1)
    return None


def state_shardings(state: Any, batch: int, mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> Any:
    """Shardings for a decode-state dataclass (engine.DecodeState, talker.TalkerState): its `cache` field by the
    cache axes, per-row fields ([B, ...]) by batch, the rest replicated."""
    axes = jax.tree_util.tree_map(lambda x: _row_axes(x, batch), state)
    if hasattr(state, "cache"):
        axes = axes.replace(cache=CACHE_TREE_AXES)
    return sharding.tree_shardings(state, axes, mesh, rules, type(state).__name__ + "/")


def talker_param_shardings(config: OmniConfig, mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES, dtype=jnp.float32) -> Any:
    from omni_jax import talker

    return sharding.param_shardings(talker.boxed_abstract_params(config, dtype), mesh, rules)


def abstract_talker_step_args(
    config: OmniConfig, mesh: Mesh, batch: int, max_len: int, trailing_len: int, dtype=jnp.bfloat16,
    rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES, sampling: Any = None,
) -> tuple:
    """ShapeDtypeStructs with shardings for talker_step(params, state, trailing); allocates nothing."""
    from omni_jax import talker

    sampling = talker.TalkerSampling.greedy() if sampling is None else sampling
    boxed = talker.boxed_abstract_params(config, dtype)
    params = sharding.with_shardings(nn.unbox(boxed), sharding.param_shardings(boxed, mesh, rules), dtype)
    t = config.talker.text
    sds = jax.ShapeDtypeStruct
    cache = KVCache.abstract(t.num_hidden_layers, batch, max_len, t.num_key_value_heads, t.head_dim, dtype)
    i32 = jnp.int32
    args = {
        "embeds": sds((batch, 1, t.hidden_size), dtype), "lengths": sds((batch,), i32),
        "positions": sds((3, batch, 1), i32), "rope_delta": sds((batch,), i32), "cache": cache,
        "penalty_from": sds((batch,), i32), "rng": jax.random.PRNGKey(0),
    }
    names = [n for n in inspect.signature(talker.talker_prefill).parameters if n not in ("model", "params", "sampling")]
    unknown = [n for n in names if n not in args]
    if unknown:
        raise TypeError(f"abstract_talker_step_args does not know talker_prefill's arguments {unknown}")
    state = jax.eval_shape(
        functools.partial(talker.talker_prefill, talker.Talker(config, dtype, dtype), sampling=sampling),
        nn.unbox(boxed), **{n: args[n] for n in names},
    )
    state = sharding.with_shardings(state, state_shardings(state, batch, mesh, rules))
    trailing = sds((batch, trailing_len, t.hidden_size), dtype,
                   sharding=NamedSharding(mesh, sharding.logical_spec(("batch", None, "embed"), (batch, trailing_len, t.hidden_size), mesh, rules)))
    return params, state, trailing
