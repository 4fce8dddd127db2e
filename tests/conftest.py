"""Session setup shared by the tests and every subprocess they start (launchers, multi-device workers).

Set in os.environ before jax loads, so subprocesses inherit the same settings:
  * one persistent compilation cache (OMNI_JAX_TEST_COMPILE_CACHE, default .jax_cache/): a shape compiled
    by one test or launcher is a cache hit for every later one;
  * XLA's backend optimisation level 0 and no new CPU fusion emitters: tiny test models spend their time
    compiling, not running (measured: the two end-to-end pipeline tests 61 -> 51 s cold with level 0;
    the tiny pipeline's first generate 11.7 -> 8.9 s cold, mean of 3, without the fusion emitters, while
    its warm generate stays 0.2 s); numerics stay fp32.
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(
    os.environ.get("OMNI_JAX_TEST_COMPILE_CACHE", os.path.join(ROOT, ".jax_cache")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in TEST_XLA_FLAGS if f not in _flags])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)

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

#: The KV-cache length of every test pipeline over the embedded tiny model: one set of compiled shapes.
TINY_MAX_LEN = 128


@pytest.fixture(scope="session")
def tiny_pipe():
    """OmniPipeline over the embedded tiny random-weight model (fp32), shared by every test module of a worker:
    loading and tracing it once per process instead of once per module. Tests that patch its params restore them."""
    from omni_jax.runtime.pipeline import OmniPipeline

    return OmniPipeline.load(None, max_len=TINY_MAX_LEN)
