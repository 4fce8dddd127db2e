"""Sampling: filters keep exactly HF's support, penalty equals HF's processor, seeds reproduce, T=0 is greedy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from omni_jax.runtime.sampling import SamplingParams, process_logits, sample, seen_mask_from_ids, top_k_filter, top_p_filter

B, V = 4, 97


def _logits(seed=0, scale=3.0):
    return np.random.default_rng(seed).normal(0, scale, (B, V)).astype(np.float32)


def _history(seed=1, t=12):
    return np.random.default_rng(seed).integers(0, V, (B, t))  # repeated ids included


def test_top_k_keeps_exactly_the_k_largest():
    logits = _logits()
    for k in (1, 5, 40):
        out = np.asarray(top_k_filter(jnp.asarray(logits), k))
        expected = np.argsort(-logits, axis=-1)[:, :k]
        for b in range(B):
            assert set(np.flatnonzero(np.isfinite(out[b]))) == set(expected[b])
        kept = np.isfinite(out)
        np.testing.assert_array_equal(out[kept], logits[kept])  # kept logits untouched
        hf = TopKLogitsWarper(k)(None, torch.tensor(logits)).numpy()
        np.testing.assert_array_equal(np.isfinite(hf), kept)


def test_top_p_keeps_smallest_prefix_reaching_p():
    top_p = jax.jit(top_p_filter)  # p traced: one compile per shape
    probs = np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)
    logits = jnp.log(jnp.asarray(probs))
    # ascending cumsum: 0.05, 0.2, 0.5, 1.0; HF drops tokens with cumsum <= 1 - p.
    assert set(np.flatnonzero(np.isfinite(top_p(logits, 0.75)[0]))) == {0, 1}
    assert set(np.flatnonzero(np.isfinite(top_p(logits, 0.9)[0]))) == {0, 1, 2}
    assert set(np.flatnonzero(np.isfinite(top_p(logits, 0.3)[0]))) == {0}  # the top token is always kept
    assert set(np.flatnonzero(np.isfinite(top_p(logits, 1.0)[0]))) == {0, 1, 2, 3}
    x = _logits(3)
    for p in (0.1, 0.5, 0.9, 0.99):
        ours = np.isfinite(np.asarray(top_p(jnp.asarray(x), p)))
        hf = np.isfinite(TopPLogitsWarper(p)(None, torch.tensor(x)).numpy())
        np.testing.assert_array_equal(ours, hf)


def test_repetition_penalty_equals_hf_processor():
    logits, hist = _logits(4), _history(5)
    seen = seen_mask_from_ids(jnp.asarray(hist), V)
    for penalty in (1.3, 0.7):
        ours = np.asarray(process_logits(jnp.asarray(logits), SamplingParams.greedy(repetition_penalty=penalty), seen))
        hf = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(hist), torch.tensor(logits)).numpy()
        np.testing.assert_allclose(ours, hf, rtol=1e-6, atol=0)  # same fp32 mul/div: exact up to rounding mode


def test_full_chain_matches_hf_processor_list():
    logits, hist = _logits(6), _history(7)
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05, suppress_tokens=(3, 50))
    hf_chain = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.05), SuppressTokensLogitsProcessor([3, 50], device="cpu"),
        TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8),
    ])
    hf = hf_chain(torch.tensor(hist), torch.tensor(logits)).numpy()
    ours = np.asarray(process_logits(jnp.asarray(logits), params, seen_mask_from_ids(jnp.asarray(hist), V)))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(hf))
    np.testing.assert_allclose(ours[np.isfinite(ours)], hf[np.isfinite(hf)], rtol=1e-6)


def test_samples_stay_in_support_and_follow_the_distribution():
    logits = jnp.asarray(_logits(8, scale=1.0))
    params = SamplingParams(temperature=0.8, top_k=6)
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample(logits, k, params)))(keys))  # [N, B]
    probs = np.asarray(jax.nn.softmax(process_logits(logits, params), axis=-1))
    for b in range(B):
        assert set(np.unique(draws[:, b])) <= set(np.flatnonzero(probs[b] > 0))
        freq = np.bincount(draws[:, b], minlength=V) / len(keys)
        # 4000 draws: binomial std <= 0.008; 0.04 is 5 sigma.
        assert np.max(np.abs(freq - probs[b])) < 0.04


def test_same_seed_same_output_and_seeds_differ():
    logits = jnp.asarray(_logits(9, scale=0.5))
    params = SamplingParams(temperature=1.0, top_p=0.95)
    f = jax.jit(sample, static_argnums=2)
    a = [np.asarray(f(logits, jax.random.PRNGKey(s), params)) for s in range(6)]
    b = [np.asarray(f(logits, jax.random.PRNGKey(s), params)) for s in range(6)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert len({tuple(x) for x in a}) > 1  # near-flat logits: six seeds cannot all agree


@pytest.mark.parametrize("penalty,suppress", [(1.0, ()), (1.2, (0, 1, 2))])
def test_temperature_zero_is_greedy(penalty, suppress):
    logits, hist = _logits(10), _history(11)
    seen = seen_mask_from_ids(jnp.asarray(hist), V)
    params = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, repetition_penalty=penalty, suppress_tokens=suppress)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(hist), torch.tensor(logits))
    expected[:, list(suppress)] = -np.inf
    expected = expected.argmax(-1).numpy()
    for seed in range(3):
        np.testing.assert_array_equal(np.asarray(sample(jnp.asarray(logits), jax.random.PRNGKey(seed), params, seen)),
                                      expected)


def test_suppressed_tokens_never_sampled():
    logits = np.zeros((B, V), np.float32)
    logits[:, 7] = 20.0  # would win almost always
    params = SamplingParams(temperature=1.0, suppress_tokens=(7,))
    draws = np.asarray(jax.vmap(lambda k: sample(jnp.asarray(logits), k, params))(
        jax.random.split(jax.random.PRNGKey(1), 200)))
    assert not np.any(draws == 7)


def test_invalid_params_rejected():
    for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0.0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="seen"):
        process_logits(jnp.zeros((1, 4)), SamplingParams(repetition_penalty=1.1))


def test_per_row_settings_keep_the_same_support_as_static_ones():
    """sample_rows (served slots: settings as data, a key per row) draws from exactly the support process_logits
    keeps for the same static settings, row by row; temperature 0 rows are the argmax; a row's draws depend on
    its own key only."""
    from omni_jax.runtime.sampling import sample_rows

    sample_rows = jax.jit(sample_rows)
    logits = _logits(3)
    settings = [(0.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 7, 0.8)]  # (temperature, top_k, top_p) per row
    temp, top_k, top_p = (np.asarray(c, dt) for c, dt in zip(zip(*settings), (np.float32, np.int32, np.float32)))
    draws = np.stack([np.asarray(sample_rows(logits, jax.random.split(jax.random.PRNGKey(s), B), temp, top_k, top_p))
                      for s in range(300)])
    for b, (t, k, p) in enumerate(settings):
        if t == 0:
            assert (draws[:, b] == logits[b].argmax()).all()
            continue
        kept = np.isfinite(np.asarray(process_logits(logits[b:b + 1], SamplingParams(t, k, p))[0]))
        assert set(draws[:, b]) <= set(np.flatnonzero(kept)) and len(set(draws[:, b])) > 1
    # row 1 alone (same key) draws what it drew beside the others
    keys = jax.random.split(jax.random.PRNGKey(7), B)
    alone = sample_rows(logits[1:2], keys[1:2], temp[1:2], top_k[1:2], top_p[1:2])
    assert int(alone[0]) == int(sample_rows(logits, keys, temp, top_k, top_p)[1])
