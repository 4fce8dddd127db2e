"""launch/batch.py as users run it: a subprocess on the tiny random-weight default.

Checks crash safety (SIGKILL at random points, then resume), and input validation (bad lines
reported with their line numbers; --strict fails before loading the model).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

import soundfile as sf

from omni_jax.runtime.sampling import SamplingParams
from tests import launcher_cases, procs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = os.path.join(REPO, "launch", "batch.py")
# Small budgets, a short cache and batch 2 everywhere, so every run reuses the same compiled shapes; greedy, so a
# resumed batch (which samples with another seed) must still give the same text.
SMALL = ["--batch_size=2", "--max_len=128", "--max_new_tokens=4", "--talker_max_new_tokens=6", "--greedy",
         "--talker_greedy"]
PROMPTS = ["Hello!", "What is two plus two?", "Name a color.", "Tell me a joke."]
RUN_TIMEOUT_S = 300


def _cmd(inp, out, *extra: str) -> list[str]:
    return [sys.executable, BATCH, f"--input={inp}", f"--output_dir={out}", *SMALL, *extra]


def _run(inp, out, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(inp, out, *extra), cwd=REPO, env=procs.env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)


def _records(out) -> list[dict]:
    """results.jsonl as a reader sees it at any instant: must always be whole JSON lines (atomic rewrite)."""
    path = os.path.join(out, "results.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _summary(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("summary: ")]
    assert len(lines) == 1, f"expected one summary line, stdout was:\n{stdout}"
    return json.loads(lines[0][len("summary: "):])


def _write_jsonl(path, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


@pytest.mark.heavy
def test_sigkill_then_resume(tmp_path, tiny_pipe):
    inp = tmp_path / "prompts.jsonl"
    ids = [f"q{i}" for i in range(len(PROMPTS))]
    _write_jsonl(inp, [json.dumps({"id": i, "prompt": p}) for i, p in zip(ids, PROMPTS)])

    # The uninterrupted answers, in process: the job's default model is this tiny random one, greedy, batch 2.
    ref_text = {}
    for i in range(0, len(PROMPTS), 2):
        res = tiny_pipe.generate(PROMPTS[i:i + 2], text_only=True, max_new_tokens=4, sampling=SamplingParams.greedy())
        ref_text.update({ids[i + j]: r.text for j, r in enumerate(res)})

    out = tmp_path / "out"
    rng = random.Random(1234)
    kills_mid_job = 0
    for k in range(2):
        before = len(_records(out))
        proc = subprocess.Popen(_cmd(inp, out), cwd=REPO, env=procs.env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            # The first kill lands at a random time (startup, model load, compile-cache load or generation),
            # the others once this run has written a result; each then waits a short random delay (it may land
            # inside the next write). Stopping at the first new result bounds each run's progress, so work is
            # left for later kills however fast the machine is.
            deadline = time.monotonic() + (rng.uniform(0.2, 3.0) if k == 0 else RUN_TIMEOUT_S)
            while proc.poll() is None and len(_records(out)) == before and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.02))
            if proc.poll() is None:
                written = len(_records(out))
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(timeout=30) == -signal.SIGKILL
                kills_mid_job += 0 < written < len(ids)
                print(f"kill {k}: SIGKILL with {written}/{len(ids)} results written")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert kills_mid_job >= 1, "no SIGKILL landed after some results were written and before the job ended"

    final = _run(inp, out)
    assert final.returncode == 0, final.stderr
    summary = _summary(final.stdout)
    assert summary["items"] == len(ids) and summary["failures"] == 0 and summary["bad_lines"] == 0
    assert summary["done_now"] + summary["skipped_done"] == len(ids)
    assert summary["skipped_done"] >= kills_mid_job  # the killed runs' results were kept, not redone

    recs = _records(out)
    assert sorted(rec["id"] for rec in recs) == sorted(ids)  # every id exactly once
    for rec in recs:
        assert rec["text"] == ref_text[rec["id"]]  # resumed batches answer the right prompt (greedy: same text)
        info = sf.info(os.path.join(out, rec["wav"]))
        assert info.samplerate == 24000 == rec["sample_rate"]
        assert info.frames == rec["samples"] > 0
    leftovers = [name for name in os.listdir(out) if ".tmp-" in name]
    assert not leftovers, leftovers
    assert sorted(os.listdir(out)) == sorted([f"{i}.wav" for i in ids] + ["results.jsonl"])


BAD_INPUT = [
    '{"id": "good1", "prompt": "Hello there."}',                                         # 1 ok
    '{"id": "broken", "prompt": "no closing brace"',                                      # 2 invalid JSON
    '{"prompt": "who am I?"}',                                                            # 3 missing id
    '{"id": "good1", "prompt": "same id again"}',                                         # 4 duplicate id
    '{"id": "spk", "prompt": "hi", "speaker": "nobody"}',                                 # 5 unknown speaker
    '{"id": "both", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}',      # 6 prompt and messages
    "",                                                                                   # 7 blank: skipped
    '{"id": "good2", "messages": [{"role": "user", "content": "Name a fruit."}]}',        # 8 ok
]
BAD_LINES = {2: "invalid JSON", 3: "missing 'id'", 4: "duplicate id 'good1'", 5: "unknown speaker 'nobody'",
             6: "needs exactly one of 'prompt' or 'messages'"}


def test_malformed_input(tmp_path):
    inp = tmp_path / "prompts.jsonl"
    _write_jsonl(inp, BAD_INPUT)
    only = tmp_path / "only.jsonl"  # line 5 (unknown speaker) then line 6 (prompt and messages)
    _write_jsonl(only, [BAD_INPUT[0], BAD_INPUT[4], BAD_INPUT[5]])
    out, strict_out = tmp_path / "out", tmp_path / "strict"
    runs = [(inp, out), (inp, strict_out, "--strict"), (only, tmp_path / "strict_text", "--strict", "--text_only"),
            (only, tmp_path / "strict_speech", "--strict")]
    # The four runs share one launcher process (tests/launcher_cases.py): three of them stop before the model loads,
    # so a fresh Python + JAX import would be most of their cost.
    results = launcher_cases.run_cases(BATCH, [{"args": _cmd(i, o, *extra)[2:], "cwd": REPO} for i, o, *extra in runs],
                                       str(tmp_path))
    full, strict, strict_text, strict_speech = [SimpleNamespace(returncode=r["returncode"], stdout=r["stdout"],
                                                                stderr=r["stderr"]) for r in results]

    # Without --strict: good lines are produced (with audio), each bad one is reported with its line number.
    r = full
    assert r.returncode == 0, r.stderr
    for n, what in BAD_LINES.items():
        assert f"bad input: line {n}: {what}" in r.stderr, (n, r.stderr)
    reported = sorted(int(ln.split()[3].rstrip(":")) for ln in r.stderr.splitlines() if ln.startswith("bad input: "))
    assert reported == sorted(BAD_LINES)  # blank line 7 and the good lines are not reported
    recs = _records(out)
    assert {rec["id"]: rec["line"] for rec in recs} == {"good1": 1, "good2": 8}
    for rec in recs:
        assert sf.info(os.path.join(out, rec["wav"])).frames == rec["samples"]
    summary = _summary(r.stdout)
    assert (summary["items"], summary["bad_lines"], summary["failures"]) == (2, len(BAD_LINES), 0)

    # --strict: stops at the first bad line with a non-zero exit, before loading the model or writing anything.
    r = strict
    assert r.returncode != 0
    assert "bad input: line 2: invalid JSON" in r.stderr and "line 3" not in r.stderr
    assert "summary: " not in r.stdout and not os.path.exists(strict_out / "results.jsonl")

    # With --text_only the speaker is irrelevant: line 5 passes and --strict stops at the next bad line (6).
    r = strict_text
    assert r.returncode != 0
    assert "bad input: line 3: needs exactly one of 'prompt' or 'messages'" in r.stderr
    assert "bad input: line 2" not in r.stderr
    # Without --text_only the same file stops at the unknown speaker.
    r = strict_speech
    assert r.returncode != 0 and "bad input: line 2: unknown speaker 'nobody'" in r.stderr
