"""Random transformers Qwen3-Omni models built from a config dict: the reference for parity tests and benchmarks.

Why here and not in tests/: `launch/bench.py` compares this project against transformers on the same weights,
so both the test suite (tests/reference.py re-exports these names) and the benchmark need the same
deterministic model builder and the same HF-side config fix-ups. torch/transformers are optional dependencies
of the library, so they are imported inside the functions, with a clear error when missing.
"""

from __future__ import annotations

import copy
import gc
import json
import os
from typing import Any, Iterator

import numpy as np

#: Tiny audio/vision towers: transformers always builds them, our config loader ignores them; tiny keeps
#: them from costing memory next to a large text model.
TINY_TOWERS = {
    "audio_config": dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                         output_dim=64, num_mel_bins=16, downsample_hidden_size=16),
    "vision_config": dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          deepstack_visual_indexes=[0], num_position_embeddings=16, patch_size=4),
}

#: Written into an HF dir after save_pretrained returned: its presence means the dir is complete.
HF_COMPLETE_MARKER = ".omni_jax_hf_complete"


def _require_torch():
    try:
        import torch
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"tools.hf_reference needs torch and transformers (pip install torch transformers): {e}"
        ) from e
    return torch, transformers


def hf_config_dict(cfg: dict, vocab_size: int | None = 1024) -> dict:
    """Our json + the bits transformers needs that we do not (tiny audio/vision towers).

    vocab_size: the thinker vocab to use (None keeps the config's; the tests use 1024 to stay small)."""
    cfg = copy.deepcopy(cfg)
    if vocab_size is not None:
        cfg["thinker_config"]["text_config"]["vocab_size"] = vocab_size
    cfg["thinker_config"].update(copy.deepcopy(TINY_TOWERS))
    hidden = cfg["thinker_config"]["text_config"]["hidden_size"]  # tiny towers, but projecting to the thinker's width
    cfg["thinker_config"]["audio_config"]["output_dim"] = hidden
    cfg["thinker_config"]["vision_config"]["out_hidden_size"] = hidden
    cfg["talker_config"].setdefault("spatial_merge_size", 2)
    return cfg


def build_hf_model(cfg: dict, seed: int = 0):
    """A random fp32 transformers model whose every parameter (norms included) is perturbed, deterministically."""
    torch, _ = _require_torch()
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**cfg)).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # transformers allocates the talker's expert weights with torch.empty and never initializes them
        # (its _init_weights only covers the thinker's MoE): zero them so the draw below is deterministic
        # instead of inheriting whatever the allocator returned (NaNs on some machines).
        for module in model.modules():
            if type(module).__name__ == "Qwen3OmniMoeTalkerTextExperts":
                module.gate_up_proj.zero_()
                module.down_proj.zero_()
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".norm." in name or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def save_hf_model(model, out_dir: str) -> str:
    model.save_pretrained(out_dir)
    return out_dir


def read_safetensors(hf_dir: str) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open

    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(hf_dir, name), "np") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)


def _fingerprint(cfg: dict, seed: int) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([cfg, seed], sort_keys=True).encode()).hexdigest()


def hf_dir_complete(hf_dir: str, cfg: dict | None = None, seed: int = 0) -> bool:
    """hf_dir holds a complete checkpoint (of this config and seed, when cfg is given)."""
    path = os.path.join(hf_dir, HF_COMPLETE_MARKER)
    if not os.path.isfile(path):
        return False
    if cfg is None:
        return True
    with open(path) as f:
        return json.load(f).get("fingerprint") == _fingerprint(cfg, seed)


def write_hf_checkpoint(cfg: dict, hf_dir: str, seed: int = 0) -> str:
    """Build `build_hf_model(cfg, seed)`, save_pretrained it into hf_dir, then write the completion marker.

    The model is freed before returning. Run it in a child process for big configs (`ensure_hf_checkpoint`):
    only a process exit reliably hands all of torch's memory back."""
    model = build_hf_model(cfg, seed)
    os.makedirs(hf_dir, exist_ok=True)
    save_hf_model(model, hf_dir)
    del model
    gc.collect()
    with open(os.path.join(hf_dir, HF_COMPLETE_MARKER), "w") as f:
        json.dump({"seed": seed, "fingerprint": _fingerprint(cfg, seed)}, f)
    return hf_dir


def ensure_hf_checkpoint(cfg: dict, hf_dir: str, seed: int = 0, *, subprocess: bool = True) -> bool:
    """Write the random HF checkpoint unless hf_dir already holds a complete one. Returns True if it was built.

    subprocess: build in a spawned child, so the parent's peak memory never includes the builder's copy."""
    if hf_dir_complete(hf_dir, cfg, seed):
        return False
    if os.path.isdir(hf_dir):
        import shutil

        shutil.rmtree(hf_dir)  # a killed run's leftover (no marker), or another config's or seed's
    if not subprocess:
        write_hf_checkpoint(cfg, hf_dir, seed)
        return True
    import multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=write_hf_checkpoint, args=(cfg, hf_dir, seed))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not hf_dir_complete(hf_dir):
        raise RuntimeError(f"building the random transformers checkpoint in {hf_dir} failed (exit code "
                           f"{proc.exitcode})")
    return True


def load_hf_model(hf_dir: str) -> Any:
    """transformers' Qwen3OmniMoeForConditionalGeneration.from_pretrained(hf_dir) in float32, eval mode."""
    torch, _ = _require_torch()
    from transformers import Qwen3OmniMoeForConditionalGeneration

    return Qwen3OmniMoeForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()


def meta_param_count(cfg: dict) -> int:
    """Parameter count of the transformers model for cfg, built on the meta device (allocates nothing)."""
    torch, _ = _require_torch()
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**cfg))
    return sum(p.numel() for p in model.parameters())
