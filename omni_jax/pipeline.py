"""`from omni_jax.pipeline import OmniPipeline, Request` (the README's import path): the pipeline lives in
omni_jax.runtime.pipeline, its types in omni_jax.runtime.types."""

from omni_jax.runtime.pipeline import OmniPipeline  # noqa: F401
from omni_jax.runtime.types import Request, Result, StreamEvent  # noqa: F401
