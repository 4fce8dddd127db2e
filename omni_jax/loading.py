"""Load config + parameters + tokenizer for inference, shared by the launchers and later pipeline objects.

Without a checkpoint the embedded default is the tiny config (configs/tiny.json) with deterministic
random weights for every component (`random_params`, numpy seed 0): useful for smoke tests, never for
meaningful text or speech. With a checkpoint the weights come from `omni_jax.checkpoint.load_params`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from omni_jax.config import OmniConfig, load_config
from omni_jax import checkpoint, code2wav, talker, thinker
from omni_jax.errors import CheckpointError, CheckpointNotFoundError
from omni_jax.tokenizer import QwenTokenizer, load_tokenizer

DEFAULT_CONFIG = "tiny"


@dataclasses.dataclass
class LoadedModel:
    config: OmniConfig
    params: dict[str, Any]  # root tree: {"thinker": ...} (+ "talker", "code2wav" when a checkpoint provides them)
    tokenizer: QwenTokenizer
    dtype: Any
    random_weights: bool  # True: the embedded tiny model with random weights
    source: str  # human-readable origin of the weights


def default_dtype() -> Any:
    """float32 on CPU (exact, and bf16 matmuls are slow there), bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def parse_dtype(name: str | None) -> Any:
    if not name:
        return default_dtype()
    table = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
             "float16": jnp.float16, "fp16": jnp.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(table)}")
    return table[name]


def random_params(cfg: OmniConfig, dtype: Any, seed: int = 0) -> dict[str, Any]:
    """Deterministic random weights for every component (the embedded default).

    Drawn with numpy over the abstract param tree (norm scales 1, biases 0, the rest N(0, 0.02)):
    compiling the modules' init functions takes tens of seconds on CPU, this takes well under one.
    """
    import flax.linen as nn
    import numpy as np

    roots = {"thinker": thinker}
    if cfg.enable_audio_output:
        roots.update(talker=talker, code2wav=code2wav)
    rng = np.random.default_rng(seed)
    params = {}
    for name, module in roots.items():
        abstract = nn.unbox(module.boxed_abstract_params(cfg, dtype))

        def draw(path, leaf):
            last = str(getattr(path[-1], "key", path[-1]))
            if last == "scale" and any("norm" in str(getattr(p, "key", p)) for p in path):
                value = np.ones(leaf.shape, np.float32)
            elif last == "bias":
                value = np.zeros(leaf.shape, np.float32)
            else:
                value = rng.normal(0.0, 0.02, leaf.shape).astype(np.float32)
            return jnp.asarray(value, dtype)

        params[name] = jax.tree_util.tree_map_with_path(draw, abstract)
    return params


def load_model(
    checkpoint_dir: str | None = None, dtype: Any = None, config: str | OmniConfig | None = None, mesh: Any = None
) -> LoadedModel:
    """Config, params and tokenizer from `checkpoint_dir`, or the random-weight tiny default when it is None.

    config: override (path, shipped name or OmniConfig); by default the checkpoint's config.json, or 'tiny'.
    mesh: a jax.sharding.Mesh: params are restored straight into their rules-table shardings.
    """
    dtype = default_dtype() if dtype is None else dtype
    if checkpoint_dir is None:
        cfg = config if isinstance(config, OmniConfig) else load_config(config or DEFAULT_CONFIG)
        params = random_params(cfg, dtype)
        if mesh is not None:
            from omni_jax import sharding

            shard = sharding.param_shardings(checkpoint.boxed_abstract_params(cfg, dtype, tuple(params)), mesh)
            params = sharding.place(params, shard)
        return LoadedModel(cfg, params, load_tokenizer(), dtype, True,
                           f"random weights: config {config or DEFAULT_CONFIG!r}, numpy seed 0")
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointNotFoundError(f"checkpoint directory {checkpoint_dir!r} does not exist")
    if isinstance(config, OmniConfig):
        cfg = config
    elif config is None and not os.path.isfile(os.path.join(checkpoint_dir, "config.json")):
        raise CheckpointError(f"no config.json in checkpoint {checkpoint_dir!r}; pass the config it was converted "
                              "with explicitly")
    else:
        cfg = load_config(config or checkpoint_dir)
    shard = None
    if mesh is not None:
        from omni_jax import sharding

        shard = sharding.param_shardings(checkpoint.boxed_abstract_params(cfg, dtype), mesh)
    params = checkpoint.load_params(checkpoint_dir, cfg, dtype, shardings=shard)
    return LoadedModel(cfg, params, load_tokenizer(checkpoint_dir), dtype, False, f"checkpoint {checkpoint_dir}")
