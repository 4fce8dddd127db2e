"""OmniPipeline end to end against transformers' full `generate(..., return_audio=True)` at fp32.

Small random HF checkpoints (two configs) are saved, converted with the real converter and loaded
with `OmniPipeline.load`; greedy thinker + greedy talker must give the same text tokens and codec
frames, and the same waveform up to float summation order. Our rows run as one batch; each must
equal HF's single-sequence generate for that prompt and speaker.
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from omni_jax.models import code2wav as c2w
from omni_jax.models.audio_encoder import rows_for_frames
from omni_jax.processing import audio as audio_lib
from omni_jax.checkpoint.convert import convert_checkpoint
from omni_jax.errors import UsageError
from omni_jax.runtime.pipeline import OmniPipeline
from omni_jax.runtime.sampling import TalkerSampling

from tests import reference

SPECIAL, THINKER_EXTRA, TALKER_VARIANT = reference.SPECIAL, reference.THINKER_EXTRA, reference.TALKER_VARIANT

# name: (thinker text overrides, talker overrides, seed, rows (system_len, user_len), speakers,
#        thinker / talker token budgets)
CASES = {
    "base": ({}, {}, 21, [(3, 5), (0, 2)], ["ethan", "Chelsie"], 6, 10),
    "variant": (reference.VARIANTS["mha_hd8_sparse2"], TALKER_VARIANT, 22, [(2, 4)], ["CHELSIE"], 5, 7),
}
MAX_LEN = 64


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12))


def _centered_rel_l2(a, b) -> float:
    """Relative L2 with each waveform's mean removed: the random vocoders' output is mostly a DC offset
    (std/mean ~ 0.07), which would make the plain ratio lenient."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return _rel_l2(a - a.mean(), b - b.mean())


_chat = reference.chat_ids


class Case:
    def __init__(self, name: str, tmp_path_factory):
        thinker_over, talker_over, seed, shapes, self.speakers, self.thinker_new, self.talker_new = CASES[name]
        cfg = reference.hf_config_dict(reference.tiny_config_dict(**thinker_over))
        for sub, over in talker_over.items():
            cfg["talker_config"][sub].update(copy.deepcopy(over))
        cfg.update(SPECIAL)
        cfg["thinker_config"].update(THINKER_EXTRA)
        self.hf = reference.build_hf_model(cfg, seed=seed)
        hf_dir = reference.save_hf_model(self.hf, str(tmp_path_factory.mktemp(f"pipe_hf_{name}")))
        ckpt = str(tmp_path_factory.mktemp(f"pipe_ckpt_{name}") / "ckpt")
        convert_checkpoint(hf_dir, ckpt, dtype="float32", progress=False)
        self.pipe = OmniPipeline.load(ckpt, dtype=jnp.float32, max_len=MAX_LEN)
        rng = np.random.default_rng(seed)
        self.prompts = [_chat(rng, *s) for s in shapes]

    def hf_generate(self, prompt: list[int], speaker: str):
        return reference.hf_generate(self.hf, prompt, speaker, self.thinker_new, self.talker_new,
                                     SPECIAL["im_end_token_id"])


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return {name: Case(name, tmp_path_factory) for name in CASES}


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
@pytest.mark.parametrize("name", list(CASES))
def test_end_to_end_matches_hf(cases, name):
    c = cases[name]
    ours = c.pipe.generate_ids(c.prompts, c.speakers, max_new_tokens=c.thinker_new,
                               talker_max_new_tokens=c.talker_new, talker_sampling=TalkerSampling.greedy(),
                               eos_ids=[SPECIAL["im_end_token_id"]])
    assert len(ours) == len(c.prompts)
    for row, (prompt, speaker) in enumerate(zip(c.prompts, c.speakers)):
        hf_tokens, hf_codes, hf_wav = c.hf_generate(prompt, speaker)
        res = ours[row]
        err, cerr = _rel_l2(res.wav, hf_wav), _centered_rel_l2(res.wav, hf_wav)
        print(f"{name} row {row} ({speaker}): tokens {len(res.token_ids)} codes {res.codes.shape} "
              f"wav {res.wav.shape} rel L2 {err:.2e} (centered {cerr:.2e})")
        assert res.token_ids == hf_tokens
        assert res.codes.shape == hf_codes.shape == (16, c.talker_new - 1)  # no codec EOS: budget - 1 frames
        np.testing.assert_array_equal(res.codes, hf_codes)
        assert res.wav.shape == hf_wav.shape == (c2w.wav_length(c.pipe.config, hf_codes.shape[1]),)
        assert err <= 1e-4 and cerr <= 1e-4  # fp32 both sides; only summation order differs


@pytest.mark.parametrize("lengths,chunk,context", [((11, 4), 300, 25), ((20, 13), 8, 3)])
def test_vocode_rows_match_hf_single_decodes(cases, lengths, chunk, context):
    """A batch of rows with distinct lengths (zero-padded bucket, or several chunks) cut per row equals HF's
    chunked_decode of each row's own codes."""
    c = cases["base"]
    cfg = c.pipe.config.code2wav
    rng = np.random.default_rng(9)
    codes = rng.integers(0, cfg.codebook_size, (len(lengths), cfg.num_quantizers, max(lengths))).astype(np.int32)
    wavs = c.pipe.vocode(codes, lengths, chunk_size=chunk, left_context_size=context)
    for row, n in enumerate(lengths):
        with torch.no_grad():
            hf = c.hf.code2wav.chunked_decode(torch.tensor(codes[row:row + 1, :, :n], dtype=torch.long),
                                              chunk_size=chunk, left_context_size=context).reshape(-1).numpy()
        err, cerr = _rel_l2(wavs[row], hf), _centered_rel_l2(wavs[row], hf)
        print(f"vocode lengths {lengths} chunk {chunk}: row {row} rel L2 {err:.2e} (centered {cerr:.2e})")
        assert wavs[row].shape == hf.shape
        assert err <= 1e-4 and cerr <= 1e-4  # fp32 both sides


def test_unknown_speaker_lists_known(cases):
    c = cases["base"]
    with pytest.raises(ValueError, match="aiden, chelsie, ethan"):
        c.pipe.generate_ids(c.prompts, "nobody", max_new_tokens=2, talker_max_new_tokens=2)
    with pytest.raises(ValueError, match="2 speakers for 1 prompts"):
        c.pipe.generate_ids(c.prompts[:1], ["ethan", "aiden"], max_new_tokens=2)


def test_reply_too_short_to_voice(cases):
    """A one-token reply cannot be voiced (HF's talker prompt needs two): text comes back, audio is empty."""
    c = cases["base"]
    res = c.pipe.generate_ids(c.prompts, c.speakers, max_new_tokens=1, talker_max_new_tokens=4,
                              talker_sampling=TalkerSampling.greedy(), eos_ids=[SPECIAL["im_end_token_id"]])
    for r in res:
        assert len(r.token_ids) == 1 and r.finish_reason in ("length", "eos")
        assert r.codes.shape == (16, 0) and r.wav.shape == (0,)


def test_bf16_embedded_default():
    pipe = OmniPipeline.load(None, dtype=jnp.bfloat16, max_len=MAX_LEN)
    talker_new = 4
    (res,) = pipe.generate(["你好,世界"], max_new_tokens=4, talker_max_new_tokens=talker_new)
    frames = res.codes.shape[1]
    assert res.codes.shape == (pipe.config.talker.num_code_groups, frames) and 1 <= frames <= talker_new - 1
    assert c2w.wav_length(pipe.config, frames) == frames * 1920 - 555  # the tiny config's single chunk
    assert res.wav.shape == (c2w.wav_length(pipe.config, frames),) and res.wav.dtype == np.float32
    assert np.isfinite(res.wav).all() and np.abs(res.wav).max() <= 1.0
    assert res.sample_rate == 24000 and len(res.token_ids) == 4


def test_chunked_prefill_pipeline_matches_single_pass(tiny_pipe):
    """--prefill_chunk only bounds prefill memory: text, codes and audio stay the same."""
    chunked = OmniPipeline(tiny_pipe.loaded, max_len=tiny_pipe.max_len, prefill_chunk=4)  # the same weights
    runs = []
    for pipe in (tiny_pipe, chunked):
        [res] = pipe.generate(["你好,世界"], max_new_tokens=4, talker_max_new_tokens=5,
                              talker_sampling=TalkerSampling.greedy())
        runs.append(res)
    a, b = runs
    assert len(a.prompt_ids) > 4  # the chunked run really took several chunks
    assert a.token_ids == b.token_ids
    np.testing.assert_array_equal(a.codes, b.codes)
    assert a.codes.shape[-1] > 0
    np.testing.assert_allclose(a.wav, b.wav, atol=1e-6)  # fp32; hidden states differ only by summation order


def _audio_prompt(rng, clip_rows: list[int], text_len: int = 3) -> list[int]:
    """A user turn with `<|audio_start|>` n x `<|audio_pad|>` `<|audio_end|>` per clip, then the assistant header."""
    s, a = SPECIAL, THINKER_EXTRA
    out = [s["im_start_token_id"], s["user_token_id"]]
    for n in clip_rows:
        out += [a["audio_start_token_id"]] + [a["audio_token_id"]] * n + [a["audio_end_token_id"]]
    out += [int(t) for t in rng.integers(0, 999, text_len)] + [s["im_end_token_id"], 198]
    return out + [s["im_start_token_id"], s["assistant_token_id"], 198]


def _clip(rng, frames: int) -> np.ndarray:
    """frames * 10 ms of a 16 kHz test signal: two tones and noise."""
    t = np.arange(frames * audio_lib.HOP) / audio_lib.SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1250 * t)
            + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def hf_audio_inputs(feats: list[np.ndarray]) -> dict:
    """transformers' audio arguments for one row's clips: input_features [clips, mels, longest] zero-padded and
    feature_attention_mask [clips, longest]."""
    frames = [f.shape[1] for f in feats]
    padded = np.zeros((len(feats), feats[0].shape[0], max(frames)), np.float32)
    mask = np.zeros((len(feats), max(frames)), np.int64)
    for i, f in enumerate(feats):
        padded[i, :, : f.shape[1]], mask[i, : f.shape[1]] = f, 1
    return dict(input_features=torch.tensor(padded), feature_attention_mask=torch.tensor(mask))


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
def test_spoken_questions_match_hf(cases):
    """Audio in, speech out: greedy tokens, codes and waveform equal transformers' generate with input_features /
    feature_attention_mask. Two rows of different audio lengths in one batch (one clip over a chunk boundary with a
    remainder; two clips in one turn), each against HF's single-sequence run."""
    c = cases["base"]
    cfg = c.pipe.config.thinker.audio
    rng = np.random.default_rng(5)
    clips = [[130], [70, 45]]  # mel frames per clip: 17 rows; 9 + 6 rows
    feats = [[audio_lib.log_mel(_clip(rng, n), cfg.num_mel_bins) for n in row] for row in clips]
    prompts = [_audio_prompt(rng, [rows_for_frames(n, cfg.chunk_frames) for n in row]) for row in clips]
    speakers = ["aiden", "ethan"]
    ours = c.pipe.generate_ids(prompts, speakers, audio=feats, max_new_tokens=c.thinker_new,
                               talker_max_new_tokens=c.talker_new, talker_sampling=TalkerSampling.greedy(),
                               eos_ids=[SPECIAL["im_end_token_id"]])
    for row, (prompt, speaker) in enumerate(zip(prompts, speakers)):
        frames = [f.shape[1] for f in feats[row]]
        extra = hf_audio_inputs(feats[row])
        hf_tokens, hf_codes, hf_wav = reference.hf_generate(
            c.hf, prompt, speaker, c.thinker_new, c.talker_new, SPECIAL["im_end_token_id"], **extra)
        res = ours[row]
        with torch.no_grad():  # the thinker's prompt logits with the audio merged in, at the last prompt position
            hf_logits = c.hf.thinker(input_ids=torch.tensor([prompt]), **extra).logits[0, -1].numpy()
        assert _rel_l2(res.prompt_logits, hf_logits) <= 1e-5
        err = _centered_rel_l2(res.wav, hf_wav)
        print(f"audio row {row} ({frames} frames): tokens {res.token_ids} codes {res.codes.shape} centered rel L2 "
              f"{err:.2e}")
        assert res.audio_embeds.shape == (sum(rows_for_frames(n, cfg.chunk_frames) for n in frames),
                                          c.pipe.config.thinker.text.hidden_size)
        assert res.token_ids == hf_tokens
        np.testing.assert_array_equal(res.codes, hf_codes)
        assert res.wav.shape == hf_wav.shape and _rel_l2(res.wav, hf_wav) <= 1e-4 and err <= 1e-4
    # The audio changes the answer: the same prompt with silence instead gives other hidden states.
    silent = [[np.full_like(f, f.min()) for f in row] for row in feats]
    again = c.pipe.generate_ids(prompts, speakers, audio=silent, max_new_tokens=2, text_only=True,
                                eos_ids=[SPECIAL["im_end_token_id"]])
    assert not np.allclose(again[0].audio_embeds, ours[0].audio_embeds)


def test_thinker_only_checkpoint_matches_hf(tmp_path_factory):
    """A checkpoint saved with enable_audio_output=False (the Thinking and Captioner layout: no talker, no
    Code2Wav) converts, answers text (and audio questions) with transformers' greedy tokens, and refuses speech."""
    cfg = reference.hf_config_dict(reference.tiny_config_dict())
    cfg.update(SPECIAL, enable_audio_output=False)
    cfg["thinker_config"].update(THINKER_EXTRA)
    hf = reference.build_hf_model(cfg, seed=31)
    hf_dir = reference.save_hf_model(hf, str(tmp_path_factory.mktemp("thinker_only_hf")))
    ckpt = str(tmp_path_factory.mktemp("thinker_only_ckpt") / "ckpt")
    convert_checkpoint(hf_dir, ckpt, dtype="float32", progress=False)
    pipe = OmniPipeline.load(ckpt, dtype=jnp.float32, max_len=MAX_LEN)
    assert not pipe.has_speech and set(pipe.params) == {"thinker", "audio_tower"}
    rng = np.random.default_rng(31)
    cfg_a = pipe.config.thinker.audio
    feats = [audio_lib.log_mel(_clip(rng, 90), cfg_a.num_mel_bins)]
    prompts = [_chat(rng, 2, 4), _audio_prompt(rng, [rows_for_frames(90, cfg_a.chunk_frames)])]
    ours = pipe.generate_ids(prompts, text_only=True, max_new_tokens=6, audio=[[], feats],
                             eos_ids=[SPECIAL["im_end_token_id"]])
    for row, prompt in enumerate(prompts):
        extra = hf_audio_inputs(feats) if row == 1 else {}
        with torch.no_grad():
            seq = hf.generate(input_ids=torch.tensor([prompt]), return_audio=False, thinker_do_sample=False,
                              thinker_max_new_tokens=6, thinker_eos_token_id=SPECIAL["im_end_token_id"], **extra)
        seq = getattr(seq, "sequences", seq)
        assert ours[row].token_ids == seq[0, len(prompt):].tolist()
    with pytest.raises(UsageError, match="no talker/code2wav weights"):
        pipe.generate_ids(prompts[:1], max_new_tokens=2)
