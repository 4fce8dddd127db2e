"""The one table of model components: what each is called, which checkpoint keys it owns, and its module.

The converter, the loader, the checkpoint layout, the layout step and the memory plan all read this
table, so adding a component (an audio or vision encoder) is one model module plus one entry here.
A model module provides:

  build(config, dtype) -> (flax module in the checkpoint layout, init arguments)
  hf_rules(config)     -> the omni_jax.models.rules.Rule list for its checkpoint keys
  unroll(config, params, split_experts, consume)   (optional) its unrolled-layout params

An entry without a module is a part of the checkpoint this project does not build yet: its keys are
skipped by the converter with a logged count, never silently.
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config import OmniConfig
from omni_jax.models import audio_encoder, code2wav, talker, thinker, vision_encoder
from omni_jax.models.rules import Rule


@dataclasses.dataclass(frozen=True)
class Component:
    name: str  # param-tree root and checkpoint item name
    hf_prefixes: tuple[str, ...]  # checkpoint keys it owns (the longest matching prefix wins)
    module: ModuleType | None  # None: known, not built yet (keys skipped)
    speech: bool = False  # only in checkpoints with audio output (enable_audio_output)
    # Whether a config has this component at all (the audio tower needs thinker_config.audio_config).
    in_config: Callable[[OmniConfig], bool] = lambda config: True
    # Loaded when the checkpoint has it: checkpoints converted before omni_jax built it still load, without it.
    optional: bool = False

    @property
    def built(self) -> bool:
        return self.module is not None


COMPONENTS: tuple[Component, ...] = (
    Component("thinker", ("thinker.",), thinker),
    Component("audio_tower", ("thinker.audio_tower.",), audio_encoder,
              in_config=lambda config: config.thinker.audio is not None, optional=True),
    Component("visual", ("thinker.visual.",), vision_encoder,
              in_config=lambda config: config.thinker.vision is not None, optional=True),
    Component("talker", ("talker.",), talker, speech=True),
    Component("code2wav", ("code2wav.",), code2wav, speech=True),
)
_BY_NAME = {c.name: c for c in COMPONENTS}


def get(name: str) -> Component:
    if name not in _BY_NAME:
        raise ValueError(f"unknown component {name!r}; expected one of {tuple(_BY_NAME)}")
    return _BY_NAME[name]


def built_names() -> tuple[str, ...]:
    return tuple(c.name for c in COMPONENTS if c.built)


def default_roots(config: OmniConfig) -> tuple[str, ...]:
    """Components a model has: every built one its config describes, the speech ones only when the config speaks."""
    return tuple(c.name for c in COMPONENTS
                 if c.built and c.in_config(config) and (config.enable_audio_output or not c.speech))


def owner(key: str) -> Component | None:
    """The component owning checkpoint key `key` (longest prefix), or None."""
    best, length = None, -1
    for c in COMPONENTS:
        for p in c.hf_prefixes:
            if key.startswith(p) and len(p) > length:
                best, length = c, len(p)
    return best


def _roots(config: OmniConfig, roots: Iterable[str] | None) -> tuple[str, ...]:
    roots = default_roots(config) if roots is None else tuple(roots)
    for r in roots:
        if not get(r).built:
            raise ValueError(f"component {r!r} is not built by this version of omni_jax")
        if not get(r).in_config(config):
            raise ValueError(f"component {r!r} is not described by this config")
    return roots


@functools.lru_cache(maxsize=32)
def _boxed(config: OmniConfig, dtype: Any, root: str):
    # Cached: tracing a model's init costs seconds and the converter, loader and plan all need it.
    module, args = get(root).module.build(config, dtype)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))["params"]


def boxed_abstract_params(config: OmniConfig, dtype=jnp.float32, roots: Iterable[str] | None = None) -> dict:
    """{root: abstract params with their logical-axis boxes (nn.Partitioned)}; allocates nothing."""
    return {r: _boxed(config, jnp.dtype(dtype), r) for r in _roots(config, roots)}


def abstract_params(config: OmniConfig, dtype=jnp.float32, roots: Iterable[str] | None = None) -> dict:
    """{root: jax.ShapeDtypeStruct tree}: the exact tree a checkpoint load returns."""
    return nn.unbox(boxed_abstract_params(config, dtype, roots))


def init_params(config: OmniConfig, rng: jax.Array, dtype=jnp.float32, roots: Iterable[str] | None = None) -> dict:
    """{root: params} from the modules' own initializers (one compiled init per component)."""
    out = {}
    for r in _roots(config, roots):
        module, args = get(r).module.build(config, jnp.dtype(dtype))
        rng, key = jax.random.split(rng)
        out[r] = nn.unbox(jax.jit(lambda k, m=module, a=args: m.init(k, *a))(key)["params"])
    return out


def random_params(config: OmniConfig, dtype: Any, seed: int = 0, roots: Iterable[str] | None = None) -> dict:
    """Deterministic random weights for every component (the embedded default).

    Drawn with numpy over the abstract tree (norm scales 1, biases 0, the rest N(0, 0.02)): compiling
    the modules' init functions takes tens of seconds on CPU, this takes well under one."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        last = str(getattr(path[-1], "key", path[-1]))
        if last == "scale" and any("norm" in str(getattr(p, "key", p)) for p in path):
            value = np.ones(leaf.shape, np.float32)
        elif last == "bias":
            value = np.zeros(leaf.shape, np.float32)
        else:
            value = rng.normal(0.0, 0.02, leaf.shape).astype(np.float32)
        return jnp.asarray(value, dtype)

    roots = _roots(config, roots)
    abstract = abstract_params(config, dtype, roots)  # (a tree_map result: keys sorted, so draw in table order)
    # Optional components draw last: a config that gains one (the audio tower) keeps the others' weights.
    order = sorted(roots, key=lambda r: get(r).optional)
    drawn = {r: jax.tree_util.tree_map_with_path(draw, abstract[r]) for r in order}
    return {r: drawn[r] for r in roots}


def hf_rules(config: OmniConfig, roots: Iterable[str] | None = None) -> list[Rule]:
    """Every conversion rule of the given (default: all built) components."""
    rules: list[Rule] = []
    for r in (built_names() if roots is None else tuple(roots)):
        rules += get(r).module.hf_rules(config)
    return rules


def unroll(config: OmniConfig, params: dict, split_experts: bool = True, consume: bool = False) -> dict:
    """{root: params} in the unrolled layout (omni_jax.nn.decoder) for components that have one; the others
    are returned as they are. consume: each component's input tree is emptied as it is converted."""
    out = {}
    for r, tree in list(params.items()):
        fn = getattr(get(r).module, "unroll", None)
        out[r] = fn(config, tree, split_experts, consume) if fn is not None else tree
        if consume:
            params[r] = out[r]
    return out
