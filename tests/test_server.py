"""launch/serve.py as a real uvicorn server on a free localhost port, driven by the official `openai` client.

One server process for the module (tiny config, random weights, 8 slots, greedy talker, an API key): text and
speech replies streamed and not; 8 staggered concurrent streaming speech requests, each byte-identical to its
solo run; every bad-request class gets a 4xx with an OpenAI error body (never a traceback) and the server
answers afterwards; a client that disconnects mid-stream frees its slot; the load generator runs against it;
last, SIGTERM with a stream in flight: the stream finishes, the process exits 0.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from tests import procs
from tests.conftest import ROOT, TINY_MAX_LEN

KEY = "test-key"
MODEL = "qwen3-omni"
SLOTS = 8
PROMPTS = ["Tell me about the sea.", "hi", "What is JAX?", "你好,世界", "Count to ten.", "A poem, please.",
           "Why is the sky blue?", "ok"]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, lines: list[str]):
        self.proc, self.url, self.lines = proc, url, lines
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}


@pytest.fixture(scope="module")
def server():
    cmd = [sys.executable, os.path.join(ROOT, "launch", "serve.py"), "--port=0", f"--slots={SLOTS}",
           f"--max_len={TINY_MAX_LEN}", "--talker_max_new_tokens=16", "--talker_greedy", f"--api_key={KEY}",
           "--max_request_mb=0.5", "--max_audio_seconds=3", "--grace_s=30", "--default_max_tokens=8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=procs.env())
    lines: list[str] = []
    url = None
    deadline = time.time() + 150
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("serving ") and " on http://" in line:
            url = line.split(" on ", 1)[1].strip()
            break
        if time.time() > deadline:
            break
    if url is None:
        proc.kill()
        pytest.fail("server did not start:\n" + "".join(lines[-30:]))
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    yield Server(proc, url, lines)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _stream(client, prompt, max_tokens=8, speech=True, **extra):
    """(text, pcm16 bytes, finish_reason, usage) of one streamed request."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content": prompt}], max_completion_tokens=max_tokens,
              temperature=0, stream=True, stream_options={"include_usage": True}, **extra)
    if speech:
        kw.update(modalities=["text", "audio"], audio={"voice": "ethan", "format": "pcm16"})
    text, audio, reason, usage = "", b"", None, None
    for ch in client.chat.completions.create(**kw):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            text += c.delta.content or ""
            a = getattr(c.delta, "audio", None)
            if a is not None and getattr(a, "data", None):
                audio += base64.b64decode(a.data)
            reason = c.finish_reason or reason
    return text, audio, reason, usage


def test_text_and_speech_replies(server):
    c = server.client
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                  max_completion_tokens=8, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    s_text, s_audio, _, usage = _stream(c, PROMPTS[0], speech=False)
    assert s_text == text and s_audio == b"" and usage.completion_tokens == r.usage.completion_tokens

    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                  max_completion_tokens=8, temperature=0, modalities=["text", "audio"],
                                  audio={"voice": "chelsie", "format": "wav"})
    msg = r.choices[0].message
    assert msg.content == text and msg.audio.transcript == text and msg.audio.id.startswith("audio_")
    wav, rate = sf.read(io.BytesIO(base64.b64decode(msg.audio.data)), dtype="int16")
    assert rate == 24000 and wav.ndim == 1 and wav.size > 0
    # the same reply streamed (pcm16 chunks) is the same audio, sample for sample (voice chelsie again)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}], max_completion_tokens=8, temperature=0,
              stream=True, modalities=["text", "audio"], audio={"voice": "chelsie", "format": "pcm16"})
    pcm, s_text = b"", ""
    for ch in c.chat.completions.create(**kw):
        for ch_ in ch.choices:
            s_text += ch_.delta.content or ""
            a = getattr(ch_.delta, "audio", None)
            pcm += base64.b64decode(a.data) if a is not None and getattr(a, "data", None) else b""
    assert s_text == text
    np.testing.assert_array_equal(np.frombuffer(pcm, "<i2"), wav)
    # a spoken reply passed back by its audio id continues the conversation
    follow = c.chat.completions.create(model=MODEL, max_completion_tokens=4, temperature=0, messages=[
        {"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "audio": {"id": msg.audio.id}},
        {"role": "user", "content": "And then?"}])
    assert follow.usage.prompt_tokens > r.usage.prompt_tokens
    models = c.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_concurrent_streaming_speech_equals_solo(server):
    c = server.client
    solo = [_stream(c, p, max_tokens=6 + i % 3) for i, p in enumerate(PROMPTS)]
    out: list = [None] * len(PROMPTS)

    def run(i):
        time.sleep(0.15 * i)  # staggered arrivals: each joins a batch already decoding
        out[i] = _stream(c, PROMPTS[i], max_tokens=6 + i % 3)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (a, b) in enumerate(zip(solo, out)):
        assert b is not None, f"request {i} failed"
        assert a[0] == b[0] and a[2] == b[2], i
        assert len(a[1]) > 0 and a[1] == b[1], i  # the same PCM bytes
    m = server.metrics()
    assert m["omni_jax_active_slots"] == 0 and m["omni_jax_requests_completed"] >= 2 * len(PROMPTS)
    assert m["omni_jax_peak_active_slots"] >= 4  # they really shared the batch


def _wav_b64(seconds: float, rate: int = 16000, fmt: str = "WAV") -> str:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_audio_input(server):
    c = server.client
    for fmt in ("wav", "flac"):
        r = c.chat.completions.create(model=MODEL, max_completion_tokens=4, temperature=0, messages=[
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": _wav_b64(1.0, fmt=fmt.upper()),
                                                                                  "format": fmt}},
                                         {"type": "text", "text": "What is this?"}]}])
        assert r.usage.prompt_tokens > 13 and r.choices[0].message.content is not None


def _data_url(kind: str, data: bytes, mime: str) -> dict:
    return {"type": f"{kind}_url", f"{kind}_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}


def test_image_and_video_input(server, tmp_path):
    """An image_url data: URL answers (the vision rows count in the prompt tokens); a video_url is decoded and its
    token count checked against --max_len (the tiny server's 128 cannot hold a video: a 400 with the numbers)."""
    from PIL import Image

    from tests.test_video import write_video

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    c = server.client
    text_only = c.chat.completions.create(model=MODEL, max_completion_tokens=3, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}]}])
    r = c.chat.completions.create(model=MODEL, max_completion_tokens=3, temperature=0, messages=[
        {"role": "user", "content": [_data_url("image", buf.getvalue(), "image/png"),
                                     {"type": "text", "text": "What is this?"}]}])
    # 32 x 32 px at the tiny encoder's 8 px per merged token: 16 vision rows + <|vision_start|><|vision_end|>
    assert r.usage.prompt_tokens == text_only.usage.prompt_tokens + 18 and r.choices[0].message.content is not None
    frames = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    video = open(write_video(str(tmp_path / "v.mp4"), frames, 2), "rb").read()
    with pytest.raises(openai.BadRequestError, match="max_len"):
        c.chat.completions.create(model=MODEL, max_completion_tokens=3, messages=[
            {"role": "user", "content": [_data_url("video", video, "video/mp4")]}],
            extra_body={"use_audio_in_video": True})


def test_bad_requests_get_openai_errors(server):
    url = server.url + "/v1/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    good = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def part(data, fmt="wav"):
        return dict(good, messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]}])

    cases = [  # (name, request kwargs, expected status, word in the message)
        ("malformed JSON", dict(content=b'{"model": "qwen3-omni", "messages": [', headers=auth), 400, "JSON"),
        ("not an object", dict(json=[1, 2], headers=auth), 400, "object"),
        ("wrong type", dict(json=dict(good, temperature="hot"), headers=auth), 400, "temperature"),
        ("out of range", dict(json=dict(good, top_p=0), headers=auth), 400, "top_p"),
        ("messages missing", dict(json={"model": MODEL}, headers=auth), 400, "messages"),
        ("bad role", dict(json=dict(good, messages=[{"role": "robot", "content": "x"}]), headers=auth), 400, "role"),
        ("unknown voice", dict(json=dict(good, modalities=["text", "audio"], audio={"voice": "alloy"}), headers=auth),
         400, "voice"),
        ("bad modalities", dict(json=dict(good, modalities=["video"]), headers=auth), 400, "modalities"),
        ("bad base64", dict(json=part("not base64 !!"), headers=auth), 400, "base64"),
        ("undecodable audio", dict(json=part(base64.b64encode(b"RIFF0000garbage" * 20).decode()), headers=auth), 400,
         "decoded"),
        ("unknown audio format", dict(json=part(_wav_b64(0.5), "ogg"), headers=auth), 400, "format"),
        ("audio too long", dict(json=part(_wav_b64(4.0)), headers=auth), 400, "max_audio_seconds"),
        ("undecodable image", dict(json=dict(good, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]), headers=auth), 400,
         "cannot read"),
        ("network image", dict(json=dict(good, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]), headers=auth), 400,
         "network"),
        ("local path without --media_dir", dict(json=dict(good, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]), headers=auth), 400, "media_dir"),
        ("undecodable video", dict(json=dict(good, messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(
                b"garbage" * 30).decode()}}]}]), headers=auth), 400, "video"),
        ("bad use_audio_in_video", dict(json=dict(good, use_audio_in_video="yes"), headers=auth), 400,
         "use_audio_in_video"),
        ("too many tokens", dict(json=dict(good, max_tokens=TINY_MAX_LEN), headers=auth), 400, "max_len"),
        ("n > 1", dict(json=dict(good, n=2), headers=auth), 400, "n"),
        ("unknown model", dict(json=dict(good, model="gpt-4o"), headers=auth), 404, "gpt-4o"),
        ("oversize body", dict(content=json.dumps(dict(good, pad="x" * 600_000)).encode(), headers=auth), 413,
         "larger"),
        ("no API key", dict(json=good), 401, "API key"),
        ("wrong API key", dict(json=good, headers={"Authorization": "Bearer nope"}), 401, "API key"),
    ]
    for name, kw, status, word in cases:
        r = httpx.post(url, timeout=60, **kw)
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert word.lower() in err["message"].lower() and err["type"], (name, err)
        assert "Traceback" not in r.text and 'File "' not in r.text, name
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(server.url + path).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/v1/nothing", headers=auth).json()["error"]["message"]
    # the openai client maps them to its exception classes, and the server still answers
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_completion_tokens=10_000)
    r = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert not any("hot" in ln or "not base64" in ln for ln in server.lines)  # bodies are never logged


def test_disconnect_frees_the_slot(server):
    before = server.metrics()["omni_jax_requests_cancelled"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 100,
            "stream": True, "modalities": ["text", "audio"], "audio": {"voice": "ethan", "format": "pcm16"}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 3:
                break  # hang up mid-stream
    deadline = time.time() + 10
    while time.time() < deadline:
        m = server.metrics()
        if m["omni_jax_requests_cancelled"] > before and m["omni_jax_active_slots"] == 0:
            break
        time.sleep(0.05)
    assert m["omni_jax_requests_cancelled"] == before + 1 and m["omni_jax_active_slots"] == 0
    text, audio, reason, _ = _stream(server.client, "hi", max_tokens=4)
    assert reason in ("stop", "length") and audio


def test_load_generator_runs(server):
    import importlib.util

    spec = importlib.util.spec_from_file_location("loadtest", os.path.join(ROOT, "launch", "loadtest.py"))
    lt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lt)
    levels = [lt.run_level(server.client, MODEL, c, 1, 0.1, 5) for c in (1, 2)]
    table, _ = lt.report(levels, 3.0, 3.0)
    for lv in levels:
        assert lv["requests"] == lv["concurrency"] and lv["audio_s_per_s"] > 0 and lv["ttfa_p95"] >= lv["ttft_p50"] > 0
    assert "| 2 |" in table and "audio s per wall s" in table


def test_sigterm_finishes_in_flight_and_exits_0(server):
    """Last test of the module: it stops the server."""
    result: dict = {}

    def run():
        result["out"] = _stream(server.client, PROMPTS[0], max_tokens=12)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 30
    while server.metrics()["omni_jax_active_slots"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    t.join(timeout=60)
    assert server.proc.wait(timeout=60) == 0
    text, audio, reason, usage = result["out"]
    assert reason in ("stop", "length") and audio and usage.completion_tokens >= 1
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=5)
