"""Sparse mixture-of-experts block: float32 router, top-k, stacked SiLU-gated experts.

The expert computation is a pure function of (tokens, routing, stacked weights) so the
expert-parallel path can wrap the same code in shard_map. Three dispatch strategies, all
exact (no token dropping):
  * "gather": gathers each token's k expert matrices; best for decode (few tokens).
  * "ragged": sorts token copies by expert and uses lax.ragged_dot; best for prefill on accelerators.
  * "dense":  runs every expert on every token and masks; only for tiny models / CPU prefill
              (XLA:CPU lowers ragged_dot densely and slowly).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.config import DecoderConfig
from omni_jax.mlp import GatedMLP

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


def experts_gather(x, weights, ids, wg, wu, wd):
    g = jnp.einsum("nh,nkhi->nki", x, wg[ids])
    u = jnp.einsum("nh,nkhi->nki", x, wu[ids])
    y = jnp.einsum("nki,nkih->nkh", _ffn(g, u), wd[ids])
    return jnp.einsum("nkh,nk->nh", y, weights)


def experts_dense(x, weights, ids, wg, wu, wd):
    e = wg.shape[0]
    combine = jnp.sum(jax.nn.one_hot(ids, e, dtype=x.dtype) * weights[..., None], axis=1)  # [N,E]
    g = jnp.einsum("nh,ehi->nei", x, wg)
    u = jnp.einsum("nh,ehi->nei", x, wu)
    y = jnp.einsum("nei,eih->neh", _ffn(g, u), wd)
    return jnp.einsum("neh,ne->nh", y, combine)


def experts_ragged(x, weights, ids, wg, wu, wd):
    n, k = ids.shape
    e = wg.shape[0]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    xs = x[order // k]
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    g = jax.lax.ragged_dot(xs, wg, sizes)
    u = jax.lax.ragged_dot(xs, wu, sizes)
    y = jax.lax.ragged_dot(_ffn(g, u), wd, sizes)
    y = jnp.zeros_like(y).at[order].set(y).reshape(n, k, -1)
    return jnp.einsum("nkh,nk->nh", y, weights)


DISPATCH = {"gather": experts_gather, "dense": experts_dense, "ragged": experts_ragged}


def pick_dispatch(num_tokens: int, cfg: DecoderConfig, impl: str = "auto") -> str:
    if impl != "auto":
        if impl not in DISPATCH:
            raise ValueError(f"unknown moe dispatch {impl!r}; choose from {sorted(DISPATCH)} or 'auto'")
        return impl
    if num_tokens * cfg.num_experts_per_tok <= 2 * cfg.num_experts:
        return "gather"
    if jax.default_backend() == "cpu":
        return "dense" if num_tokens * cfg.num_experts_per_tok * 4 >= num_tokens * cfg.num_experts else "gather"
    return "ragged"


class SparseMoE(nn.Module):
    cfg: DecoderConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, t, h = x.shape
        e, i = cfg.num_experts, cfg.moe_intermediate_size
        p = lambda name, shape, axes: self.param(name, nn.with_logical_partitioning(_INIT, axes), shape, self.param_dtype)
        router = p("router", (h, e), ("embed", "router"))
        wg = p("gate_proj", (e, h, i), ("experts", "embed", "expert_mlp"))
        wu = p("up_proj", (e, h, i), ("experts", "embed", "expert_mlp"))
        wd = p("down_proj", (e, i, h), ("experts", "expert_mlp", "embed"))
        flat = x.reshape(-1, h)
        weights, ids = route(flat, router, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        fn = DISPATCH[pick_dispatch(flat.shape[0], cfg, self.impl)]
        out = fn(flat, weights, ids, wg.astype(self.dtype), wu.astype(self.dtype), wd.astype(self.dtype))
        if cfg.shared_expert_intermediate_size > 0:
            shared = GatedMLP(cfg.shared_expert_intermediate_size, self.dtype, self.param_dtype, name="shared_expert")(flat)
            gate = nn.Dense(
                1, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(_INIT, ("embed", None)), name="shared_expert_gate",
            )(flat)
            out = out + nn.sigmoid(gate) * shared
        return out.reshape(b, t, h).astype(x.dtype)
