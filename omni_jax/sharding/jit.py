"""The sharded jit: one primitive every compiled step goes through, and the shardings of step states.

`sharded_jit` is jax.jit whose trace runs under `rules.use_mesh`, so model code sees the mesh
(activation constraints, the expert-parallel MoE) while the compiled function takes and returns
arrays laid out by the rules table. With mesh=None it is a plain single-device jit of the same
function. Nothing here knows a model: engines pass their own step functions and states.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh

from omni_jax.sharding import rules
from omni_jax.sharding.rules import DEFAULT_RULES, MeshAxes


def sharded_jit(
    fn: Callable,
    mesh: Mesh | None,
    in_shardings: Any = None,
    out_shardings: Any = None,
    donate_argnums: Sequence[int] = (),
    rules_table: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
    **jit_kwargs: Any,
) -> Callable:
    """jax.jit(fn, ...) traced under rules.use_mesh(mesh, rules_table); mesh=None: a plain jit.

    A drop-in for jax.jit (extra kwargs such as static_argnames pass through). in/out_shardings
    left None are inferred: inputs keep the shardings they arrive with (params placed with
    `rules.place`), outputs get what GSPMD propagates (the KV cache is pinned by the model).
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
        with rules.use_mesh(mesh, rules_table):
            return fn(*args, **kwargs)

    return jax.jit(traced, **jit_kwargs)


def _row_axes(x: Any, batch: int) -> tuple | None:
    """Per-row state ([B, ...]) follows the batch; anything else (step counter, rng key) is replicated."""
    shape = getattr(x, "shape", ())
    if len(shape) >= 1 and shape[0] == batch:
        return ("batch",) + (None,) * (len(shape) - 1)
    return None


def state_shardings(state: Any, batch: int, mesh: Mesh,
                    rules_table: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> Any:
    """Shardings of a step-state dataclass (thinker DecodeState / PromptState, TalkerState, a KVCache).

    A field whose value names its own logical axes (`logical_axes()`, e.g. a KVCache) is laid out by
    them; other per-row fields ([B, ...]) follow the batch; the rest is replicated."""
    if hasattr(state, "logical_axes"):
        axes = state.logical_axes()
    else:
        axes = jax.tree_util.tree_map(lambda x: _row_axes(x, batch), state)
        own = {f: getattr(state, f).logical_axes() for f in getattr(state, "__dataclass_fields__", {})
               if hasattr(getattr(state, f), "logical_axes")}
        if own:
            axes = axes.replace(**own)
    return rules.tree_shardings(state, axes, mesh, rules_table, type(state).__name__ + "/")

