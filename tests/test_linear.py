"""The unrolled CPU layouts ([out, in] kernels, split code-predictor heads) compute what the checkpoint layout does."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.models.code_predictor import CodePredictor, frame_cache, split_lm_heads
from omni_jax.config import load_config
from omni_jax.nn.linear import Linear, out_in


@pytest.mark.parametrize("features,axes,in_axes,x_shape,bias", [
    (24, ("embed", "mlp"), 1, (2, 3, 16), False),
    ((4, 8), ("embed", "heads", "head_dim"), 1, (2, 3, 16), True),
    (16, ("heads", "head_dim", "embed"), 2, (2, 3, 4, 8), True),
])
def test_out_in_kernel_equals_checkpoint_layout(features, axes, in_axes, x_shape, bias):
    x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
    ref = Linear(features, axes, in_axes, bias)
    params = nn.unbox(ref.init(jax.random.PRNGKey(1), x)["params"])
    params = {k: jax.random.normal(jax.random.PRNGKey(i), a.shape) for i, (k, a) in enumerate(params.items())}
    want = ref.apply({"params": params}, x)
    moved = {**params, "kernel": out_in(params["kernel"], in_axes)}
    got = Linear(features, axes, in_axes, bias, out_in=True).apply({"params": moved}, x)
    assert got.shape == want.shape == x_shape[: len(x_shape) - in_axes] + (features if isinstance(features, tuple) else (features,))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    # the layouts differ, so passing one for the other is a shape error, not a silent wrong answer
    if moved["kernel"].shape != params["kernel"].shape:
        with pytest.raises(Exception, match="shape"):
            ref.apply({"params": moved}, x)


def test_split_lm_heads_give_the_stacked_heads_logits():
    cfg = load_config("tiny").talker
    cp_cfg, groups = cfg.code_predictor, cfg.num_code_groups
    stacked = CodePredictor(cp_cfg, groups)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 1, cp_cfg.hidden_size))
    pos = jnp.zeros((2, 1), jnp.int32)
    ck, cv = frame_cache(cp_cfg, 2, groups, jnp.float32)
    params = nn.unbox(stacked.init(jax.random.PRNGKey(1), x, pos, ck, cv, jnp.zeros((2,), jnp.int32))["params"])
    split = split_lm_heads(params)
    assert "lm_head" not in split and split_lm_heads(split).keys() == split.keys()
    unrolled = CodePredictor(cp_cfg, groups)  # the same module: it reads the split heads from the params
    h = jax.random.normal(jax.random.PRNGKey(3), (2, cp_cfg.hidden_size))
    for g in (0, groups - 2):
        want = stacked.apply({"params": params}, h, g, method="logits")
        np.testing.assert_array_equal(np.asarray(split[f"lm_head_{g}"]), np.asarray(params["lm_head"][g]).T)
        for group in (g, jnp.int32(g)):  # static index, and traced (lax.switch) as inside the frame's scan
            got = jax.jit(lambda p, h, gr: unrolled.apply({"params": p}, h, gr, method="logits"),
                          static_argnums=() if not isinstance(group, int) else (2,))(split, h, group)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
