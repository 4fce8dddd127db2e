"""The vision encoder (transformers `Qwen3OmniMoeVisionEncoder`): pixel patches -> thinker-width rows + deepstack.

A patch is 2 frames x 16 x 16 pixels x 3 channels, flattened as the processor emits it; the Conv3d whose
stride equals its kernel is one matmul over that vector. A learned 48 x 48 position table, resampled
bilinearly (align_corners) to each frame's patch grid, is added; 2-D rotary (h and w halves of the head)
rotates q and k; blocks attend within one frame only. The processor orders a frame's patches by 2 x 2 merge
block, so four consecutive rows merge into one thinker token: the main merger normalises each patch, then
concatenates (LN 1152 -> 4608 -> GELU -> out); each deepstack merger taps a block's output and normalises
after concatenating.

Static shapes: the host lays frames on a grid [frames, S, patch_dim] with S the longest frame's patches
(a multiple of the merge unit), `valid` masking the padding as attention keys. Positions and resampling
taps are host arrays (`frame_inputs`), so one compiled program serves any image size of a bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config import OmniConfig, VisionEncoderConfig
from omni_jax.models.rules import Rule, identity, linear


def _dense(n: int, name: str, axes: tuple[str, str], dtype, param_dtype) -> nn.Dense:
    return nn.Dense(n, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))


def _layer_norm(name: str, param_dtype) -> nn.LayerNorm:
    axes = ("vision_embed",)
    return nn.LayerNorm(1e-6, dtype=jnp.float32, param_dtype=param_dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), axes),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes))


def rotary_cos_sin(hw: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """hw [..., 2] patch (row, col) -> cos, sin [..., head_dim]: row angles, col angles, repeated (rotate-half)."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim // 2, 2, dtype=jnp.float32) / (head_dim // 2)))
    ang = hw.astype(jnp.float32)[..., None] * inv  # [..., 2, head_dim // 4]
    ang = jnp.concatenate([ang[..., 0, :], ang[..., 1, :]], axis=-1)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


class Block(nn.Module):
    cfg: VisionEncoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, valid):
        """x [F, S, D] float32; cos/sin [F, S, 1, head_dim]; valid [F, S] bool (keys)."""
        c = self.cfg
        e, m = "vision_embed", "vision_mlp"
        f, s, d = x.shape
        h = _layer_norm("norm1", self.param_dtype)(x).astype(self.dtype)
        qkv = _dense(3 * d, "qkv", (e, "vision_qkv"), self.dtype, self.param_dtype)(h)
        q, k, v = jnp.moveaxis(qkv.reshape(f, s, 3, c.num_heads, c.head_dim), 2, 0)
        q = _rotate(q.astype(jnp.float32), cos, sin).astype(self.dtype)
        k = _rotate(k.astype(jnp.float32), cos, sin).astype(self.dtype)
        scores = jnp.einsum("fqhd,fkhd->fhqk", q, k, preferred_element_type=jnp.float32) * c.head_dim ** -0.5
        scores = jnp.where(valid[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        attn = jnp.einsum("fhqk,fkhd->fqhd", probs, v).reshape(f, s, d)
        x = x + _dense(d, "proj", (e, e), self.dtype, self.param_dtype)(attn).astype(jnp.float32)
        h = _layer_norm("norm2", self.param_dtype)(x).astype(self.dtype)
        h = nn.gelu(_dense(c.intermediate_size, "linear_fc1", (e, m), self.dtype, self.param_dtype)(h),
                    approximate=True)
        return x + _dense(d, "linear_fc2", (m, e), self.dtype, self.param_dtype)(h).astype(jnp.float32)


class Merger(nn.Module):
    """Four merge-block patches -> one thinker row. postshuffle: normalise after concatenating (deepstack)."""

    cfg: VisionEncoderConfig
    postshuffle: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x [F, S, D] -> [F, S / merge_unit, out_hidden_size] float32."""
        c = self.cfg
        f, s, d = x.shape
        wide = d * c.merge_unit
        if self.postshuffle:
            x = _layer_norm("ln_q", self.param_dtype)(x.reshape(f, s // c.merge_unit, wide))
        else:
            x = _layer_norm("ln_q", self.param_dtype)(x).reshape(f, s // c.merge_unit, wide)
        x = _dense(wide, "mlp_0", ("vision_merge", "vision_merge"), self.dtype, self.param_dtype)(x.astype(self.dtype))
        x = nn.gelu(x, approximate=False)
        x = _dense(c.out_hidden_size, "mlp_2", ("vision_merge", "embed"), self.dtype, self.param_dtype)(x)
        return x.astype(jnp.float32)


class VisionEncoder(nn.Module):
    cfg: VisionEncoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, patches, valid, hw, taps, tap_weights):
        """patches [F, S, patch_dim]; valid [F, S] bool; hw [F, S, 2] int (patch row, col); taps [F, S, 4] int
        and tap_weights [F, S, 4] float (bilinear resampling of the position table).
        -> (merged [F, S/4, out], deepstack [levels, F, S/4, out]), float32."""
        c = self.cfg
        x = _dense(c.hidden_size, "patch_embed", ("vision_patch", "vision_embed"), self.dtype,
                   self.param_dtype)(patches.astype(self.dtype)).astype(jnp.float32)
        table = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("vision_pos", "vision_embed")),
                           (c.num_position_embeddings, c.hidden_size), self.param_dtype)
        x = x + jnp.einsum("fsk,fskd->fsd", tap_weights.astype(jnp.float32), table[taps].astype(jnp.float32))
        cos, sin = rotary_cos_sin(hw, c.head_dim, c.rope_theta)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        deep = []
        for i in range(c.depth):
            x = Block(c, self.dtype, self.param_dtype, name=f"blocks_{i}")(x, cos, sin, valid)
            if i in c.deepstack_visual_indexes:
                level = c.deepstack_visual_indexes.index(i)
                deep.append((level, Merger(c, True, self.dtype, self.param_dtype, name=f"merger_list_{level}")(x)))
        merged = Merger(c, False, self.dtype, self.param_dtype, name="merger")(x)
        deep = jnp.stack([d for _, d in sorted(deep, key=lambda t: t[0])]) if deep else jnp.zeros((0,) + merged.shape)
        return merged, deep


# ---------------------------------------------------------------------------- host-side layout

def merge_order(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Patch (row, col) of each position of a frame's patch sequence, in 2x2-merge-block order."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    return (rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1),
            cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1))


def bilinear_taps(rows: np.ndarray, cols: np.ndarray, h: int, w: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Four table indices and weights per patch: the side x side table resampled to h x w, align_corners."""
    def axis(i, n):
        src = i.astype(np.float64) * (side - 1) / max(n - 1, 1)
        lo = np.floor(src)
        frac = src - lo
        lo = lo.astype(np.int64)
        return np.stack([np.clip(lo, 0, side - 1), np.clip(lo + 1, 0, side - 1)], -1), np.stack([1 - frac, frac], -1)

    (ht, hw_), (wt, ww) = axis(rows, h), axis(cols, w)
    taps = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
    weights = (hw_[:, :, None] * ww[:, None, :]).reshape(-1, 4)
    return taps.astype(np.int32), weights.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FrameGrid:
    """A call's images/videos laid out frame by frame, and where each one's merged rows come out."""

    patches: np.ndarray  # [F, S, patch_dim] float32
    valid: np.ndarray  # [F, S] bool
    hw: np.ndarray  # [F, S, 2] int32
    taps: np.ndarray  # [F, S, 4] int32
    tap_weights: np.ndarray  # [F, S, 4] float32
    rows: tuple[int, ...]  # merged rows (= placeholder tokens) per item

    def gather(self, merged: np.ndarray, merge_unit: int) -> list[np.ndarray]:
        """Per item, its [rows, out] rows in prompt order (frames in order, merge blocks in order)."""
        keep = self.valid[:, ::merge_unit]
        flat = np.asarray(merged)[keep]
        return np.split(flat, np.cumsum(self.rows)[:-1])


def frame_grid(items: Sequence[tuple[np.ndarray, tuple[int, int, int]]], cfg: VisionEncoderConfig,
               frames: int | None = None, frame_len: int | None = None) -> FrameGrid:
    """items: (patches [t*h*w, patch_dim] as the processor emits them, grid (t, h, w)). frames / frame_len: pad
    the grid to these sizes (static shape buckets); None: as small as fits."""
    m = cfg.spatial_merge_size
    need_f = sum(t for _, (t, _, _) in items)
    need_s = max(h * w for _, (_, h, w) in items)
    frames = need_f if frames is None else frames
    frame_len = need_s if frame_len is None else frame_len
    if frames < need_f or frame_len < need_s or frame_len % cfg.merge_unit:
        raise ValueError(f"these items need {need_f} frames of {need_s} patches; the grid has {frames} of {frame_len}")
    patches = np.zeros((frames, frame_len, cfg.patch_dim), np.float32)
    valid = np.zeros((frames, frame_len), bool)
    hw = np.zeros((frames, frame_len, 2), np.int32)
    taps = np.zeros((frames, frame_len, 4), np.int32)
    weights = np.zeros((frames, frame_len, 4), np.float32)
    slot, rows = 0, []
    for pix, (t, h, w) in items:
        pix = np.asarray(pix, np.float32)
        if pix.shape != (t * h * w, cfg.patch_dim) or h % m or w % m:
            raise ValueError(f"patches {pix.shape} do not match grid {(t, h, w)} x {cfg.patch_dim} (h, w multiples "
                             f"of {m})")
        r, c = merge_order(h, w, m)
        tp, wt = bilinear_taps(r, c, h, w, cfg.grid_side)
        n = h * w
        for j in range(t):
            patches[slot, :n] = pix[j * n:(j + 1) * n]
            valid[slot, :n] = True
            hw[slot, :n, 0], hw[slot, :n, 1] = r, c
            taps[slot, :n], weights[slot, :n] = tp, wt
            slot += 1
        rows.append(t * n // cfg.merge_unit)
    return FrameGrid(patches, valid, hw, taps, weights, tuple(rows))


# ---------------------------------------------------------------------------- registry hooks

def build(config: OmniConfig, dtype) -> tuple[nn.Module, tuple]:
    cfg = config.thinker.vision
    if cfg is None:
        raise ValueError("this config has no thinker_config.vision_config")
    s = cfg.merge_unit
    args = (jnp.zeros((1, s, cfg.patch_dim), jnp.float32), jnp.ones((1, s), bool), jnp.zeros((1, s, 2), jnp.int32),
            jnp.zeros((1, s, 4), jnp.int32), jnp.zeros((1, s, 4), jnp.float32))
    return VisionEncoder(cfg, dtype, dtype), args


def _patch_kernel(a: np.ndarray) -> np.ndarray:
    """torch Conv3d weight [out, C, T, P, P] -> Dense kernel [C*T*P*P, out] (the processor's flatten order)."""
    return a.reshape(a.shape[0], -1).T


def hf_rules(config: OmniConfig) -> list[Rule]:
    """Rules for every `thinker.visual.*` checkpoint key onto the tree rooted at 'visual'."""
    root, pre = ("visual",), r"thinker\.visual\."

    def fixed(pattern: str, path: tuple[str, ...], fn=identity) -> Rule:
        return Rule(pre + pattern, lambda m: (root + path, ()), fn)

    def indexed(group: str, pattern: str, path: tuple[str, ...], fn=identity) -> Rule:
        return Rule(pre + group + r"\.(\d+)\." + pattern,
                    lambda m: (root + (f"{group}_{m.group(1)}",) + path, ()), fn)

    rules = [fixed(r"patch_embed\.proj\.weight", ("patch_embed", "kernel"), _patch_kernel),
             fixed(r"patch_embed\.proj\.bias", ("patch_embed", "bias")),
             fixed(r"pos_embed\.weight", ("pos_embed",))]
    for name in ("norm1", "norm2"):
        rules += [indexed("blocks", rf"{name}\.weight", (name, "scale")),
                  indexed("blocks", rf"{name}\.bias", (name, "bias"))]
    for hf, ours in (("attn.qkv", "qkv"), ("attn.proj", "proj"), ("mlp.linear_fc1", "linear_fc1"),
                     ("mlp.linear_fc2", "linear_fc2")):
        rules += [indexed("blocks", rf"{hf.replace('.', chr(92) + '.')}\.weight", (ours, "kernel"), linear),
                  indexed("blocks", rf"{hf.replace('.', chr(92) + '.')}\.bias", (ours, "bias"))]
    merger = [(r"ln_q\.weight", ("ln_q", "scale"), identity), (r"ln_q\.bias", ("ln_q", "bias"), identity),
              (r"mlp\.0\.weight", ("mlp_0", "kernel"), linear), (r"mlp\.0\.bias", ("mlp_0", "bias"), identity),
              (r"mlp\.2\.weight", ("mlp_2", "kernel"), linear), (r"mlp\.2\.bias", ("mlp_2", "bias"), identity)]
    for pattern, path, fn in merger:
        rules += [fixed(r"merger\." + pattern, ("merger",) + path, fn),
                  indexed("merger_list", pattern, path, fn)]
    return rules
