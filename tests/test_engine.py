"""Generation engine: greedy parity with transformers, per-row stopping, hidden-state collection,
bounded compilation and input validation (the launcher on these weights: tests/test_infer.py)."""

import collections
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from omni_jax.models.thinker import Thinker
from omni_jax.nn.kv_cache import KVCache
from omni_jax.processing.positions import text_positions
from omni_jax.runtime import layout
from omni_jax.runtime.sampling import SamplingParams
from omni_jax.runtime.thinker_engine import ThinkerEngine

from tests import reference

N_NEW = 32
GREEDY = SamplingParams.greedy()
PROMPTS = [[int(t) for t in np.random.default_rng(i).integers(0, 1000, n)] for i, n in enumerate((5, 9, 3))]


def _convert(cfg_dict, hf_dir):
    """The thinker's params in the layout this backend runs (unrolled, split experts on one CPU device)."""
    config, params = reference.convert_roots(cfg_dict, hf_dir, ("thinker",))
    return config, layout.choose().prepare(config, params)["thinker"]


def init_cache(config, batch, length, dtype=jnp.float32):
    return KVCache.create(config.thinker.text, batch, length, dtype)


def _hf_greedy(hf_model, prompts, n, **kwargs):
    """transformers greedy generate, left-padded batch (its convention), EOS disabled so every row runs n tokens."""
    thinker = hf_model.thinker
    if not hasattr(thinker.config, "vision_start_token_id"):
        # transformers 5.x thinker config lacks this field, which its text-only rope-index code still reads.
        thinker.config.vision_start_token_id = 151652
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = thinker.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                               eos_token_id=None, pad_token_id=0, **kwargs)
    assert out.shape[1] == width + n
    return out[:, width:].tolist()


@contextlib.contextmanager
def _count_compiles():
    """Counter of (stage, function name) for jax.monitoring trace and lowering events: they fire whether or
    not the persistent compilation cache then supplies the executable, so cache hits still count."""
    events = collections.Counter()

    def listener(event, duration, **kw):
        if event in ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration"):
            events[(event.rsplit("/", 1)[-1], kw.get("fun_name", "").removeprefix("jit(").removesuffix(")"))] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def base(hf_checkpoints):
    """(hf_model, engine, config) for the base variant; HF vocab is 1024, so the default EOS ids never occur."""
    hf_model, hf_dir, cfg_dict = hf_checkpoints["base"]
    config, params = _convert(cfg_dict, hf_dir)
    return hf_model, ThinkerEngine(config, params, max_len=64, buckets=(4, 8, 16, 32)), config


@pytest.fixture(scope="module")
def hf_reference(base):
    hf_model = base[0]
    return {"batch1": _hf_greedy(hf_model, PROMPTS[1:2], N_NEW), "batch3": _hf_greedy(hf_model, PROMPTS, N_NEW)}


def test_greedy_matches_transformers_batch1(base, hf_reference):
    _, engine, _ = base
    streamed = collections.defaultdict(list)
    res = engine.generate(PROMPTS[1:2], N_NEW, loop="python", callback=lambda row, tok: streamed[row].append(tok))
    assert res.tokens == hf_reference["batch1"]  # token for token, 32 tokens
    assert res.finish_reasons == ["length"]
    assert streamed[0] == res.tokens[0]


def test_greedy_matches_transformers_batch3_ragged(base, hf_reference):
    _, engine, _ = base
    streamed = collections.defaultdict(list)
    res = engine.generate(PROMPTS, N_NEW, loop="device", callback=lambda row, tok: streamed[row].append(tok))
    # HF left-pads, we right-pad with per-row lengths: every row must still match.
    assert res.tokens == hf_reference["batch3"]
    assert [streamed[i] for i in range(3)] == res.tokens
    assert res.sequences == [p + t for p, t in zip(PROMPTS, res.tokens)]


def test_greedy_matches_transformers_other_variant(hf_checkpoints):
    """kv_heads=1, dense (mlp_only) layers, no top-k renormalisation, other M-RoPE sections."""
    variant = "gqa1_noNorm_mlponly"
    hf_model, hf_dir, cfg_dict = hf_checkpoints[variant]
    config, params = _convert(cfg_dict, hf_dir)
    engine = ThinkerEngine(config, params, max_len=64, buckets=(16,))
    assert engine.generate(PROMPTS, N_NEW).tokens == _hf_greedy(hf_model, PROMPTS, N_NEW)


@pytest.mark.parametrize("loop", ["python", "device"])
def test_collects_hidden_states_like_transformers(base, hf_reference, loop):
    """collect_hidden returns embeds / accept-layer states for every prompt+generated position (as HF's
    hidden_states[0] / hidden_states[accept_hidden_layer] over the full sequence)."""
    hf_model, engine, config = base
    streamed = collections.defaultdict(list)
    res = engine.generate(PROMPTS, N_NEW, collect_hidden=True, loop=loop,
                          callback=lambda row, tok: streamed[row].append(tok))
    assert res.tokens == hf_reference["batch3"]
    assert [streamed[i] for i in range(3)] == res.tokens
    h = config.thinker.text.hidden_size
    assert res.embeds.shape == res.accept_hidden.shape == (3, max(res.total_lengths), h)
    for i, seq in enumerate(res.sequences):
        with torch.no_grad():
            out = hf_model.thinker.model(input_ids=torch.tensor([seq]), output_hidden_states=True, use_cache=False)
        n = len(seq)
        hf_emb = out.hidden_states[0][0].numpy()
        hf_acc = out.hidden_states[config.talker.accept_hidden_layer][0].numpy()
        assert np.max(np.abs(res.embeds[i, :n] - hf_emb)) == 0.0  # an embedding lookup: exact
        # fp32, accumulated over 32 decode steps vs one full forward: 1e-4 relative covers summation order.
        assert np.max(np.abs(res.accept_hidden[i, :n] - hf_acc)) <= 1e-4 * np.max(np.abs(hf_acc))
        assert not np.any(res.embeds[i, n:]) and not np.any(res.accept_hidden[i, n:])


def test_greedy_with_repetition_penalty_matches_transformers(base, hf_reference):
    """The seen-token mask (prompt + generated) reproduces HF's penalty over input_ids (which skips the
    left padding)."""
    hf_model, engine, _ = base
    res = engine.generate(PROMPTS, N_NEW, SamplingParams.greedy(repetition_penalty=1.3), loop="python")
    assert res.tokens == _hf_greedy(hf_model, PROMPTS, N_NEW, repetition_penalty=1.3)
    assert res.tokens != hf_reference["batch3"]  # the penalty really changed the continuation


def test_sampling_is_seeded_and_loop_independent(base):
    _, engine, _ = base
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1)
    a = engine.generate(PROMPTS, 12, params, seed=3, loop="python").tokens
    assert engine.generate(PROMPTS, 12, params, seed=3, loop="device").tokens == a  # same key chain
    assert engine.generate(PROMPTS, 12, params, seed=4, loop="python").tokens != a


def test_rows_stop_independently_on_eos_and_budget(base, hf_reference):
    _, engine, _ = base
    full = hf_reference["batch3"]
    # An id that row 0 first produces at step 6: row 0 must stop right there, the others wherever it
    # (first) occurs in their own continuation, or after the full budget.
    eos = next(t for k, t in enumerate(full[0]) if k >= 5 and t not in full[0][:k])
    res = engine.generate(PROMPTS, N_NEW, eos_ids=(eos,))
    for row, got in zip(full, res.tokens):
        cut = row.index(eos) + 1 if eos in row else N_NEW
        assert got == row[:cut]
    assert res.finish_reasons[0] == "eos" and len(res.tokens[0]) == full[0].index(eos) + 1
    short = engine.generate(PROMPTS, 3)
    assert short.tokens == [r[:3] for r in full] and short.finish_reasons == ["length"] * 3
    assert engine.generate(PROMPTS, 1).tokens == [r[:1] for r in full]


@pytest.mark.parametrize("loop,decode_fn", [("python", "decode_step"), ("device", "decode_loop")])
def test_compiles_once_per_bucket_plus_one_decode(base, loop, decode_fn):
    """10 prompt lengths x several budgets: prefill traces/lowers once per bucket touched, decode once
    (counted per function from jax.monitoring events, see `_count_compiles`)."""
    _, warm, config = base
    engine = ThinkerEngine(config, warm.params, max_len=64, buckets=(4, 8, 16, 32, 64), loop=loop)  # fresh jits
    lengths = [1, 2, 3, 5, 7, 8, 11, 16, 20, 29]
    budgets = [1, 4, 9, 2, 13]
    touched = {engine.bucket_for(n) for n in lengths}
    assert touched == {4, 8, 16, 32}  # 64 is never needed
    with _count_compiles() as events:
        after_first = None
        for i, n in enumerate(lengths):
            prompt = [int(t) for t in np.random.default_rng(100 + i).integers(0, 1000, n)]
            engine.generate([prompt], budgets[i % len(budgets)])
            if after_first is None:
                after_first = collections.Counter(events)
    for stage in ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration"):
        assert events[(stage, "prefill")] == len(touched)
        assert events[(stage, decode_fn)] == 1
    assert engine.prefill_fn._cache_size() == len(touched)
    assert (engine.decode_fn if loop == "python" else engine.loop_fn)._cache_size() == 1
    # Nothing else compiles per call: other functions (cache allocation, PRNG key) only in the first call.
    other = {k: v for k, v in events.items() if k[1] not in ("prefill", decode_fn)}
    assert other == {k: v for k, v in after_first.items() if k[1] not in ("prefill", decode_fn)}


CHUNK_PROMPTS = [[int(t) for t in np.random.default_rng(50 + i).integers(0, 1000, n)] for i, n in enumerate((3, 9, 13))]


@pytest.mark.parametrize("loop", ["python", "device"])
def test_chunked_prefill_matches_unchunked(base, loop):
    """prefill_chunk=4 on lengths 3/9/13 (bucket 16: 4 chunks; each row's last token in a different
    chunk) gives the unchunked engine's tokens and hidden states."""
    _, engine, _ = base
    ref = engine.generate(CHUNK_PROMPTS, 12, collect_hidden=True, loop=loop)
    compiled = engine.chunk_fn._cache_size()
    got = engine.generate(CHUNK_PROMPTS, 12, collect_hidden=True, loop=loop, prefill_chunk=4)
    assert engine.chunk_fn._cache_size() == max(compiled, 1)  # the chunked path really ran
    assert got.tokens == ref.tokens and got.sequences == ref.sequences
    assert np.max(np.abs(got.embeds - ref.embeds)) == 0.0  # an embedding lookup: exact
    # fp32; chunks change only the matmul shapes (summation order): 1e-5 absolute on O(1) activations.
    assert np.max(np.abs(got.accept_hidden - ref.accept_hidden)) <= 1e-5
    penalty = SamplingParams.greedy(repetition_penalty=1.3)  # the seen mask must span every chunk
    assert (engine.generate(CHUNK_PROMPTS, 12, penalty, loop=loop, prefill_chunk=4).tokens
            == engine.generate(CHUNK_PROMPTS, 12, penalty, loop=loop).tokens)


def test_chunked_prefill_compiles_once_per_chunk_size(base):
    """Prompt lengths 5..29 (buckets 8/16/32, 2..8 chunks) share one chunk compile; a prompt whose bucket
    fits in one chunk takes the unchunked prefill."""
    _, warm, config = base
    engine = ThinkerEngine(config, warm.params, max_len=64, buckets=(4, 8, 16, 32), prefill_chunk=4)  # fresh jits
    with _count_compiles() as events:
        for i, n in enumerate([5, 7, 9, 13, 20, 29, 3]):
            prompt = [int(t) for t in np.random.default_rng(200 + i).integers(0, 1000, n)]
            engine.generate([prompt], 3)
    for stage in ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration"):
        for fn in ("prefill_chunk_step", "empty_prompt", "first_token", "prefill"):
            assert events[(stage, fn)] == 1, (stage, fn)
    assert engine.chunk_fn._cache_size() == engine.prefill_fn._cache_size() == 1
    with pytest.raises(ValueError, match="prefill_chunk must be a positive int"):
        ThinkerEngine(config, warm.params, max_len=64, prefill_chunk=0)


def test_fresh_prefill_equals_reading_the_cache(base):
    """prefill(fresh=True) (the engine's: attention over the prompt's own keys, [T, T]) matches attending
    over the whole emptied cache buffer ([T, max_len], stale rows masked) on ragged rows."""
    import functools

    from omni_jax.runtime import thinker_engine as eng

    _, engine, config = base
    tokens = np.zeros((2, 16), np.int32)
    tokens[0, :9], tokens[1, :3] = PROMPTS[1], PROMPTS[2]
    lengths = np.array([9, 3], np.int32)
    args = (tokens, lengths, jax.random.PRNGKey(0), np.int32(4), np.array([-1], np.int32))
    outs = []
    for fresh in (False, True):
        fn = jax.jit(functools.partial(eng.prefill, model=engine.model, sampling=GREEDY, collect_hidden=True,
                                       fresh=fresh))
        cache = init_cache(config, 2, 64)
        cache = cache.replace(k=cache.k + 7.0, v=cache.v - 3.0)  # stale garbage past each row's length
        outs.append(fn(engine.params, cache, *args))
    (ref, ref_first, _), (got, first, _) = outs
    np.testing.assert_array_equal(np.asarray(first), np.asarray(ref_first))
    np.testing.assert_array_equal(np.asarray(got.cache.lengths), np.asarray(ref.cache.lengths))
    for a, b in ((got.cache.k, ref.cache.k), (got.cache.v, ref.cache.v), (got.accept_hidden, ref.accept_hidden)):
        assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= 1e-5  # fp32 summation order only


def test_prefill_accepts_explicit_positions_and_embeds(base):
    """Multimodal entry point: explicit M-RoPE positions/embeddings; shifted positions set rope_deltas."""
    _, engine, config = base
    model = Thinker(config)
    tokens = np.zeros((2, 8), np.int32)
    tokens[0, :5], tokens[1, :8] = PROMPTS[0], PROMPTS[1][:8]
    lengths = np.array([5, 8], np.int32)
    embeds = model.apply({"params": engine.params}, jnp.asarray(tokens), method=Thinker.embed)
    args = (np.int32(4), np.array([-1], np.int32))
    ref, ref_first, _ = engine.prefill_fn(engine.params, init_cache(config, 2, 64), tokens, lengths,
                                          jax.random.PRNGKey(0), *args, sampling=GREEDY)
    shift = 7
    got, first, _ = engine.prefill_fn(engine.params, init_cache(config, 2, 64), tokens, lengths,
                                      jax.random.PRNGKey(0), *args, text_positions(jnp.full((2,), shift), 8),
                                      embeds, sampling=GREEDY)
    # RoPE is relative: a constant shift of every position leaves attention, hence the token, unchanged.
    np.testing.assert_array_equal(np.asarray(first), np.asarray(ref_first))
    np.testing.assert_array_equal(np.asarray(got.rope_deltas), [shift, shift])
    np.testing.assert_array_equal(np.asarray(ref.rope_deltas), [0, 0])
    np.testing.assert_array_equal(np.asarray(got.cache.lengths), lengths)


def test_invalid_requests_raise_clear_errors(base):
    _, engine, config = base
    short = ThinkerEngine(config, engine.params, max_len=16, buckets=(4, 8))
    with pytest.raises(ValueError, match="longer than max_len=16"):
        short.generate([[1] * 17], 1)
    with pytest.raises(ValueError, match="largest prefill bucket 8"):
        short.generate([[1] * 9], 1)
    with pytest.raises(ValueError, match="does not fit max_len=16"):
        short.generate([[1] * 8], 9)
    with pytest.raises(ValueError, match="empty"):
        short.generate([[1], []], 2)
    with pytest.raises(ValueError, match="outside"):
        short.generate([[1, 5000]], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        short.generate([[1]], 0)
    with pytest.raises(ValueError, match="exceeds max_len"):
        ThinkerEngine(config, engine.params, max_len=16, buckets=(8, 32))
