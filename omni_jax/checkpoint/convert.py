"""Hugging Face safetensors -> omni_jax param tree.

Every HF key is matched by exactly one `Rule` (omni_jax.models.rules); each model module owns the
rules for its keys and the registry (omni_jax.models.registry) says which component owns which
keys. Keys of a component this project does not build are skipped with a logged count; keys no
component owns, or no rule matches, are an error.

`convert_tensors` converts in memory (tests, small models). `convert_checkpoint` streams a real
checkpoint (safetensors read lazily by omni_jax.checkpoint.safetensors) into the per-layer Orbax
layout of omni_jax.checkpoint.layout, after `plan_conversion` has checked names and shapes only.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from omni_jax.errors import CheckpointError, CheckpointNotFoundError, UsageError
from omni_jax.models import registry
from omni_jax.models.rules import Path, Rule


class UnknownKeyError(CheckpointError, KeyError):
    """A checkpoint tensor no rule maps: not a Qwen3-Omni checkpoint, or a part this project does not know."""

    __str__ = Exception.__str__  # KeyError would print the message quoted


class WeightsMismatchError(CheckpointError):
    """The tensors of a checkpoint do not fit the model its config describes (shapes, counts, dtypes)."""


def match_key(key: str, rules: Iterable[Rule]) -> tuple[Rule, Path, tuple[int, ...]]:
    for rule in rules:
        m = rule.match(key)
        if m is not None:
            path, index = rule.target(m)
            return rule, path, index
    raise UnknownKeyError(f"no conversion rule for checkpoint key {key!r}")


def get_path(tree: Mapping[str, Any], path: Path) -> Any:
    node = tree
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            raise KeyError(f"param path {'/'.join(path)} does not exist (missing {p!r})")
        node = node[p]
    return node


def check_slice(key: str, path: Path, index: tuple[int, ...], value: np.ndarray, leaf_shape: tuple[int, ...]) -> None:
    if len(index) > len(leaf_shape):
        raise ValueError(f"{key}: index {index} deeper than param {'/'.join(path)} of shape {leaf_shape}")
    for i, (ix, n) in enumerate(zip(index, leaf_shape)):
        if not 0 <= ix < n:
            raise ValueError(f"{key}: index {ix} out of range {n} on axis {i} of {'/'.join(path)}")
    want = tuple(leaf_shape[len(index):])
    if tuple(value.shape) != want:
        raise ValueError(f"{key}: converted shape {tuple(value.shape)} != param {'/'.join(path)} slice shape {want}")


def convert_tensors(
    tensors: Iterable[tuple[str, np.ndarray]],
    abstract: Mapping[str, Any],
    rules: list[Rule],
    dtype=np.float32,
) -> dict:
    """In-memory conversion (small checkpoints / tests): fill numpy leaves, check every leaf element was written."""
    import jax

    out = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, dtype), abstract)
    written: dict[Path, int] = {}
    for key, arr in tensors:
        rule, path, index = match_key(key, rules)
        leaf = get_path(out, path)
        value = rule.transform(np.asarray(arr))
        check_slice(key, path, index, value, leaf.shape)
        leaf[index] = value.astype(dtype)
        written[path] = written.get(path, 0) + int(np.prod(value.shape))
    for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
        p = tuple(k.key for k in path)
        if written.get(p, 0) != leaf.size:
            raise ValueError(f"param {'/'.join(p)} only received {written.get(p, 0)} of {leaf.size} values")
    return out


# ---------------------------------------------------------------------------------------------
# Whole-model rules, planning and the streaming checkpoint converter.
# ---------------------------------------------------------------------------------------------

# An HF decoder layer: `<stack>.layers.<N>.` (thinker.model, talker.model, talker.code_predictor.model,
# code2wav.pre_transformer). Keys of one layer are converted (and stored) together.
_LAYER_GROUP = re.compile(r"^(.+?\.layers\.\d+)\.")


@dataclasses.dataclass(frozen=True)
class KeyPlan:
    """One HF tensor: where it goes (param path + stack index) and the converted slice's shape."""

    key: str
    rule: Rule
    path: Path
    index: tuple[int, ...]
    shape: tuple[int, ...]
    slice_shape: tuple[int, ...]


@dataclasses.dataclass
class Plan:
    """Result of plan_conversion: every converted key (checked to cover the model exactly once)."""

    keys: list[KeyPlan]
    skipped: dict[str, int]  # skip prefix -> number of keys skipped


def transformed_shape(rule: Rule, shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of rule.transform's output for an HF tensor of `shape`, computed on a zero-strided
    dummy so views (transpose / reshape) allocate nothing even for 152064x2048 embeddings."""
    dummy = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), tuple(shape), (0,) * len(shape))
    return tuple(np.shape(rule.transform(dummy)))


def _skip_prefix(key: str, roots: tuple[str, ...]) -> str | None:
    """The prefix to count `key` under when it belongs to a component not converted here, else None."""
    comp = registry.owner(key)
    if comp is None or comp.name in roots:
        return None
    return comp.hf_prefixes[0]


def plan_conversion(
    shapes: Iterable[tuple[str, Sequence[int]]],
    leaf_shapes: Mapping[Path, Sequence[int]],
    rules: list[Rule],
    roots: Iterable[str] | None = None,
) -> Plan:
    """Match every (HF key, HF shape) to a param slice without touching data, and check that the
    keys cover every element of every leaf in `leaf_shapes` exactly once.

    roots: the components converted (default: every built one); keys the registry gives to another
    component are skipped and counted under that component's key prefix.

    Raises UnknownKeyError listing keys no rule matches, ValueError listing wrong slice shapes,
    duplicate writes or leaves not fully covered.
    """
    roots = registry.built_names() if roots is None else tuple(roots)
    shape_cache: dict[tuple[int, tuple[int, ...]], tuple[int, ...]] = {}
    skipped: dict[str, int] = {}
    unknown: list[str] = []
    errors: list[str] = []
    planned: list[KeyPlan] = []
    writes: dict[Path, dict[tuple[int, ...], str]] = {}
    for key, shape in shapes:
        shape = tuple(int(s) for s in shape)
        prefix = _skip_prefix(key, roots)
        if prefix is not None:
            skipped[prefix] = skipped.get(prefix, 0) + 1
            continue
        try:
            rule, path, index = match_key(key, rules)
        except UnknownKeyError:
            unknown.append(key)
            continue
        if path not in leaf_shapes:
            errors.append(f"{key}: rule maps it to {'/'.join(path)}, which is not a param of the model")
            continue
        ck = (id(rule.transform), shape)
        if ck not in shape_cache:
            shape_cache[ck] = transformed_shape(rule, shape)
        slice_shape = shape_cache[ck]
        try:
            check_slice(key, path, index, _Shaped(slice_shape), tuple(leaf_shapes[path]))
        except ValueError as e:
            errors.append(f"{e} (tensor shape in the checkpoint: {shape})")
            continue
        seen = writes.setdefault(path, {})
        if index in seen:
            errors.append(f"{key} and {seen[index]} both write {'/'.join(path)}[{index}]")
            continue
        seen[index] = key
        planned.append(KeyPlan(key, rule, path, index, shape, slice_shape))
    if unknown:
        more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
        raise UnknownKeyError(f"no conversion rule for checkpoint key(s): {', '.join(map(repr, unknown[:10]))}{more}; "
                              "is this a Qwen3-Omni (Qwen3OmniMoeForConditionalGeneration) checkpoint?")
    for path, leaf_shape in leaf_shapes.items():
        seen = writes.get(path, {})
        depths = {len(i) for i in seen}
        if len(depths) > 1:
            errors.append(f"{'/'.join(path)} is written at mixed stack depths {sorted(depths)}")
        elif len(seen) != (need := int(np.prod(tuple(leaf_shape)[: next(iter(depths), 0)], dtype=np.int64))):
            errors.append(f"param {'/'.join(path)} {tuple(leaf_shape)} is not fully covered: {len(seen)} of {need} "
                          "slice(s) written")
    if errors:
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise WeightsMismatchError(
            "checkpoint does not map onto the model its config describes:\n" + "\n".join(errors[:20]) + more +
            "\nEither the config does not match these weights (use the config.json that came with them, or undo the "
            "edit), or tensors are missing from the download (re-download it)."
        )
    return Plan(planned, skipped)


class _Shaped:
    """Stands in for an array in check_slice when only the shape is known."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


def layer_group(key: str) -> str | None:
    """'thinker.model.layers.7.mlp...' -> 'thinker.model.layers.7'; None for keys outside a decoder layer."""
    m = _LAYER_GROUP.match(key)
    return m.group(1) if m else None


def assign_items(plan: Plan, leaf_shapes: Mapping[Path, Sequence[int]]) -> tuple[dict[Path, dict], dict[str, list[KeyPlan]]]:
    """Decide the on-disk item of every leaf.

    A stacked leaf whose leading-axis slices correspond one-to-one to HF decoder layers is stored
    *split*: slice i lives in the item of its HF layer. Every other leaf is stored whole in the item
    named after its component ('thinker', 'talker', 'code2wav'). Returns (leaf layout, item -> keys).
    """
    by_path: dict[Path, list[KeyPlan]] = {}
    for kp in plan.keys:
        by_path.setdefault(kp.path, []).append(kp)
    layout: dict[Path, dict] = {}
    items: dict[str, list[KeyPlan]] = {}
    for path, kps in by_path.items():
        shape = tuple(int(s) for s in leaf_shapes[path])
        slice_group: dict[int, str] = {}
        group_slice: dict[str, int] = {}
        split = all(len(kp.index) >= 1 for kp in kps)
        for kp in kps if split else ():
            g = layer_group(kp.key)
            i = kp.index[0]
            if g is None or slice_group.setdefault(i, g) != g or group_slice.setdefault(g, i) != i:
                split = False
                break
        if split and len(slice_group) == shape[0]:
            layout[path] = {"shape": list(shape), "slices": [slice_group[i] for i in range(shape[0])]}
            for kp in kps:
                items.setdefault(slice_group[kp.index[0]], []).append(kp)
        else:
            layout[path] = {"shape": list(shape), "item": path[0]}
            items.setdefault(path[0], []).extend(kps)
    return layout, items


def _release_freed_memory() -> None:
    """Hand freed heap back to the OS after each item: glibc keeps the per-thread arenas that Orbax's
    writer threads used, which otherwise shows up as RSS creeping up over the first layers."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_DTYPES = ("bfloat16", "float16", "float32")
_FLOAT_SOURCES = ("BF16", "F16", "F32", "F64")


def check_source_dtypes(plan: Plan, infos: Mapping[str, Any]) -> None:
    """Every converted tensor must be floating point: an integer/bool tensor where a weight belongs means a
    corrupt or foreign file, and casting it would silently produce garbage."""
    bad = [f"{kp.key} in {os.path.basename(infos[kp.key].path)}: stored as {infos[kp.key].dtype}, param "
           f"{'/'.join(kp.path)}{list(kp.index) if kp.index else ''} needs a float ({'/'.join(_FLOAT_SOURCES)})"
           for kp in plan.keys if infos[kp.key].dtype not in _FLOAT_SOURCES]
    if bad:
        more = f"\n... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise WeightsMismatchError("checkpoint tensors have the wrong dtype:\n" + "\n".join(bad[:20]) + more +
                                   "\nThe files are corrupt or not this model's weights: re-download them.")


def convert_checkpoint(
    hf_dir: str,
    out_dir: str,
    dtype: str = "bfloat16",
    *,
    overwrite: bool = False,
    config=None,
    progress: bool = True,
) -> str:
    """Convert an HF Qwen3-Omni safetensors dir (single file or sharded) into an omni_jax Orbax checkpoint.

    Streams one decoder layer at a time (layout in omni_jax.checkpoint.layout), so peak memory is about
    one layer's converted params plus the largest non-layer component, whatever the depth. Writes
    into `<out_dir>.partial` and renames it into place only after the completion marker is written
    (replacing an existing checkpoint, with `overwrite`, by one atomic directory exchange), so a run
    killed at any point leaves nothing loadable at out_dir and the next run discards the stale
    .partial dir. Names, shapes and dtypes are all checked from the headers before anything is written.
    """
    import shutil

    import ml_dtypes
    from absl import logging
    from tqdm import tqdm

    from omni_jax.checkpoint import layout as ckpt
    from omni_jax.checkpoint.safetensors import index_checkpoint
    from omni_jax.config import load_config

    if dtype not in _DTYPES:
        raise UsageError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    if not os.path.isdir(hf_dir):
        raise CheckpointNotFoundError(f"HF checkpoint dir {hf_dir!r} does not exist (or is not a directory)")
    if os.path.normpath(os.path.abspath(out_dir)) == os.path.normpath(os.path.abspath(hf_dir)):
        raise UsageError(f"the output dir must differ from the HF checkpoint dir ({hf_dir})")
    ckpt.check_out_dir(out_dir, overwrite)
    explicit_config = config is not None
    if not explicit_config:
        if not os.path.isfile(os.path.join(hf_dir, "config.json")):
            raise CheckpointError(f"{hf_dir} has no config.json: copy the config.json that came with these weights "
                                  "into it")
        config = load_config(hf_dir)

    # Everything below up to the first write checks names, shapes and dtypes from the headers only.
    infos = index_checkpoint(hf_dir)
    owners = {c.name for c in map(registry.owner, infos) if c is not None}
    roots = tuple(name for name in registry.built_names() if name in owners and registry.get(name).in_config(config))
    if not roots:
        raise CheckpointError(f"{hf_dir}: no tensors of any component omni_jax builds "
                              f"({', '.join(registry.built_names())}); is this a Qwen3-Omni checkpoint?")
    leaf_shapes = {p: s.shape for p, s in ckpt.flatten(registry.abstract_params(config, roots=roots)).items()}
    try:
        plan = plan_conversion(((k, i.shape) for k, i in infos.items()), leaf_shapes, registry.hf_rules(config, roots),
                               roots)
    except CheckpointError as e:
        source = "the config passed in" if explicit_config else os.path.join(hf_dir, "config.json")
        raise type(e)(f"{hf_dir}: the tensors do not fit the model of {source}: {e}") from None
    check_source_dtypes(plan, infos)
    for prefix, n in sorted(plan.skipped.items()):
        logging.warning("skipping %d checkpoint tensors under %s* (omni_jax does not build %s yet)", n, prefix,
                        registry.owner(prefix).name)
    layout, items = assign_items(plan, leaf_shapes)

    def first(kps):
        return min((infos[kp.key].path, infos[kp.key].offset) for kp in kps)

    order = sorted(items, key=lambda name: first(items[name]))
    tmp = ckpt.claim_partial_dir(out_dir)  # discards a stale one; refuses one a live conversion is writing
    try:
        writer = ckpt.ItemWriter()
        with tqdm(total=len(plan.keys), unit="tensor", disable=not progress, desc="converting") as bar:
            for name in order:
                bar.set_postfix_str(name)
                tree: dict[Path, np.ndarray] = {}
                for kp in sorted(items[name], key=lambda kp: (infos[kp.key].path, infos[kp.key].offset)):
                    spec = layout[kp.path]
                    split = "slices" in spec
                    if kp.path not in tree:
                        slot = tuple(spec["shape"][1:] if split else spec["shape"])
                        tree[kp.path] = np.zeros(slot, np_dtype)
                    raw = infos[kp.key].load()
                    value = kp.rule.transform(raw)
                    check_slice(kp.key, kp.path, kp.index, value, tuple(spec["shape"]))
                    tree[kp.path][kp.index[1:] if split else kp.index] = value
                    del raw, value
                    bar.update(1)
                writer.save(os.path.join(tmp, ckpt.PARAMS_DIR, name), ckpt.unflatten(tree))
                del tree
                _release_freed_memory()
        writer.close()
        for fname in sorted(os.listdir(hf_dir)):
            src = os.path.join(hf_dir, fname)
            if (os.path.isfile(src) and not fname.startswith(".") and not fname.endswith(_WEIGHT_SUFFIXES)
                    and fname != "model.safetensors.index.json"):
                shutil.copy2(src, os.path.join(tmp, fname))
        if explicit_config:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                f.write(config.to_json())
        for spec in layout.values():
            spec["dtype"] = dtype
        ckpt.write_layout(tmp, layout, {"source": os.path.abspath(hf_dir), "dtype": dtype,
                                        "skipped": plan.skipped, "roots": list(roots)})
        ckpt.finalize_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logging.info("wrote %s: %d tensors -> %d params in %d items", out_dir, len(plan.keys), len(layout), len(items))
    return out_dir
