"""OpenAI-compatible HTTP server: continuous batching of text and speech replies (FastAPI + uvicorn).

  python launch/serve.py --checkpoint=/data/omni_ckpt --slots=8 --max_len=4096          # http://127.0.0.1:8000
  python launch/serve.py --checkpoint=DIR --mesh=tp4ep8 --host=0.0.0.0 --port=8000 --api_key=$KEY
  python launch/serve.py --port=0                  # tiny RANDOM-weight model on a free port (smoke test)

Routes: POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics. The server binds
127.0.0.1 unless --host says otherwise; with --api_key (or $OMNI_JAX_API_KEY) every route but /health
needs `Authorization: Bearer <key>`. It compiles its steps at start (--warmup) and prints
`serving <model> on http://HOST:PORT` once it answers. SIGTERM: no new connections, in-flight requests get
--grace_s to finish, the rest are cancelled, exit 0. Request bodies are never logged.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402

from omni_jax import cli  # noqa: E402  (jax-free: bad flags fail before jax loads)
from omni_jax.cli import flag_groups as shared  # noqa: E402
from omni_jax.errors import UsageError  # noqa: E402

FLAGS = flags.FLAGS
shared.define_model_flags()
shared.define_stream_flags()
flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0 exposes the server to the network).")
flags.DEFINE_integer("port", 8000, "Port to bind; 0 picks a free one (printed at start).", lower_bound=0,
                     upper_bound=65535)
flags.DEFINE_integer("slots", 8, "Concurrent sequences (decode slots in every stage).", lower_bound=1)
flags.DEFINE_string("api_key", None, "Key clients must send as 'Authorization: Bearer <key>' (default: "
                    "$OMNI_JAX_API_KEY; none: no check).")
flags.DEFINE_float("max_request_mb", 32.0, "Largest request body accepted, in MB.", lower_bound=0.001)
flags.DEFINE_string("media_dir", None, "image_url / video_url parts may name local files under this directory "
                    "(default: data: URLs only; nothing is ever fetched from the network).")
flags.DEFINE_float("max_audio_seconds", 300.0, "Longest audio input accepted per content part, in seconds.",
                   lower_bound=0.1)
flags.DEFINE_integer("default_max_tokens", 512, "A request's text budget when it sets none (capped by max_len).",
                     lower_bound=1)
flags.DEFINE_integer("talker_max_new_tokens", 1024, "The talker's budget per reply (codec frames of 80 ms, + 1).",
                     lower_bound=2)
flags.DEFINE_bool("talker_greedy", False, "Greedy talker and code predictor for every request (default: HF's "
                  "sampling, each request with its own seed).")
flags.DEFINE_integer("prefills_per_step", 8, "Admissions per scheduler step while others are decoding (8: a burst "
                     "of arrivals is admitted at once; 1 bounds the pause a prefill puts on running streams, but "
                     "queues bursts: see the README's Serving under load).", lower_bound=1)
flags.DEFINE_integer("max_waiting", 256, "Queued requests beyond which new ones get 429.", lower_bound=1)
flags.DEFINE_float("grace_s", 30.0, "On SIGTERM, seconds in-flight requests get to finish.", lower_bound=0.0)
flags.DEFINE_string("model_name", "qwen3-omni", "The model id clients send and /v1/models lists.")
flags.DEFINE_bool("warmup", True, "Compile every step with one text + speech request before serving.")


def main(argv):
    del argv
    api_key = FLAGS.api_key if FLAGS.api_key is not None else os.environ.get("OMNI_JAX_API_KEY") or None
    dtype = shared.parse_dtype_flag(FLAGS.dtype)
    sock = _bind(FLAGS.host, FLAGS.port)  # a taken port fails before the weights load

    import uvicorn

    from omni_jax.config import load_config
    from omni_jax.runtime.loading import DEFAULT_CONFIG
    from omni_jax.runtime.pipeline import OmniPipeline
    from omni_jax.runtime.sampling import TalkerSampling
    from omni_jax.runtime.scheduler import ServingEngine
    from omni_jax.serving.app import create_app

    config = load_config(FLAGS.checkpoint or DEFAULT_CONFIG)
    mesh = shared.make_mesh_flag(FLAGS.mesh, config)
    pipe = OmniPipeline.load(FLAGS.checkpoint, dtype=dtype, max_len=FLAGS.max_len, mesh=mesh,
                             prefill_chunk=FLAGS.prefill_chunk)
    if pipe.random_weights:
        print(f"NOTE: no --checkpoint given, so the weights are RANDOM ({pipe.loaded.source}); the replies are "
              "meaningless.", flush=True)
    engine = ServingEngine(
        pipe, slots=FLAGS.slots, talker_max_new_tokens=FLAGS.talker_max_new_tokens,
        talker_sampling=TalkerSampling.greedy() if FLAGS.talker_greedy else TalkerSampling(),
        chunk_frames=FLAGS.stream_chunk, first_chunk_frames=FLAGS.stream_first_chunk,
        prefills_per_step=FLAGS.prefills_per_step, max_waiting=FLAGS.max_waiting).start()
    if FLAGS.warmup:
        t0 = time.perf_counter()
        warm_up(engine)
        logging.info("warm-up (compiles) took %.1f s", time.perf_counter() - t0)
    app = create_app(engine, model_name=FLAGS.model_name, api_key=api_key,
                     max_request_bytes=int(FLAGS.max_request_mb * (1 << 20)),
                     max_audio_seconds=FLAGS.max_audio_seconds, default_max_tokens=FLAGS.default_max_tokens,
                     media_dir=FLAGS.media_dir)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=FLAGS.grace_s))
    # uvicorn re-raises the signal it shut down on once it returns; with this handler in place that is a no-op,
    # so a SIGTERM ends in a clean exit 0 after the graceful shutdown.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    host, port = sock.getsockname()[:2]
    print(f"serving {FLAGS.model_name} on http://{host}:{port}", flush=True)
    import asyncio

    asyncio.run(server.serve(sockets=[sock]))
    engine.stop(grace_s=0.0)  # uvicorn has already given in-flight requests --grace_s
    print("stopped", flush=True)


def warm_up(engine) -> None:
    """One text + speech request (and a text-only one) through every compiled step before the first client."""
    from omni_jax.runtime.scheduler import ServeRequest
    from omni_jax.runtime.types import Request

    pipe = engine.pipe
    ids = pipe.encode(Request(prompt="Hello."))
    speech = pipe.has_speech
    frames = max(engine.first_chunk_frames + engine.chunk_frames, 2)
    n = min(frames + 1, engine.max_len - len(ids))
    engine.submit(ServeRequest(ids, max_new_tokens=max(2, n), speech=speech, temperature=0.0)).result()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise UsageError(f"--host={host} --port={port}: cannot bind ({e.strerror})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    cli.run(main)
