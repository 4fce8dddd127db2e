"""Side-by-side benchmark: omni_jax vs transformers (PyTorch) on the same converted weights, plus a roofline.

  python launch/bench.py --config=tiny               # smoke run (seconds)
  python launch/bench.py --config=bench              # real widths, 2 thinker + 2 talker layers (~2.56 B params,
                                                     #   ~10.2 GB per framework at float32: needs ~21 GB of RAM)
  python launch/bench.py --config=bench --nohf       # ours alone (e.g. on a GPU)

One process: a random transformers model is built once per (config, seed) and saved (save_pretrained) under
--work_dir/hf, converted with omni_jax.checkpoint.convert.convert_checkpoint into --work_dir/ckpt (float32); later runs reuse
both. Each run loads transformers (from_pretrained, float32) and ours (OmniPipeline.load, float32), then for every
phase runs one warm-up each (ours compiles there) and --repeats rounds alternating ours, theirs. Reported: medians,
ratio = ours throughput / theirs throughput (> 1: we are faster), our % of the roofline, compile time, memory.
With --bf16_too our phases run again in bfloat16 afterwards (transformers stays float32: no ratio there).

Phases (--what): prefill, decode, talker, code2wav, e2e, audio_encoder (its own random encoder at --audio_config's
width: the real 32 layers x 1280 by default), vocoder_stream (the stateful streaming Code2Wav), roofline.
Definitions are in each phase function's docstring and in the JSON's "definitions". The roofline measures the
machine first (before any model is loaded): memory bandwidth (copy of a --copy_mib float32 array, read + write
bytes) and float32 matmul FLOP/s; decode-like phases get bytes of weights read per step -> roofline steps/s;
prefill and Code2Wav get FLOPs -> % of matmul rate.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from omni_jax import cli  # noqa: E402  (exit codes: 2 usage, 1 runtime; "error: ..." on stderr)
from omni_jax.cli import flag_groups as shared  # noqa: E402
from tools.bench.checkpoints import params_bytes, resolve_config, load_ours, prepare_checkpoints  # noqa: E402
from tools.bench.harness import CompileTimer, Ctx, peak_rss_mib, rss_mib  # noqa: E402
from tools.bench.phases import DEFINITIONS, PHASE_FNS  # noqa: E402
from tools.bench.report import print_table  # noqa: E402
from tools.bench.roofline import measure_machine  # noqa: E402

PHASES = ("prefill", "decode", "talker", "code2wav", "e2e", "audio_encoder", "vision_encoder", "vocoder_stream",
          "roofline")

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "tiny | bench | path to an HF-format config.json.")
flags.DEFINE_string("what", "all", f"'all' or a comma list of {', '.join(PHASES)}.")
flags.DEFINE_integer("repeats", 5, "Timed rounds per phase (after one warm-up each), alternating ours / theirs.")
flags.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.")
flags.DEFINE_integer("prompt_len", 512, "Prefill prompt length (batch 1, random in-vocab ids).")
flags.DEFINE_integer("decode_prompt_len", 16, "Prompt length for the decode phase.")
flags.DEFINE_integer("decode_tokens", 32, "N: decode rate = N / (t(N+1 tokens) - t(1 token)).")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Decode batch sizes.")
flags.DEFINE_integer("talker_frames", 60, "Talker frames (80 ms each) per run of the talker phase.")
flags.DEFINE_float("code2wav_seconds", 10.0, "Seconds of audio decoded in the Code2Wav phase (random codes).")
flags.DEFINE_integer("e2e_tokens", 24, "Thinker tokens in the talker and end-to-end phases (greedy).")
flags.DEFINE_integer("e2e_frames", 60, "Max talker frames in the end-to-end phase (greedy).")
flags.DEFINE_float("e2e_audio_seconds", 5.0, "Seconds of synthetic audio in the e2e phase's spoken question (its "
                   "first-audio breakdown; 0: skip it).", lower_bound=0.0)
flags.DEFINE_float("e2e_video_seconds", 4.0, "Seconds of 2 fps synthetic video (64 x 48 frames) in the e2e phase's "
                   "video question (its first-audio breakdown, and transformers' generate on the same input; 0: skip "
                   "it).", lower_bound=0.0)
flags.DEFINE_string("prompt", "Tell me about the sea.", "Text prompt of the talker and end-to-end phases.")
shared.define_stream_flags()
flags.DEFINE_list("vocoder_chunks", ["1", "2", "4", "8", "25"], "Chunk sizes (frames) of the vocoder_stream phase.")
flags.DEFINE_integer("vocoder_calls", 20, "Timed decode calls per chunk size in the vocoder_stream phase.")
flags.DEFINE_integer("vocoder_long_chunks", 205, "Chunks of --stream_chunk frames in the vocoder_stream phase's long "
                     "reply (chunk 5 vs chunk 200 needs >= 202).", lower_bound=1)
flags.DEFINE_float("audio_seconds", 30.0, "Audio per call in the audio-encoder phase.")
flags.DEFINE_string("audio_config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                                 "qwen3_omni_30b_a3b_instruct.json"),
                    "config.json whose thinker_config.audio_config / vision_config the audio- and vision-encoder "
                    "phases build (default: the real ones, 32 layers x 1280 / 27 blocks x 1152).")
flags.DEFINE_list("vision_image_size", ["1280", "720"], "Width, height of the vision-encoder phase's image (and its "
                  "video's frames).")
flags.DEFINE_float("vision_video_seconds", 10.0, "Seconds of 2 fps video in the vision-encoder phase (0: image only).",
                   lower_bound=0.0)
flags.DEFINE_integer("max_len", 1024, "Our KV-cache length (must hold prompt_len + 1 and the e2e prompt + reply).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "Our dtype in the side-by-side (transformers always runs float32).")
flags.DEFINE_bool("bf16_too", True, "After the comparison, run our phases again in bfloat16 (ours only).")
flags.DEFINE_bool("hf", True, "Run transformers side by side (--nohf: ours alone).")
flags.DEFINE_integer("copy_mib", 1024, "Size of the array copied to measure memory bandwidth.")
flags.DEFINE_integer("matmul_n", 4096, "n of the n x n float32 matmul measuring FLOP/s.")
flags.DEFINE_string("work_dir", None, "Where the HF and converted checkpoints live (default "
                    "~/.cache/omni_jax/bench/<config>-seed<N>).")
flags.DEFINE_string("json_out", None, "JSON report path (default <work_dir>/results.json).")


def _parse_what(what: str) -> list[str]:
    from omni_jax.errors import UsageError

    todo = list(PHASES) if what == "all" else [w.strip() for w in what.split(",") if w.strip()]
    bad = [w for w in todo if w not in PHASES]
    if bad or not todo:
        raise UsageError(f"--what={what!r}: unknown phase(s) {bad}; choose 'all' or from {', '.join(PHASES)}")
    return todo


def _encoder_configs(path: str) -> dict:
    """The audio- and vision-encoder phases' configs: ours and transformers' dicts, from one config.json."""
    from omni_jax.config import AudioEncoderConfig, VisionEncoderConfig

    with open(path) as f:
        th = json.load(f)["thinker_config"]
    audio, vision = th["audio_config"], th["vision_config"]
    return {"audio_cfg": AudioEncoderConfig.from_hf(audio, "thinker_config.audio_config"), "audio_hf_dict": audio,
            "vision_cfg": VisionEncoderConfig.from_hf(vision, "thinker_config.vision_config"), "vision_hf_dict": vision}


def _image_size(value: list[str]) -> tuple[int, int]:
    from omni_jax.errors import UsageError

    try:
        w, h = (int(v) for v in value)
    except ValueError:
        raise UsageError(f"--vision_image_size must be two integers WIDTH,HEIGHT, got {value}") from None
    if min(w, h) < 1:
        raise UsageError(f"--vision_image_size must be positive, got {w},{h}")
    return w, h


def run_phases(ctx: Ctx, todo: list[str]) -> dict:
    phases = {}
    for name in todo:
        if name in PHASE_FNS:
            t0 = time.perf_counter()
            phases[name] = PHASE_FNS[name](ctx)
            phases[name]["phase_wall_s"] = time.perf_counter() - t0
            print(f"[bench] {name} done in {phases[name]['phase_wall_s']:.1f} s", file=sys.stderr, flush=True)
    return phases


def main(argv):
    del argv
    from omni_jax.errors import UsageError

    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
        from absl import logging

        logging.set_verbosity(logging.WARNING)  # Orbax logs every restored item at INFO
    todo = _parse_what(FLAGS.what)
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    from omni_jax.runtime.types import check_chunk_frames

    if not all(c.strip().lstrip("-").isdigit() for c in FLAGS.vocoder_chunks):
        raise UsageError(f"--vocoder_chunks={','.join(FLAGS.vocoder_chunks)}: give integers, e.g. 1,2,4,8,25")
    vocoder_chunks = [check_chunk_frames(int(c), "--vocoder_chunks") for c in FLAGS.vocoder_chunks]
    if FLAGS.repeats < 1 or FLAGS.decode_tokens < 1 or FLAGS.prompt_len < 1 or any(b < 1 for b in batch_sizes):
        raise UsageError("--repeats, --decode_tokens, --prompt_len and --batch_sizes must be >= 1")
    name, cfg_path = resolve_config(FLAGS.config)
    work_dir = FLAGS.work_dir or os.path.expanduser(f"~/.cache/omni_jax/bench/{name}-seed{FLAGS.seed}")
    json_out = FLAGS.json_out or os.path.join(work_dir, "results.json")
    if FLAGS.max_len < FLAGS.prompt_len + 1:
        raise UsageError(f"--max_len={FLAGS.max_len} must exceed --prompt_len={FLAGS.prompt_len}")

    import jax

    if FLAGS.hf:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    with open(cfg_path) as f:
        cfg_dict = json.load(f)
    report: dict[str, Any] = {
        "config": name, "config_path": cfg_path, "seed": FLAGS.seed, "backend": jax.default_backend(),
        "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "dtype": FLAGS.dtype, "hf": FLAGS.hf,
        "flags": {k: FLAGS[k].value for k in ("what", "repeats", "prompt_len", "decode_prompt_len", "decode_tokens",
                                               "batch_sizes", "talker_frames", "code2wav_seconds", "e2e_tokens",
                                               "e2e_frames", "e2e_audio_seconds", "e2e_video_seconds", "stream_chunk", "stream_first_chunk",
                                               "vocoder_chunks", "vocoder_calls", "vocoder_long_chunks", "max_len",
                                               "bf16_too", "copy_mib", "matmul_n")},
        "definitions": DEFINITIONS, "memory": {"rss_start_mib": rss_mib()},
    }
    machine = None
    if "roofline" in todo:
        machine = measure_machine(FLAGS.copy_mib, FLAGS.matmul_n, FLAGS.repeats, FLAGS.hf)
        report["machine"] = machine
    os.makedirs(work_dir, exist_ok=True)
    hf_dir, ckpt_dir, report["checkpoints"] = prepare_checkpoints(cfg_dict, work_dir, FLAGS.seed)
    gc.collect()

    hf = None
    if FLAGS.hf:
        from tools import hf_reference

        hf = hf_reference.load_hf_model(hf_dir)
        gc.collect()
        report["memory"]["rss_after_hf_load_mib"] = rss_mib()
        report["memory"]["hf_params_bytes"] = sum(p.numel() * p.element_size() for p in hf.parameters())
    pipe = load_ours(ckpt_dir, FLAGS.dtype, FLAGS.max_len)
    gc.collect()
    report["memory"]["rss_after_ours_load_mib"] = rss_mib()
    report["memory"]["ours_params_bytes"] = params_bytes(pipe.params)
    report["params"] = params_bytes(pipe.params) // (4 if FLAGS.dtype == "float32" else 2)

    compile_timer = CompileTimer()
    eos = (pipe.config.im_end_token_id,)  # transformers' generate default thinker_eos_token_id (<|im_end|>)
    common = dict(cfg=pipe.config, machine=machine, compile_timer=compile_timer, repeats=FLAGS.repeats,
                  seed=FLAGS.seed, prompt_len=FLAGS.prompt_len, decode_prompt_len=FLAGS.decode_prompt_len,
                  decode_tokens=FLAGS.decode_tokens, batch_sizes=batch_sizes, talker_frames=FLAGS.talker_frames,
                  code2wav_seconds=FLAGS.code2wav_seconds, e2e_tokens=FLAGS.e2e_tokens, e2e_frames=FLAGS.e2e_frames,
                  e2e_audio_seconds=FLAGS.e2e_audio_seconds, prompt=FLAGS.prompt,
                  e2e_video_seconds=FLAGS.e2e_video_seconds,
                  stream_chunk=FLAGS.stream_chunk, stream_first_chunk=FLAGS.stream_first_chunk,
                  vocoder_chunks=vocoder_chunks, vocoder_calls=FLAGS.vocoder_calls,
                  vocoder_long_chunks=FLAGS.vocoder_long_chunks, eos=eos, prompt_ids=pipe.encode(FLAGS.prompt),
                  audio_seconds=FLAGS.audio_seconds, vision_image_size=_image_size(FLAGS.vision_image_size),
                  vision_video_seconds=FLAGS.vision_video_seconds, **_encoder_configs(FLAGS.audio_config))
    ctx = Ctx(pipe=pipe, hf=hf, dtype_bytes=4 if FLAGS.dtype == "float32" else 2, **common)
    report["phases"] = run_phases(ctx, todo)
    print_table(f"omni_jax ({FLAGS.dtype}) vs transformers (float32, CPU) -- config {name}, medians of "
                f"{FLAGS.repeats}; ratio > 1: ours faster; target = roofline figure", report["phases"])

    if FLAGS.bf16_too and FLAGS.dtype != "bfloat16":
        del ctx, pipe, hf
        gc.collect()
        pipe = load_ours(ckpt_dir, "bfloat16", FLAGS.max_len)
        gc.collect()
        report["memory"]["rss_after_ours_bf16_load_mib"] = rss_mib()
        ctx = Ctx(pipe=pipe, hf=None, dtype_bytes=2, **common)
        report["bf16"] = run_phases(ctx, todo)
        print_table("omni_jax bfloat16 (ours only)", report["bf16"])
    report["memory"]["peak_rss_mib"] = peak_rss_mib()
    print(f"\npeak RSS {report['memory']['peak_rss_mib']:.0f} MiB; our params "
          f"{report['memory']['ours_params_bytes'] / 2**20:.0f} MiB ({report['params'] / 1e9:.3f} B)")
    if machine:
        print(f"machine: bandwidth {machine['bandwidth_Bps'] / 1e9:.2f} GB/s (read-only "
              f"{machine['bandwidth_read_only_jax_sum_Bps'] / 1e9:.2f}), matmul "
              f"{machine['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s float32")
    os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
    with open(json_out, "w") as f:
        json.dump(report, f, indent=2, default=float)
    print(f"wrote {json_out}")


if __name__ == "__main__":
    cli.run(main)