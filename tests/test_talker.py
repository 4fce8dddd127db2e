"""Talker, code predictor and talker input assembly equal transformers at fp32.

End-to-end: HF's full `generate(..., return_audio=True)` is run with its thinker/talker/code2wav calls
wrapped to capture the thinker sequences + hidden states, the talker inputs it builds and the talker
codes; we rebuild the talker inputs from the captured thinker outputs and decode greedily.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from omni_jax.models.code_predictor import frame_cache
from omni_jax.models.talker import Talker
from omni_jax.nn.kv_cache import KVCache
from omni_jax.runtime import layout
from omni_jax.runtime.sampling import TalkerSampling, suppressed_codec_ids
from omni_jax.runtime.talker_engine import TalkerGenerator
from omni_jax.runtime.talker_inputs import tts_token_ids

from tests import reference

SPECIAL, THINKER_EXTRA, TALKER_VARIANT = reference.SPECIAL, reference.THINKER_EXTRA, reference.TALKER_VARIANT


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def _with_special(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg.update(SPECIAL)
    cfg["thinker_config"].update(THINKER_EXTRA)
    return cfg


class Case:
    def __init__(self, hf_model, hf_dir, cfg_dict):
        cfg = _with_special(cfg_dict)
        self.config, params = reference.convert_roots(cfg, hf_dir, ("talker",))
        self.hf = copy.deepcopy(hf_model)  # the fixture model is shared; only our copy gets remapped ids
        for k, v in SPECIAL.items():
            setattr(self.hf.config, k, v)
        for k, v in THINKER_EXTRA.items():
            setattr(self.hf.config.thinker_config, k, v)
            setattr(self.hf.thinker.config, k, v)
        self.gen = TalkerGenerator(self.config)
        self.model = self.gen.model
        self.params = layout.choose().prepare(self.config, params)["talker"]  # the layout this backend runs


@pytest.fixture(scope="module")
def cases(hf_checkpoints, tmp_path_factory):
    out = {"base": Case(*hf_checkpoints["base"])}
    cfg = copy.deepcopy(hf_checkpoints["base"][2])
    for sub, over in TALKER_VARIANT.items():
        cfg["talker_config"][sub].update(over)
    model = reference.build_hf_model(cfg, seed=11)
    d = reference.save_hf_model(model, str(tmp_path_factory.mktemp("hf_talker_variant")))
    out["talker_variant"] = Case(model, d, cfg)
    return out


CASES = ["base", "talker_variant"]


@pytest.mark.parametrize("name", CASES)
def test_projections(cases, name):
    c = cases[name]
    rng = np.random.default_rng(1)
    e = rng.standard_normal((2, 5, c.config.talker.thinker_hidden_size)).astype(np.float32)
    h = rng.standard_normal(e.shape).astype(np.float32)
    mm = rng.random((2, 5)) < 0.5
    with torch.no_grad():
        hf_t = c.hf.talker.text_projection(torch.tensor(e)).numpy()
        hf_h = c.hf.talker.hidden_projection(torch.tensor(h)).numpy()
    ours = c.model.apply({"params": c.params}, jnp.asarray(e), jnp.asarray(h), jnp.asarray(mm), method=Talker.project)
    # fp32 both sides: only summation order differs.
    assert _rel(np.asarray(ours), np.where(mm[..., None], hf_h, hf_t)) <= 1e-5


@pytest.mark.parametrize("name", CASES)
def test_talker_logits(cases, name):
    c = cases[name]
    b, t = 2, 7
    rng = np.random.default_rng(2)
    x = rng.standard_normal((b, t, c.config.talker.text.hidden_size)).astype(np.float32)
    # Distinct t/h/w positions exercise the interleaved M-RoPE sections.
    pos = np.stack([np.arange(t) * s + o for s, o in ((1, 0), (2, 1), (3, 2))])[:, None, :].repeat(b, 1)
    with torch.no_grad():
        out = c.hf.talker.model(inputs_embeds=torch.tensor(x), position_ids=torch.tensor(pos), use_cache=False)
        hf_logits = c.hf.talker.codec_head(out.last_hidden_state).numpy()

    def run(params, x, pos):
        h, _ = c.model.apply({"params": params}, x, pos, KVCache.create(c.config.talker.text, b, t), jnp.zeros((b,), jnp.int32),
                             method=Talker.forward)
        return c.model.apply({"params": params}, h, method=Talker.head)

    ours = np.asarray(jax.jit(run)(c.params, jnp.asarray(x), jnp.asarray(pos)))
    print(name, "talker logits rel err", _rel(ours, hf_logits))
    assert _rel(ours, hf_logits) <= 1e-4  # fp32 parity; summation order only


@pytest.mark.parametrize("name", CASES)
def test_code_predictor_frame(cases, name):
    c = cases[name]
    tk = c.config.talker
    g, b = tk.num_code_groups, 2
    rng = np.random.default_rng(3)
    hidden = rng.standard_normal((b, tk.text.hidden_size)).astype(np.float32)
    codes = rng.integers(0, tk.code_predictor.vocab_size, (b, g))
    cp = c.hf.talker.code_predictor
    with torch.no_grad():
        e0 = c.hf.talker.get_input_embeddings()(torch.tensor(codes[:, :1]))
        rest = [cp.get_input_embeddings()[i](torch.tensor(codes[:, i + 1:i + 2])) for i in range(g - 2)]
        x = torch.cat([torch.tensor(hidden[:, None])] + [e0] + rest, dim=1)  # teacher forcing: [B, G, H]
        hs = cp.model(inputs_embeds=x, use_cache=False).last_hidden_state
        hf_logits = np.stack([cp.lm_head[i](hs[:, i + 1]).numpy() for i in range(g - 1)], axis=1)  # [B, G-1, V]
        greedy = cp.generate(inputs_embeds=x[:, :2], max_new_tokens=g - 1, do_sample=False).numpy()
        # The next talker input (before text): talker emb(code0) + sum_g cp_emb[g-1](code_g), HF's formula.
        all_codes = torch.tensor(np.concatenate([codes[:, :1], greedy], 1))
        hf_sum = (c.hf.talker.get_input_embeddings()(all_codes[:, 0])
                  + sum(cp.get_input_embeddings()[i](all_codes[:, i + 1]) for i in range(g - 1))).numpy()

    pos = jnp.broadcast_to(jnp.arange(g)[None], (b, g))
    ck, cv = frame_cache(tk.code_predictor, b, g, jnp.float32)
    teacher_forced = jax.jit(lambda p, x: c.model.apply({"params": p}, "__call__", x, pos, ck, cv,
                                                         jnp.zeros((b,), jnp.int32), method=Talker.cp)[0])
    ours_all = teacher_forced(c.params, jnp.asarray(x.numpy()))
    ours = np.stack([np.asarray(ours_all)[:, i + 1, i] for i in range(g - 1)], axis=1)
    print(name, "code predictor logits rel err", _rel(ours, hf_logits))
    assert _rel(ours, hf_logits) <= 1e-4  # fp32 parity

    if name != "base":
        return  # the variant's greedy frames are checked end to end in test_generate_matches_hf
    frame, emb = c.gen.frame(c.params, jnp.asarray(hidden), jnp.asarray(codes[:, 0], jnp.int32),
                             jax.random.PRNGKey(0), sampling=TalkerSampling.greedy())
    np.testing.assert_array_equal(np.asarray(frame)[:, 1:], greedy)
    np.testing.assert_array_equal(np.asarray(frame)[:, 0], codes[:, 0])
    assert _rel(emb, hf_sum) <= 1e-5  # fp32 sum of 16 embeddings


def _hf_generate(c, rows, speaker, thinker_new, talker_new, inject_eos=None):
    """Run HF's full generate on left-padded rows; capture thinker output, talker kwargs and codes."""
    hf, cap = c.hf, {}
    length = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    orig_thinker, orig_talker = hf.thinker.generate, hf.talker.generate

    def thinker_generate(*a, **kw):
        out = orig_thinker(*a, **kw)
        if inject_eos is not None:  # make a row end early so the per-row tts_eos move is exercised
            row, j = inject_eos
            out.sequences[row, length + j] = SPECIAL["im_end_token_id"]
        cap["thinker"] = out
        return out

    def talker_generate(*a, **kw):
        cap["talker_kwargs"] = kw
        cap["talker"] = orig_talker(*a, **kw)
        return cap["talker"]

    def chunked_decode(codes, **kw):
        cap["codes"] = codes.clone()
        return torch.zeros(codes.shape[0], 1, codes.shape[-1] * c.hf.code2wav.total_upsample)

    hf.thinker.generate, hf.talker.generate = thinker_generate, talker_generate
    hf.code2wav.chunked_decode = chunked_decode
    try:
        hf.generate(input_ids=ids, attention_mask=mask if len(rows) > 1 else None, speaker=speaker, return_audio=True,
                    thinker_do_sample=False, talker_do_sample=False, thinker_max_new_tokens=thinker_new,
                    talker_max_new_tokens=talker_new, thinker_eos_token_id=SPECIAL["im_end_token_id"])
    finally:
        del hf.thinker.generate, hf.talker.generate, hf.code2wav.chunked_decode
    return ids.numpy(), mask.numpy(), cap


_chat = reference.chat_ids


E2E = {
    # name: (case, rows (system_len, user_len), speaker, thinker tokens, talker tokens, injected EOS (row, gen index))
    "base_batch2": ("base", [(3, 5), (0, 2)], "Ethan", 6, 10, (1, 2)),
    "variant_single": ("talker_variant", [(2, 4)], "chelsie", 5, 6, None),
    "base_batch2_short": ("base", [(3, 5), (0, 2)], "Ethan", 6, 6, (1, 2)),  # codec-EOS test (same rows)
}


def _e2e(c, params, e2e, keep=None):
    """HF full generate vs our input assembly + greedy talker on HF's thinker output.

    Checks the assembled talker inputs; returns (our TalkerCodes, HF codes, HF per-row lengths)."""
    name, shapes, speaker, thinker_new, talker_new, inject = E2E[e2e]
    rng = np.random.default_rng(4)
    rows = [_chat(rng, *s) for s in shapes]
    ids, mask, cap = _hf_generate(c, rows, speaker, thinker_new, talker_new, inject)
    res, kw = cap["thinker"], cap["talker_kwargs"]
    lp = ids.shape[1]
    seq = res.sequences.numpy()
    embeds = torch.cat([h[0] for h in res.hidden_states], 1).numpy()
    accept = torch.cat([h[c.config.talker.accept_hidden_layer] for h in res.hidden_states], 1).numpy()
    valid = [mask[r].astype(bool) for r in range(len(rows))]
    with torch.no_grad():
        tts = c.hf.thinker.get_input_embeddings()(torch.tensor(tts_token_ids(c.config))).numpy()
    inputs = c.gen.build_inputs(
        params,
        [seq[r, :lp][valid[r]] for r in range(len(rows))],
        [seq[r, lp:] for r in range(len(rows))],
        [np.concatenate([embeds[r, :lp][valid[r]], embeds[r, lp:]]) for r in range(len(rows))],
        [accept[r, :lp][valid[r]] for r in range(len(rows))],
        tts,
        speaker,
    )

    # Talker prompt: HF left-pads and masks, we right-pad; compare each row's real tokens.
    hf_embeds, hf_mask = kw["inputs_embeds"].numpy(), kw["attention_mask"].numpy().astype(bool)
    hf_ids = kw["talker_input_ids"].numpy()
    for r in range(len(rows)):
        n = int(inputs.lengths[r])
        assert n == hf_mask[r].sum()
        assert _rel(np.asarray(inputs.embeds[r, :n]), hf_embeds[r][hf_mask[r]]) <= 1e-5  # fp32 projections
        np.testing.assert_array_equal(inputs.input_ids[r, :n], hf_ids[r][hf_mask[r]])
    hf_trailing = kw["trailing_text_hidden"].numpy()
    ttr = hf_trailing.shape[1]
    assert _rel(np.asarray(inputs.trailing[:, :ttr]), hf_trailing) <= 1e-5
    hf_pad = kw["tts_pad_embed"].numpy()[0, 0]
    assert _rel(np.asarray(inputs.trailing[:, ttr:]), np.broadcast_to(hf_pad, inputs.trailing[:, ttr:].shape)) <= 1e-5

    out = c.gen.generate(params, inputs, talker_new, TalkerSampling.greedy())
    hf_codes = cap["codes"].numpy()
    # HF's per-row length: first codec EOS among the group-0 tokens (frames from there on are zeroed).
    hf_c0 = cap["talker"].sequences.numpy()[:, :hf_codes.shape[-1]]
    eos = hf_c0 == c.config.talker.codec_eos_token_id
    hf_lengths = np.where(eos.any(1), eos.argmax(1), hf_codes.shape[-1])
    print(e2e, "codes", out.codes.shape, "hf", hf_codes.shape, "lengths", out.lengths, hf_lengths)
    if keep is not None:
        keep["inputs"] = inputs
    return out, hf_codes, hf_lengths


@pytest.fixture(scope="module")
def e2e_results(cases):
    """Lazily computed, shared by the parity and the codec-EOS tests."""
    store = {}

    def get(e2e):
        if e2e not in store:
            c = cases[E2E[e2e][0]]
            store[e2e + "/extra"] = {}
            store[e2e] = _e2e(c, c.params, e2e, store[e2e + "/extra"])
        return store[e2e]

    get.extra = lambda e2e: store[e2e + "/extra"]

    return get


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
@pytest.mark.parametrize("e2e", ["base_batch2", "variant_single"])
def test_generate_matches_hf(cases, e2e_results, e2e):
    out, hf_codes, hf_lengths = e2e_results(e2e)
    assert out.codes.shape == hf_codes.shape
    np.testing.assert_array_equal(out.codes, hf_codes)
    np.testing.assert_array_equal(out.lengths, hf_lengths)
    if e2e == "base_batch2":
        # HF's batched repetition penalty skips each row's first (left-padding count) codes; penalizing them
        # all (HF's single-sequence behaviour) changes the shorter row here, so that quirk is really covered.
        c = cases["base"]
        plain = c.gen.generate(c.params, e2e_results.extra(e2e)["inputs"], E2E[e2e][4], TalkerSampling.greedy(),
                               penalty_from=None)
        assert not np.array_equal(plain.codes, hf_codes)


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
def test_codec_eos_matches_hf(cases, e2e_results):
    """Random models never emit codec EOS, so make EOS's head row 1.02x that of a code row 0 picks at frame 3:
    EOS then wins wherever that code would, and per-row stopping, lengths and zeroing are compared with HF."""
    c = cases["base"]
    _, hf_codes, _ = e2e_results("base_batch2")
    code, eos = int(hf_codes[0, 0, 3]), c.config.talker.codec_eos_token_id
    head = c.hf.talker.codec_head.weight
    assert head.data_ptr() != c.hf.talker.model.codec_embedding.weight.data_ptr()
    params = dict(c.params)
    kernel = np.array(params["codec_head"]["kernel"])
    kernel[:, eos] = 1.02 * kernel[:, code]
    params["codec_head"] = {"kernel": kernel}
    saved = head[eos].detach().clone()
    with torch.no_grad():
        head[eos] = 1.02 * head[code]
    try:
        out, hf_codes, hf_lengths = _e2e(c, params, "base_batch2_short")
    finally:
        with torch.no_grad():
            head[eos] = saved
    assert (hf_lengths < hf_codes.shape[-1]).any()  # EOS really happened
    assert out.codes.shape == hf_codes.shape
    np.testing.assert_array_equal(out.codes, hf_codes)
    np.testing.assert_array_equal(out.lengths, hf_lengths)


def test_input_assembly_multiturn_multimodal(cases):
    """Audio tokens in two user turns (hidden_projection there), a past assistant turn and a system turn (both
    dropped), against HF's own `_get_talker_user_parts` / `_get_talker_assistant_parts` and generate's selection."""
    c = cases["base"]
    s, a = SPECIAL, c.config.thinker.audio_token_id
    st, en, nl = s["im_start_token_id"], s["im_end_token_id"], 198
    prompt = ([st, s["system_token_id"], 5, 6, en, nl, st, s["user_token_id"], 7, a, a, a, 8, en, nl,
               st, s["assistant_token_id"], 9, 10, en, nl, st, s["user_token_id"], a, a, 11, en, nl,
               st, s["assistant_token_id"], nl])
    generated = [12, 13, 14, 15, en]
    lp, hth = len(prompt), c.config.talker.thinker_hidden_size
    rng = np.random.default_rng(8)
    emb = rng.standard_normal((lp + len(generated) - 1, hth)).astype(np.float32)
    hid = rng.standard_normal(emb.shape).astype(np.float32)
    tts = rng.standard_normal((3, hth)).astype(np.float32)
    ours = c.gen.build_inputs(c.params, [np.array(prompt)], [np.array(generated)], [emb], [hid], tts, "Aiden")

    hf, tkc = c.hf, c.config
    ids = torch.tensor([prompt])
    seq = torch.tensor([prompt + generated])
    with torch.no_grad():
        mm = (seq == a)
        full_user = hf._get_talker_user_parts(0, lp, mm, torch.tensor(hid[None]), torch.tensor(emb[None]))
        # generate()'s user-position selection (single row, no padding)
        pos = torch.arange(lp)[None]
        prev = torch.cummax(torch.where(ids == st, pos, pos.new_full((), -1)), dim=-1).values.clamp_min(0)
        user_mask = ids.gather(1, (prev + 1).clamp_max(lp - 1)) == s["user_token_id"]
        user = full_user[0][user_mask[0]]
        bos, eos, pad = hf.talker.text_projection(torch.tensor(tts)[None]).chunk(3, dim=1)
        start = int(torch.nonzero((ids[0, :-1] == st) & (ids[0, 1:] == s["assistant_token_id"])).flatten()[-1])
        asst, asst_ids, trailing = hf._get_talker_assistant_parts(
            start, seq.shape[1], tkc.talker.speaker("aiden"), torch.tensor(emb[None]), pad, bos, eos)
    expect = torch.cat([user, asst[0]]).numpy()
    assert int(user_mask.sum()) == 9 + 7  # both user turns, each with its <|im_end|> and trailing newline
    n = int(ours.lengths[0])
    assert n == expect.shape[0]
    assert _rel(np.asarray(ours.embeds[0, :n]), expect) <= 1e-5  # fp32 projections
    ttr = trailing.shape[1]
    assert _rel(np.asarray(ours.trailing[0, :ttr]), trailing[0].numpy()) <= 1e-5
    rest = np.asarray(ours.trailing[0, ttr:])
    assert _rel(rest, np.broadcast_to(pad[0].numpy(), rest.shape)) <= 1e-5  # tts_pad forever after
    np.testing.assert_array_equal(ours.input_ids[0, :n], np.concatenate([ids[0][user_mask[0]].numpy(),
                                                                         asst_ids[0].numpy()]))


def test_sampling_settings_match_hf_processors(cases):
    """TalkerSampling maps onto HF generate's talker processors (penalty, suppressed codec ids, temperature 0.9,
    top-k 50) and the code predictor's (top-k 50, top-p 0.8); greedy keeps penalty and suppression."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor, SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
        TopPLogitsWarper,
    )
    from omni_jax.runtime.sampling import process_logits

    config = cases["base"].config
    vocab, eos = config.talker.text.vocab_size, config.talker.codec_eos_token_id
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((2, vocab)) * 3).astype(np.float32)
    seen_ids = rng.integers(0, vocab, (2, 20))
    seen = np.zeros((2, vocab), bool)
    np.put_along_axis(seen, seen_ids, True, axis=1)
    suppressed = [i for i in range(vocab - 1024, vocab) if i != eos]  # as HF generate builds it

    def hf_chain(processors, ids):
        x = torch.tensor(logits)
        for proc in processors:
            x = proc(torch.tensor(ids), x)
        return x.numpy()

    head = [RepetitionPenaltyLogitsProcessor(1.05), SuppressTokensLogitsProcessor(suppressed)]
    cp_warp = [TopKLogitsWarper(50), TopPLogitsWarper(0.8)]
    for ts, hf_procs, ours_params, ours_seen in (
        (TalkerSampling(), head + [TemperatureLogitsWarper(0.9), TopKLogitsWarper(50)],
         TalkerSampling().talker_params(config), seen),
        (TalkerSampling.greedy(), head, TalkerSampling.greedy().talker_params(config), seen),
        (TalkerSampling(), cp_warp, TalkerSampling().code_predictor_params(), None),
    ):
        want = hf_chain(hf_procs, seen_ids)
        ours_seen = None if ours_seen is None else jnp.asarray(ours_seen)
        got = np.asarray(process_logits(jnp.asarray(logits), ours_params, ours_seen))
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
        np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6)
    assert TalkerSampling.greedy().code_predictor_params().is_greedy


def _random_inputs(c, gen, params, rng, speaker):
    prompt = np.array(_chat(rng, 2, 3))
    generated = np.array([5, 6, 7, SPECIAL["im_end_token_id"]])
    hth = c.config.talker.thinker_hidden_size
    emb = rng.standard_normal((len(prompt) + len(generated) - 1, hth)).astype(np.float32)
    tts = rng.standard_normal((3, hth)).astype(np.float32)
    return gen.build_inputs(params, [prompt], [generated], [emb], None, tts, speaker)


def test_speakers(cases):
    c = cases["base"]
    a = _random_inputs(c, c.gen, c.params, np.random.default_rng(6), "AIDEN")  # names are case-insensitive
    b = _random_inputs(c, c.gen, c.params, np.random.default_rng(6), "chelsie")
    table = np.asarray(c.params["model"]["codec_embedding"]["embedding"])
    tk = c.config.talker
    n = int(a.lengths[0])
    # Only the speaker slot (assistant position 6 of 9, i.e. n-3) differs, by the codec embedding difference.
    diff = np.asarray(a.embeds[0, :n] - b.embeds[0, :n])
    np.testing.assert_allclose(diff[n - 3], table[tk.speaker("aiden")] - table[tk.speaker("chelsie")], atol=1e-5)
    np.testing.assert_array_equal(np.delete(diff, n - 3, axis=0), 0)
    with pytest.raises(ValueError, match="aiden, chelsie, ethan"):
        _random_inputs(c, c.gen, c.params, np.random.default_rng(6), "nobody")


def test_bf16_smoke(cases):
    c = cases["base"]
    gen = TalkerGenerator(c.config, dtype=jnp.bfloat16)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.bfloat16), c.params)
    inputs = _random_inputs(c, gen, params, np.random.default_rng(7), "ethan")
    assert inputs.embeds.dtype == jnp.bfloat16 and np.isfinite(np.asarray(inputs.embeds, np.float32)).all()
    state, trailing = gen.start(params, inputs, 4, TalkerSampling(), jax.random.PRNGKey(3))
    state, codes, valid = gen.step(params, state, trailing, sampling=TalkerSampling())
    assert np.isfinite(np.asarray(state.hidden, np.float32)).all()
    codes = np.asarray(codes)
    assert codes.shape == (1, c.config.talker.num_code_groups)
    assert (codes[:, 1:] >= 0).all() and (codes[:, 1:] < c.config.talker.code_predictor.vocab_size).all()
    assert codes[0, 0] not in suppressed_codec_ids(c.config)  # group 0: a codec id or EOS


def test_plan_lowering_aliases_the_step_state(cases):
    """launch/plan.py lowers the accelerator's talker step (donate=True) on CPU: the carried state (KV cache
    included) must alias the output, or the memory plan counts it twice (at full size under tp4ep8 it did:
    1.71x ideal instead of 1.05x before donation was forced there)."""
    c = cases["base"]
    greedy = TalkerSampling.greedy()
    gen = TalkerGenerator(c.config, donate=True)
    args = gen.abstract_step_args(2, 32, 4, greedy)
    mem = gen.step.lower(*args, sampling=greedy).compile().memory_analysis()
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(args[1].cache))
    assert mem.alias_size_in_bytes >= cache_bytes > 0, (mem.alias_size_in_bytes, cache_bytes)
    plain = TalkerGenerator(c.config, donate=False).step.lower(*args, sampling=greedy).compile().memory_analysis()
    assert plain.alias_size_in_bytes < cache_bytes  # the check can fail: without donation nothing is aliased
