"""Subprocess body for tests/test_sharding.py: multi-device runs need XLA_FLAGS set before jax loads.

  python -m tests.sharding_worker meshes OUT            # 32 simulated devices, one process
  python -m tests.sharding_worker multiprocess OUT PID NPROC PORT SPEC   # 4 devices per process

Writes .npz / .json results into OUT; the test compares them (tolerances live in the test).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys


def _setup(devices: int) -> None:
    """Simulated devices before jax loads; the rest (cache, CPU, test XLA flags) comes from the parent."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    from tests import procs

    os.environ["XLA_FLAGS"] = procs.xla_flags(devices)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


B, T, L, NEW = 2, 5, 16, 4  # batch, prompt bucket, cache length, generated tokens


def _thinker_inputs():
    import jax
    import jax.numpy as jnp

    from omni_jax import load_config
    from omni_jax.models import registry

    config = load_config("tiny")
    params = registry.init_params(config, jax.random.PRNGKey(0), roots=("thinker",))["thinker"]
    prompt = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, config.thinker.text.vocab_size)
    lengths = jnp.array([T, T - 2], jnp.int32)  # ragged rows: right padding must not leak
    return config, params, prompt, lengths


def _mesh(spec):
    import jax

    from omni_jax.sharding.mesh import make_mesh

    n = math.prod(int(x) for x in re.findall(r"\d+", spec))
    return make_mesh(spec, devices=jax.devices()[:n])


def _layout_params(config, params, root, mesh, shardings):
    """Params in the layout the run uses: placed by the rules table under a mesh, unrolled on one CPU device."""
    from omni_jax.runtime import layout
    from omni_jax.sharding import rules

    if mesh is not None:
        return rules.place(params, shardings)
    return layout.choose(None).prepare(config, {root: params})[root]


def _greedy_generate(steps, params, cache, prompt, lengths, num_new: int, logits: bool = True):
    """Greedy tokens [B, num_new] (and, with logits, the logits that chose them [B, num_new, V] as numpy) through
    the engine's own compiled prefill and decode steps (ThinkerSteps), EOS disabled. The decode step donates
    its state, so each step's logits are copied to the host before the next step runs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from omni_jax.runtime.sampling import SamplingParams

    greedy = SamplingParams.greedy()
    state, first, _ = steps.prefill_fn(params, cache, prompt, lengths, jax.random.PRNGKey(0),
                                       np.int32(num_new), np.array([-1], np.int32), sampling=greedy)
    toks, all_logits = [first], [np.asarray(state.logits)] if logits else []
    for _ in range(num_new - 1):
        state, tok, _, _ = steps.decode_fn(params, state, sampling=greedy)
        toks.append(tok)
        if logits:
            all_logits.append(np.asarray(state.logits))
    return jnp.stack(toks, axis=1), (np.stack(all_logits, axis=1) if logits else None)


def _run_thinker(config, params, prompt, lengths, mesh):
    import numpy as np

    from omni_jax.runtime.thinker_engine import ThinkerSteps

    steps = ThinkerSteps(config, mesh=mesh)
    params = _layout_params(config, params, "thinker", mesh, steps.param_shardings() if mesh is not None else None)
    toks, logits = _greedy_generate(steps, params, steps.cache(B, L), prompt, lengths, NEW)
    return steps, params, np.asarray(toks), logits


def _moe_hlo(config, mesh) -> dict:
    """Compiled HLO collectives of one sharded MoE layer, plus a control that really all-gathers expert weights."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from omni_jax.nn.moe import Dispatch, SparseMoE
    from omni_jax.sharding import jit as sjit
    from omni_jax.sharding import rules as sharding
    from tools import hlo_inspect

    cfg = config.thinker.text
    out = {}
    for impl in ("gather", "grouped", "dense", "ragged"):
        moe = SparseMoE(cfg, dispatch=Dispatch.always(impl))
        x = jnp.ones((B, T, cfg.hidden_size))
        boxed = jax.eval_shape(lambda: moe.init(jax.random.PRNGKey(0), x))["params"]
        shard = sharding.param_shardings(boxed, mesh)
        params = jax.jit(lambda: nn.unbox(moe.init(jax.random.PRNGKey(0), x))["params"], out_shardings=shard)()
        fn = sjit.sharded_jit(lambda p, x: moe.apply({"params": p}, x), mesh)
        out[impl] = [c.describe() for c in hlo_inspect.collectives(fn.lower(params, x).compile().as_text())]
    wg = params["gate_proj"]
    control = jax.jit(lambda w: w * 2, out_shardings=NamedSharding(mesh, PartitionSpec()))
    out["control_allgather"] = [c.describe() for c in hlo_inspect.collectives(control.lower(wg).compile().as_text())]
    out["weight_shard_shape"] = list(wg.sharding.shard_shape(wg.shape))
    return out


def meshes(out_dir: str) -> None:
    _setup(32)
    import jax
    import numpy as np

    from omni_jax.runtime.sampling import SamplingParams
    from omni_jax.sharding import rules as sharding
    from tools import hlo_inspect

    config, params, prompt, lengths = _thinker_inputs()
    _, _, toks, logits = _run_thinker(config, params, prompt, lengths, None)
    np.savez(os.path.join(out_dir, "thinker_single.npz"), tokens=toks, logits=logits)
    report = {"devices": jax.device_count()}
    for spec in ("tp4ep8", "ep8", "tp2ep2"):
        mesh = _mesh(spec)
        steps, placed, toks, logits = _run_thinker(config, params, prompt, lengths, mesh)
        np.savez(os.path.join(out_dir, f"thinker_{spec}.npz"), tokens=toks, logits=logits)
        if spec == "tp4ep8":
            greedy = SamplingParams.greedy()
            state, _, _ = steps.prefill_fn(placed, steps.cache(B, L), prompt, lengths, jax.random.PRNGKey(0),
                                           np.int32(NEW), np.array([-1], np.int32), sampling=greedy)
            hlo = steps.decode_fn.lower(placed, state, sampling=greedy).compile().as_text()
            report["thinker_decode_collectives"] = [c.describe() for c in hlo_inspect.collectives(hlo)]
            report["moe"] = _moe_hlo(config, mesh)
            report["moe_param_specs"] = {k: v for k, v in sharding.describe(steps.param_shardings()).items()
                                         if "/mlp/" in k}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f)


def multiprocess(out_dir: str, pid: int, nproc: int, port: int, spec: str) -> None:
    _setup(4)
    from omni_jax.sharding.mesh import is_primary, maybe_initialize_distributed

    maybe_initialize_distributed(f"localhost:{port}", nproc, pid)
    import jax
    from jax.experimental import multihost_utils

    from omni_jax.runtime.thinker_engine import ThinkerSteps
    from omni_jax.sharding import rules as sharding

    config, params, prompt, lengths = _thinker_inputs()  # same seeds in every process => same values
    mesh = _mesh(spec)
    steps = ThinkerSteps(config, mesh=mesh)
    params = sharding.place(params, steps.param_shardings())
    row = jax.sharding.NamedSharding(mesh, sharding.logical_spec(("batch", None), prompt.shape, mesh))
    prompt, lengths = sharding.place(prompt, row), sharding.place(lengths, jax.sharding.NamedSharding(
        mesh, sharding.logical_spec(("batch",), lengths.shape, mesh)))
    toks, _ = _greedy_generate(steps, params, steps.cache(B, L), prompt, lengths, NEW, logits=False)
    toks = multihost_utils.process_allgather(toks, tiled=True)  # numpy, on every process
    if is_primary():
        with open(os.path.join(out_dir, "multiprocess.json"), "w") as f:
            json.dump({"tokens": toks.tolist(), "process_count": jax.process_count(), "devices": jax.device_count()}, f)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "meshes":
        meshes(sys.argv[2])
    elif mode == "multiprocess":
        multiprocess(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
