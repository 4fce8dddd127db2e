"""Pre-norm transformer decoder stack shared by the thinker, the talker and the code predictor.

Layers are grouped into *segments* of identical structure (dense vs sparse MLP) and each
segment is one `nn.scan`, so compile time does not grow with depth. A segment also ends at
every "tap" layer whose output the caller needs (the talker reads the thinker's
`accept_hidden_layer`), so taps cost nothing extra.

The params say which layout runs. The checkpoint's is scanned; `unstack_layers` turns it into the
unrolled one, where every layer has its own module and params (`layer_<i>`). XLA:CPU cannot read a
slice of a stacked weight in place: every layer's weights are copied out of the stack before each
matmul, at every decode step, which measured 2-3x slower than separate arrays for matrix-vector
products. Unrolled layers also store their projection kernels [out, in] (`omni_jax.nn.linear`: why),
so the unrolled layout always means both. Which layout a run uses is decided once, at load time, by
omni_jax.runtime.layout (a single CPU device unrolls; meshes and accelerators keep the scan).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, MutableMapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from omni_jax.config import DecoderConfig
from omni_jax.nn import attention, linear, mlp, moe
from omni_jax.nn.attention import Attention
from omni_jax.nn.mlp import GatedMLP
from omni_jax.nn.moe import Dispatch, SparseMoE
from omni_jax.nn.norm import RMSNorm
from omni_jax.nn.rope import rope_cos_sin
from omni_jax.sharding.rules import constrain


@dataclasses.dataclass(frozen=True)
class Segment:
    start: int
    count: int
    sparse: bool

    @property
    def name(self) -> str:
        return f"layers_{self.start}"


def segments(cfg: DecoderConfig, taps: Sequence[int] = ()) -> tuple[Segment, ...]:
    """Split layers into runs of equal structure, also cutting after each tap (a count of layers run)."""
    out: list[Segment] = []
    start = 0
    for layer in range(1, cfg.num_hidden_layers + 1):
        end_here = (
            layer == cfg.num_hidden_layers
            or layer in taps
            or cfg.is_sparse(layer) != cfg.is_sparse(start)
        )
        if end_here:
            out.append(Segment(start, layer - start, cfg.is_sparse(start)))
            start = layer
    return tuple(out)


def segment_of(layer: int, segs: Sequence[Segment]) -> tuple[Segment, int]:
    for seg in segs:
        if seg.start <= layer < seg.start + seg.count:
            return seg, layer - seg.start
    raise IndexError(f"layer {layer} outside the stack")


class DecoderLayer(nn.Module):
    cfg: DecoderConfig
    sparse: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dispatch: Dispatch = Dispatch()
    sliding_window: int | None = None
    fresh_cache: bool = False  # see Attention
    out_in: bool = False  # projection kernels in omni_jax.nn.linear's [out, in] layout (unrolled layers)

    @nn.compact
    def __call__(self, carry, cos, sin, start, additions=None):
        x, cache_k, cache_v, layer = carry
        cfg = self.cfg
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="input_layernorm")(x)
        attn, cache_k, cache_v = Attention(
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps,
            cfg.use_qk_norm, cfg.attention_bias, self.sliding_window, self.dtype, self.param_dtype,
            fresh_cache=self.fresh_cache, out_in=self.out_in, name="self_attn",
        )(h, cos, sin, cache_k, cache_v, layer, start)
        x = x + attn
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")(x)
        if self.sparse:
            h = SparseMoE(cfg, self.dtype, self.param_dtype, self.dispatch, self.out_in, name="mlp")(h)
        else:
            h = GatedMLP(cfg.intermediate_size, self.dtype, self.param_dtype, self.out_in, name="mlp")(h)
        x = x + h
        if additions is not None:
            # Deepstack: layer l's output gains additions[l] for l < len(additions) (zeros off the vision rows).
            levels = additions.shape[0]
            x = x + jnp.where(layer < levels, additions[jnp.minimum(layer, levels - 1)], 0).astype(x.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        return (x, cache_k, cache_v, layer + 1), None


class DecoderStack(nn.Module):
    """Runs all layers over a static KV cache; returns the final hidden states (pre-norm) and taps.

    Scanned or unrolled as its params are (module docstring); init makes the scanned (checkpoint) layout."""

    cfg: DecoderConfig
    taps: tuple[int, ...] = ()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dispatch: Dispatch = Dispatch()
    fresh_cache: bool = False  # every row starts at cache row 0 with nothing before it (see Attention)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache_k: jax.Array,
        cache_v: jax.Array,
        start: jax.Array,
        additions: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[int, jax.Array], jax.Array, jax.Array]:
        """additions [L, B, T, H] (optional): added to the outputs of layers 0..L-1 (the thinker's deepstack)."""
        cfg = self.cfg
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, cfg.mrope_interleaved)
        taps: dict[int, jax.Array] = {}
        if 0 in self.taps:
            taps[0] = x
        carry = (x, cache_k, cache_v, jnp.zeros((), jnp.int32))
        unrolled = self.has_variable("params", layer_name(0))
        for seg in segments(cfg, self.taps):
            args = (cfg, seg.sparse, self.dtype, self.param_dtype, self.dispatch)
            if unrolled:
                for i in range(seg.start, seg.start + seg.count):
                    carry, _ = DecoderLayer(*args, fresh_cache=self.fresh_cache, out_in=True, name=layer_name(i))(
                        carry, cos, sin, start, additions)
            else:
                layers = scan_layers(DecoderLayer, seg.count, broadcasts=4)(
                    *args, fresh_cache=self.fresh_cache, name=seg.name)
                carry, _ = layers(carry, cos, sin, start, additions)
            end = seg.start + seg.count
            if end in self.taps:
                taps[end] = carry[0]
        x, cache_k, cache_v, _ = carry
        return x, taps, cache_k, cache_v


def scan_layers(layer: type[nn.Module], length: int, broadcasts: int = 3):
    """`layer` scanned `length` times over its carry: params stacked on a leading "layers" axis (the rules
    table's name for it), a streaming "cache" (Code2Wav's) on axis 1 so that batch stays leading, its
    `broadcasts` other call arguments shared by every step."""
    return nn.scan(
        layer,
        variable_axes={"params": 0, "cache": 1},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * broadcasts,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def layer_name(i: int) -> str:
    """Param name of layer i in an unrolled DecoderStack."""
    return f"layer_{i}"


def unstack_layers(stack: MutableMapping[str, Any], cfg: DecoderConfig, taps: Sequence[int] = (),
                   split_experts: bool = False, consume: bool = False) -> dict[str, Any]:
    """Scanned DecoderStack params ({segment: leaves [count, ...]}) -> unrolled ({layer_<i>: leaves}).

    Projection kernels are transposed to `Linear(out_in=True)`'s layout. split_experts: also give every
    MoE expert its own (transposed) arrays, `moe.split_experts`, cut straight from the stack. consume:
    pop each segment from `stack` once converted, so (when nothing else holds it) its memory is freed
    before the next one is copied: the peak is one segment above the params, not twice the params. Already-unrolled params are returned unchanged (their experts split
    if asked), so callers may pass either layout."""
    split = moe.split_experts if split_experts else dict
    if layer_name(0) in stack:
        return {name: {**layer, "mlp": split(layer["mlp"])} for name, layer in stack.items()}
    out: dict[str, Any] = {}
    for seg in segments(cfg, taps):
        tree = stack.pop(seg.name) if consume else stack[seg.name]
        for j in range(seg.count):
            if split_experts and moe.is_stacked_experts(tree["mlp"], stacked_dims=4):
                layer = jax.tree.map(lambda a, j=j: a[j], {**tree, "mlp": moe.non_expert_params(tree["mlp"])})
                layer["mlp"].update(moe.split_expert_weights(tree["mlp"], layer=j))
            else:
                layer = jax.tree.map(lambda a, j=j: a[j], tree)
            out[layer_name(seg.start + j)] = _kernels_out_in(layer)
        del tree
    return out


def _kernels_out_in(layer: dict[str, Any]) -> dict[str, Any]:
    """One layer's attention and dense-MLP (or shared-expert) kernels in the [out, in] layout."""
    def convert(module: Mapping[str, Any], in_axes: Mapping[str, int]) -> dict[str, Any]:
        return {k: ({**v, "kernel": linear.out_in(v["kernel"], in_axes[k])} if k in in_axes else v)
                for k, v in module.items()}

    ffn = layer["mlp"]
    if "router" in ffn:  # sparse: only the shared expert is a GatedMLP
        if "shared_expert" in ffn:
            ffn = {**ffn, "shared_expert": convert(ffn["shared_expert"], mlp.KERNEL_IN_AXES)}
    else:
        ffn = convert(ffn, mlp.KERNEL_IN_AXES)
    return {**layer, "self_attn": convert(layer["self_attn"], attention.KERNEL_IN_AXES), "mlp": ffn}
