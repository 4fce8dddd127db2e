"""Logical axis names and the one table mapping them to mesh axes.

Model code only names logical axes (on params via nn.with_logical_partitioning, on
activations via `constrain`, on the KV cache via kv_cache.CACHE_AXES). Which mesh axis
shards what is decided here and nowhere else: params, activations and caches all get their
PartitionSpecs from `DEFAULT_RULES` through `logical_spec`.

A dimension that a mesh axis does not divide (the talker's 2 KV heads under tp4) is
replicated instead of failing; this is logged once per (name, dim).

The mesh is made known to model code by `use_mesh(mesh)`, entered by the sharded step
wrapper (omni_jax.sharding.jit.sharded_jit) *inside* the traced function, so a jitted function's trace
always sees the same mesh. Outside it, `current()` is None and everything runs unsharded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omni_jax.sharding.mesh import DATA, EXPERT, TENSOR

MeshAxes = str | tuple[str, ...] | None

# Logical axis -> mesh axis (or None for replicated). Order matters only for duplicates.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", DATA),
    ("cache_batch", DATA),
    ("length", None),
    ("cache_length", None),
    ("layers", None),
    ("embed", None),
    ("norm", None),
    ("vocab", TENSOR),
    ("heads", TENSOR),
    ("kv_heads", TENSOR),
    ("cache_kv_heads", TENSOR),
    ("head_dim", None),
    ("mlp", TENSOR),
    ("experts", EXPERT),
    ("expert_mlp", TENSOR),
    ("router", None),
    ("codebooks", None),
    ("conv_in", None),
    ("conv_out", None),
    ("kernel", None),
    ("channels", None),
    # The audio encoder runs replicated, one request's clips per call (omni_jax.runtime.audio_encoder).
    ("audio_embed", None),
    ("audio_mlp", None),
    ("audio_conv", None),
    # So does the vision encoder (omni_jax.runtime.vision_encoder): one request's images/videos per call.
    ("vision_embed", None),
    ("vision_mlp", None),
    ("vision_qkv", None),
    ("vision_merge", None),
    ("vision_patch", None),
    ("vision_pos", None),
)

# Logical axes of a flattened token stream [tokens, hidden] (the MoE's input): tokens follow the batch.
TOKEN_AXES = ("batch", "embed")
# Logical axes of the routing tensors [tokens, top_k].
ROUTING_AXES = ("batch", None)

_logged: set[tuple] = set()


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
    name: str = "",
) -> PartitionSpec:
    """PartitionSpec for an array with logical `axes` and `shape` on `mesh`.

    Each logical name takes the first rule whose mesh axes are in the mesh and not yet used
    by another dimension (as flax does). Mesh axes of size 1 are dropped. If the mesh axes do
    not divide the dimension, the longest dividing prefix of them is used (usually none:
    replicated) and this is logged once per (name, dim).
    """
    if len(axes) != len(shape):
        raise ValueError(f"{name or 'array'}: {len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
    used: set[str] = set()
    out: list[MeshAxes] = []
    for dim, (logical, size) in enumerate(zip(axes, shape)):
        chosen: tuple[str, ...] = ()
        if logical is not None:
            for rule_name, mesh_axes in rules:
                if rule_name != logical:
                    continue
                cand = tuple(a for a in _as_tuple(mesh_axes) if a in mesh.shape)
                if used.intersection(cand):
                    continue
                chosen = tuple(a for a in cand if mesh.shape[a] > 1)
                break
        fitted = chosen
        while fitted and size % math.prod(mesh.shape[a] for a in fitted) != 0:
            fitted = fitted[:-1]
        if fitted != chosen:
            key = (name or tuple(axes), dim)
            if key not in _logged:
                _logged.add(key)
                logging.warning(
                    "sharding: %s dim %d (%s, size %d) is not divisible by mesh axes %s (size %d); %s",
                    name or f"array with axes {tuple(axes)}", dim, logical, size, chosen,
                    math.prod(mesh.shape[a] for a in chosen),
                    f"sharding it over {fitted} only" if fitted else "replicating it",
                )
        used.update(fitted)
        out.append(None if not fitted else fitted[0] if len(fitted) == 1 else fitted)
    return PartitionSpec(*out)


def spec_mesh_axes(spec: PartitionSpec, dim: int) -> tuple[str, ...]:
    """Mesh axes sharding dimension `dim` of `spec` (empty when replicated)."""
    return _as_tuple(spec[dim]) if dim < len(spec) else ()


@dataclasses.dataclass(frozen=True)
class MeshRules:
    """A mesh plus the logical->mesh rules in force; what sharding-aware model code reads."""

    mesh: Mesh
    rules: tuple[tuple[str, MeshAxes], ...] = DEFAULT_RULES

    def spec(self, axes: Sequence[str | None], shape: Sequence[int], name: str = "") -> PartitionSpec:
        return logical_spec(axes, shape, self.mesh, self.rules, name)

    def sharding(self, axes: Sequence[str | None], shape: Sequence[int], name: str = "") -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape, name))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def is_trivial(self) -> bool:
        return self.mesh.size == 1


_ctx = threading.local()


def current() -> MeshRules | None:
    """The MeshRules entered with `use_mesh` on this thread, or None (single-device semantics)."""
    return getattr(_ctx, "value", None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> Iterator[MeshRules | None]:
    """Make `mesh` and `rules` visible to model code traced inside this block (None: unsharded)."""
    old = current()
    _ctx.value = None if mesh is None else MeshRules(mesh, tuple(rules))
    try:
        yield _ctx.value
    finally:
        _ctx.value = old


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding hint for an activation; a no-op outside a mesh / rules context."""
    ctx = current()
    if ctx is None:
        # Backward compatible: honours flax's own nn.logical_axis_rules context if a caller set one.
        return nn.with_logical_constraint(x, tuple(axes))
    if ctx.is_trivial:
        return x
    return jax.lax.with_sharding_constraint(x, ctx.sharding(axes, x.shape, name=f"activation{tuple(axes)}"))


# ----------------------------------------------------------------------------- param / state trees


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def logical_axes(boxed_tree: Any) -> Any:
    """Tree of logical-axis tuples (None for unannotated leaves), shaped like nn.unbox(boxed_tree)."""
    return jax.tree_util.tree_map(
        lambda x: tuple(x.names) if _is_box(x) else None, boxed_tree, is_leaf=_is_box
    )


def param_shardings(
    boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES
) -> Any:
    """NamedShardings for a boxed (abstract or concrete) param tree from nn.with_logical_partitioning.

    Unannotated leaves are replicated. The result has the structure of nn.unbox(boxed_tree).
    """

    def one(path, x):
        if _is_box(x):
            return NamedSharding(mesh, logical_spec(x.names, x.value.shape, mesh, rules, _path_str(path)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, boxed_tree, is_leaf=_is_box)


def tree_shardings(
    tree: Any, axes_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES, prefix: str = ""
) -> Any:
    """NamedShardings for arrays / ShapeDtypeStructs `tree` given a matching tree of logical-axis tuples."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    axes = treedef.flatten_up_to(axes_tree)
    out = []
    for (path, x), ax in zip(leaves, axes):
        if ax is None:
            out.append(NamedSharding(mesh, PartitionSpec()))
        else:
            out.append(NamedSharding(mesh, logical_spec(ax, x.shape, mesh, rules, prefix + _path_str(path))))
    return jax.tree_util.tree_unflatten(treedef, out)


def with_shardings(abstract_tree: Any, shardings: Any, dtype: Any = None) -> Any:
    """ShapeDtypeStructs carrying shardings (optionally recast), for ahead-of-time lowering."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(
            x.shape, dtype if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sharding=s
        ),
        abstract_tree,
        shardings,
    )


def place(tree: Any, shardings: Any) -> Any:
    """Put host/device arrays onto their shardings; works across processes when every process holds the full value."""

    def one(x, s):
        if isinstance(x, jax.Array):
            if x.sharding.is_equivalent_to(s, x.ndim):
                return x
            if x.is_fully_addressable and s.is_fully_addressable:
                return jax.device_put(x, s)
            if not x.is_fully_addressable:  # a global array: reshard on device
                return jax.jit(lambda a: a, out_shardings=s)(x)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree_util.tree_map(one, tree, shardings)


def describe(shardings: Any) -> Mapping[str, str]:
    """{path: 'PartitionSpec(...)'} for logs and tests."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(shardings)
    return {_path_str(p): str(s.spec) for p, s in leaves}
