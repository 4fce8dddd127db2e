"""Load config + parameters + tokenizer for inference, shared by the launchers and the pipeline.

Without a checkpoint the embedded default is the tiny config (configs/tiny.json) with deterministic
random weights for every component (`registry.random_params`, numpy seed 0): useful for smoke tests,
never for meaningful text or speech. With a checkpoint the weights come from `checkpoint.load_params`.
Params come back in the checkpoint (scanned) layout; the pipeline applies the run's layout step.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from omni_jax.checkpoint.load import load_params
from omni_jax.config import OmniConfig, load_config
from omni_jax.errors import CheckpointError, CheckpointNotFoundError
from omni_jax.models import registry
from omni_jax.processing.tokenizer import QwenTokenizer, load_tokenizer
from omni_jax.sharding import rules

DEFAULT_CONFIG = "tiny"


@dataclasses.dataclass
class LoadedModel:
    config: OmniConfig
    params: dict[str, Any]  # root tree: {"thinker": ...} (+ "talker", "code2wav" when a checkpoint provides them)
    tokenizer: QwenTokenizer
    dtype: Any
    random_weights: bool  # True: the embedded tiny model with random weights
    source: str  # human-readable origin of the weights
    processor: Any = None  # omni_jax.processing.vision.VisionProcessorConfig (models with a vision encoder)


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
        params = registry.random_params(cfg, dtype)
        if mesh is not None:
            shard = rules.param_shardings(registry.boxed_abstract_params(cfg, dtype, tuple(params)), mesh)
            params = rules.place(params, shard)
        return LoadedModel(cfg, params, load_tokenizer(), dtype, True,
                           f"random weights: config {config or DEFAULT_CONFIG!r}, numpy seed 0", _processor(None, cfg))
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
        shard = rules.param_shardings(registry.boxed_abstract_params(cfg, dtype), mesh)
    params = load_params(checkpoint_dir, cfg, dtype, shardings=shard)
    return LoadedModel(cfg, params, load_tokenizer(checkpoint_dir), dtype, False, f"checkpoint {checkpoint_dir}",
                       _processor(checkpoint_dir, cfg))


def _processor(checkpoint_dir: str | None, cfg: OmniConfig):
    """The image/video processor values of a model with a vision encoder (its preprocessor_config.json)."""
    if cfg.thinker.vision is None:
        return None
    from omni_jax.processing.vision import processor_for_model

    return processor_for_model(checkpoint_dir, cfg.thinker.vision)
