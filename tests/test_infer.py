"""launch/infer.py end to end (the embedded tiny random-weight model, tiny budgets).

The runs go through two launcher processes (tests/launcher_cases.py) instead of one each: a fresh Python +
JAX import per run was a large part of what each cost.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import soundfile as sf

from omni_jax.models import code2wav as c2w
from omni_jax.config import load_config
from omni_jax.processing.tokenizer import load_tokenizer

from tests import launcher_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFER = os.path.join(ROOT, "launch", "infer.py")
BUDGET = ["--max_new_tokens=5", "--talker_max_new_tokens=6", "--max_len=128"]
INTERACTIVE_STDIN = "hello\nsecond question\n/reset\nhello\n"  # EOF ends the session


def _launch(work, cases: dict, devices=None) -> dict:
    """{case: (working dir, stdout)} for infer.py runs {case: args} in one launcher process."""
    jobs, dirs = [], {}
    for name, args in cases.items():
        dirs[name] = work / name
        dirs[name].mkdir()
        jobs.append({"args": [a.replace("{dir}", str(dirs[name])) for a in args], "cwd": str(dirs[name]),
                     **({"stdin": INTERACTIVE_STDIN} if name == "interactive" else {})})
    results = launcher_cases.run_cases(INFER, jobs, str(work), devices=devices)
    return {name: (dirs[name], _ok(name, r)) for name, r in zip(cases, results)}


@pytest.fixture(scope="module")
def speech_runs(tmp_path_factory):
    """The single-device speech run and its --mesh=ep2 twin, in one process with two simulated CPU devices (the
    single-device run uses the first)."""
    return _launch(tmp_path_factory.mktemp("infer_speech"), {
        "hello": ["--prompt=你好,世界", "--output={dir}/hello.wav", "--dump_dir={dir}/dump", *BUDGET],
        "mesh": ["--prompt=你好,世界", "--mesh=ep2", "--output=", "--dump_dir={dir}/dump", *BUDGET],
    }, devices=2)


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("infer_other"), {
        "text_only": ["--prompt=你好,世界", "--text_only", "--greedy", "--dump_dir={dir}/dump", *BUDGET],
        "interactive": ["--interactive", "--greedy", "--output={dir}/x.wav", "--dump_dir={dir}/dump",
                        "--max_new_tokens=4", "--talker_max_new_tokens=4", "--max_len=128"],
    })


def _ok(name, result):
    assert result["returncode"] == 0, f"infer.py ({name}) failed ({result['returncode']}):\n{result['stdout']}\n{result['stderr']}"
    return result["stdout"]


@pytest.fixture(scope="module")
def hello(speech_runs):
    """The single-device run with --output and --dump_dir, shared by the checks below."""
    return speech_runs["hello"]


def test_prompt_writes_24khz_wav_and_prints_text(hello):
    tmp, out = hello
    doc = json.loads((tmp / "dump" / "tokens.json").read_text(encoding="utf-8"))
    assert doc["text"] and doc["text"] in out  # the reply is printed
    assert "[11 prompt tokens, 5 generated" in out  # '你好,世界' in the ChatML template
    info = sf.info(str(tmp / "hello.wav"))
    assert info.format == "WAV" and info.samplerate == 24000 and info.channels == 1
    assert info.frames == c2w.wav_length(load_config("tiny"), doc["frames"])
    assert not (tmp / "output.wav").exists()  # --output replaced the default


def test_dump_dir_codes_and_audio(hello):
    tmp, _ = hello
    doc = json.loads((tmp / "dump" / "tokens.json").read_text(encoding="utf-8"))
    codes = np.load(tmp / "dump" / "codes.npy")
    # Random weights never emit codec EOS: talker budget 6 -> 5 frames.
    assert codes.shape == (16, 5) == (16, doc["frames"]) and np.issubdtype(codes.dtype, np.integer)
    assert codes.min() >= 0 and codes.max() < load_config("tiny").code2wav.codebook_size
    audio, rate = sf.read(str(tmp / "dump" / "audio.wav"))
    assert rate == 24000 and audio.shape == (c2w.wav_length(load_config("tiny"), 5),)
    np.testing.assert_array_equal(audio, sf.read(str(tmp / "hello.wav"))[0])
    assert len(doc["generated_ids"]) == 5 and doc["speaker"] == "ethan"


def test_mesh_matches_single_device(hello, speech_runs):
    """--mesh=ep2 over two simulated CPU devices (expert-parallel thinker and talker) gives the same tokens
    and (sampled, same seed) codes as the single-device run."""
    tmp, _ = hello
    mesh_dir, _ = speech_runs["mesh"]
    ref = json.loads((tmp / "dump" / "tokens.json").read_text(encoding="utf-8"))
    got = json.loads((mesh_dir / "dump" / "tokens.json").read_text(encoding="utf-8"))
    assert got["generated_ids"] == ref["generated_ids"]
    np.testing.assert_array_equal(np.load(mesh_dir / "dump" / "codes.npy"), np.load(tmp / "dump" / "codes.npy"))
    assert not list(mesh_dir.glob("*.wav"))  # --output= writes no WAV


def test_text_only_with_random_tiny_weights(other_runs):
    """No --checkpoint: the tiny config's random weights, announced as such; --text_only writes no audio."""
    tmp_path, out = other_runs["text_only"]
    assert "RANDOM" in out and "weights" in out
    lines = out.splitlines()
    stats = next(i for i, line in enumerate(lines) if line.startswith("[11 prompt tokens, 5 generated"))
    assert lines[stats + 1].strip()  # the generated text itself
    dump = json.loads((tmp_path / "dump" / "tokens.json").read_text())
    assert dump["prompt_ids"][:4] == [151644, 872, 198, 108386]  # <|im_start|>user\n你好
    assert len(dump["generated_ids"]) == 5
    assert not list(tmp_path.glob("*.wav")) and not (tmp_path / "dump" / "codes.npy").exists()


def test_interactive_keeps_history(other_runs):
    tmp_path, out = other_runs["interactive"]
    turns = [json.loads((tmp_path / "dump" / f"turn_{n}" / "tokens.json").read_text(encoding="utf-8"))
             for n in (1, 2, 3)]
    assert not (tmp_path / "dump" / "turn_4").exists()
    tok = load_tokenizer()
    first = [{"role": "user", "content": "hello"}]
    assert turns[0]["prompt_ids"] == tok.apply_chat_template(first)
    # Turn 2's prompt is the whole conversation: turn 1's user message and reply, then the new message.
    history = first + [{"role": "assistant", "content": turns[0]["text"]},
                       {"role": "user", "content": "second question"}]
    assert turns[1]["messages"] == history
    assert turns[1]["prompt_ids"] == tok.apply_chat_template(history)
    assert turns[1]["prompt_ids"][: len(turns[0]["prompt_ids"])] == turns[0]["prompt_ids"]
    # /reset: turn 3 starts over, so (greedy) it repeats turn 1 exactly.
    assert turns[2]["prompt_ids"] == turns[0]["prompt_ids"]
    assert turns[2]["generated_ids"] == turns[0]["generated_ids"]
    assert "[history cleared]" in out and "[turn 2: " in out
    for n in (1, 2, 3):
        info = sf.info(str(tmp_path / f"turn_{n}.wav"))
        assert info.samplerate == 24000 and info.frames == c2w.wav_length(load_config("tiny"), turns[n - 1]["frames"])
