"""Speech, images and video in through the launchers: `infer.py --audio / --image / --video` and `/audio PATH`,
batch lines with `audio` / `image` / `video`, the dumps (embeds, positions), and bad files.

The checkpoints are the tiny model (it has tiny audio and vision towers) with random weights, written with the
real checkpoint writer, as it is, without its talker, and without its audio tower. Cases share launcher processes
(tests/launcher_cases.py). Parity of the audio and vision paths with transformers is tests/test_pipeline.py's.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import soundfile as sf

from tests import launcher_cases, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFER = os.path.join(ROOT, "launch", "infer.py")
BATCH = os.path.join(ROOT, "launch", "batch.py")
BUDGET = ["--max_new_tokens=3", "--talker_max_new_tokens=4", "--max_len=128"]


def _write_audio(d) -> None:
    rng = np.random.default_rng(0)
    sf.write(str(d / "q.wav"), rng.uniform(-0.5, 0.5, (11025, 2)).astype(np.float32), 22050)  # 0.5 s stereo 22.05 kHz
    sf.write(str(d / "long.flac"), rng.uniform(-0.5, 0.5, 16000 * 9).astype(np.float32), 16000)  # 9 s
    sf.write(str(d / "empty.wav"), np.zeros((0, 1), np.float32), 16000)
    sf.write(str(d / "nan.wav"), np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    (d / "notaudio.wav").write_text("this is not a RIFF file")
    (d / "adir").mkdir()
    from PIL import Image

    from tests.test_video import write_video

    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(str(d / "pic.png"))  # 16 tokens
    Image.fromarray(rng.integers(0, 256, (2, 600, 3), dtype=np.uint8)).save(str(d / "thin.png"))  # aspect 300
    Image.fromarray(rng.integers(0, 256, (640, 640, 3), dtype=np.uint8)).save(str(d / "big.png"))  # 6400 tokens
    (d / "notimage.png").write_text("not an image")
    t = np.arange(8000) / 16000
    # 2 frames at 2 fps (one temporal patch: 100 tokens at the tiny encoder's minimum frame size) + 0.5 s of sound
    write_video(str(d / "clip.mp4"), rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), 2,
                (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32))
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 40)


# q.wav: 0.5 s -> 50 mel frames -> ceil(50 / 8) = 7 placeholder tokens
Q_ROWS = 7


def _save(raw: dict, name: str, tmp_path_factory, roots: set[str]) -> str:
    """Random weights for config `raw`, saved as an omni_jax checkpoint with the real writer."""
    from omni_jax import checkpoint, parse_config
    from omni_jax.models import registry

    config = parse_config(raw)
    params = registry.random_params(config, np.float32, seed=3)
    assert set(params) == roots
    out = str(tmp_path_factory.mktemp(name) / "ckpt")
    checkpoint.save_params(params, out, config)
    return out


@pytest.fixture(scope="module")
def audio_ckpt(tmp_path_factory):
    """The tiny config (it has a tiny audio tower), random weights, as a checkpoint."""
    return _save(reference.tiny_config_dict(), "audio_ckpt", tmp_path_factory,
                 {"thinker", "audio_tower", "visual", "talker", "code2wav"})


@pytest.fixture(scope="module")
def thinker_only_ckpt(tmp_path_factory):
    """The same model saved as a Thinking / Captioner checkpoint is: enable_audio_output=false, no talker."""
    raw = dict(copy.deepcopy(reference.tiny_config_dict()), enable_audio_output=False)
    return _save(raw, "thinker_only_ckpt", tmp_path_factory, {"thinker", "audio_tower", "visual"})


@pytest.fixture(scope="module")
def no_tower_ckpt(tmp_path_factory):
    """A config without thinker_config.audio_config / vision_config: no audio or vision tower."""
    raw = copy.deepcopy(reference.tiny_config_dict())
    del raw["thinker_config"]["audio_config"], raw["thinker_config"]["vision_config"]
    return _save(raw, "no_tower_ckpt", tmp_path_factory, {"thinker", "talker", "code2wav"})


def _listing(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root) for f in files + dirs}


# case: (args, expected exit code, stderr fragment or None); {ckpt} is the audio checkpoint
BAD = {
    "missing": (["--audio=nope.wav", "--prompt=hi"], "audio file nope.wav does not exist"),
    "directory": (["--audio=adir"], "audio file adir is a directory"),
    "not_audio": (["--audio=notaudio.wav"], "audio file notaudio.wav is not audio soundfile can read"),
    "zero_samples": (["--audio=empty.wav"], "audio empty.wav has zero samples"),
    "nan_samples": (["--audio=nan.wav"], "audio nan.wav has NaN or Inf samples"),
    "second_clip_bad": (["--audio=q.wav", "--audio=nope.wav"], "audio file nope.wav does not exist"),
    "too_long": (["--audio=long.flac", "--max_len=64", "--max_new_tokens=8"],
                 "117 of them are audio (13 tokens per second), so about 3 s of audio fit"),
    "with_input_ids": (["--audio=q.wav", "--input_ids=1,2"], "--input_ids are exact ids without media"),
    "interactive_flag": (["--audio=q.wav", "--interactive"], "/audio, /image, /video PATH lines"),
    "image_missing": (["--image=nope.png", "--prompt=hi"], "image 1: no such file 'nope.png'"),
    "not_image": (["--image=pic.png", "--image=notimage.png"], "image 2: cannot read 'notimage.png' as an image"),
    "image_aspect": (["--image=thin.png"], "aspect ratio 300 exceeds 200"),
    "image_too_big": (["--image=big.png", "--max_len=128", "--max_new_tokens=8"],
                      "the images/videos take image 1: 6400 tokens"),
    "corrupt_video": (["--video=corrupt.mp4"], "video 1: cannot read 'corrupt.mp4' as a video"),
    "video_missing": (["--video=nope.mp4"], "video 1: no such file 'nope.mp4'"),
    "audio_in_video_alone": (["--prompt=hi", "--use_audio_in_video"], "--use_audio_in_video needs a --video"),
    "media_with_input_ids": (["--image=pic.png", "--input_ids=1,2"], "--input_ids are exact ids without media"),
}


def _launch(work, cases: dict) -> dict:
    """{case: (result, working dir, its listing before)} for infer.py cases run in one launcher process."""
    dirs, before = {}, {}
    for name, case in cases.items():
        d = dirs[name] = work / name
        d.mkdir()
        _write_audio(d)
        case["cwd"] = str(d)
        before[name] = _listing(d)
    results = launcher_cases.run_cases(INFER, list(cases.values()), str(work))
    return {name: (r, dirs[name], before[name]) for name, r in zip(cases, results)}


@pytest.fixture(scope="module")
def refused_runs(audio_ckpt, thinker_only_ckpt, no_tower_ckpt, tmp_path_factory):
    """The cases that must stop before the weights load (one process: cheap)."""
    cases = {name: {"args": [f"--checkpoint={audio_ckpt}", *args, "--output=out.wav", "--dump_dir=dump"]}
             for name, (args, _) in BAD.items()}
    cases["no_tower"] = {"args": [f"--checkpoint={no_tower_ckpt}", "--audio=q.wav", "--output=out.wav"]}
    cases["no_vision_tower"] = {"args": [f"--checkpoint={no_tower_ckpt}", "--image=pic.png", "--output=out.wav"]}
    cases["thinker_only_speech"] = {"args": [f"--checkpoint={thinker_only_ckpt}", "--prompt=hi", "--output=out.wav",
                                             "--dump_dir=dump"]}
    return _launch(tmp_path_factory.mktemp("audio_refused"), cases)


@pytest.fixture(scope="module")
def infer_runs(audio_ckpt, tmp_path_factory):
    """The runs that answer, two per launcher process (four in one took 50 s on a loaded CI machine)."""
    return _launch(tmp_path_factory.mktemp("audio_infer"), {
        "spoken": {"args": [f"--checkpoint={audio_ckpt}", "--audio=q.wav", "--audio=q.wav", "--prompt=and?",
                            "--output=out.wav", "--dump_dir=dump", "--greedy", *BUDGET]},
        "audio_only": {"args": [f"--checkpoint={audio_ckpt}", "--audio=q.wav", "--output=", "--dump_dir=dump",
                                "--greedy", "--text_only", *BUDGET]},
    })


@pytest.fixture(scope="module")
def chat_runs(audio_ckpt, thinker_only_ckpt, tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("audio_chat"), {
        "chat": {"args": [f"--checkpoint={audio_ckpt}", "--interactive", "--greedy", "--text_only",
                          "--dump_dir=dump", *BUDGET], "stdin": "/audio q.wav\n/audio nope.wav\nwhat was that?\n"},
        "thinker_only_text": {"args": [f"--checkpoint={thinker_only_ckpt}", "--audio=q.wav", "--text_only",
                                       "--greedy", "--dump_dir=dump", *BUDGET]},
    })


@pytest.mark.parametrize("case", list(BAD))
def test_bad_audio_exits_2_before_loading(refused_runs, case):
    res, cwd, before = refused_runs[case]
    assert res["returncode"] == 2, res
    assert BAD[case][1] in res["stderr"] and "error: " in res["stderr"] and "Traceback" not in res["stderr"], res
    assert res["stdout"] == ""  # nothing ran: no reply, no "wrote ..."
    assert _listing(cwd) == before  # no WAV, no dump dir


def test_model_without_towers_refuses_audio_and_images(refused_runs):
    for case, words in (("no_tower", "no audio encoder"), ("no_vision_tower", "no vision encoder")):
        res, cwd, before = refused_runs[case]
        assert res["returncode"] == 2 and words in res["stderr"], res
        assert _listing(cwd) == before


@pytest.fixture(scope="module")
def vision_runs(audio_ckpt, tmp_path_factory):
    """An image question with speech, and a video with its own sound track (text only), both dumped."""
    return _launch(tmp_path_factory.mktemp("vision_infer"), {
        "image": {"args": [f"--checkpoint={audio_ckpt}", "--image=pic.png", "--image=pic.png", "--prompt=what?",
                           "--output=out.wav", "--dump_dir=dump", "--greedy", *BUDGET]},
        "video": {"args": [f"--checkpoint={audio_ckpt}", "--video=clip.mp4", "--use_audio_in_video", "--prompt=?",
                           "--output=", "--dump_dir=dump", "--greedy", "--text_only", *BUDGET]},
    })


def test_image_question_dumps_vision_rows_and_positions(vision_runs):
    res, cwd, _ = vision_runs["image"]
    assert res["returncode"] == 0, res
    doc = json.loads((cwd / "dump" / "tokens.json").read_text())
    ids, pad, start = doc["prompt_ids"], 151655, 151652  # <|image_pad|>, <|vision_start|>
    assert ids.count(pad) == 32 and ids[ids.index(pad) - 1] == start  # two 32 x 32 px images: 16 rows each
    embeds = np.load(cwd / "dump" / "vision_embeds.npy")
    assert embeds.shape == (32, 64) and embeds.dtype == np.float32
    np.testing.assert_array_equal(embeds[:16], embeds[16:])  # the same image twice: the same rows
    pos = np.load(cwd / "dump" / "position_ids.npy")
    assert pos.shape == (3, len(ids)) and pos.dtype == np.float32
    first = ids.index(pad)
    # an image's rows share one time step and take the 4 x 4 merged grid's rows and columns
    np.testing.assert_array_equal(pos[0, first:first + 16], np.full(16, pos[0, first]))
    np.testing.assert_array_equal(pos[1, first:first + 16] - pos[1, first], np.repeat(np.arange(4), 4))
    np.testing.assert_array_equal(pos[2, first:first + 16] - pos[2, first], np.tile(np.arange(4), 4))
    assert pos[0, -1] == pos.max() and not (cwd / "dump" / "audio_embeds.npy").exists()
    assert sf.info(str(cwd / "out.wav")).samplerate == 24000


def test_video_with_its_sound_track(vision_runs):
    res, cwd, _ = vision_runs["video"]
    assert res["returncode"] == 0, res
    doc = json.loads((cwd / "dump" / "tokens.json").read_text())
    ids = doc["prompt_ids"]
    video_pad, audio_pad = 151656, 151675
    audio_rows = np.load(cwd / "dump" / "audio_embeds.npy").shape[0]
    assert ids.count(video_pad) == 100 and ids.count(audio_pad) == audio_rows > 0
    i = ids.index(151652)  # <|vision_start|><|audio_start|> ... <|audio_end|><|vision_end|>
    assert ids[i + 1] == 151669 and ids[i + 2] == video_pad
    assert np.load(cwd / "dump" / "vision_embeds.npy").shape == (100, 64)
    assert np.load(cwd / "dump" / "position_ids.npy").shape == (3, len(ids))


def test_text_prompt_dumps_text_positions(infer_runs):
    res, cwd, _ = infer_runs["audio_only"]
    n = len(json.loads((cwd / "dump" / "tokens.json").read_text())["prompt_ids"])
    np.testing.assert_array_equal(np.load(cwd / "dump" / "position_ids.npy"), np.broadcast_to(np.arange(n), (3, n)))


def test_spoken_question_dumps_expanded_ids_embeds_and_logits(infer_runs):
    res, cwd, _ = infer_runs["spoken"]
    assert res["returncode"] == 0, res
    doc = json.loads((cwd / "dump" / "tokens.json").read_text())
    pad = 151675  # <|audio_pad|>
    ids = doc["prompt_ids"]
    assert ids.count(pad) == 2 * Q_ROWS
    start, end = 151669, 151670  # <|audio_start|>, <|audio_end|>: each clip's pads sit between its own pair
    first = ids.index(pad)
    assert ids[first - 1] == start and ids[first + Q_ROWS] == end and ids[first + Q_ROWS + 1] == start
    embeds = np.load(cwd / "dump" / "audio_embeds.npy")
    assert embeds.shape == (2 * Q_ROWS, 64) and embeds.dtype == np.float32
    np.testing.assert_array_equal(embeds[:Q_ROWS], embeds[Q_ROWS:])  # the same clip twice: the same rows
    logits = np.load(cwd / "dump" / "prompt_logits.npy")
    assert logits.shape == (152064,) and logits.dtype == np.float32 and np.isfinite(logits).all()
    assert doc["generated_ids"][0] == int(np.argmax(logits))  # greedy: token 1 is the prompt logits' argmax
    assert sf.info(str(cwd / "out.wav")).samplerate == 24000


def test_audio_without_prompt_text(infer_runs):
    res, cwd, _ = infer_runs["audio_only"]
    assert res["returncode"] == 0, res
    doc = json.loads((cwd / "dump" / "tokens.json").read_text())
    assert doc["prompt_ids"].count(151675) == Q_ROWS and len(doc["generated_ids"]) == 3
    assert not list(cwd.glob("out.wav"))


def test_interactive_audio_turns(chat_runs):
    """`/audio PATH` is a spoken turn; a bad file is reported and the session goes on; the next text turn's prompt
    re-renders the spoken turn (its pads included)."""
    res, cwd, _ = chat_runs["chat"]
    assert res["returncode"] == 0, res
    assert "audio file nope.wav does not exist" in res["stdout"]
    t1 = json.loads((cwd / "dump" / "turn_1" / "tokens.json").read_text())
    t2 = json.loads((cwd / "dump" / "turn_2" / "tokens.json").read_text())
    assert not (cwd / "dump" / "turn_3").exists()
    assert t1["prompt_ids"].count(151675) == Q_ROWS and t2["prompt_ids"].count(151675) == Q_ROWS
    assert t2["prompt_ids"][: len(t1["prompt_ids"])] == t1["prompt_ids"]
    assert t2["messages"][0]["content"] == [{"type": "audio", "audio": "q.wav"}]


def test_batch_lines_with_audio(audio_ckpt, tmp_path):
    _write_audio(tmp_path)
    lines = [
        {"id": "a", "prompt": "what is this?", "audio": "q.wav"},  # relative to the input file
        {"id": "b", "prompt": "", "audio": ["q.wav", str(tmp_path / "q.wav")]},
        {"id": "c", "messages": [{"role": "user", "content": [{"type": "audio", "audio": "q.wav"},
                                                              {"type": "text", "text": "hm"}]}]},
        {"id": "bad1", "prompt": "x", "audio": "nope.wav"},
        {"id": "bad2", "prompt": "x", "audio": "nan.wav"},
        {"id": "bad3", "messages": [{"role": "user", "content": "x"}], "audio": "q.wav"},
        {"id": "d", "prompt": "describe", "image": "pic.png"},
        {"id": "bad4", "prompt": "x", "image": ["pic.png", "notimage.png"]},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    (res,) = launcher_cases.run_cases(BATCH, [{"args": [f"--input={inp}", f"--output_dir={out}",
                                                        f"--checkpoint={audio_ckpt}", "--batch_size=2", "--greedy",
                                                        "--text_only", *BUDGET], "cwd": str(ROOT)}], str(tmp_path))
    assert res["returncode"] == 0, res
    err = res["stderr"]
    assert "bad input: line 4: audio file " in err and "nope.wav does not exist" in err, err
    assert "bad input: line 5: audio " in err and "has NaN or Inf samples" in err, err
    assert "bad input: line 6: 'audio' goes with 'prompt'" in err, err
    assert "bad input: line 8: image 2: cannot read" in err, err
    recs = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert sorted(recs) == ["a", "b", "c", "d"]
    assert recs["d"]["prompt_tokens"] > 18  # 16 image rows between <|vision_start|> and <|vision_end|>
    n_text = {"a": recs["a"]["prompt_tokens"] - Q_ROWS, "b": recs["b"]["prompt_tokens"] - 2 * Q_ROWS}
    assert n_text["b"] < n_text["a"]  # b has no text part; a carries its question
    assert recs["c"]["prompt_tokens"] > Q_ROWS


def test_thinker_only_checkpoint_refuses_speech_and_answers_text(refused_runs, chat_runs):
    res, cwd, before = refused_runs["thinker_only_speech"]
    assert res["returncode"] == 2 and "has no talker" in res["stderr"] and "--text_only" in res["stderr"], res
    assert res["stderr"].count("error: ") == 1 and "Traceback" not in res["stderr"]
    assert _listing(cwd) == before
    res, cwd, _ = chat_runs["thinker_only_text"]
    assert res["returncode"] == 0, res
    doc = json.loads((cwd / "dump" / "tokens.json").read_text())
    assert doc["prompt_ids"].count(151675) == Q_ROWS and len(doc["generated_ids"]) == 3
    assert (cwd / "dump" / "audio_embeds.npy").exists() and not (cwd / "dump" / "codes.npy").exists()
