"""Builds small random transformers Qwen3-Omni models: the numerical oracle for parity tests."""

from __future__ import annotations

import copy
import json
import os

import numpy as np

TINY_TOWERS = {
    "audio_config": dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                         output_dim=64, num_mel_bins=16, downsample_hidden_size=16),
    "vision_config": dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          deepstack_visual_indexes=[0], num_position_embeddings=16, patch_size=4),
}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config_dict(**thinker_text_overrides) -> dict:
    with open(os.path.join(ROOT, "configs", "tiny.json")) as f:
        cfg = json.load(f)
    cfg = copy.deepcopy(cfg)
    cfg["thinker_config"]["text_config"].update(thinker_text_overrides)
    return cfg


# Variants exercising norm_topk_prob, head counts, mrope_section and mlp_only_layers.
VARIANTS = {
    "base": {},
    "gqa1_noNorm_mlponly": dict(num_attention_heads=4, num_key_value_heads=1, norm_topk_prob=False, mlp_only_layers=[1, 2],
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000, "mrope_section": [4, 2, 2],
                                                  "interleaved": True, "mrope_interleaved": True}),
    "mha_hd8_sparse2": dict(num_attention_heads=8, num_key_value_heads=8, head_dim=8, decoder_sparse_step=2, num_experts=6,
                             num_experts_per_tok=3, rope_parameters={"rope_type": "default", "rope_theta": 1000000,
                                                                     "mrope_section": [2, 1, 1], "interleaved": True,
                                                                     "mrope_interleaved": True}),
}


def hf_config_dict(cfg: dict, vocab_size: int = 1024) -> dict:
    """Our json + the bits transformers needs that we do not (tiny audio/vision towers)."""
    cfg = copy.deepcopy(cfg)
    cfg["thinker_config"]["text_config"]["vocab_size"] = vocab_size
    cfg["thinker_config"].update(copy.deepcopy(TINY_TOWERS))
    cfg["talker_config"].setdefault("spatial_merge_size", 2)
    return cfg


def build_hf_model(cfg: dict, seed: int = 0):
    """A random fp32 transformers model whose every parameter (norms included) is perturbed."""
    import torch
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


def read_safetensors(hf_dir: str):
    from safetensors import safe_open

    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(hf_dir, name), "np") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)


# The fixture thinkers have a 1024-token vocab, so the chat/tts special ids are remapped below it
# (written into config.json, so a converted checkpoint carries them).
SPECIAL = dict(im_start_token_id=1000, im_end_token_id=1001, system_token_id=1002, user_token_id=1003,
               assistant_token_id=1004, tts_pad_token_id=1005, tts_bos_token_id=1006, tts_eos_token_id=1007)
# transformers' thinker rope index reads these; tiny.json leaves them out.
THINKER_EXTRA = dict(vision_start_token_id=151652, audio_start_token_id=151669)

# A talker unlike tiny.json's: more heads, 1-D-ish M-RoPE split, 6 experts top-3 without renormalisation,
# a 3-layer code predictor with one KV head.
TALKER_VARIANT = {
    "text_config": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, num_local_experts=6,
                        num_experts_per_tok=3, norm_topk_prob=False, shared_expert_intermediate_size=32,
                        num_hidden_layers=3, intermediate_size=96,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000, "mrope_section": [2, 1, 1],
                                         "interleaved": True}),
    "code_predictor_config": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_hidden_layers=3,
                                  intermediate_size=96),
}


def chat_ids(rng, system_len: int, user_len: int) -> list[int]:
    """A ChatML prompt in SPECIAL ids with random text tokens: [system turn], user turn, assistant header."""
    s = SPECIAL
    text = lambda n: [int(t) for t in rng.integers(0, 999, n)]
    out = []
    if system_len:
        out += [s["im_start_token_id"], s["system_token_id"]] + text(system_len) + [s["im_end_token_id"], 198]
    out += [s["im_start_token_id"], s["user_token_id"]] + text(user_len) + [s["im_end_token_id"], 198]
    return out + [s["im_start_token_id"], s["assistant_token_id"], 198]
