"""Hugging Face checkpoint key -> param path rules: the regex table each model module declares for its keys.

Every HF key is matched by exactly one `Rule` (regex -> param path, leading stack index, transform).
A model module's `hf_rules(config)` lists the rules for its keys, so the mapping of a name lives
beside the code that consumes it; the converter (omni_jax.checkpoint.convert) only applies them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from omni_jax.nn.decoder import segment_of, segments

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


def fixed(pattern: str, path: Path, transform=identity) -> Rule:
    """A rule for one key with no stack index."""
    return Rule(pattern, lambda m: (path, ()), transform)


def decoder_rules(prefix: str, root: Path, cfg, taps: tuple[int, ...] = ()) -> list[Rule]:
    """Rules for one HF decoder stack (`{prefix}.layers.N...`) onto our scanned DecoderStack at `root`."""
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
