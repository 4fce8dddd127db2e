"""Load generator for launch/serve.py: streaming speech requests at several concurrency levels, with the
official `openai` client.

  python launch/loadtest.py --url=http://127.0.0.1:8000/v1 --concurrency=1,4,8
  python launch/loadtest.py --serve_args="--checkpoint=/tmp/omni_bench/ckpt --slots=8 --max_len=512" --concurrency=1,4,8

First --warmup_requests untimed requests (the server compiles a prompt-length bucket on its first use). At each
level, `c` clients each send `--requests_per_client` streamed requests back to back (a closed loop);
client i starts i * --stagger_s after the first, so requests arrive at staggered times and join a batch
already running. Per level it reports requests/s, text tokens/s, seconds of audio per wall second, and p50 /
p95 time to first text token and to first audio (from sending the request to receiving the delta), then
checks the targets: audio seconds per wall second at the highest level >= --target_throughput x the lowest
level's, and p95 first audio at the highest level <= --target_latency x the lowest level's.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from omni_jax import cli  # noqa: E402
from omni_jax.errors import UsageError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("url", None, "Base URL of a running server, e.g. http://127.0.0.1:8000/v1.")
flags.DEFINE_string("serve_args", None, "Instead of --url: start launch/serve.py with these flags (on a free port) "
                    "and stop it at the end.")
flags.DEFINE_string("api_key", None, "API key (default $OMNI_JAX_API_KEY, else 'none').")
flags.DEFINE_list("concurrency", ["1", "4", "8"], "Concurrency levels, in order.")
flags.DEFINE_integer("requests_per_client", 2, "Requests each client sends at a level.", lower_bound=1)
flags.DEFINE_integer("warmup_requests", 1, "Untimed requests sent first, one at a time: a server compiles each new "
                     "prompt-length bucket on first use, which would otherwise land in the first level's numbers.",
                     lower_bound=0)
flags.DEFINE_float("stagger_s", 0.5, "Client i starts i * stagger_s after client 0.", lower_bound=0.0)
flags.DEFINE_integer("max_tokens", 24, "max_completion_tokens per request.", lower_bound=1)
flags.DEFINE_bool("speech", True, "Ask for speech (modalities text + audio, pcm16 stream).")
flags.DEFINE_bool("greedy", True, "temperature 0.")
flags.DEFINE_string("model", None, "Model id (default: the server's first /v1/models entry).")
flags.DEFINE_float("target_throughput", 3.0, "Target: audio s per wall s at the top level / the lowest level.")
flags.DEFINE_float("target_latency", 3.0, "Target: p95 first audio at the top level / the lowest level.")
flags.DEFINE_string("json_out", None, "Write the per-level report (and every request's numbers) here.")

PROMPTS = ["Tell me about the sea.", "What is JAX?", "Why is the sky blue?", "Give me a recipe for soup.",
           "Describe a city at night.", "How do birds fly?", "Tell me a short story.", "What is music?"]
SAMPLE_RATE = 24000


def one_request(client, model: str, prompt: str, max_tokens: int, speech: bool, greedy: bool) -> dict:
    """One streamed request; times (seconds from sending it) of the first text delta and first audio delta."""
    kwargs = dict(model=model, messages=[{"role": "user", "content": prompt}], max_completion_tokens=max_tokens,
                  temperature=0.0 if greedy else 1.0, stream=True, stream_options={"include_usage": True})
    if speech:
        kwargs.update(modalities=["text", "audio"], audio={"voice": "ethan", "format": "pcm16"})
    t0 = time.perf_counter()
    out = {"ttft": None, "ttfa": None, "tokens": 0, "audio_bytes": 0}
    for chunk in client.chat.completions.create(**kwargs):
        now = time.perf_counter() - t0
        if chunk.usage is not None:
            out["tokens"] = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.content and out["ttft"] is None:
            out["ttft"] = now
        audio = getattr(delta, "audio", None)
        data = getattr(audio, "data", None) if audio is not None else None
        if data:
            out["audio_bytes"] += len(base64.b64decode(data))
            if out["ttfa"] is None:
                out["ttfa"] = now
    out["t_start"], out["total"] = t0, time.perf_counter() - t0
    out["audio_s"] = out["audio_bytes"] / 2 / SAMPLE_RATE
    return out


def run_level(client, model: str, concurrency: int, requests_per_client: int, stagger_s: float, max_tokens: int,
              speech: bool = True, greedy: bool = True) -> dict:
    """Drive one concurrency level; returns its summary and every request's numbers."""
    import numpy as np

    results: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        time.sleep(i * stagger_s)
        for k in range(requests_per_client):
            prompt = PROMPTS[(i * requests_per_client + k) % len(PROMPTS)]
            try:
                r = one_request(client, model, prompt, max_tokens, speech, greedy)
            except Exception as e:  # noqa: BLE001 - reported with the level
                with lock:
                    errors.append(e)
                return
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed at concurrency {concurrency}: {errors[0]!r}")
    wall = max(r["t_start"] + r["total"] for r in results) - t0

    def pct(key, q):
        vals = [r[key] for r in results if r[key] is not None]
        return float(np.percentile(vals, q)) if vals else float("nan")

    return {
        "concurrency": concurrency, "requests": len(results), "wall_s": wall,
        "requests_per_s": len(results) / wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "audio_s_per_s": sum(r["audio_s"] for r in results) / wall,
        "ttft_p50": pct("ttft", 50), "ttft_p95": pct("ttft", 95), "ttfa_p50": pct("ttfa", 50),
        "ttfa_p95": pct("ttfa", 95), "per_request": [{k: v for k, v in r.items() if k != "t_start"} for r in results],
    }


def report(levels: list[dict], target_throughput: float, target_latency: float) -> tuple[str, bool]:
    """A markdown table of the levels and the two target checks (top level against the lowest)."""
    rows = ["| concurrency | requests | wall s | requests/s | text tokens/s | audio s / wall s | "
            "first token p50 / p95 s | first audio p50 / p95 s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for lv in levels:
        rows.append(f"| {lv['concurrency']} | {lv['requests']} | {lv['wall_s']:.1f} | {lv['requests_per_s']:.3f} | "
                    f"{lv['tokens_per_s']:.2f} | {lv['audio_s_per_s']:.3f} | {lv['ttft_p50']:.2f} / "
                    f"{lv['ttft_p95']:.2f} | {lv['ttfa_p50']:.2f} / {lv['ttfa_p95']:.2f} |")
    lo, hi = levels[0], levels[-1]
    ok = True
    if len(levels) > 1 and lo["audio_s_per_s"] > 0:
        thr = hi["audio_s_per_s"] / lo["audio_s_per_s"]
        lat = hi["ttfa_p95"] / lo["ttfa_p95"]
        ok = thr >= target_throughput and lat <= target_latency
        rows.append("")
        rows.append(f"audio s per wall s, concurrency {hi['concurrency']} / {lo['concurrency']}: {thr:.2f}x "
                    f"(target >= {target_throughput:g}x: {'met' if thr >= target_throughput else 'NOT met'})")
        rows.append(f"p95 first audio, concurrency {hi['concurrency']} / {lo['concurrency']}: {lat:.2f}x "
                    f"(target <= {target_latency:g}x: {'met' if lat <= target_latency else 'NOT met'})")
    return "\n".join(rows), ok


def start_server(serve_args: str, timeout_s: float = 900.0) -> tuple[subprocess.Popen, str]:
    """launch/serve.py with these flags on a free port; returns (process, base URL) once it answers."""
    import shlex

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py")
    proc = subprocess.Popen([sys.executable, script, "--port=0"] + shlex.split(serve_args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.perf_counter() + timeout_s
    for line in proc.stdout:
        print(line, end="", file=sys.stderr)
        if line.startswith("serving ") and " on http://" in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, line.split(" on ", 1)[1].strip() + "/v1"
        if time.perf_counter() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"the server did not start (exit {proc.wait()})")


def main(argv):
    del argv
    if (FLAGS.url is None) == (FLAGS.serve_args is None):
        raise UsageError("give exactly one of --url or --serve_args")
    try:
        levels = [int(c) for c in FLAGS.concurrency]
    except ValueError:
        raise UsageError(f"--concurrency must be integers, got {FLAGS.concurrency}") from None
    if not levels or min(levels) < 1:
        raise UsageError(f"--concurrency must be positive integers, got {levels}")
    import openai

    proc = None
    url = FLAGS.url
    if FLAGS.serve_args is not None:
        proc, url = start_server(FLAGS.serve_args)
    try:
        client = openai.OpenAI(base_url=url, api_key=FLAGS.api_key or os.environ.get("OMNI_JAX_API_KEY", "none"),
                               max_retries=0, timeout=3600)
        model = FLAGS.model or client.models.list().data[0].id
        out = []
        for k in range(FLAGS.warmup_requests):
            one_request(client, model, PROMPTS[k % len(PROMPTS)], FLAGS.max_tokens, FLAGS.speech, FLAGS.greedy)
        for c in levels:
            lv = run_level(client, model, c, FLAGS.requests_per_client, FLAGS.stagger_s, FLAGS.max_tokens,
                           FLAGS.speech, FLAGS.greedy)
            print(f"concurrency {c}: {lv['requests']} requests in {lv['wall_s']:.1f} s", file=sys.stderr, flush=True)
            out.append(lv)
        table, ok = report(out, FLAGS.target_throughput, FLAGS.target_latency)
        print(table, flush=True)
        if FLAGS.json_out:
            with open(FLAGS.json_out, "w") as f:
                json.dump({"levels": out, "targets_met": ok}, f, indent=1)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=120)


if __name__ == "__main__":
    cli.run(main)
