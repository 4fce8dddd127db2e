"""Peak host memory of checkpoint conversion vs depth, on synthetic FULL-WIDTH checkpoints.

  python launch/bench_convert.py                      # thinker with 2 and 4 layers
  python launch/bench_convert.py --layers=2,4,8 --work_dir=/big/disk

For each depth L it writes a bf16 HF checkpoint with the real tensor names and shapes (taken
from tools/data/qwen3_omni_weight_manifest.tsv.gz: hidden 2048, 128 experts, vocab 152064, ...)
but only L thinker layers and --talker_layers talker layers, as sharded safetensors with an
index (so one layer's keys straddle files). It then runs launch/convert.py in a fresh process
and reports that child's peak RSS (os.wait4 ru_maxrss). If conversion streams layer by layer,
the peak does not grow with L. Disk: about (1.25 GB x L + 2.5 GB) twice per depth; each depth's
files are deleted before the next one is written unless --keep.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from omni_jax import cli  # noqa: E402  (exit codes: 2 usage, 1 runtime; "error: ..." on stderr)

FLAGS = flags.FLAGS
flags.DEFINE_list("layers", ["2", "4"], "Thinker depths to compare.")
flags.DEFINE_integer("talker_layers", 1, "Talker depth of the synthetic checkpoints.")
flags.DEFINE_string("work_dir", "/tmp/omni_jax_bench_convert", "Scratch dir (needs ~2 x (1.25 GB x L + 2.5 GB)).")
flags.DEFINE_string("manifest", os.path.join(ROOT, "tools", "data", "qwen3_omni_weight_manifest.tsv.gz"),
                    "Real checkpoint tensor names and shapes.")
flags.DEFINE_string("config", os.path.join(ROOT, "configs", "qwen3_omni_30b_a3b_instruct.json"), "Real config.json.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Converted dtype.")
flags.DEFINE_integer("shard_mb", 1000, "Max safetensors shard size (MB).")
flags.DEFINE_integer("tower_keys", 16, "Audio/vision tower keys kept per tower (they are skipped; shows the count).")
flags.DEFINE_bool("keep", False, "Keep the synthetic and converted checkpoints.")


def _entries(path: str, layers: int, talker_layers: int, tower_keys: int) -> list[tuple[str, tuple[int, ...]]]:
    import re

    with gzip.open(path, "rt") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    out, towers = [], {}
    for key, shape in rows:
        m = re.match(r"(thinker\.model|talker\.model)\.layers\.(\d+)\.", key)
        if m and int(m.group(2)) >= (layers if m.group(1) == "thinker.model" else talker_layers):
            continue
        tower = next((t for t in ("thinker.audio_tower.", "thinker.visual.") if key.startswith(t)), None)
        if tower is not None:
            towers[tower] = towers.get(tower, 0) + 1
            if towers[tower] > tower_keys:
                continue
        out.append((key, tuple(int(s) for s in shape.strip("[]").split(","))))
    return out


def _write_checkpoint(hf_dir: str, entries, config: dict, shard_bytes: int, seed: int = 0) -> int:
    """Random bf16 tensors streamed from a 64 MB pool; returns total bytes. Flat memory while writing."""
    os.makedirs(hf_dir)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(32 * 1024 * 1024, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16).tobytes()
    shards, cur, size = [], [], 0
    for key, shape in sorted(entries):
        nbytes = int(np.prod(shape)) * 2
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((key, shape, nbytes))
        size += nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for key, shape, nbytes in shard:
            header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
            weight_map[key] = fname
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(os.path.join(hf_dir, fname), "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for _, _, nbytes in shard:
                start = int(rng.integers(0, len(pool) // 2)) & ~1
                left = nbytes
                while left:
                    chunk = pool[start:start + min(left, len(pool) - start)]
                    f.write(chunk)
                    left -= len(chunk)
                    start = 0
        total += pos
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _convert_in_child(hf_dir: str, out_dir: str, dtype: str) -> tuple[float, float, int]:
    """(peak RSS MiB, seconds, exit code) of launch/convert.py in a fresh process."""
    cmd = [sys.executable, os.path.join(ROOT, "launch", "convert.py"), f"--hf_dir={hf_dir}", f"--out_dir={out_dir}",
           f"--dtype={dtype}", "--noprogress"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, time.time() - t0, proc.returncode


def main(argv):
    del argv
    with open(FLAGS.config) as f:
        base = json.load(f)
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    free = shutil.disk_usage(FLAGS.work_dir).free
    print(f"free disk at {FLAGS.work_dir}: {free / 1e9:.1f} GB")
    results = []
    for layers in (int(x) for x in FLAGS.layers):
        cfg = copy.deepcopy(base)
        cfg["thinker_config"]["text_config"]["num_hidden_layers"] = layers
        cfg["talker_config"]["accept_hidden_layer"] = layers // 2  # keeps the real two-segment thinker stack
        cfg["talker_config"]["text_config"]["num_hidden_layers"] = FLAGS.talker_layers
        entries = _entries(FLAGS.manifest, layers, FLAGS.talker_layers, FLAGS.tower_keys)
        need = 2 * sum(int(np.prod(s)) * 2 for _, s in entries) * (2 if FLAGS.dtype == "float32" else 1)
        if need > free * 0.9:
            raise app.UsageError(f"{layers} layers need ~{need / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free")
        hf_dir = os.path.join(FLAGS.work_dir, f"hf_{layers}")
        out_dir = os.path.join(FLAGS.work_dir, f"ckpt_{layers}")
        for d in (hf_dir, out_dir):
            shutil.rmtree(d, ignore_errors=True)
        t0 = time.time()
        hf_bytes = _write_checkpoint(hf_dir, entries, cfg, FLAGS.shard_mb * 1_000_000)
        print(f"L={layers}: wrote {len(entries)} tensors, {hf_bytes / 1e9:.2f} GB in {time.time() - t0:.0f} s")
        rss, secs, rc = _convert_in_child(hf_dir, out_dir, FLAGS.dtype)
        if rc != 0:
            raise RuntimeError(f"conversion of {hf_dir} failed with exit code {rc}")
        res = {"thinker_layers": layers, "tensors": len(entries), "hf_gb": round(hf_bytes / 1e9, 3),
               "out_gb": round(_du(out_dir) / 1e9, 3), "peak_rss_mib": round(rss), "seconds": round(secs, 1)}
        print(json.dumps(res))
        results.append(res)
        if not FLAGS.keep:
            shutil.rmtree(hf_dir)
            shutil.rmtree(out_dir)
    print("\nthinker layers | HF GB | peak RSS MiB | seconds")
    for r in results:
        print(f"{r['thinker_layers']:>14} | {r['hf_gb']:>5.2f} | {r['peak_rss_mib']:>12} | {r['seconds']:>7}")


if __name__ == "__main__":
    cli.run(main)
