"""Code2Wav equals transformers' Qwen3OmniMoeCode2Wav at fp32 (full and chunked decode); the stateful stream
equals the full decode at every chunk size; the documented receptive field is exact; bf16 runs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from omni_jax import load_config
from omni_jax.config import parse_config
from omni_jax.errors import UsageError
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


def _small_code2wav():
    """A Code2Wav small enough to compile 25 stream steps in seconds (U = 12 samples per frame, D = 9, one
    transformer layer of window 8), with weights scaled up so the waveform is far from zero."""
    with open(os.path.join(reference.ROOT, "configs", "tiny.json")) as f:
        tree = json.load(f)
    tree["code2wav_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, sliding_window=8, decoder_dim=16, upsample_rates=[2, 3],
                                   upsampling_ratios=[2])
    config = parse_config(tree)
    params = registry.random_params(config, jnp.float32, seed=3, roots=("code2wav",))["code2wav"]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    leaves = [p + 0.1 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
    # committed to the device, as restored checkpoints are (uncommitted params hid a second compile per chunk size)
    return config, jax.device_put(jax.tree_util.tree_unflatten(treedef, leaves), jax.devices()[0])


def _stream_rows(stream, replies):
    """Stream replies[b] (a list of [Q, T] code arrays, one after another) through row b of `stream`, each
    reply starting with a reset and ending with a short chunk where T is not a multiple of the chunk size.
    Returns each row's list of reply waveforms."""
    n = stream.chunk_frames
    plans = []  # per row: (reply index, first frame) of every call
    for reps in replies:
        plans.append([(i, a) for i, r in enumerate(reps) for a in range(0, r.shape[1], n)])
    out = [[[] for _ in reps] for reps in replies]
    for k in range(max(map(len, plans))):
        step = [plan[k] if k < len(plan) else None for plan in plans]
        stream.reset([b for b, s in enumerate(step) if s is not None and s[1] == 0])
        wav = stream.decode([None if s is None else replies[b][s[0]][:, s[1]:s[1] + n] for b, s in enumerate(step)])
        for b, s in enumerate(step):
            assert (wav[b] is None) == (s is None)
            if s is not None:
                out[b][s[0]].append(wav[b])
    return [[np.concatenate(p) for p in row] for row in out]


def _max_stream_error(params, config, replies, chunk_sizes, fulls):
    worst = 0.0
    for chunk in chunk_sizes:
        got = _stream_rows(vocoder.VocoderStream(params, config, chunk, batch=len(replies)), replies)
        for row, ref_row in zip(got, fulls):
            for wav, ref in zip(row, ref_row):
                assert wav.shape == ref.shape, (chunk, wav.shape, ref.shape)
                worst = max(worst, float(np.max(np.abs(wav - ref))))
    return worst


def test_stream_equals_full_decode_every_chunk_size():
    """Rows of different lengths, one over 300 frames, one streaming a second reply after a reset: for every
    chunk size 1..25 the concatenated stream is the full decode, and each chunk size compiles exactly once."""
    config, params = _small_code2wav()
    cfg = config.code2wav
    rng = np.random.default_rng(5)
    replies = [[rng.integers(0, cfg.codebook_size, (cfg.num_quantizers, t))] for t in (310,)]
    replies.append([rng.integers(0, cfg.codebook_size, (cfg.num_quantizers, t)) for t in (95, 41)])
    fulls = [[np.asarray(vocoder.code2wav(params, r[None], config))[0] for r in row] for row in replies]
    assert fulls[0][0].shape == (310 * cfg.total_upsample - c2w.delay_samples(config),)
    assert min(float(np.max(np.abs(f))) for row in fulls for f in row) > 1e-2  # a waveform, not silence
    compiles = []  # XLA compiles of the stream step (a jit cache entry can hide a recompile: count the compiler)
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, fun_name="", **__: compiles.append(fun_name)
        if event.endswith("backend_compile_duration") and "_stream_step" in fun_name else None)
    err = _max_stream_error(params, config, replies, range(1, 26), fulls)
    print(f"stream vs full decode, chunk sizes 1..25: max abs {err:.2e}; {len(compiles)} stream-step compiles")
    assert err <= 1e-5
    assert len(compiles) == 25  # one per chunk size (batch 2): tails padded, later calls reuse it


def test_stream_equals_full_decode_transformers_weights(model):
    """The same at the tiny config with the converted transformers weights (U = 1920, two 72-frame layers)."""
    _, config, params = model
    codes = _codes(config, 2, 305, seed=2)
    replies = [[codes[0]], [codes[1, :, :33]]]
    fulls = [[np.asarray(vocoder.code2wav(params, r[None], config))[0] for r in row] for row in replies]
    err = _max_stream_error(params, config, replies, (1, 4, 25), fulls)
    peak = max(float(np.max(np.abs(f))) for row in fulls for f in row)
    print(f"stream vs full decode (transformers weights), chunks 1/4/25: max abs {err:.2e}, peak {peak:.2e}")
    assert err <= 1e-5 and err <= 1e-4 * peak  # the random HF init is quiet: bound the relative error too


def test_stream_state_is_constant_size_and_rejects_bad_chunks():
    config, params = _small_code2wav()
    state = vocoder.init_stream(params, config, batch=3)
    cfg = config.code2wav
    kv = [a for path, a in jax.tree_util.tree_flatten_with_path(state.cache)[0] if "key" in jax.tree_util.keystr(path)]
    # batch-major (rows are reset and masked by their leading index), layers next, then the window
    assert [a.shape[:3] for a in kv] == [(3, cfg.num_hidden_layers, cfg.sliding_window - 1)]
    assert all(a.shape[0] == 3 for a in jax.tree_util.tree_leaves(state.cache))
    for bad in (0, -1, 26, 2.5, True, "4"):
        with pytest.raises(UsageError, match=r"chunk_frames must be an integer in \[1, 25\]"):
            vocoder.VocoderStream(params, config, bad)
    stream = vocoder.VocoderStream(params, config, 3, batch=2)
    with pytest.raises(ValueError, match=r"row 0 needs codes \[16, 1..3\]"):
        stream.decode([np.zeros((16, 4), np.int32), None])
    stream.decode([np.zeros((16, 2), np.int32), None])  # row 0 ends mid-chunk: its padding is in the state
    with pytest.raises(ValueError, match="row 0 ended with a short chunk"):
        stream.decode([np.zeros((16, 3), np.int32), None])
    stream.reset([0])
    (wav, none) = stream.decode([np.zeros((16, 3), np.int32), None])
    assert none is None and len(wav) == 3 * cfg.total_upsample - c2w.delay_samples(config)  # a fresh reply again


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
