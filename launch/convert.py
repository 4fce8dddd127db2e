"""Convert a Hugging Face Qwen3-Omni safetensors checkpoint into an omni_jax Orbax checkpoint.

  python launch/convert.py --hf_dir=/data/Qwen3-Omni-30B-A3B-Instruct --out_dir=/data/omni_jax_ckpt
  python launch/convert.py --hf_dir=DIR --out_dir=DIR --dtype=float32 --overwrite

Streams one decoder layer at a time (torch is not needed), so the 66 GB checkpoint converts on a
machine with ~24 GB of RAM. Audio/vision tower tensors are skipped (logged). The result is written
to <out_dir>.partial and moved into place only when complete (an existing checkpoint is replaced,
with --overwrite, by one atomic directory swap), so a killed run never leaves a loadable partial
output; rerunning it discards the stale .partial dir. Load it with omni_jax.checkpoint.load_params(out_dir).
Exit codes: 0 done, 2 bad flags / missing input dir / output exists, 1 a broken or mismatched checkpoint.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402

from omni_jax import cli  # noqa: E402  (jax-free; exit codes: 2 usage, 1 bad checkpoint, "error: ..." on stderr)

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "HF checkpoint dir: config.json + model.safetensors or sharded with an index.", required=True)
flags.DEFINE_string("out_dir", None, "Output checkpoint dir (must not exist or be empty, unless --overwrite).", required=True)
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "Storage dtype of the converted params.")
flags.DEFINE_bool("overwrite", False, "Replace an existing omni_jax checkpoint at --out_dir.")
flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")


def _quiet_orbax(record) -> bool:
    """Drop Orbax's per-item INFO chatter (dozens of lines per layer) so progress stays readable."""
    return record.levelno >= logging.converter.ABSL_TO_STANDARD[logging.WARNING] or "/orbax/" not in record.pathname


def main(argv):
    del argv
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host-only; never grab accelerators
    from omni_jax.checkpoint.convert import convert_checkpoint

    logging.get_absl_handler().addFilter(_quiet_orbax)
    t0 = time.time()
    out = convert_checkpoint(FLAGS.hf_dir, FLAGS.out_dir, FLAGS.dtype, overwrite=FLAGS.overwrite,
                             progress=FLAGS.progress)
    logging.info("converted %s -> %s in %.1f s", FLAGS.hf_dir, out, time.time() - t0)
    print(out)


if __name__ == "__main__":
    cli.run(main)
