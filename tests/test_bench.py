"""Smoke test of launch/bench.py on the tiny config: it runs side by side with transformers, prints a ratio for
every phase row and writes a JSON report with positive figures. No timing assertions (shared CPUs)."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests import procs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two runs (one per group of phases) sharing one work dir: the transformers checkpoint is built and converted
# once, and neither run alone takes a minute on a loaded CI machine. The cache length is the other tiny tests'
# (conftest.TINY_MAX_LEN), so their compiled programs are persistent-cache hits here.
GROUPS = {
    "lm": ("roofline,prefill,decode", ("prefill tok/s", "decode b1 tok/s", "decode b2 tok/s")),
    "speech": ("roofline,talker,code2wav,e2e,audio_encoder,vision_encoder,vocoder_stream",
               ("talker+cp frames/s", "code2wav RTF", "e2e first audio s", "e2e total RTF", "audio encoder 1.5 s (s)",
                "vision encoder image (s)", "vision encoder video (s)", "vocoder 1-frame chunk s", "vocoder 4-frame chunk s")),
}
TINY = ["--config=tiny", "--repeats=1", "--prompt_len=16", "--decode_prompt_len=8", "--decode_tokens=32",
        "--batch_sizes=1,2", "--talker_frames=4", "--code2wav_seconds=0.5", "--e2e_tokens=4", "--e2e_frames=4",
        "--max_len=128", "--vocoder_chunks=1,4", "--vocoder_calls=2", "--vocoder_long_chunks=8", "--copy_mib=4",
        "--matmul_n=128", "--nobf16_too", "--audio_seconds=1.5", "--e2e_audio_seconds=1", "--e2e_video_seconds=0",
        "--vision_image_size=64,48", "--vision_video_seconds=2",
        f"--audio_config={os.path.join(ROOT, 'configs', 'tiny.json')}"]


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_work")


def _positive(values) -> None:
    assert all(isinstance(v, (int, float)) and v > 0 for v in values), values


@pytest.mark.parametrize("group", list(GROUPS))
def test_bench_tiny_runs_and_reports_ratios(group, work_dir, tmp_path):
    what, rows = GROUPS[group]
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "launch", "bench.py"), *TINY, f"--what={what}",
           f"--work_dir={work_dir}", f"--json_out={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=procs.env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    number = r"[-+0-9.,e]+"
    for row in rows:  # phase, ours, theirs, ratio, ...: every row has numeric ours / theirs / ratio columns
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(row)), None)
        assert line is not None, f"no table row {row!r} in:\n{proc.stdout}"
        cols = line[len(row):].split()
        assert all(re.fullmatch(number, c) for c in cols[:3]), f"row without a ratio: {line!r}"

    report = json.loads(out.read_text())
    ph = report["phases"]
    assert set(ph) == set(what.split(",")) - {"roofline"}
    _positive([report["memory"]["peak_rss_mib"], report["memory"]["ours_params_bytes"]])
    if group == "lm":
        _positive([ph["prefill"]["ours_tokens_per_s"], ph["prefill"]["theirs_tokens_per_s"], ph["prefill"]["flops"],
                   report["machine"]["bandwidth_Bps"], report["machine"]["matmul_flops_per_s"]])
        for b in ("batch1", "batch2"):
            d = ph["decode"][b]
            _positive([d["ours_tokens_per_s"], d["theirs_tokens_per_s"], d["bytes_per_step"], d["ratio"]])
        assert ph["decode"]["batch2"]["routed_experts_source"].startswith("counted")
    else:
        _positive([ph["talker"]["ours_frames_per_s"], ph["talker"]["theirs_frames_per_s"],
                   ph["code2wav"]["ours_rtf"], ph["code2wav"]["theirs_rtf"], ph["code2wav"]["flops"],
                   ph["e2e"]["ours_rtf"], ph["e2e"]["theirs_rtf"], ph["e2e"]["ours_time_to_first_audio_s"]])
        e, v = ph["e2e"], ph["vocoder_stream"]
        b = e["ours_stream"]["breakdown"]  # a text prompt: no audio encoder, a front end of ~0 s
        _positive([e["stream_over_generate"], *(b[k] for k in ("time_to_first_token_s", "talker_prefill_s",
                                                                "time_to_first_frame_s", "time_to_first_audio_s")),
                   v["long"]["chunk5_s"], v["long"]["stream_over_vocode"]]
                  + [r[k] for r in v["chunks"].values() for k in ("ours_s", "theirs_s", "ratio")])
        sp = e["ours_spoken_stream"]["breakdown"]  # 1 s of audio: the front end and encoder run before the thinker
        _positive([sp["front_end_s"], sp["encoders_s"]])
        assert sp["encoders_s"] < sp["time_to_first_token_s"] < sp["time_to_first_audio_s"]
        assert "spoken question (1 s of audio): first audio" in proc.stdout
        assert v["long"]["chunk200_s"] is None  # 8 chunks: too short to have a chunk 200, and says so
        assert "vocoder long stream (8 chunks of 4): chunk 5" in proc.stdout
        a = ph["audio_encoder"]
        _positive([a["ours_s"], a["theirs_s"], a["ratio"], a["flops"], a["ours_roofline_pct"]])
        assert a["rows"] == 13 + 7 and a["layers"] == 1  # 150 frames; the tiny tower
