"""Every MoE dispatch strategy computes the same thing as running every expert on every token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.config import load_config
from omni_jax.nn.moe import (DISPATCH, Dispatch, SparseMoE, experts_dense, experts_grouped, experts_split, route,
                             split_experts)

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


@pytest.mark.parametrize("block", [None, 1, 2, 8, 64])
@pytest.mark.parametrize("n", [1, 3, 29])
def test_split_experts_equal_dense(weights, n, block):
    """Per-expert transposed arrays (the single-CPU layout) through lax.switch: same result as dense."""
    x, w, ids, _, wg, wu, wd = _case(weights, n, 11 + n)
    split = split_experts({"gate_proj": wg, "up_proj": wu, "down_proj": wd})
    assert sorted(split) == ["down_proj", "gate_up_proj"]
    assert len(split["gate_up_proj"]) == E and split["gate_up_proj"][3].shape == (2 * I, H)
    np.testing.assert_array_equal(split["gate_up_proj"][3], np.concatenate([wg[3].T, wu[3].T]))
    np.testing.assert_array_equal(split["down_proj"][5], wd[5].T)
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, split_experts(split), split))  # idempotent
    ref = experts_dense(x, w, ids, wg, wu, wd)
    got = jax.jit(lambda x, w, ids, *s: experts_split(x, w, ids, *s, block=block))(
        x, w, ids, split["gate_up_proj"], split["down_proj"])
    assert _rel(got, ref) < 1e-6


def test_sparse_moe_module_reads_split_params():
    """SparseMoE applied to split params gives what it gives on the stacked ones, whatever dispatch policy it was
    built with (the policy is for stacked experts; split params always run "split")."""
    cfg = load_config("tiny").talker.text  # has a shared expert too
    mod = SparseMoE(cfg)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, cfg.hidden_size)), jnp.float32)
    params = jax.tree.map(lambda a: a.unbox() if hasattr(a, "unbox") else a, mod.init(jax.random.PRNGKey(0), x)["params"],
                          is_leaf=lambda a: hasattr(a, "unbox"))
    ref = mod.apply({"params": params}, x)
    split = split_experts(params)
    got = mod.apply({"params": split}, x)
    assert _rel(got, ref) < 1e-6
    dense = SparseMoE(cfg, dispatch=Dispatch.always("dense"))
    assert _rel(dense.apply({"params": split}, x), ref) < 1e-6
    assert _rel(dense.apply({"params": params}, x), ref) < 1e-6
    with pytest.raises(ValueError, match="unknown moe dispatch 'split'"):
        Dispatch.always("split")


def test_unstack_layers_splits_experts_and_consumes_segments():
    """Scanned thinker-style params -> unrolled layers with split experts, cut straight from the stack, and
    attention kernels in the [out, in] layout; consume=True empties the input as it goes and gives the same
    arrays."""
    from omni_jax.nn.decoder import layer_name, segments, unstack_layers

    cfg = load_config("tiny").thinker.text
    rng = np.random.default_rng(5)
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    stack = {}
    for seg in segments(cfg, (1,)):
        n = seg.count
        mlp = {"router": rng.standard_normal((n, h, e)), "gate_proj": rng.standard_normal((n, e, h, i)),
               "up_proj": rng.standard_normal((n, e, h, i)), "down_proj": rng.standard_normal((n, e, i, h))}
        nh, hd = cfg.num_attention_heads, cfg.head_dim
        attn = {"q_proj": {"kernel": rng.standard_normal((n, h, nh, hd))},
                "o_proj": {"kernel": rng.standard_normal((n, nh, hd, h))},
                "q_norm": {"scale": rng.standard_normal((n, hd))}}
        stack[seg.name] = {"mlp": {k: jnp.asarray(v, jnp.float32) for k, v in mlp.items()},
                           "self_attn": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), attn),
                           "input_layernorm": {"scale": jnp.asarray(rng.standard_normal((n, h)), jnp.float32)}}
    keep = unstack_layers(stack, cfg, (1,), split_experts=True)
    names = [seg.name for seg in segments(cfg, (1,))]
    assert sorted(stack) == sorted(names)  # not consumed
    for seg in segments(cfg, (1,)):
        for j in range(seg.count):
            layer = keep[layer_name(seg.start + j)]
            src = stack[seg.name]
            np.testing.assert_array_equal(layer["mlp"]["router"], src["mlp"]["router"][j])
            np.testing.assert_array_equal(layer["input_layernorm"]["scale"], src["input_layernorm"]["scale"][j])
            at, sa = layer["self_attn"], src["self_attn"]
            np.testing.assert_array_equal(at["q_norm"]["scale"], sa["q_norm"]["scale"][j])
            np.testing.assert_array_equal(at["q_proj"]["kernel"], jnp.transpose(sa["q_proj"]["kernel"][j], (1, 2, 0)))
            np.testing.assert_array_equal(at["o_proj"]["kernel"], jnp.transpose(sa["o_proj"]["kernel"][j], (2, 0, 1)))
            assert sorted(layer["mlp"]) == ["down_proj", "gate_up_proj", "router"]
            for x in (0, e - 1):
                np.testing.assert_array_equal(layer["mlp"]["down_proj"][x], src["mlp"]["down_proj"][j, x].T)
                np.testing.assert_array_equal(layer["mlp"]["gate_up_proj"][x], np.concatenate(
                    [src["mlp"]["gate_proj"][j, x].T, src["mlp"]["up_proj"][j, x].T]))
    eaten = unstack_layers(dict(stack), cfg, (1,), split_experts=True, consume=True)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), eaten, keep))
    owned = dict(stack)
    unstack_layers(owned, cfg, (1,), split_experts=True, consume=True)
    assert owned == {}
    again = unstack_layers(keep, cfg, (1,), split_experts=True)  # already unrolled and split: the same arrays
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, again, keep))
