"""Code2Wav equals transformers' Qwen3OmniMoeCode2Wav at fp32 (full and chunked decode); incremental decode with
the documented left context equals the full decode; the documented receptive field is exact; bf16 runs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from omni_jax import load_config
from omni_jax.checkpoint import convert
from omni_jax.models import code2wav as c2w
from omni_jax.models import registry
from omni_jax.runtime import vocoder
from tests import reference

MANIFEST = os.path.join(reference.ROOT, "tools", "data", "code2wav_weight_manifest.tsv")


@pytest.fixture(scope="module")
def model(hf_checkpoints):
    hf_model, hf_dir, cfg_dict = hf_checkpoints["base"]
    config, params = reference.convert_roots(cfg_dict, hf_dir, ("code2wav",))
    return hf_model.code2wav, config, jax.tree_util.tree_map(jnp.asarray, params["code2wav"])


def _codes(config, batch, frames, seed):
    cfg = config.code2wav
    return np.random.default_rng(seed).integers(0, cfg.codebook_size, (batch, cfg.num_quantizers, frames))


def _rel_l2(ours, ref):
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def test_full_decode_matches_transformers(model):
    hf, config, params = model
    codes = _codes(config, 2, 11, seed=0)
    with torch.no_grad():
        ref = hf(torch.tensor(codes)).numpy()[:, 0]
    ours = np.asarray(vocoder.code2wav(params, codes, config))
    # HF's length: each trimmed transposed conv loses one step, D = 555 samples in all.
    assert ours.shape == ref.shape == (2, c2w.wav_length(config, 11)) == (2, 11 * config.code2wav.total_upsample - 555)
    err = _rel_l2(ours, ref)
    print("full decode rel L2", err)
    assert err <= 1e-4  # fp32 both sides: summation order only


def test_chunked_decode_matches_transformers(model):
    hf, config, params = model
    t, chunk, left = 100, 40, 25  # 3 chunks: no context, full context (start 40 > 25), short last chunk
    codes = _codes(config, 2, t, seed=1)
    with torch.no_grad():
        ref = hf.chunked_decode(torch.tensor(codes), chunk_size=chunk, left_context_size=left).numpy()[:, 0]
    plan = vocoder.chunk_plan(t, chunk, left)
    assert plan == [(0, 40, 0), (40, 80, 25), (80, 100, 25)]
    ours = np.asarray(vocoder.chunked_decode(params, codes, config, chunk_size=chunk, left_context_size=left))
    assert ours.shape == ref.shape == (2, t * config.code2wav.total_upsample - len(plan) * c2w.delay_samples(config))
    err = _rel_l2(ours, ref)
    print("chunked decode rel L2", err)
    assert err <= 1e-4  # fp32 both sides: summation order only


def test_incremental_decode_equals_full(model):
    _, config, params = model
    cfg = config.code2wav
    context = c2w.required_left_context(config)
    assert context == cfg.num_hidden_layers * (cfg.sliding_window - 1) + c2w.conv_context_frames(config)
    t = context + 28  # so the 25-frame chunks also reach the steady state (start > context, no padding)
    codes = _codes(config, 1, t, seed=2)
    full = np.asarray(vocoder.code2wav(params, codes, config))
    u, d = cfg.total_upsample, c2w.delay_samples(config)
    for chunk in (4, 25):
        pieces = []
        for start in range(0, t, chunk):
            end = min(start + chunk, t)
            piece = np.asarray(vocoder.decode_incremental(params, codes, start, end, config, pad_frames_to=chunk))
            assert piece.shape[-1] == end * u - d - max(0, start * u - d)
            pieces.append(piece)
        inc = np.concatenate(pieces, axis=-1)
        assert inc.shape == full.shape
        err = float(np.max(np.abs(inc - full)))
        print(f"incremental chunk={chunk} context={context}: max abs {err:.3g}")
        assert err <= 1e-5  # same arithmetic up to reduction order over masked (exactly zero) terms


def test_receptive_field_is_exact(model):
    """Forward-mode derivative of one sample w.r.t. one frame's embeddings: zero exactly outside the documented
    dependency range [a - required_left_context, a] of sample a*U - D, and not zero at its ends."""
    _, config, params = model
    cfg = config.code2wav
    context = c2w.required_left_context(config)
    t = context + 4
    a = t - 1
    # Frame f uses code f in every quantizer, so embedding rows q*codebook_size + f belong to frame f only.
    codes = np.broadcast_to(np.arange(t)[None, None, :], (1, cfg.num_quantizers, t))
    table = params["code_embedding"]["embedding"]

    def wav(emb):
        return vocoder.code2wav({**params, "code_embedding": {"embedding": emb}}, codes, config)[0]

    def tangent(frame):
        rows = np.arange(cfg.num_quantizers) * cfg.codebook_size + frame
        return jnp.zeros_like(table).at[rows].set(1.0)

    frames = jnp.array([a - context - 1, a - context, a - 1, a])
    tangents = jax.vmap(tangent)(frames)
    jvp = jax.jit(jax.vmap(lambda tan: jax.jvp(wav, (table,), (tan,))[1]))(tangents)
    m0 = a * cfg.total_upsample - c2w.delay_samples(config)  # first sample that frame a completes
    dy = np.asarray(jvp[:, m0 - 1: m0 + 1])
    print("d wav[m0-1:m0+1] / d frame", dict(zip(map(int, frames), dy.tolist())))
    assert dy[0, 1] == 0.0  # one frame beyond the context: no influence at all
    assert dy[1, 1] != 0.0  # the context's first frame matters: the number is tight
    assert dy[3, 0] == 0.0 and dy[3, 1] != 0.0  # causal with delay D: frame a reaches sample m0, not m0 - 1
    assert dy[2, 0] != 0.0


def test_bf16_smoke(model):
    _, config, params = model
    codes = _codes(config, 2, 11, seed=0)  # same shape as the fp32 test: reuses its compile
    bf16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
    ours = np.asarray(vocoder.code2wav(bf16, codes, config))
    ref = np.asarray(vocoder.code2wav(params, codes, config))
    assert ours.dtype == np.float32 and ours.shape == (2, 11 * config.code2wav.total_upsample - 555)
    assert np.all(np.isfinite(ours)) and np.max(np.abs(ours)) <= 1.0
    err = _rel_l2(ours, ref)
    print("bf16 vs fp32 rel L2", err)
    assert err <= 0.1  # bf16 has ~3 significant digits; a layout or cast bug gives O(1)


def test_hf_rules_cover_real_checkpoint():
    """Every code2wav tensor of the real checkpoint (names+shapes copied from its index) lands on a param of the
    real config's tree with the right shape, and every param element is covered exactly once."""
    config = load_config("qwen3_omni_30b_a3b_instruct")
    abstract = registry.abstract_params(config, roots=("code2wav",))
    rules = c2w.hf_rules(config)
    covered: dict[tuple, int] = {}
    with open(MANIFEST) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    assert len(rows) == 230
    for key, shape in rows:
        rule, path, index = convert.match_key(key, rules)
        leaf = convert.get_path(abstract, path)
        value = rule.transform(np.broadcast_to(np.float32(0), tuple(json.loads(shape))))
        convert.check_slice(key, path, index, value, leaf.shape)
        covered[path] = covered.get(path, 0) + value.size
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        p = tuple(k.key for k in path)
        assert covered.get(p, 0) == int(np.prod(leaf.shape)), p
