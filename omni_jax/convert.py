"""Hugging Face safetensors -> omni_jax param tree.

Every HF key is matched by exactly one `Rule` (regex -> param path, leading stack index,
transform). Each component module owns the rules for its keys (`hf_rules`), so the mapping
of a name lives beside the code that consumes it. Unknown keys are an error.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

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


class UnknownKeyError(KeyError):
    pass


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
        Rule(r"thinker\.lm_head\.weight", lambda m: (("thinker", "lm_head", "kernel"), ()), linear),
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
