"""Bad inputs through the real launchers: exit code, message, no traceback, no output.

The cases of each (launcher, device count) run in one subprocess (tests/launcher_cases.py: the launcher's
own entry point per case, flags reset, own working directory), not one process each: a fresh JAX import
was most of a case's cost.

Contract (omni_jax.cli): exit 0 success, 2 usage error, 1 runtime failure; a user error prints one
`error: ...` line on stderr and no traceback (unless --verbosity=1). Every case here fails before the
weights load (most before jax is even imported), and none may create anything in its working directory:
neither the --output file nor a stray temp file.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests import launcher_cases, procs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFER = os.path.join(ROOT, "launch", "infer.py")
BATCH = os.path.join(ROOT, "launch", "batch.py")
OUT = "out.wav"  # every infer case writes (would write) here unless it names another --output

# Files a case may need, created in its tmp dir before the run (name -> bytes).
FILES = {
    "bad_utf8.txt": b"hi \xff\xfe there",
    "blank.txt": b"  \n\t\n",
    "not_a_dir": b"x",
    "bad_utf8.jsonl": b'{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "caf\xe9"}\n',
    "ok.jsonl": b'{"id": "a", "prompt": "hi"}\n',
}

# id: (launcher, args, expected exit code, stderr fragment, simulated CPU devices or None)
CASES = {
    # --- prompts
    "empty_prompt": (INFER, ["--prompt="], 2, "--prompt is empty", None),
    "blank_prompt_file": (INFER, ["--prompt_file=blank.txt"], 2, "--prompt_file='blank.txt' is empty", None),
    "missing_prompt_file": (INFER, ["--prompt_file=nope.txt"], 2, "--prompt_file='nope.txt': no such file", None),
    "invalid_utf8_prompt_file": (INFER, ["--prompt_file=bad_utf8.txt"], 2,
                                 "'bad_utf8.txt' is not valid UTF-8: byte 0xff at byte offset 3", None),
    "empty_input_ids": (INFER, ["--input_ids=,"], 2, "--input_ids is empty", None),
    "no_prompt": (INFER, [], 2, "give exactly one of --prompt, --prompt_file, --input_ids", None),
    # the tiny template turns "hi" into 9 tokens
    "prompt_longer_than_max_len": (INFER, ["--prompt=hi", "--max_len=8", "--max_new_tokens=1"], 2,
                                   "the prompt is 9 tokens and --max_new_tokens=1, together 10 tokens, longer than "
                                   "--max_len=8", None),
    "prompt_plus_budget_over_max_len": (INFER, ["--prompt=hi", "--max_len=32", "--max_new_tokens=30"], 2,
                                        "together 39 tokens, longer than --max_len=32", None),
    # --- speaker, sampling, budgets
    "unknown_speaker": (INFER, ["--prompt=hi", "--speaker=nobody"], 2,
                        "unknown speaker 'nobody'; this checkpoint knows: aiden, chelsie, ethan", None),
    "negative_temperature": (INFER, ["--prompt=hi", "--temperature=-0.5"], 2, "--temperature=-0.5: must be >= 0",
                             None),
    "top_p_zero": (INFER, ["--prompt=hi", "--top_p=0"], 2, "--top_p=0.0: must be in (0, 1]", None),
    "top_p_above_one": (INFER, ["--prompt=hi", "--top_p=1.5"], 2, "--top_p=1.5: must be in (0, 1]", None),
    "negative_top_k": (INFER, ["--prompt=hi", "--top_k=-1"], 2, "--top_k=-1: must be a non-negative integer", None),
    "zero_repetition_penalty": (INFER, ["--prompt=hi", "--repetition_penalty=0"], 2,
                                "--repetition_penalty=0.0: must be > 0", None),
    "talker_top_p_above_one": (INFER, ["--prompt=hi", "--talker_top_p=2"], 2, "--talker_top_p=2.0: must be in (0, 1]",
                               None),
    "negative_talker_temperature": (INFER, ["--prompt=hi", "--talker_temperature=-1"], 2,
                                    "--talker_temperature=-1.0: must be >= 0", None),
    "zero_max_new_tokens": (INFER, ["--prompt=hi", "--max_new_tokens=0"], 2, "flag --max_new_tokens=0", None),
    "negative_talker_max_new_tokens": (INFER, ["--prompt=hi", "--talker_max_new_tokens=-3"], 2,
                                       "flag --talker_max_new_tokens=-3", None),
    # --- streaming chunk sizes: 1..25 codec frames, absl's bounds
    "stream_chunk_zero": (INFER, ["--prompt=hi", "--stream", "--stream_chunk=0"], 2, "flag --stream_chunk=0", None),
    "stream_chunk_negative": (INFER, ["--prompt=hi", "--stream", "--stream_chunk=-2"], 2, "flag --stream_chunk=-2",
                              None),
    "stream_first_chunk_over_max": (INFER, ["--prompt=hi", "--stream", "--stream_first_chunk=30"], 2,
                                    "flag --stream_first_chunk=30: 30 is not an integer in the range [1, 25]", None),
    "stream_chunk_over_max": (INFER, ["--prompt=hi", "--stream", "--stream_chunk=26"], 2,
                              "flag --stream_chunk=26: 26 is not an integer in the range [1, 25]", None),
    # --- flags absl rejects (absl alone would exit 1)
    "unknown_flag": (INFER, ["--prompt=hi", "--nonsense=1"], 2, "Unknown command line flag 'nonsense'", None),
    "bad_flag_type": (INFER, ["--prompt=hi", "--top_k=many"], 2, "flag --top_k=many", None),
    "bad_dtype": (INFER, ["--prompt=hi", "--dtype=int3"], 2, "--dtype: unknown dtype 'int3'", None),
    # --- output paths (checked before anything runs; nothing is created)
    "output_dir_missing": (INFER, ["--prompt=hi", "--output=missing/a.wav"], 2,
                           "/missing' does not exist; create it first", None),
    "output_parent_is_file": (INFER, ["--prompt=hi", "--output=not_a_dir/a.wav"], 2, "/not_a_dir' is not a directory",
                              None),
    "output_is_directory": (INFER, ["--prompt=hi", "--output=."], 2, "--output='.' is a directory", None),
    "dump_dir_under_file": (INFER, ["--prompt=hi", "--dump_dir=not_a_dir/dump"], 2, "is not a directory", None),
    # --- meshes (before the weights load)
    "mesh_device_count": (INFER, ["--prompt=hi", "--mesh=tp2"], 2, "needs 2 devices", None),
    "mesh_experts": (INFER, ["--prompt=hi", "--mesh=ep3"], 2, "expert axis 3 does not divide the thinker's 8 experts",
                     3),
    "mesh_heads": (INFER, ["--prompt=hi", "--mesh=tp3"], 2,
                   "tensor axis 3 does not divide the thinker's 4 attention heads", 3),
    "mesh_unparsable": (INFER, ["--prompt=hi", "--mesh=xp2"], 2, "cannot parse mesh spec 'xp2'", None),
    # --- batch.py
    "batch_invalid_utf8_line": (BATCH, ["--input=bad_utf8.jsonl", "--output_dir=res", "--strict"], 2,
                                "line 2: invalid UTF-8 (byte 0xe9 at byte offset 54 of bad_utf8.jsonl)", None),
    "batch_output_dir_under_file": (BATCH, ["--input=ok.jsonl", "--output_dir=not_a_dir/res"], 2,
                                    "is not a directory", None),
    "batch_unknown_speaker": (BATCH, ["--input=ok.jsonl", "--output_dir=res", "--speaker=nobody"], 2,
                              "--speaker 'nobody' is unknown", None),
    "batch_zero_max_new_tokens": (BATCH, ["--input=ok.jsonl", "--output_dir=res", "--max_new_tokens=0"], 2,
                                  "flag --max_new_tokens=0", None),
    "batch_missing_required_flag": (BATCH, ["--input=ok.jsonl"], 2, "--output_dir", None),
    "batch_mesh_device_count": (BATCH, ["--input=ok.jsonl", "--output_dir=res", "--mesh=ep2"], 2, "needs 2 devices",
                                None),
}


def _run(script: str, args: list[str], cwd, devices: int | None = None) -> subprocess.CompletedProcess:
    """One launcher process, exactly as a user starts it."""
    return subprocess.run([sys.executable, script, *_with_output(script, args)], cwd=cwd, capture_output=True,
                          text=True, env=procs.env(devices), timeout=300)


def _listing(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root) for f in files + dirs}


def _with_output(script: str, args: list[str]) -> list[str]:
    if script == INFER and not any(a.startswith("--output=") for a in args):
        return [*args, f"--output={OUT}"]
    return list(args)


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """{case: (result dict, working dir, its listing before the run)}: every case, one process per group."""
    groups: dict[tuple, list[str]] = {}
    for case, (script, _, _, _, devices) in CASES.items():
        groups.setdefault((script, devices), []).append(case)
    out = {}
    for (script, devices), names in groups.items():
        work = tmp_path_factory.mktemp("cli_cases")
        dirs = {case: work / case for case in names}
        for cwd in dirs.values():
            cwd.mkdir()
            for name, data in FILES.items():
                (cwd / name).write_bytes(data)
        before = {case: _listing(cwd) for case, cwd in dirs.items()}
        jobs = [{"args": _with_output(script, CASES[case][1]), "cwd": str(dirs[case])} for case in names]
        results = launcher_cases.run_cases(script, jobs, str(work), devices)
        out.update({case: (res, dirs[case], before[case]) for case, res in zip(names, results)})
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, bad_input_runs):
    _, _, code, fragment, _ = CASES[case]
    res, cwd, before = bad_input_runs[case]
    rc, stdout, stderr = res["returncode"], res["stdout"], res["stderr"]
    assert rc == code, f"exit {rc} != {code}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    assert fragment in stderr, stderr
    # batch.py reports input lines as "bad input: line N: ..." (its --strict stop included)
    assert ("error: " in stderr or "bad input: " in stderr) and "Traceback" not in stderr, stderr
    assert _listing(cwd) == before  # no output file, no half-created dir, no leftover temp file


def test_verbosity_shows_traceback(tmp_path):
    proc = _run(INFER, ["--prompt=hi", "--top_p=1.5", "--verbosity=1"], tmp_path)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "error: --top_p=1.5" in proc.stderr
    assert not (tmp_path / OUT).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_output_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        proc = _run(INFER, ["--prompt=hi", f"--output={locked}/a.wav"], tmp_path)
        assert proc.returncode == 2 and "cannot write to directory" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not os.listdir(locked)
    finally:
        locked.chmod(0o700)


@pytest.fixture(scope="module")
def poisoned_checkpoint(tmp_path_factory):
    """The tiny random model with NaN thinker LM-head weights, saved with the real checkpoint writer."""
    from omni_jax import checkpoint
    from omni_jax.runtime.loading import load_model

    loaded = load_model(None)
    params = {root: dict(tree) for root, tree in loaded.params.items()}
    params["thinker"]["lm_head"] = np.asarray(params["thinker"]["lm_head"]) * np.nan
    out = str(tmp_path_factory.mktemp("poisoned") / "ckpt")
    checkpoint.save_params(params, out, loaded.config)
    return out


def test_nan_weights_fail_naming_the_stage(poisoned_checkpoint, tmp_path):
    proc = _run(INFER, ["--prompt=hi", f"--checkpoint={poisoned_checkpoint}", "--max_new_tokens=3",
                        "--talker_max_new_tokens=3", "--max_len=128", "--dump_dir=dump"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "error: non-finite values (NaN/Inf) in the thinker output" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / OUT).exists() and not (tmp_path / "dump").exists()
