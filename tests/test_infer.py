"""launch/infer.py end to end in subprocesses (the embedded tiny random-weight model, tiny budgets).

Subprocesses share the repo's persistent compilation cache, so repeated runs skip most compiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import soundfile as sf

from omni_jax.models import code2wav as c2w
from omni_jax.config import load_config
from omni_jax.processing.tokenizer import load_tokenizer

from tests import procs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFER = os.path.join(ROOT, "launch", "infer.py")
BUDGET = ["--max_new_tokens=5", "--talker_max_new_tokens=6", "--max_len=128"]


def _run(args, cwd, stdin=None, devices=None):
    proc = subprocess.run([sys.executable, INFER, *args], cwd=cwd, input=stdin, capture_output=True, text=True,
                          env=procs.env(devices), timeout=300)
    return proc


def _ok(proc):
    assert proc.returncode == 0, f"infer.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def hello(tmp_path_factory):
    """One single-device run with --output and --dump_dir, shared by the checks below."""
    tmp = tmp_path_factory.mktemp("infer_hello")
    out = _ok(_run(["--prompt=你好,世界", f"--output={tmp}/hello.wav", f"--dump_dir={tmp}/dump", *BUDGET], tmp))
    return tmp, out


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


def test_mesh_matches_single_device(hello, tmp_path):
    """--mesh=ep2 over two simulated CPU devices (expert-parallel thinker and talker) gives the same tokens
    and (sampled, same seed) codes as the single-device run."""
    tmp, _ = hello
    _ok(_run(["--prompt=你好,世界", "--mesh=ep2", "--output=", f"--dump_dir={tmp_path}/dump", *BUDGET], tmp_path,
             devices=2))
    ref = json.loads((tmp / "dump" / "tokens.json").read_text(encoding="utf-8"))
    got = json.loads((tmp_path / "dump" / "tokens.json").read_text(encoding="utf-8"))
    assert got["generated_ids"] == ref["generated_ids"]
    np.testing.assert_array_equal(np.load(tmp_path / "dump" / "codes.npy"), np.load(tmp / "dump" / "codes.npy"))
    assert not list(tmp_path.glob("*.wav"))  # --output= writes no WAV


def test_text_only_with_random_tiny_weights(tmp_path):
    """No --checkpoint: the tiny config's random weights, announced as such; --text_only writes no audio."""
    out = _ok(_run(["--prompt=你好,世界", "--text_only", "--greedy", f"--dump_dir={tmp_path}/dump", *BUDGET], tmp_path))
    assert "RANDOM" in out and "weights" in out
    lines = out.splitlines()
    stats = next(i for i, line in enumerate(lines) if line.startswith("[11 prompt tokens, 5 generated"))
    assert lines[stats + 1].strip()  # the generated text itself
    dump = json.loads((tmp_path / "dump" / "tokens.json").read_text())
    assert dump["prompt_ids"][:4] == [151644, 872, 198, 108386]  # <|im_start|>user\n你好
    assert len(dump["generated_ids"]) == 5
    assert not list(tmp_path.glob("*.wav")) and not (tmp_path / "dump" / "codes.npy").exists()


def test_interactive_keeps_history(tmp_path):
    stdin = "hello\nsecond question\n/reset\nhello\n"  # EOF ends the session
    out = _ok(_run(["--interactive", "--greedy", f"--output={tmp_path}/x.wav", f"--dump_dir={tmp_path}/dump",
                    "--max_new_tokens=4", "--talker_max_new_tokens=4", "--max_len=128"], tmp_path, stdin=stdin))
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
