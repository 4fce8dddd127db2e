"""omni_jax: Qwen3-Omni-30B-A3B inference in JAX/Flax."""

from omni_jax.config import OmniConfig, load_config, parse_config

__all__ = ["OmniConfig", "load_config", "parse_config"]
