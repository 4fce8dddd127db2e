"""Every MoE dispatch strategy computes the same thing as running every expert on every token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.moe import DISPATCH, experts_dense, experts_grouped, route

E, H, I, K = 16, 32, 24, 4


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    router = jnp.asarray(rng.standard_normal((H, E)), jnp.float32)
    wg, wu = (jnp.asarray(rng.standard_normal((E, H, I)) * 0.1, jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((E, I, H)) * 0.1, jnp.float32)
    return router, wg, wu, wd


def _case(weights, n, seed):
    router, wg, wu, wd = weights
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, H)), jnp.float32)
    w, ids = route(x, router, K, True)
    valid = jnp.asarray(rng.random((n, K)) > 0.4)
    return x, w, ids, valid, wg, wu, wd


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("name", sorted(DISPATCH))
@pytest.mark.parametrize("n", [1, 3, 37])
def test_dispatch_equals_dense(weights, name, n):
    x, w, ids, valid, wg, wu, wd = _case(weights, n, n)
    ref = experts_dense(x, w, ids, wg, wu, wd)
    got = jax.jit(DISPATCH[name])(x, w, ids, wg, wu, wd)
    assert _rel(got, ref) < 1e-6  # fp32 summation order only
    if name != "dense":
        # Expert-parallel shards: masked copies contribute exactly nothing.
        ref_v = experts_dense(x, jnp.where(valid, w, 0), jnp.where(valid, ids, 0), wg, wu, wd)
        got_v = jax.jit(lambda *a: DISPATCH[name](*a, valid=valid))(x, w, ids, wg, wu, wd)
        assert _rel(got_v, ref_v) < 1e-6


@pytest.mark.parametrize("block", [1, 2, 8, 64])
def test_grouped_blocks_overrunning_experts(weights, block):
    """Blocks longer than an expert's rows spill into the next expert's rows; those get rewritten."""
    x, w, ids, _, wg, wu, wd = _case(weights, 29, 7)
    ref = experts_dense(x, w, ids, wg, wu, wd)
    got = jax.jit(lambda *a: experts_grouped(*a, block=block))(x, w, ids, wg, wu, wd)
    assert _rel(got, ref) < 1e-6
