"""Checkpoints: HF safetensors reading, the converter to Orbax, the on-disk layout and the sharded loader.

  safetensors.py  torch-free lazy safetensors reader (and a small writer for tests)
  convert.py      HF dir -> omni_jax checkpoint, one decoder layer at a time (rules from the model registry)
  layout.py       omni_jax_checkpoint.json, per-layer Orbax items, atomic partial-dir writes, save_params
  load.py         load_params: item by item straight into target shardings
"""

from omni_jax.checkpoint.layout import (  # noqa: F401  (the package's public names)
    LAYOUT_FILE, PARAMS_DIR, IncompleteCheckpointError, OutputExistsError, flatten, partial_dir, read_layout,
    save_params, unflatten,
)
from omni_jax.checkpoint.load import load_params  # noqa: F401
from omni_jax.errors import CheckpointError, CheckpointNotFoundError  # noqa: F401
