"""Hugging Face safetensors -> omni_jax param tree.

Every HF key is matched by exactly one `Rule` (regex -> param path, leading stack index,
transform). Each component module owns the rules for its keys (`hf_rules`), so the mapping
of a name lives beside the code that consumes it. Unknown keys are an error.

`convert_tensors` converts in memory (tests, small models). `convert_checkpoint` streams a real
checkpoint (safetensors read lazily by omni_jax.safetensors_io) into the per-layer Orbax layout
described in omni_jax/checkpoint.py, after `plan_conversion` has checked names and shapes only.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from omni_jax.errors import CheckpointError, CheckpointNotFoundError, UsageError

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    """`pattern` full-matches an HF key; `target(match)` gives (param path, index into the leaf's leading
    stack dims); `transform` maps the HF array (numpy, HF layout) to the slice's layout."""

    pattern: str
    target: Callable[[re.Match], tuple[Path, tuple[int, ...]]]
    transform: Callable[[np.ndarray], np.ndarray]

    def match(self, key: str) -> re.Match | None:
        return re.fullmatch(self.pattern, key)


class UnknownKeyError(CheckpointError, KeyError):
    """A checkpoint tensor no rule maps: not a Qwen3-Omni checkpoint, or a part this project does not know."""

    __str__ = Exception.__str__  # KeyError would print the message quoted


class WeightsMismatchError(CheckpointError):
    """The tensors of a checkpoint do not fit the model its config describes (shapes, counts, dtypes)."""


# ---- transforms (HF layout -> ours) ----

def identity(a: np.ndarray) -> np.ndarray:
    return a


def linear(a: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Dense kernel [in, out]."""
    return a.T


def linear_to_heads(head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """[heads*head_dim, in] -> DenseGeneral kernel [in, heads, head_dim]."""
    return lambda a: a.T.reshape(a.shape[1], -1, head_dim)


def heads_to_linear(head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """o_proj [out, heads*head_dim] -> DenseGeneral kernel [heads, head_dim, out]."""
    return lambda a: a.T.reshape(-1, head_dim, a.shape[0])


def bias_to_heads(head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: a.reshape(-1, head_dim)


def match_key(key: str, rules: Iterable[Rule]) -> tuple[Rule, Path, tuple[int, ...]]:
    for rule in rules:
        m = rule.match(key)
        if m is not None:
            path, index = rule.target(m)
            return rule, path, index
    raise UnknownKeyError(f"no conversion rule for checkpoint key {key!r}")


def decoder_rules(prefix: str, root: Path, cfg, taps: tuple[int, ...] = ()) -> list[Rule]:
    """Rules for one HF decoder stack (`{prefix}.layers.N...`) onto our scanned DecoderStack at `root`."""
    from omni_jax.decoder import segment_of, segments

    segs = segments(cfg, taps)
    d = cfg.head_dim
    p = re.escape(prefix)

    def at(*leaf: str, expert: bool = False):
        def target(m: re.Match):
            seg, i = segment_of(int(m.group(1)), segs)
            index = (i, int(m.group(2))) if expert else (i,)
            return root + (seg.name,) + leaf, index
        return target

    attn = [
        ("q_proj.weight", ("self_attn", "q_proj", "kernel"), linear_to_heads(d)),
        ("k_proj.weight", ("self_attn", "k_proj", "kernel"), linear_to_heads(d)),
        ("v_proj.weight", ("self_attn", "v_proj", "kernel"), linear_to_heads(d)),
        ("o_proj.weight", ("self_attn", "o_proj", "kernel"), heads_to_linear(d)),
        ("q_proj.bias", ("self_attn", "q_proj", "bias"), bias_to_heads(d)),
        ("k_proj.bias", ("self_attn", "k_proj", "bias"), bias_to_heads(d)),
        ("v_proj.bias", ("self_attn", "v_proj", "bias"), bias_to_heads(d)),
        ("o_proj.bias", ("self_attn", "o_proj", "bias"), identity),
        ("q_norm.weight", ("self_attn", "q_norm", "scale"), identity),
        ("k_norm.weight", ("self_attn", "k_norm", "scale"), identity),
    ]
    rules = [Rule(rf"{p}\.layers\.(\d+)\.self_attn\.{re.escape(k)}", at(*leaf), fn) for k, leaf, fn in attn]
    rules += [
        Rule(rf"{p}\.layers\.(\d+)\.input_layernorm\.weight", at("input_layernorm", "scale"), identity),
        Rule(rf"{p}\.layers\.(\d+)\.post_attention_layernorm\.weight", at("post_attention_layernorm", "scale"), identity),
        Rule(rf"{p}\.layers\.(\d+)\.mlp\.gate\.weight", at("mlp", "router"), linear),
        Rule(rf"{p}\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight",
             lambda m: at("mlp", m.group(3), expert=True)(m), linear),
        Rule(rf"{p}\.layers\.(\d+)\.mlp\.shared_expert\.(gate_proj|up_proj|down_proj)\.weight",
             lambda m: at("mlp", "shared_expert", m.group(2), "kernel")(m), linear),
        Rule(rf"{p}\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight", at("mlp", "shared_expert_gate", "kernel"), linear),
        Rule(rf"{p}\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight",
             lambda m: at("mlp", m.group(2), "kernel")(m), linear),
        Rule(rf"{p}\.norm\.weight", lambda m: (root[:-1] + ("norm", "scale"), ()), identity),
    ]
    return rules


def thinker_rules(config) -> list[Rule]:
    text = config.thinker.text
    rules = decoder_rules("thinker.model", ("thinker", "layers"), text, (config.talker.accept_hidden_layer,))
    rules += [
        Rule(r"thinker\.model\.embed_tokens\.weight", lambda m: (("thinker", "embed_tokens", "embedding"), ()), identity),
        Rule(r"thinker\.lm_head\.weight", lambda m: (("thinker", "lm_head"), ()), identity),  # [V, H] as in HF
    ]
    return rules


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

COMPONENTS: tuple[str, ...] = ("thinker", "talker", "code2wav")
# HF keys of parts this project does not build; skipped with a logged count, never silently.
SKIP_PREFIXES: tuple[str, ...] = ("thinker.audio_tower.", "thinker.visual.")
# An HF decoder layer: `<stack>.layers.<N>.` (thinker.model, talker.model, talker.code_predictor.model,
# code2wav.pre_transformer). Keys of one layer are converted (and stored) together.
_LAYER_GROUP = re.compile(r"^(.+?\.layers\.\d+)\.")


def component_module(root: str):
    """The module owning component `root` (omni_jax.<root>), or None while it is not written yet.

    A component counts as available once it has `boxed_abstract_params` (and `hf_rules`, except the
    thinker, whose rules live here). Import errors raised *inside* an existing module propagate.
    """
    import importlib

    if root not in COMPONENTS:
        raise ValueError(f"unknown component {root!r}; expected one of {COMPONENTS}")
    name = f"omni_jax.{root}"
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise
    need = ("boxed_abstract_params",) if root == "thinker" else ("boxed_abstract_params", "hf_rules")
    return mod if all(hasattr(mod, n) for n in need) else None


def available_components() -> tuple[str, ...]:
    return tuple(r for r in COMPONENTS if component_module(r) is not None)


def component_rules(config, root: str) -> list[Rule]:
    mod = component_module(root)
    if mod is None:
        raise ModuleNotFoundError(f"component {root!r} (omni_jax.{root}) is not available: no conversion rules for it")
    if hasattr(mod, "hf_rules"):
        return list(mod.hf_rules(config))
    return thinker_rules(config)


def all_rules(config, roots: Iterable[str] | None = None) -> list[Rule]:
    """thinker_rules + talker.hf_rules + code2wav.hf_rules (components not yet available are left out
    when `roots` is None; naming an unavailable one is an error)."""
    roots = available_components() if roots is None else tuple(roots)
    rules: list[Rule] = []
    for root in roots:
        rules += component_rules(config, root)
    return rules


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


def plan_conversion(
    shapes: Iterable[tuple[str, Sequence[int]]],
    leaf_shapes: Mapping[Path, Sequence[int]],
    rules: list[Rule],
    skip_prefixes: tuple[str, ...] = SKIP_PREFIXES,
) -> Plan:
    """Match every (HF key, HF shape) to a param slice without touching data, and check that the
    keys cover every element of every leaf in `leaf_shapes` exactly once.

    Raises UnknownKeyError listing keys no rule matches, ValueError listing wrong slice shapes,
    duplicate writes or leaves not fully covered.
    """
    shape_cache: dict[tuple[int, tuple[int, ...]], tuple[int, ...]] = {}
    skipped: dict[str, int] = {}
    unknown: list[str] = []
    errors: list[str] = []
    planned: list[KeyPlan] = []
    writes: dict[Path, dict[tuple[int, ...], str]] = {}
    for key, shape in shapes:
        shape = tuple(int(s) for s in shape)
        prefix = next((p for p in skip_prefixes if key.startswith(p)), None)
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

    Streams one decoder layer at a time (layout in omni_jax/checkpoint.py), so peak memory is about
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

    from omni_jax import checkpoint as ckpt
    from omni_jax.config import load_config
    from omni_jax.safetensors_io import index_checkpoint

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
    present = {k.split(".", 1)[0] for k in infos}
    available = available_components()
    roots = tuple(r for r in COMPONENTS if r in available and r in present)
    if not roots:
        raise CheckpointError(f"{hf_dir}: no tensors of any available component ({', '.join(available)}); "
                              "is this a Qwen3-Omni checkpoint?")
    missing_modules = tuple(f"{r}." for r in COMPONENTS if r in present and r not in available)
    leaf_shapes = {p: s.shape for p, s in ckpt.flatten(ckpt.abstract_params(config, roots=roots)).items()}
    try:
        plan = plan_conversion(((k, i.shape) for k, i in infos.items()), leaf_shapes, all_rules(config, roots),
                               SKIP_PREFIXES + missing_modules)
    except CheckpointError as e:
        source = "the config passed in" if explicit_config else os.path.join(hf_dir, "config.json")
        raise type(e)(f"{hf_dir}: the tensors do not fit the model of {source}: {e}") from None
    check_source_dtypes(plan, infos)
    for prefix, n in sorted(plan.skipped.items()):
        why = "its omni_jax module is not available yet" if prefix in missing_modules else "that part is not built"
        logging.warning("skipping %d checkpoint tensors under %s* (%s)", n, prefix, why)
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
