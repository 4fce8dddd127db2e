"""Subprocess body for tests/test_mesh_pipeline.py: the whole OmniPipeline under device meshes.

  python -m tests.mesh_pipeline_worker CKPT PROMPTS_JSON OUT_DIR

XLA_FLAGS (32 simulated CPU devices) must be set before jax loads, hence a separate process. Loads the
converted checkpoint once per mesh (restored straight into its shardings), runs greedy speech
generation for the same prompts, and records tokens, codes, waveforms and the thinker's prefill logits
at every prompt position. Writes OUT_DIR/report.json (+ one .npz per run); the test compares them.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

from tests import sharding_worker

DEVICES = 32
MESHES = ("tp4ep8", "ep8", "tp2ep2")


def _setup() -> None:
    sharding_worker._setup(DEVICES)


def _prefill_logits(pipe, prompts):
    """Thinker logits [B, T, V] at every (right-padded) prompt position, computed with the pipeline's own
    (possibly sharded) params and jitted under its mesh, like the engine's prefill."""
    import jax.numpy as jnp
    import numpy as np

    from omni_jax.processing.positions import text_positions
    from omni_jax.sharding import jit as sjit

    b, t = len(prompts), max(len(p) for p in prompts)
    tokens = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    model, mesh = pipe.engine.model, pipe.mesh
    cache = pipe.engine.steps.cache(b, t)

    def run(params, tokens, cache):
        start = jnp.zeros((tokens.shape[0],), jnp.int32)
        return model.apply({"params": params}, tokens, text_positions(start, tokens.shape[1]), cache, start).logits

    logits = np.asarray(sjit.sharded_jit(run, mesh)(pipe.engine.params, tokens, cache))
    valid = np.arange(t)[None, :] < np.asarray([len(p) for p in prompts])[:, None]
    return np.where(valid[..., None], logits, 0.0)


def main(ckpt: str, prompts_json: str, out_dir: str) -> None:
    _setup()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from omni_jax.runtime.pipeline import OmniPipeline
    from omni_jax.runtime.sampling import TalkerSampling
    from omni_jax.sharding.mesh import make_mesh, mesh_spec_string

    with open(prompts_json) as f:
        job = json.load(f)
    report = {"devices": jax.device_count(), "runs": {}}
    for name in job.get("meshes", MESHES):
        t0 = time.perf_counter()
        n = math.prod(int(x) for x in re.findall(r"\d+", name))
        mesh = make_mesh(name, devices=jax.devices()[:n])
        pipe = OmniPipeline.load(ckpt, dtype=jnp.float32, max_len=job["max_len"], mesh=mesh)
        audio = visual = None
        if "media" in job:  # per row, its clips' log-mel features (npz keys feat_<row>_<clip>) and its images /
            # videos (patches vis_<row>_<item>; kind, grid and seconds per grid in the job)
            from omni_jax.processing.vision import VisualInput

            media = np.load(job["media"])
            audio = [[media[f"feat_{r}_{c}"] for c in range(n)] for r, n in enumerate(job["audio_counts"])]
            visual = [[VisualInput(kind, media[f"vis_{r}_{i}"], tuple(grid), spg)
                       for i, (kind, grid, spg) in enumerate(items)] for r, items in enumerate(job["visual"])]
        res = pipe.generate_ids(job["prompts"], job["speakers"], max_new_tokens=job["thinker_new"],
                                talker_max_new_tokens=job["talker_new"], talker_sampling=TalkerSampling.greedy(),
                                eos_ids=job["eos_ids"], audio=audio, visual=visual)
        if audio is None:
            logits = _prefill_logits(pipe, job["prompts"])
        else:  # the prompt logits at the last position, encoder rows merged in (the engine's own prefill)
            logits = np.stack([r.prompt_logits for r in res])
        arrays = {"logits": logits}
        for row, r in enumerate(res):
            arrays[f"codes_{row}"] = np.asarray(r.codes)
            arrays[f"wav_{row}"] = np.asarray(r.wav)
        np.savez(os.path.join(out_dir, f"{name}.npz"), **arrays)
        report["runs"][name] = {
            "mesh": mesh_spec_string(mesh),
            "mesh_devices": int(mesh.devices.size),
            "tokens": [list(map(int, r.token_ids)) for r in res],
            "seconds": time.perf_counter() - t0,
        }
        print(f"{name}: tokens {report['runs'][name]['tokens']} codes {[a.shape for k, a in arrays.items() if k.startswith('codes')]} "
              f"in {report['runs'][name]['seconds']:.1f}s", flush=True)
        del pipe
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: python -m tests.mesh_pipeline_worker CKPT PROMPTS_JSON OUT_DIR")
    main(*sys.argv[1:])
