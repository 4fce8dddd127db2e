"""The benchmark's weights: a random transformers checkpoint built once per (config, seed), converted once."""

from __future__ import annotations

import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: The real model's values (configs/qwen3_omni_30b_a3b_instruct.json).
HF_THINKER_IDS = {"vision_start_token_id": 151652, "audio_start_token_id": 151669}


def resolve_config(name: str) -> tuple[str, str]:
    """(short name, path) of --config."""
    if name in ("tiny", "bench"):
        return name, os.path.join(ROOT, "configs", f"{name}.json")
    from omni_jax.errors import UsageError

    if not os.path.isfile(name):
        raise UsageError(f"--config={name!r}: not 'tiny', 'bench' or an existing config.json path")
    return os.path.splitext(os.path.basename(name))[0], name


def prepare_checkpoints(cfg_dict: dict, work_dir: str, seed: int) -> tuple[str, str, dict]:
    """Build (once) the random HF checkpoint in a child process and convert it to float32 (once)."""
    from omni_jax.checkpoint.convert import convert_checkpoint
    from tools import hf_reference

    hf_dir, ckpt_dir = os.path.join(work_dir, "hf"), os.path.join(work_dir, "ckpt")
    info = {"hf_dir": hf_dir, "ckpt_dir": ckpt_dir}
    t0 = time.perf_counter()
    hf_cfg = hf_reference.hf_config_dict(cfg_dict, vocab_size=None)
    for key, value in HF_THINKER_IDS.items():  # transformers' rope index reads them; configs/tiny.json omits them
        hf_cfg["thinker_config"].setdefault(key, value)
    import jax

    from omni_jax.config import parse_config
    from omni_jax.models import registry

    size = sum(x.size for x in jax.tree_util.tree_leaves(registry.abstract_params(parse_config(cfg_dict))))
    # Big models are built in a child process: only its exit reliably returns torch's memory before the loads.
    info["hf_built"] = hf_reference.ensure_hf_checkpoint(hf_cfg, hf_dir, seed, subprocess=size > 2 * 10**8)
    info["hf_build_s"] = time.perf_counter() - t0
    if info["hf_built"] and os.path.isdir(ckpt_dir):
        import shutil

        shutil.rmtree(ckpt_dir)  # converted from the checkpoint just replaced
    info["converted"] = not os.path.isdir(ckpt_dir)  # convert_checkpoint renames into place only when complete
    if info["converted"]:
        t0 = time.perf_counter()
        convert_checkpoint(hf_dir, ckpt_dir, dtype="float32", progress=False)
        info["convert_s"] = time.perf_counter() - t0
    return hf_dir, ckpt_dir, info


def params_bytes(tree) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def load_ours(ckpt_dir: str, dtype_name: str, max_len: int):
    from omni_jax.runtime.loading import parse_dtype
    from omni_jax.runtime.pipeline import OmniPipeline

    return OmniPipeline.load(ckpt_dir, dtype=parse_dtype(dtype_name), max_len=max_len)
