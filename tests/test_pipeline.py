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
        cfg["talker_config"].update(reference.TALKER_EXTRA)
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
    assert not pipe.has_speech and set(pipe.params) == {"thinker", "audio_tower", "visual"}
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


# ---------------------------------------------------------------------------- images and videos

#: Pixel bounds small enough for MAX_LEN (the tiny tower's patch is 4 px, so a merged token covers 8 x 8 px).
TINY_PIXELS = dict(patch_size=4, min_pixels=64, max_pixels=32 * 32, video_min_pixels=64, video_max_pixels=16 * 16)


def _vision_prompt(rng, spans: list[list[int]], text_len: int = 3) -> list[int]:
    """A user turn holding each span (placeholder ids, already expanded) between vision start / end, then text."""
    s, a = SPECIAL, THINKER_EXTRA
    out = [s["im_start_token_id"], s["user_token_id"]]
    for span in spans:
        out += [a["vision_start_token_id"]] + span + [a["vision_end_token_id"]]
    out += [int(t) for t in rng.integers(0, 999, text_len)] + [s["im_end_token_id"], 198]
    return out + [s["im_start_token_id"], s["assistant_token_id"], 198]


def _hf_visual(items) -> dict:
    """transformers' image / video arguments for one row's items."""
    out = {}
    for kind, pix, grid in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos",
                                                                          "video_grid_thw")):
        its = [v for v in items if v.kind == kind]
        if its:
            out[pix] = torch.tensor(np.concatenate([v.patches for v in its]))
            out[grid] = torch.tensor([list(v.grid) for v in its])
            if kind == "video":
                out["video_second_per_grid"] = torch.tensor([v.seconds_per_grid for v in its])
    return out


def _tiny_visuals(rng):
    """Row 0: two images (different sizes and aspects); row 1: a 3 fps, 2 s video (sampled to 4 frames at 2 fps)."""
    from omni_jax.processing import video as video_lib
    from omni_jax.processing import vision as vision_lib

    cfg = vision_lib.VisionProcessorConfig(**TINY_PIXELS)
    img = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    images = [vision_lib.image_input(img(24, 23), cfg), vision_lib.image_input(img(14, 30), cfg)]
    video = video_lib.frames_input(rng.integers(0, 256, (6, 18, 14, 3), dtype=np.uint8), 3.0, cfg)
    return [images, [video]]


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
def test_image_and_video_questions_match_hf(cases):
    """Images and a video in, speech out: greedy tokens, codes and waveform equal transformers' generate with
    pixel_values / pixel_values_videos (deepstack included), the prompt logits too; the rows that replaced the
    placeholders and the M-RoPE positions come back for the dump."""
    c = cases["base"]
    th = c.pipe.config.thinker
    rng = np.random.default_rng(11)
    visuals = _tiny_visuals(rng)
    assert [v.grid for v in visuals[0]] == [(1, 6, 6), (1, 4, 8)] and visuals[1][0].grid == (2, 4, 4)
    pad = {"image": THINKER_EXTRA["image_token_id"], "video": THINKER_EXTRA["video_token_id"]}
    prompts = [_vision_prompt(rng, [[pad[v.kind]] * v.tokens(2) for v in row]) for row in visuals]
    speakers = ["chelsie", "ethan"]
    ours = c.pipe.generate_ids(prompts, speakers, visual=visuals, max_new_tokens=c.thinker_new,
                               talker_max_new_tokens=c.talker_new, talker_sampling=TalkerSampling.greedy(),
                               eos_ids=[SPECIAL["im_end_token_id"]])
    for row, (prompt, speaker) in enumerate(zip(prompts, speakers)):
        extra = _hf_visual(visuals[row])
        hf_tokens, hf_codes, hf_wav = reference.hf_generate(
            c.hf, prompt, speaker, c.thinker_new, c.talker_new, SPECIAL["im_end_token_id"], **extra)
        res = ours[row]
        with torch.no_grad():  # with an attention mask: without one transformers falls back to text positions
            ids = torch.tensor([prompt])
            hf_logits = c.hf.thinker(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0, -1].numpy()
        err = _centered_rel_l2(res.wav, hf_wav)
        print(f"vision row {row} ({[v.kind for v in visuals[row]]}): logits rel L2 "
              f"{_rel_l2(res.prompt_logits, hf_logits):.2e}, tokens {res.token_ids} codes {res.codes.shape} "
              f"wav centered rel L2 {err:.2e}")
        assert _rel_l2(res.prompt_logits, hf_logits) <= 1e-5
        assert res.token_ids == hf_tokens
        np.testing.assert_array_equal(res.codes, hf_codes)
        assert res.wav.shape == hf_wav.shape and _rel_l2(res.wav, hf_wav) <= 1e-4 and err <= 1e-4
        n_vis = sum(v.tokens(2) for v in visuals[row])
        assert res.vision_embeds.shape == (n_vis, th.text.hidden_size) and res.audio_embeds is None
        assert res.position_ids.shape == (3, len(prompt)) and not np.array_equal(res.position_ids[0],
                                                                                  res.position_ids[1])
    # Chunked prefill (positions and deepstack rows cut per chunk, the deltas from the whole prompt) changes nothing.
    chunked = OmniPipeline(c.pipe.loaded, max_len=MAX_LEN, prefill_chunk=16)
    again = chunked.generate_ids(prompts, speakers, visual=visuals, max_new_tokens=c.thinker_new,
                                 talker_max_new_tokens=c.talker_new, talker_sampling=TalkerSampling.greedy(),
                                 eos_ids=[SPECIAL["im_end_token_id"]])
    for a, b in zip(ours, again):
        assert a.token_ids == b.token_ids
        np.testing.assert_array_equal(a.codes, b.codes)


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
def test_video_with_its_audio_track_matches_hf(cases):
    """use_audio_in_video: a video's frames and its audio track interleaved by time in one span. The thinker's
    prompt logits and greedy tokens equal transformers' (input_features + pixel_values_videos,
    use_audio_in_video=True); so do the codes and waveform, with transformers' talker lent what it lacks for this
    turn: the audio_config its config does not have (without it, it fails on any turn mixing audio with video) and
    the use_audio_in_video flag its generate() does not forward (without it, its talker positions treat the
    interleaved span as one plain audio clip while its thinker does not)."""
    from omni_jax.processing import video as video_lib
    from omni_jax.processing import vision as vision_lib
    from omni_jax.runtime import prompt as prompt_lib

    c = cases["base"]
    th = c.pipe.config.thinker
    rng = np.random.default_rng(12)
    track = _clip(rng, 150)  # 1.5 s
    video = video_lib.frames_input(rng.integers(0, 256, (4, 18, 14, 3), dtype=np.uint8), 2.0,
                                   vision_lib.VisionProcessorConfig(**TINY_PIXELS), audio=track)
    feats = [audio_lib.log_mel(track, th.audio.num_mel_bins)]
    rows = prompt_lib.audio_rows(c.pipe.config, feats)[0]
    span = video_lib.audio_in_video_span(video, rows, th)
    prompt = _vision_prompt(rng, [span])
    assert prompt.count(THINKER_EXTRA["audio_token_id"]) == rows and video.grid == (2, 4, 4)
    kw = dict(max_new_tokens=c.thinker_new, talker_max_new_tokens=c.talker_new,
              talker_sampling=TalkerSampling.greedy(), eos_ids=[SPECIAL["im_end_token_id"]])
    [ours] = c.pipe.generate_ids([prompt], ["aiden"], audio=[feats], visual=[[video]], **kw)
    extra = dict(hf_audio_inputs(feats), **_hf_visual([video]), use_audio_in_video=True)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        hf_logits = c.hf.thinker(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0, -1].numpy()
        seq = c.hf.generate(input_ids=ids, return_audio=False, thinker_do_sample=False,
                            thinker_max_new_tokens=c.thinker_new, thinker_eos_token_id=SPECIAL["im_end_token_id"],
                            **extra)
    seq = getattr(seq, "sequences", seq)
    print(f"audio in video: logits rel L2 {_rel_l2(ours.prompt_logits, hf_logits):.2e}, tokens {ours.token_ids}")
    assert _rel_l2(ours.prompt_logits, hf_logits) <= 1e-5
    assert ours.token_ids == seq[0, len(prompt):].tolist()
    pos_hf, _ = c.hf.thinker.model.get_rope_index(ids, None, extra["video_grid_thw"], torch.ones_like(ids), True,
                                                  torch.tensor([feats[0].shape[1]]), extra["video_second_per_grid"])
    np.testing.assert_allclose(ours.position_ids, pos_hf[:, 0].numpy(), atol=1e-4)
    assert ours.audio_embeds.shape[0] == rows and ours.vision_embeds.shape[0] == video.tokens(2)
    # transformers' talker cannot run this turn as shipped: it reads audio_config from its own config, which has
    # none, and generate() does not forward use_audio_in_video to it (so its positions would lay the interleaved span
    # out as one plain audio clip, unlike its thinker's). Lend it both and its whole generate runs.
    c.hf.talker.config.audio_config = c.hf.config.thinker_config.audio_config
    try:
        hf_tokens, hf_codes, hf_wav = reference.hf_generate(c.hf, prompt, "aiden", c.thinker_new, c.talker_new,
                                                            SPECIAL["im_end_token_id"], talker_use_audio_in_video=True,
                                                            **extra)
    finally:
        del c.hf.talker.config.audio_config
    assert hf_tokens == ours.token_ids
    np.testing.assert_array_equal(ours.codes, hf_codes)
    assert ours.wav.shape == hf_wav.shape and _centered_rel_l2(ours.wav, hf_wav) <= 1e-4
