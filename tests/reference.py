"""Builds small random transformers Qwen3-Omni models: the numerical oracle for parity tests."""

from __future__ import annotations

import copy
import json
import os

from omni_jax import parse_config
from omni_jax.checkpoint.convert import convert_tensors
from omni_jax.models import registry
from tools.hf_reference import (  # noqa: F401  (re-exported: the shared reference code lives there)
    TINY_TOWERS, build_hf_model, hf_config_dict, read_safetensors, save_hf_model,
)

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


# The fixture thinkers have a 1024-token vocab, so the chat/tts special ids are remapped below it
# (written into config.json, so a converted checkpoint carries them).
SPECIAL = dict(im_start_token_id=1000, im_end_token_id=1001, system_token_id=1002, user_token_id=1003,
               assistant_token_id=1004, tts_pad_token_id=1005, tts_bos_token_id=1006, tts_eos_token_id=1007)
# transformers' thinker rope index reads these; tiny.json leaves them out. The audio and vision ids sit below the
# fixture vocab too, so prompts can carry audio, image and video placeholders.
THINKER_EXTRA = dict(audio_token_id=1008, audio_start_token_id=1009, audio_end_token_id=1010,
                     vision_start_token_id=1011, vision_end_token_id=1012, image_token_id=1013, video_token_id=1014)
#: The talker's copies of those ids (transformers' talker reads its own config; the released one repeats the
#: thinker's values, position_id_per_seconds 13 included).
TALKER_EXTRA = dict(audio_token_id=1008, audio_start_token_id=1009, vision_start_token_id=1011, image_token_id=1013,
                    video_token_id=1014, position_id_per_seconds=13)

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


def hf_generate(hf, prompt: list[int], speaker: str, thinker_new: int, talker_new: int, eos_id: int, **extra):
    """transformers' greedy single-sequence speech generate: (new text ids, codes [16, T] fed to code2wav,
    waveform). extra: more generate arguments (input_features, feature_attention_mask)."""
    import torch

    cap, orig = {}, hf.code2wav.chunked_decode

    def chunked_decode(codes, **kw):
        cap["codes"] = codes.clone()
        return orig(codes, **kw)

    hf.code2wav.chunked_decode = chunked_decode
    try:
        seq, wav = hf.generate(
            input_ids=torch.tensor([prompt]), speaker=speaker, return_audio=True, thinker_do_sample=False,
            talker_do_sample=False, thinker_max_new_tokens=thinker_new, talker_max_new_tokens=talker_new,
            thinker_eos_token_id=eos_id, **extra)
    finally:
        del hf.code2wav.chunked_decode
    return seq[0, len(prompt):].tolist(), cap["codes"][0].numpy(), wav.reshape(-1).numpy()


def convert_roots(cfg_dict: dict, hf_dir: str, roots=("thinker",)):
    """(config, {root: params}) of the given components, converted in memory from a saved HF dir
    (checkpoint layout, numpy), with the converter's own rules and the registry's key ownership."""
    config = parse_config(cfg_dict)
    roots = tuple(roots)
    tensors = ((k, v) for k, v in read_safetensors(hf_dir)
               if registry.owner(k) is not None and registry.owner(k).name in roots)
    params = convert_tensors(tensors, registry.abstract_params(config, roots=roots), registry.hf_rules(config, roots))
    return config, params
