"""Attention over the cache reads only a length bucket's rows, and equals attending over every row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.nn import kv_cache
from omni_jax.nn.attention import attention_mask, cached_attention, dot_attention


def test_length_buckets():
    assert kv_cache.length_buckets(1024) == (128, 512, 1024)
    assert kv_cache.length_buckets(1000) == (128, 512, 1000)
    assert kv_cache.length_buckets(2048, growth=2) == (128, 256, 512, 1024, 2048)
    assert kv_cache.length_buckets(128) == (128,)
    assert kv_cache.length_buckets(16) == (16,)


@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("starts,t", [((0, 5), 1), ((126, 3), 2), ((127, 0), 1), ((128, 40), 1), ((200, 511), 1), ((511, 512), 2),
                                       ((600, 1), 3), ((1022, 7), 2)])
def test_cached_attention_equals_full_buffer(starts, t, window):
    layers, b, kvh, n, d, s = 2, 2, 2, 4, 8, 1024
    rng = np.random.default_rng(sum(starts) + t)
    ck, cv = (jnp.asarray(rng.standard_normal((layers, b, kvh, s, d)), jnp.float32) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((b, t, n, d)), jnp.float32)
    q_pos = jnp.asarray(starts)[:, None] + jnp.arange(t)[None, :]
    layer = jnp.int32(1)
    want = dot_attention(q, ck[1], cv[1], attention_mask(q_pos, s, window), d**-0.5)
    got = jax.jit(lambda *a: cached_attention(*a, window, d**-0.5, jnp.float32))(q, ck, cv, layer, q_pos)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
