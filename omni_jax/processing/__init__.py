"""Inputs to token ids and positions: the Qwen tokenizer and chat template, and M-RoPE position ids."""
