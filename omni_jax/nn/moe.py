"""Sparse mixture-of-experts block: float32 router, top-k, stacked SiLU-gated experts.

The expert computation is a pure function of (tokens, routing, stacked weights) so the
expert-parallel path can wrap the same code in shard_map. Dispatch strategies, all exact (no
token dropping):
  * "gather":  one independent slice-and-matmul chain per (token, expert) copy, unrolled; decode on
               accelerators (few copies). Nothing bigger than one expert's matrices is materialised.
  * "grouped": sorts copies by expert and loops over the experts actually hit, reading each one's
               weights once and running its rows in fixed blocks (weights as the matmul's left
               operand); everything on CPU. Measured on CPU at the real widths (2048 hidden, 768 FFN,
               128 experts, top-8): 9 ms vs 10 ms (unrolled gather) vs 34 ms (gathering all k
               matrices at once) per layer at batch 1, 60 vs 92 ms at batch 8, and 0.57-0.59 s for a
               512-token prefill, where the one-batched-matmul-with-capacity layout took 0.83-1.3 s.
  * "split":   "grouped" over `split_experts` params (transposed arrays per expert, gate and up fused,
               lax.switch per block): what a single CPU device runs (see `split_experts` for why). Measured in one
               process on the bench checkpoint against "grouped": 1.23x for a 512-token prefill,
               1.17x / 1.25x for decode at batch 1 / 8.
  * "ragged":  sorts copies by expert and uses lax.ragged_dot; prefill on accelerators.
  * "dense":   runs every expert on every token and masks; only for tiny models
               (XLA:CPU lowers ragged_dot densely and slowly).
Which one runs is a `Dispatch` policy the model is built with (chosen per backend in one place,
omni_jax.runtime.layout); split params always run "split". Under a mesh (sharding.rules.use_mesh)
the same local code runs per expert shard inside shard_map: see `experts_parallel`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.config import DecoderConfig
from omni_jax.nn.mlp import GatedMLP
from omni_jax.sharding import rules

_INIT = nn.initializers.normal(0.02)


def route(x: jax.Array, router: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """x [N,H], router [H,E] -> (weights [N,k] in x.dtype, expert ids [N,k])."""
    logits = jnp.dot(x, router.astype(x.dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(x.dtype), ids


def _ffn(h_gate, h_up):
    return nn.silu(h_gate) * h_up


def _vary_like(x, w):
    """An exact scalar 0 that, inside shard_map, varies over the same mesh axes as the tokens and weights.

    Loop carries and cond branches must match the type of what the body computes from both; a zero
    selected from each has their axes without touching their values (NaN-safe, unlike 0 * w)."""
    return jnp.where(False, x[0, 0], 0) + jnp.where(False, w[0, 0, 0].astype(x.dtype), 0)


def experts_gather(x, weights, ids, wg, wu, wd, valid=None):
    """valid [N,k] (expert-parallel shards): copies routed to other shards are skipped (lax.cond)."""
    n, k = ids.shape
    zero = _vary_like(x, wd)
    rows = []
    for r in range(n):
        xr = x[r : r + 1]
        acc = jnp.zeros_like(xr)
        for j in range(k):
            e = ids[r, j]
            y = lambda xr=xr, e=e: _ffn(xr @ wg[e], xr @ wu[e]) @ wd[e]
            if valid is None:
                acc = acc + weights[r, j] * y()
            else:
                acc = acc + weights[r, j] * jax.lax.cond(valid[r, j], y, lambda xr=xr: jnp.zeros_like(xr) + zero)
        rows.append(acc)
    return jnp.concatenate(rows, axis=0)


def _sort_copies(x, ids, valid, num_experts):
    """Token copies sorted by expert: (order [N*k], rows x[order // k], counts [E]). Copies routed to other
    shards (valid=False) get the sentinel id E: they sort last and no expert counts them."""
    k = ids.shape[1]
    flat = (ids if valid is None else jnp.where(valid, ids, num_experts)).reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return order, x[order // k], jnp.bincount(flat, length=num_experts).astype(jnp.int32)


def _combine_sorted(y_sorted, order, weights, valid):
    """Undo `_sort_copies` on the per-copy outputs [N*k, H] and take the routing-weighted sum per token."""
    n, k = weights.shape
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(n, k, -1)
    if valid is not None:
        y = jnp.where(valid[..., None], y, 0)
    return jnp.einsum("nkh,nk->nh", y, weights)


def _grouped_loop(x, weights, ids, valid, num_experts: int, block: int | None, expert_fn, zero):
    """Sort copies by expert, loop over the hit experts in id order, run each one's rows in blocks.

    expert_fn(ex) -> (rows [b, H] -> [b, H]) is called once per expert (so a stacked layout slices its
    weights once per expert, not per block). A block may run past its expert's rows into the next
    expert's: those rows are rewritten when that expert runs (later, ids ascend), and the buffer has
    `block` spare rows at the end, so no masking is needed. Copies routed elsewhere (valid=False)
    sort last and are never computed.
    """
    p, h = ids.size, x.shape[1]
    if block is None:
        block = grouped_block(p, num_experts)
    order, xs, counts = _sort_copies(x, ids, valid, num_experts)
    starts = jnp.cumsum(counts) - counts
    xs = jnp.pad(xs, ((0, block), (0, 0)))
    hit = jnp.nonzero(counts > 0, size=min(num_experts, p), fill_value=0)[0]
    tail = max(1, block // 4)

    def expert(u, ys):
        ex = hit[u]
        ffn = expert_fn(ex)

        def rows(size, base):
            def run(b, ys):
                off = base + b * size
                y = ffn(jax.lax.dynamic_slice_in_dim(xs, off, size))
                return jax.lax.dynamic_update_slice_in_dim(ys, y.astype(ys.dtype), off, 0)
            return run

        # Full blocks, then the remainder in quarter blocks: less padding than rounding up to `block`.
        full = counts[ex] // block
        ys = jax.lax.fori_loop(0, full, rows(block, starts[ex]), ys)
        if tail == block:  # blocks of one row (decode): no remainder, and half the code to compile
            return ys
        rest = counts[ex] - full * block
        return jax.lax.fori_loop(0, (rest + tail - 1) // tail, rows(tail, starts[ex] + full * block), ys)

    ys = jax.lax.fori_loop(0, jnp.sum(counts > 0), expert, jnp.zeros((p + block, h), x.dtype) + zero)
    return _combine_sorted(ys[:p], order, weights, valid)


def experts_grouped(x, weights, ids, wg, wu, wd, valid=None, block: int | None = None):
    """Stacked weights, sliced once per hit expert (weights as the matmul's left operand)."""

    def expert_fn(ex):
        g_w, u_w, d_w = wg[ex], wu[ex], wd[ex]
        return lambda r: jnp.einsum(
            "ih,bi->bh", d_w, _ffn(jnp.einsum("hi,bh->bi", g_w, r), jnp.einsum("hi,bh->bi", u_w, r)))

    return _grouped_loop(x, weights, ids, valid, wg.shape[0], block, expert_fn, _vary_like(x, wd))


def experts_split(x, weights, ids, gate_ups, downs, block: int | None = None):
    """Per-expert weights from `split_experts` (gate and up fused [2I, H], down [H, I]), each its own buffer.

    Same loop as "grouped", but each block picks its expert's matmuls with lax.switch, so weights are
    read in place instead of sliced (copied) out of a stack."""

    def branch(gu, d):
        def ffn(r):
            a = jnp.einsum("bh,ih->bi", r, gu)
            i = a.shape[-1] // 2
            return jnp.einsum("bi,hi->bh", _ffn(a[:, :i], a[:, i:]), d)
        return ffn

    branches = [branch(*w) for w in zip(gate_ups, downs)]
    return _grouped_loop(x, weights, ids, None, len(branches), block,
                         lambda ex: functools.partial(jax.lax.switch, ex, branches), 0)


_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
_SPLIT_NAMES = ("gate_up_proj", "down_proj")  # the `split_experts` layout


def split_experts(mlp: Mapping[str, Any]) -> dict[str, Any]:
    """A SparseMoE's params with the stacked experts as arrays per expert, transposed to [out, in]:
    gate_up_proj (gate and up fused, [2I, H]) and down_proj ([H, I]).

    Why (single CPU device): XLA:CPU copies any slice of a stacked weight before a matmul, and its
    YNNPACK dots ran 12-27% faster with the weight's contracted dim last (from one row to 32-row
    blocks at the real widths). Fusing gate and up halves the dots per expert: the expert loop at the
    bench widths (128 experts, H 2048, I 768) ran 5.5 -> 4.8 ms for one decode token and 40 -> 36 ms for
    eight. Already-split (or dense-MLP) params are returned unchanged."""
    if not is_stacked_experts(mlp):
        return dict(mlp)
    return {**non_expert_params(mlp), **split_expert_weights(mlp)}


def split_expert_weights(mlp: Mapping[str, Any], layer: int | None = None) -> dict[str, tuple]:
    """Just the split entries (`split_experts`); layer: cut layer `layer` of a scanned stack
    ([layers, E, ...]) without copying the whole layer first."""
    layer = 0 if layer is None else layer
    return {"gate_up_proj": _unstack_gate_up(mlp["gate_proj"], mlp["up_proj"], layer),
            "down_proj": _unstack_t(mlp["down_proj"], layer)}


def is_stacked_experts(mlp: Mapping[str, Any], stacked_dims: int = 3) -> bool:
    w = mlp.get("gate_proj")
    return hasattr(w, "ndim") and w.ndim == stacked_dims


def non_expert_params(mlp: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mlp.items() if k not in _EXPERT_NAMES + _SPLIT_NAMES}


def _layer(w, layer):
    """w [E, a, b] or [layers, E, a, b] (then layer `layer`, traced: one compile per shape) -> [E, a, b]."""
    return jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False) if w.ndim == 4 else w


@jax.jit
def _unstack_t(w, layer):
    """-> E arrays [b, a] (see _layer)."""
    w = _layer(w, layer)
    return tuple(w[e].T for e in range(w.shape[0]))


@jax.jit
def _unstack_gate_up(wg, wu, layer):
    """gate, up [(layers,) E, H, I] -> E arrays [2I, H]: gate rows, then up rows."""
    wg, wu = _layer(wg, layer), _layer(wu, layer)
    return tuple(jnp.concatenate([wg[e].T, wu[e].T], axis=0) for e in range(wg.shape[0]))


def grouped_block(copies: int, num_experts: int) -> int:
    """Rows per matmul block: a power of two near twice the mean rows per expert, in [1, 64].

    Measured on CPU for 512 tokens, top-8 of 128 experts (mean 32 rows), with the quarter-block tail:
    blocks of 16, 32 and 64 rows within 4% of each other (0.57-0.59 s per layer), 128 slower (0.67 s)."""
    target = max(1, 2 * copies // num_experts)
    return min(64, 1 << (target.bit_length() - 1))


def experts_dense(x, weights, ids, wg, wu, wd):
    e = wg.shape[0]
    combine = jnp.sum(jax.nn.one_hot(ids, e, dtype=x.dtype) * weights[..., None], axis=1)  # [N,E]
    g = jnp.einsum("nh,ehi->nei", x, wg)
    u = jnp.einsum("nh,ehi->nei", x, wu)
    y = jnp.einsum("nei,eih->neh", _ffn(g, u), wd)
    return jnp.einsum("neh,ne->nh", y, combine)


def experts_ragged(x, weights, ids, wg, wu, wd, valid=None):
    """valid [N,k] (expert-parallel shards): copies routed to other shards sort last, outside every group."""
    order, xs, sizes = _sort_copies(x, ids, valid, wg.shape[0])
    g = jax.lax.ragged_dot(xs, wg, sizes)
    u = jax.lax.ragged_dot(xs, wu, sizes)
    return _combine_sorted(jax.lax.ragged_dot(_ffn(g, u), wd, sizes), order, weights, valid)


DISPATCH = {"gather": experts_gather, "grouped": experts_grouped, "dense": experts_dense, "ragged": experts_ragged}

#: Largest number of (token, expert) copies the unrolled "gather" dispatch takes (HLO size grows with it).
GATHER_MAX_COPIES = 64


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """Which expert computation runs over stacked experts: `few` for up to `max_few` (token, expert) copies
    (decode), `many` beyond (prefill). Static (hashable): each policy compiles its own program. The default
    is the accelerator policy; omni_jax.runtime.layout picks one per backend."""

    few: str = "gather"
    many: str = "ragged"
    max_few: int = GATHER_MAX_COPIES

    def __post_init__(self):
        for name in (self.few, self.many):
            if name not in DISPATCH:
                raise ValueError(f"unknown moe dispatch {name!r} for stacked experts; choose from {sorted(DISPATCH)}")

    @classmethod
    def always(cls, name: str) -> "Dispatch":
        return cls(name, name)

    def pick(self, copies: int) -> str:
        return self.few if copies <= self.max_few else self.many


# Logical axes of the stacked expert weights; the expert-parallel path derives its specs from these.
EXPERT_IN_AXES = ("experts", "embed", "expert_mlp")  # gate_proj / up_proj [E, H, I]
EXPERT_OUT_AXES = ("experts", "expert_mlp", "embed")  # down_proj [E, I, H]


def _local_experts(name, x, weights, ids, valid, wg, wu, wd):
    """One shard's experts on all its tokens; copies routed elsewhere (valid=False) contribute exactly 0."""
    if valid is None:
        return DISPATCH[name](x, weights, ids, wg, wu, wd)
    if name in ("ragged", "grouped", "gather"):
        return DISPATCH[name](x, weights, ids, wg, wu, wd, valid=valid)
    # Masked copies point at local expert 0 with weight 0: finite values times 0, so exact.
    return DISPATCH[name](x, jnp.where(valid, weights, 0), jnp.where(valid, ids, 0), wg, wu, wd)


def experts_parallel(x, weights, ids, wg, wu, wd, cfg: DecoderConfig, ctx: "rules.MeshRules", dispatch: Dispatch,
                     dtype):
    """Expert-parallel (and expert-FFN tensor-parallel) MoE over ctx.mesh with explicit collectives.

    Layout (from the rules table): expert weights are split over the `experts` mesh axes on E
    and over the `expert_mlp` axes on the FFN dim I; tokens and routing are split only like the
    batch (data axis) and replicated over the expert/tensor axes. Each shard runs its E/ep local
    experts (ids remapped to local, copies routed to other shards masked out) on the I/tp slice,
    giving a partial sum of the final output; one psum over (expert, tensor) combines them.
    Weights never move (no collective touches an expert weight); the single collective is an
    all-reduce of the [tokens, hidden] activations.

    Why replicated tokens + psum rather than all-to-all, for prefill too: attention here is split
    over heads (tensor axis) and replicated over the expert axis, so every expert shard already
    holds every token and dispatch is a local mask, with no communication and no capacity limit
    (exact, no token dropping, static shapes). Combine is one all-reduce of [N, H]: ~2*N*H bytes
    per device (ring). An all-to-all pays off only with the batch split over the expert axis
    (data-parallel attention): with the thinker's top-8 of 128 experts on ep=8 shards a token
    reaches ~5.3 shards (~4.6 off-device), so dispatch + combine move ~9.2*N*H/ep ~ 1.15*N*H bytes
    per device, ~40% less, but need worst-case buffers (N/ep*k rows per shard) to stay exact and a
    second layout for attention. Decode (a few tokens) is latency-bound: one collective is best.
    """
    up = ctx.spec(EXPERT_IN_AXES, wg.shape, "moe/expert_in_proj")
    down = ctx.spec(EXPERT_OUT_AXES, wd.shape, "moe/expert_out_proj")
    tok = ctx.spec(rules.TOKEN_AXES, x.shape, "moe/tokens")
    route_spec = ctx.spec(rules.ROUTING_AXES, ids.shape, "moe/routing")
    e_axes, t_axes = rules.spec_mesh_axes(up, 0), rules.spec_mesh_axes(up, 2)
    if (e_axes, t_axes) != (rules.spec_mesh_axes(down, 0), rules.spec_mesh_axes(down, 1)):
        raise ValueError(f"expert in/out projections shard differently: {up} vs {down}")
    size = lambda axes: math.prod(ctx.mesh.shape[a] for a in axes)
    e_local = wg.shape[0] // size(e_axes)
    n_local = x.shape[0] // size(rules.spec_mesh_axes(tok, 0))
    name = dispatch.pick(n_local * cfg.num_experts_per_tok)
    reduce_axes = e_axes + t_axes

    def body(x, weights, ids, wg, wu, wd):
        wg, wu, wd = (w.astype(dtype) for w in (wg, wu, wd))
        valid = None
        if e_axes:
            shard = jax.lax.axis_index(e_axes[0] if len(e_axes) == 1 else e_axes)
            ids = ids - shard * e_local
            valid = (ids >= 0) & (ids < e_local)
        y = _local_experts(name, x, weights, ids, valid, wg, wu, wd)
        return jax.lax.psum(y, reduce_axes) if reduce_axes else y

    return jax.shard_map(
        body, mesh=ctx.mesh, in_specs=(tok, route_spec, route_spec, up, up, down), out_specs=tok
    )(x, weights, ids, wg, wu, wd)


class SparseMoE(nn.Module):
    """Router + experts (+ shared expert). The params say the layout: stacked experts (the checkpoint's) run
    `dispatch`; `split_experts` params run "split"."""

    cfg: DecoderConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dispatch: Dispatch = Dispatch()
    out_in: bool = False  # the shared expert's kernels in omni_jax.nn.linear's [out, in] layout (unrolled layers)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, t, h = x.shape
        e, i = cfg.num_experts, cfg.moe_intermediate_size
        p = lambda name, shape, axes: self.param(name, nn.with_logical_partitioning(_INIT, axes), shape, self.param_dtype)
        router = p("router", (h, e), ("embed", "router"))
        flat = x.reshape(-1, h)
        weights, ids = route(flat, router, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        ctx = rules.current()
        if self.has_variable("params", "gate_up_proj"):  # `split_experts` layout (single CPU device)
            if ctx is not None and not ctx.is_trivial:
                raise ValueError("split expert params (omni_jax.nn.moe.split_experts) run on one device only; "
                                 "pass the checkpoint's stacked experts when running under a mesh")
            ws = [tuple(w.astype(self.dtype) for w in self.get_variable("params", n)) for n in _SPLIT_NAMES]
            out = experts_split(flat, weights, ids, *ws)
        else:
            wg = p("gate_proj", (e, h, i), EXPERT_IN_AXES)
            wu = p("up_proj", (e, h, i), EXPERT_IN_AXES)
            wd = p("down_proj", (e, i, h), EXPERT_OUT_AXES)
            if ctx is not None and not ctx.is_trivial:
                out = experts_parallel(flat, weights, ids, wg, wu, wd, cfg, ctx, self.dispatch, self.dtype)
            else:
                fn = DISPATCH[self.dispatch.pick(flat.shape[0] * cfg.num_experts_per_tok)]
                out = fn(flat, weights, ids, wg.astype(self.dtype), wu.astype(self.dtype), wd.astype(self.dtype))
        if cfg.shared_expert_intermediate_size > 0:
            shared = GatedMLP(cfg.shared_expert_intermediate_size, self.dtype, self.param_dtype, self.out_in,
                              name="shared_expert")(flat)
            gate = nn.Dense(
                1, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(_INIT, ("embed", None)), name="shared_expert_gate",
            )(flat)
            out = out + nn.sigmoid(gate) * shared
        return out.reshape(b, t, h).astype(x.dtype)
