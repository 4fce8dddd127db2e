"""Orbax checkpoints of omni_jax params: on-disk layout, writer and (sharded) loader.

Layout of a checkpoint dir:

    omni_jax_checkpoint.json   leaf layout + completion marker (written last; the loader requires it)
    config.json, tokenizer.json, vocab.json, merges.txt, ...   copied from the HF dir
    params/<item>/             one standard Orbax checkpoint (StandardCheckpointer) per item

Why items: a scanned leaf of the real model is far bigger than host RAM allows to build at once
(thinker expert gate_proj stacked over 24 layers is ~9.7 GB bf16), so the converter never
builds stacked arrays. Each HF decoder layer becomes one item (e.g. `params/thinker.model.layers.7`)
holding that layer's slice of every stacked leaf, nested by param path; leaves that are not
per-layer (embeddings, heads, the vocoder's non-transformer parts) go whole into one item per
component (`params/thinker`, `params/talker`, `params/code2wav`). `omni_jax_checkpoint.json` maps
every param path to its item (or, for split leaves, to the ordered items of its slices). Every
item restores on its own with `ocp.StandardCheckpointer().restore(dir/params/<item>)`.

The loader restores item by item with Orbax straight into the target shardings (each device reads
only its shard) and writes split slices into a preallocated stacked buffer with a donated
dynamic_update_slice, so peak memory is the final params plus one layer.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from omni_jax import convert
from omni_jax.errors import OmniError

Path = tuple[str, ...]
LAYOUT_FILE = "omni_jax_checkpoint.json"
PARAMS_DIR = "params"
FORMAT = "omni_jax.checkpoint/1"


class CheckpointError(OmniError, ValueError):
    """A checkpoint dir does not hold what the model needs."""


class IncompleteCheckpointError(CheckpointError):
    """The dir lacks the completion marker or an item: not a checkpoint, or its writing did not finish."""


# ---- trees ----

def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """Nested mapping -> {path tuple: leaf}."""
    out: dict[Path, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = leaf
    return out


def _pstr(path: Path) -> str:
    return "/".join(path)


# ---- abstract params ----

def default_roots(config) -> tuple[str, ...]:
    """Components a model needs: the thinker, plus talker and code2wav when it speaks."""
    return ("thinker", "talker", "code2wav") if config.enable_audio_output else ("thinker",)


def boxed_abstract_params(config, dtype=jnp.float32, roots: Iterable[str] | None = None) -> dict:
    """{root: boxed abstract params of that component} (logical-axis boxes kept); allocates nothing."""
    roots = default_roots(config) if roots is None else tuple(roots)
    return {root: _component_abstract(config, jnp.dtype(dtype), root) for root in roots}


@functools.lru_cache(maxsize=32)
def _component_abstract(config, dtype, root: str):
    # Cached: tracing a model's init costs seconds and converter + loader both need it.
    mod = convert.component_module(root)
    if mod is None:
        raise CheckpointError(f"component {root!r} is needed but omni_jax.{root} is not available")
    return mod.boxed_abstract_params(config, dtype)


def abstract_params(config, dtype=jnp.float32, roots: Iterable[str] | None = None) -> dict:
    """{root: jax.ShapeDtypeStruct tree} — the exact tree load_params returns."""
    return nn.unbox(boxed_abstract_params(config, dtype, roots))


# ---- writing ----

def partial_dir(out_dir: str) -> str:
    return os.path.normpath(out_dir) + ".partial"


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse to write over a non-empty dir unless `overwrite`; even then only over an omni_jax checkpoint."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if not os.listdir(out_dir):
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to replace it")
    if not os.path.exists(os.path.join(out_dir, LAYOUT_FILE)):
        raise FileExistsError(
            f"{out_dir} is not empty and is not an omni_jax checkpoint (no {LAYOUT_FILE}); refusing to delete it even "
            "with overwrite — remove it yourself"
        )


def finalize_dir(tmp: str, out_dir: str) -> None:
    """Move the finished `tmp` into place (replacing an existing out_dir already cleared by check_out_dir)."""
    out_dir = os.path.normpath(out_dir)
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)


class ItemWriter:
    """Saves one item (a nested dict of numpy / jax arrays) synchronously with Orbax."""

    def __init__(self):
        import orbax.checkpoint as ocp

        self._ckptr = ocp.StandardCheckpointer()

    def save(self, path: str, tree: Mapping[str, Any]) -> None:
        self._ckptr.save(os.path.abspath(path), tree)
        self._ckptr.wait_until_finished()

    def close(self) -> None:
        self._ckptr.close()


def write_layout(directory: str, leaves: Mapping[Path, Mapping[str, Any]], meta: Mapping[str, Any] | None = None) -> None:
    """Write the leaf layout + completion marker (the last file written)."""
    items = sorted({s["item"] for s in leaves.values() if "item" in s} | {i for s in leaves.values() for i in s.get("slices", ())})
    doc = {"format": FORMAT, **(dict(meta) if meta else {}), "items": items,
           "leaves": {_pstr(p): dict(s) for p, s in sorted(leaves.items())}}
    path = os.path.join(directory, LAYOUT_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".tmp", path)


def read_layout(directory: str) -> dict:
    """The layout document; IncompleteCheckpointError if the marker or an item dir is missing."""
    path = os.path.join(directory, LAYOUT_FILE)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint dir {directory} does not exist")
    if not os.path.exists(path):
        hint = " (an interrupted conversion leaves a '.partial' dir without it)" if directory.rstrip("/").endswith(".partial") else ""
        raise IncompleteCheckpointError(
            f"{directory} has no {LAYOUT_FILE}: not an omni_jax checkpoint, or its writing did not finish{hint}"
        )
    with open(path) as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    for item in doc["items"]:
        if not os.path.isdir(os.path.join(directory, PARAMS_DIR, item)):
            raise IncompleteCheckpointError(f"{directory}: item {PARAMS_DIR}/{item} listed in {LAYOUT_FILE} is missing")
    doc["leaves"] = {tuple(k.split("/")): v for k, v in doc["leaves"].items()}
    return doc


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def save_params(params: Mapping[str, Any], out_dir: str, config=None, *, overwrite: bool = False) -> str:
    """Save an in-memory {root: params} tree (numpy or jax arrays, boxed or not) as a loadable checkpoint.

    Each root is one item holding whole leaves; `config` (an OmniConfig) is written as config.json.
    """
    params = nn.unbox(params)
    check_out_dir(out_dir, overwrite)
    tmp = partial_dir(out_dir)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(os.path.join(tmp, PARAMS_DIR))
    try:
        writer = ItemWriter()
        leaves: dict[Path, dict] = {}
        for root, tree in params.items():
            for path, leaf in flatten({root: tree}).items():
                leaves[path] = {"shape": list(np.shape(leaf)), "dtype": _dtype_name(leaf.dtype), "item": root}
            writer.save(os.path.join(tmp, PARAMS_DIR, root), {root: tree})  # item trees nest by full param path
        writer.close()
        if config is not None:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                f.write(config.to_json())
        write_layout(tmp, leaves, {"roots": list(params)})
        finalize_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---- loading ----

@functools.lru_cache(maxsize=None)
def _zeros_fn(specs: tuple[tuple[tuple[int, ...], Any], ...], shardings: tuple):
    """Zero stacked buffers for a group of leaves (one compile per distinct group, not per leaf)."""
    return jax.jit(lambda: tuple(jnp.zeros(shape, dtype) for shape, dtype in specs), out_shardings=shardings)


@functools.lru_cache(maxsize=None)
def _update_fn(shardings: tuple):
    """bufs[k][index[k]] = xs[k] for a group of stacked leaves, donating the buffers."""

    def update(bufs, xs, index):
        return tuple(jax.lax.dynamic_update_index_in_dim(b, x.astype(b.dtype), index[k], 0)
                     for k, (b, x) in enumerate(zip(bufs, xs)))

    return jax.jit(update, donate_argnums=0, out_shardings=shardings)


def _slice_sharding(sharding: jax.sharding.Sharding, path: Path) -> jax.sharding.Sharding:
    """Sharding of one leading-axis slice of a stacked leaf: the target's spec minus its first entry."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    raise CheckpointError(
        f"{_pstr(path)}: sharding {type(sharding).__name__} is not supported for stacked leaves; use NamedSharding"
    )


def _check_against_layout(directory: str, layout: Mapping[Path, Mapping], target: Mapping[Path, Any]) -> None:
    missing = [p for p in target if p not in layout]
    if missing:
        by_root: dict[str, list[Path]] = {}
        for p in missing:
            by_root.setdefault(p[0], []).append(p)
        lines = []
        for root, paths in by_root.items():
            total = sum(1 for p in target if p[0] == root)
            if len(paths) == total:
                lines.append(f"the checkpoint has no params for {root!r} at all (was it converted from a model without "
                             f"the {root}, or before omni_jax.{root} existed?); load without it via roots=")
            else:
                lines.append(f"{root}: {len(paths)} of {total} params missing, e.g. {', '.join(map(_pstr, paths[:5]))}")
        raise CheckpointError(f"{directory}: " + "; ".join(lines))
    bad = [f"{_pstr(p)}: checkpoint {tuple(layout[p]['shape'])} != model {tuple(s.shape)}"
           for p, s in target.items() if tuple(layout[p]["shape"]) != tuple(s.shape)]
    if bad:
        raise CheckpointError(f"{directory}: param shapes do not match the config:\n" + "\n".join(bad[:20]))


def load_params(
    checkpoint_dir: str,
    config=None,
    dtype=jnp.float32,
    shardings: Mapping[str, Any] | None = None,
    roots: Sequence[str] | None = None,
) -> dict:
    """Restore {root: params} in the scanned layout the modules expect.

    config: OmniConfig (default: the checkpoint's config.json). dtype: float dtype of the returned
    params (cast on read). shardings: a tree like the params of jax.sharding.Sharding (NamedSharding
    for stacked leaves); each leaf is restored straight into it, with no full host copy. roots:
    components to load (default: thinker, plus talker and code2wav if config.enable_audio_output).
    """
    import orbax.checkpoint as ocp

    from omni_jax.config import load_config

    doc = read_layout(checkpoint_dir)
    layout = doc["leaves"]
    if config is None:
        if not os.path.exists(os.path.join(checkpoint_dir, "config.json")):
            raise CheckpointError(f"{checkpoint_dir} has no config.json; pass config=")
        config = load_config(checkpoint_dir)
    roots = default_roots(config) if roots is None else tuple(roots)
    target = flatten(abstract_params(config, dtype, roots))
    _check_against_layout(checkpoint_dir, layout, target)

    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if shardings is None:
        sharding_of = {p: default for p in target}
    else:
        sharding_of = flatten(shardings)
        absent = [p for p in target if p not in sharding_of]
        if absent:
            raise CheckpointError(f"shardings lacks {len(absent)} params, e.g. {', '.join(map(_pstr, absent[:5]))}")

    # item -> {path in item: (target path, slice index or None)}
    wanted: dict[str, dict[Path, tuple[Path, int | None]]] = {}
    for p in target:
        spec = layout[p]
        if "slices" in spec:
            for i, item in enumerate(spec["slices"]):
                wanted.setdefault(item, {})[p] = (p, i)
        else:
            wanted.setdefault(spec["item"], {})[p] = (p, None)
    stored_in: dict[str, list[Path]] = {}
    for p, spec in layout.items():
        for item in spec.get("slices", [spec.get("item")]):
            stored_in.setdefault(item, []).append(p)

    out: dict[Path, jax.Array] = {}
    ckptr = ocp.StandardCheckpointer()
    try:
        for item in sorted(wanted):
            restore_target = {}
            for p in stored_in[item]:
                spec = layout[p]
                shape = tuple(spec["shape"][1:] if "slices" in spec else spec["shape"])
                if p in wanted[item]:
                    sh = sharding_of[p] if "item" in spec else _slice_sharding(sharding_of[p], p)
                    restore_target[p] = jax.ShapeDtypeStruct(shape, target[p].dtype, sharding=sh)
                else:  # stored but not part of this model: read to satisfy Orbax, then dropped
                    logging.warning("%s: ignoring checkpoint param %s not in the model", checkpoint_dir, _pstr(p))
                    restore_target[p] = jax.ShapeDtypeStruct(shape, jnp.dtype(spec.get("dtype", "float32")))
            restored = flatten(ckptr.restore(os.path.abspath(os.path.join(checkpoint_dir, PARAMS_DIR, item)),
                                             unflatten(restore_target)))
            split = sorted((tp, p, index) for p, (tp, index) in wanted[item].items() if index is not None)
            for p, (tp, index) in wanted[item].items():
                if index is None:
                    out[tp] = restored[p]
            if split:
                new = [tp for tp, _, _ in split if tp not in out]
                if new:
                    bufs = _zeros_fn(tuple((tuple(target[tp].shape), jnp.dtype(target[tp].dtype)) for tp in new),
                                     tuple(sharding_of[tp] for tp in new))()
                    out.update(zip(new, bufs))
                shs = tuple(sharding_of[tp] for tp, _, _ in split)
                bufs = _update_fn(shs)(tuple(out.pop(tp) for tp, _, _ in split), tuple(restored[p] for _, p, _ in split),
                                       jnp.asarray([i for _, _, i in split], jnp.int32))
                out.update(zip((tp for tp, _, _ in split), bufs))
            del restored
    finally:
        ckptr.close()
    return unflatten(out)
