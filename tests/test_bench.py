"""Smoke test of launch/bench.py on the tiny config: it runs side by side with transformers, prints a ratio for
every phase row and writes a JSON report with positive figures. No timing assertions (shared CPUs)."""

import json
import os
import re
import subprocess
import sys

from tests import procs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS = ("prefill tok/s", "decode b1 tok/s", "decode b2 tok/s", "talker+cp frames/s", "code2wav RTF",
        "e2e first audio s", "e2e total RTF")


def test_bench_tiny_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "launch", "bench.py"), "--config=tiny", "--repeats=1",
           f"--work_dir={tmp_path / 'work'}", f"--json_out={out}", "--prompt_len=16", "--decode_prompt_len=8",
           "--decode_tokens=8", "--batch_sizes=1,2", "--talker_frames=4", "--code2wav_seconds=0.5", "--e2e_tokens=4",
           "--e2e_frames=4", "--max_len=64", "--copy_mib=4", "--matmul_n=128", "--nobf16_too"]
    proc = subprocess.run(cmd, cwd=ROOT, env=procs.env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    number = r"[-+0-9.,e]+"
    for row in ROWS:  # phase, ours, theirs, ratio, ...: every row has numeric ours / theirs / ratio columns
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(row)), None)
        assert line is not None, f"no table row {row!r} in:\n{proc.stdout}"
        cols = line[len(row):].split()
        assert all(re.fullmatch(number, c) for c in cols[:3]), f"row without a ratio: {line!r}"

    report = json.loads(out.read_text())
    ph = report["phases"]
    assert set(ph) == {"prefill", "decode", "talker", "code2wav", "e2e"}
    positive = [ph["prefill"]["ours_tokens_per_s"], ph["prefill"]["theirs_tokens_per_s"], ph["prefill"]["flops"],
                ph["talker"]["ours_frames_per_s"], ph["talker"]["theirs_frames_per_s"],
                ph["code2wav"]["ours_rtf"], ph["code2wav"]["theirs_rtf"], ph["code2wav"]["flops"],
                ph["e2e"]["ours_rtf"], ph["e2e"]["theirs_rtf"], ph["e2e"]["ours_time_to_first_audio_s"],
                report["machine"]["bandwidth_Bps"], report["machine"]["matmul_flops_per_s"],
                report["memory"]["peak_rss_mib"], report["memory"]["ours_params_bytes"]]
    for b in ("batch1", "batch2"):
        d = ph["decode"][b]
        positive += [d["ours_tokens_per_s"], d["theirs_tokens_per_s"], d["bytes_per_step"], d["ratio"]]
    assert all(isinstance(v, (int, float)) and v > 0 for v in positive), positive
    assert ph["decode"]["batch2"]["routed_experts_source"].startswith("counted")
