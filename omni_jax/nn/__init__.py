"""Layers shared by every decoder: linear, norm, MLP, RoPE, KV cache, attention, MoE and the decoder stack."""
