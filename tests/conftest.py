import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)
_cache_dir = os.environ.get("OMNI_JAX_TEST_COMPILE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_cache_dir))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from tests import reference  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """{variant: (hf_model, hf_dir, our_config_dict)} — random transformers models saved with save_pretrained."""
    out = {}
    for name, overrides in reference.VARIANTS.items():
        cfg = reference.hf_config_dict(reference.tiny_config_dict(**overrides))
        model = reference.build_hf_model(cfg, seed=len(out))
        d = str(tmp_path_factory.mktemp(f"hf_{name}"))
        reference.save_hf_model(model, d)
        out[name] = (model, d, cfg)
    return out
