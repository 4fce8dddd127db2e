"""The vision encoder against transformers' Qwen3OmniMoeVisionEncoder at fp32 (rel L2 <= 1e-5): merged rows and
every deepstack level, for one call mixing a square image, a wide image and a 2-grid video (frames of different
sizes, so the grid pads frames and attention must stay inside each frame); plus a bf16 smoke test.

The config is small and random: 4-px patches, a 4 x 4 position table resampled to larger and smaller grids,
and deepstack taps on two of three blocks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from omni_jax.checkpoint.convert import convert_tensors
from omni_jax.config import VisionEncoderConfig
from omni_jax.models import vision_encoder as ve

SMALL = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=24,
             deepstack_visual_indexes=[0, 2], num_position_embeddings=16, patch_size=4, temporal_patch_size=2,
             spatial_merge_size=2, in_channels=3)
# (t, h, w) patch grids of one call: 6x6 (larger than the 4x4 table), 2x8 (wide), 2 frames of 4x2
GRIDS = [(1, 6, 6), (1, 2, 8), (2, 4, 2)]


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def case():
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeVisionEncoderConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeVisionEncoder

    hf_cfg = Qwen3OmniMoeVisionEncoderConfig(**SMALL)
    torch.manual_seed(0)
    hf = Qwen3OmniMoeVisionEncoder(hf_cfg).float().eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # perturb every weight (norms and biases included) away from its init
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    cfg = VisionEncoderConfig.from_hf(hf_cfg.to_dict(), "vision_config")
    model = ve.VisionEncoder(cfg)
    s = cfg.merge_unit
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, s, cfg.patch_dim)), jnp.ones((1, s), bool),
        jnp.zeros((1, s, 2), jnp.int32), jnp.zeros((1, s, 4), jnp.int32), jnp.zeros((1, s, 4))))
    tensors = [(f"thinker.visual.{k}", v.numpy()) for k, v in hf.state_dict().items()]
    params = convert_tensors(tensors, {"visual": nn.unbox(abstract["params"])}, ve.hf_rules(None))["visual"]
    rng = np.random.default_rng(3)
    items = [(rng.standard_normal((t * h * w, cfg.patch_dim)).astype(np.float32), (t, h, w)) for t, h, w in GRIDS]
    return hf, cfg, params, items


def _hf(hf, items):
    with torch.no_grad():
        out = hf(torch.tensor(np.concatenate([p for p, _ in items])), grid_thw=torch.tensor([g for _, g in items]))
    return out.pooler_output.numpy(), [d.numpy() for d in out.deepstack_features]


def _ours(cfg, params, items, dtype=jnp.float32, **pad):
    grid = ve.frame_grid(items, cfg, **pad)
    model = ve.VisionEncoder(cfg, dtype, dtype)
    merged, deep = jax.jit(model.apply)({"params": params}, grid.patches, grid.valid, grid.hw, grid.taps,
                                        grid.tap_weights)
    rows = grid.gather(merged, cfg.merge_unit)
    levels = [np.concatenate(grid.gather(d, cfg.merge_unit)) for d in np.asarray(deep)]
    return rows, levels


def test_encoder_and_deepstack_match_transformers(case):
    hf, cfg, params, items = case
    ref, ref_deep = _hf(hf, items)
    rows, levels = _ours(cfg, params, items)
    assert [r.shape[0] for r in rows] == [t * h * w // 4 for t, h, w in GRIDS]
    err = _rel_l2(np.concatenate(rows), ref)
    errs = [_rel_l2(a, b) for a, b in zip(levels, ref_deep)]
    print(f"merged rel L2 {err:.2e}; deepstack {[f'{e:.2e}' for e in errs]}")
    assert len(levels) == len(ref_deep) == 2
    assert err <= 1e-5 and max(errs) <= 1e-5


def test_padded_grid_leaves_rows_unchanged(case):
    """A bucketed grid (more frames, longer frames) gives the same rows: padding never leaks into attention."""
    _, cfg, params, items = case
    tight, _ = _ours(cfg, params, items)
    padded, _ = _ours(cfg, params, items, frames=6, frame_len=48)
    for a, b in zip(tight, padded):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="need"):
        ve.frame_grid(items, cfg, frames=2)


def test_encoder_bf16_smoke(case):
    _, cfg, params, items = case
    p16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    rows, levels = _ours(cfg, p16, items, jnp.bfloat16)
    assert all(np.isfinite(r).all() for r in rows) and all(np.isfinite(d).all() for d in levels)
    assert [r.shape for r in rows] == [(t * h * w // 4, cfg.out_hidden_size) for t, h, w in GRIDS]
