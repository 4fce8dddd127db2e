"""Thinker logits and accept-layer hidden states equal transformers at fp32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from omni_jax.models.thinker import Thinker
from omni_jax.nn.kv_cache import KVCache

from tests import reference


def _our_params(cfg_dict, hf_dir):
    return reference.convert_roots(cfg_dict, hf_dir, ("thinker",))


def init_cache(config, batch, length, dtype=jnp.float32):
    return KVCache.create(config.thinker.text, batch, length, dtype)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


@pytest.mark.parametrize("variant", list(reference.VARIANTS))
def test_thinker_matches_transformers(hf_checkpoints, variant):
    hf_model, hf_dir, cfg_dict = hf_checkpoints[variant]
    config, params = _our_params(cfg_dict, hf_dir)
    B, T = 3, 11  # batch > 1, length not a power of two
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.thinker.text.vocab_size, (B, T))
    # Distinct t/h/w positions so the interleaved M-RoPE sections are really exercised.
    pos = np.stack([np.arange(T) * s + o for s, o in ((1, 0), (2, 1), (3, 2))])[:, None, :].repeat(B, 1)

    with torch.no_grad():
        out = hf_model.thinker.model(
            input_ids=torch.tensor(tokens), position_ids=torch.tensor(pos), output_hidden_states=True, use_cache=False
        )
        hf_logits = hf_model.thinker.lm_head(out.last_hidden_state).numpy()
        hf_accept = out.hidden_states[config.talker.accept_hidden_layer].numpy()
        hf_embed = out.hidden_states[0].numpy()

    model = Thinker(config)
    start = jnp.zeros((B,), jnp.int32)
    ours = jax.jit(model.apply)(
        {"params": params["thinker"]}, jnp.asarray(tokens), jnp.asarray(pos), init_cache(config, B, T), start
    )
    # fp32 on both sides; 1e-4 relative leaves room for summation-order differences only.
    print(variant, _rel(np.asarray(ours.logits), hf_logits), _rel(np.asarray(ours.accept_hidden), hf_accept))
    assert _rel(np.asarray(ours.logits), hf_logits) <= 1e-4
    assert _rel(np.asarray(ours.accept_hidden), hf_accept) <= 1e-4
    assert _rel(np.asarray(ours.embeds), hf_embed) <= 1e-6


def test_thinker_bf16_smoke(hf_checkpoints):
    """bf16 params and activations (the accelerator path): finite and close to the fp32 result."""
    _, hf_dir, cfg_dict = hf_checkpoints["base"]
    config, params = _our_params(cfg_dict, hf_dir)
    B, T = 2, 7
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.thinker.text.vocab_size, (B, T)))
    pos = jnp.broadcast_to(jnp.arange(T)[None, None], (3, B, T))
    start = jnp.zeros((B,), jnp.int32)
    ref = Thinker(config).apply({"params": params["thinker"]}, tokens, pos, init_cache(config, B, T), start)
    p16 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.bfloat16), params["thinker"])
    out = Thinker(config, jnp.bfloat16, jnp.bfloat16).apply(
        {"params": p16}, tokens, pos, init_cache(config, B, T, jnp.bfloat16), start
    )
    logits = np.asarray(out.logits)
    assert out.accept_hidden.dtype == jnp.bfloat16
    assert np.isfinite(logits).all()
    # bf16 keeps ~3 significant digits; through 4 layers a few percent of the logit range is expected.
    assert _rel(logits, np.asarray(ref.logits)) < 5e-2
