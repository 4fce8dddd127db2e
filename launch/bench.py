"""Benchmarks: every figure is a ratio of variants measured side by side in one run.

  python launch/bench.py --what=decode     # device while_loop vs Python loop over the jitted step
  python launch/bench.py --what=pipeline   # stage times and real-time factor, text -> speech
  python launch/bench.py --what=stream     # time to first text token / first audio chunk vs non-streaming total
  python launch/bench.py --what=all

Absolute times on shared CPUs drift; compare the ratios. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("what", "all", ["decode", "pipeline", "stream", "all"], "Which benchmark.")
flags.DEFINE_string("checkpoint", None, "Orbax checkpoint; default: the tiny embedded model (random weights).")
flags.DEFINE_string("dtype", None, "float32 | bfloat16 (default by backend).")
flags.DEFINE_integer("repeats", 5, "Timed repetitions per variant (after one warm-up).")
flags.DEFINE_integer("max_new_tokens", 64, "Thinker tokens per run.")
flags.DEFINE_integer("talker_max_new_tokens", 48, "Talker frames per run.")
flags.DEFINE_integer("batch", 1, "Batch size for the decode benchmark.")
flags.DEFINE_integer("stream_chunk", 4, "Frames per streamed audio chunk.")
flags.DEFINE_string("prompt", "Tell me about the sea.", "Prompt text.")


def _timed(fn, repeats):
    fn()  # warm-up: compiles
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"best_s": min(times), "median_s": statistics.median(times)}


def bench_decode(pipe):
    from omni_jax.sampling import SamplingParams

    prompt = pipe.encode(FLAGS.prompt)
    prompts = [prompt] * FLAGS.batch
    n = FLAGS.max_new_tokens
    out = {}
    for loop in ("device", "python"):
        run = lambda: pipe.engine.generate(prompts, n, SamplingParams.greedy(), loop=loop, eos_ids=())
        t = _timed(run, FLAGS.repeats)
        t["tokens_per_s_per_row"] = n / t["best_s"]
        out[loop] = t
    out["device_over_python_speedup"] = out["python"]["best_s"] / out["device"]["best_s"]
    return out


def bench_pipeline(pipe):
    from omni_jax.sampling import SamplingParams
    from omni_jax.talker import TalkerSampling

    def run():
        return pipe.generate([FLAGS.prompt], max_new_tokens=FLAGS.max_new_tokens,
                             talker_max_new_tokens=FLAGS.talker_max_new_tokens, sampling=SamplingParams.greedy(),
                             talker_sampling=TalkerSampling.greedy())[0]

    run()
    stages = []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        res = run()
        total = time.perf_counter() - t0
        stages.append({**res.timings, "total_s": total, "audio_s": res.audio_seconds})
    best = min(stages, key=lambda s: s["total_s"])
    best["real_time_factor"] = best["total_s"] / best["audio_s"] if best["audio_s"] else None
    best["frames"] = int(res.codes.shape[-1])
    best["generated_tokens"] = len(res.token_ids)
    return best


def bench_stream(pipe):
    if not hasattr(pipe, "stream"):
        return {"skipped": "this build has no streaming API"}
    from omni_jax.sampling import SamplingParams
    from omni_jax.talker import TalkerSampling

    kw = dict(max_new_tokens=FLAGS.max_new_tokens, talker_max_new_tokens=FLAGS.talker_max_new_tokens,
              sampling=SamplingParams.greedy(), talker_sampling=TalkerSampling.greedy())

    def non_streaming():
        t0 = time.perf_counter()
        pipe.generate([FLAGS.prompt], **kw)
        return time.perf_counter() - t0

    def streaming():
        t0 = time.perf_counter()
        first_text = first_audio = None
        chunk_times, audio = [], 0
        last = t0
        for ev in pipe.stream(FLAGS.prompt, chunk_frames=FLAGS.stream_chunk, **kw):
            now = time.perf_counter()
            if ev.text_delta and first_text is None:
                first_text = now - t0
            if ev.audio is not None and len(ev.audio):
                if first_audio is None:
                    first_audio = now - t0
                chunk_times.append((now - last, len(ev.audio) / pipe.sample_rate))
                audio += len(ev.audio)
                last = now
        total = time.perf_counter() - t0
        return {"time_to_first_text_s": first_text, "time_to_first_audio_s": first_audio, "total_s": total,
                "audio_s": audio / pipe.sample_rate,
                "chunk_rtf_median": statistics.median(c / a for c, a in chunk_times) if chunk_times else None}

    non_streaming()
    streaming()
    ns = min(non_streaming() for _ in range(FLAGS.repeats))
    st = min((streaming() for _ in range(FLAGS.repeats)), key=lambda r: r["total_s"])
    st["non_streaming_total_s"] = ns
    st["first_audio_over_non_streaming_total"] = (st["time_to_first_audio_s"] or float("nan")) / ns
    return st


def main(argv):
    del argv
    import jax

    from omni_jax.loading import parse_dtype
    from omni_jax.pipeline import OmniPipeline

    pipe = OmniPipeline.load(FLAGS.checkpoint, dtype=parse_dtype(FLAGS.dtype), max_len=1024)
    report = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "random_weights": pipe.random_weights,
              "dtype": str(pipe.dtype.__name__ if hasattr(pipe.dtype, "__name__") else pipe.dtype)}
    todo = ["decode", "pipeline", "stream"] if FLAGS.what == "all" else [FLAGS.what]
    for what in todo:
        report[what] = {"decode": bench_decode, "pipeline": bench_pipeline, "stream": bench_stream}[what](pipe)
    print(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    app.run(main)
