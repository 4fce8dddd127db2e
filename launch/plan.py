"""Ahead-of-time memory / communication plan of the production steps under a mesh, on simulated CPU devices.

    python launch/plan.py --config=configs/qwen3_omni_30b_a3b_instruct.json --mesh=tp4ep8 --batch=8 --max_len=4096

Sets XLA_FLAGS=--xla_force_host_platform_device_count=<mesh size> before jax is imported, then
lowers and compiles the steps requests run — the thinker's decode step and chunked-prefill step
(omni_jax.runtime.thinker_engine.ThinkerSteps), the talker step (TalkerGenerator.step) and the audio
encoder on --audio_seconds of audio (AudioEncoderSteps, replicated) — on
abstract inputs that carry their shardings (no weights are allocated), and prints JSON: per-device
argument/output/temp bytes from compiled.memory_analysis(), parameter counts, the ideal per-device
bytes of the layout (expert bytes/(tp*ep) + other param bytes/tp + KV-cache bytes/its shards),
measured/ideal, and every collective in the compiled HLO with its operand shapes. Layers are
scanned (the mesh layout), so compile time stays flat in depth; collectives inside a while body run
once per layer.

Why two compiles per step: XLA:CPU has no native bf16 arithmetic, so for a bf16 program it
materializes f32 copies of bf16 operands and hoists them out of the layer loop (f32 copies of
whole stacked expert weights and of the KV cache), which no TPU/GPU does. The float32 compile
has no such converts; its bytes/2 are reported as the accelerator estimate for bf16
("accelerator_estimate_bf16"), next to the raw bf16 CPU numbers.
"""

from __future__ import annotations

import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import flags  # noqa: E402

from omni_jax import cli  # noqa: E402  (jax-free: XLA_FLAGS is still set before jax loads)
from omni_jax.errors import UsageError  # noqa: E402
from omni_jax.sharding import mesh as mesh_lib  # noqa: E402  (jax-free)

# Facts of the released checkpoint (from its tensor manifest), for comparison with what we build.
FULL_CHECKPOINT_PARAMS = 35_259_818_545
CHECKPOINT_COMPONENT_PARAMS = {"audio_tower": 647_927_168, "visual": 538_631_408}
STEPS = ("thinker_decode", "thinker_prefill", "talker_step", "audio_encoder", "vision_encoder")

FLAGS = flags.FLAGS
flags.DEFINE_string("config", os.path.join(ROOT, "configs", "qwen3_omni_30b_a3b_instruct.json"), "Model config.json.")
flags.DEFINE_string("mesh", "tp4ep8", "Mesh spec (tp4ep8, ep8, dp2tp4, auto with --devices).")
flags.DEFINE_integer("devices", None, "Simulated device count (default: the mesh's size).")
flags.DEFINE_integer("batch", 8, "Decode batch (rows).", lower_bound=1)
flags.DEFINE_integer("max_len", 4096, "KV-cache length.", lower_bound=2)
flags.DEFINE_integer("prefill_len", 256, "Tokens per prefill chunk (launch/infer.py --prefill_chunk); attention "
                     "scores grow with it.", lower_bound=1)
flags.DEFINE_integer("talker_trailing", 512, "Talker trailing-text columns (step input).", lower_bound=1)
flags.DEFINE_float("audio_seconds", 30.0, "Audio per audio-encoder call (one request's clips).", lower_bound=0.01)
flags.DEFINE_list("image_size", ["1280", "720"], "Width, height of the vision-encoder step's image (the released "
                  "processor's bounds resize it).")
flags.DEFINE_string("moe_impl", "auto", "MoE dispatch of the prefill step (omni_jax.runtime.layout.MOE_IMPLS).")
flags.DEFINE_string("decode_moe_impl", "auto", "MoE dispatch of the decode and talker steps.")
flags.DEFINE_list("steps", list(STEPS), f"Steps to plan, from {', '.join(STEPS)}.")
flags.DEFINE_bool("no_f32_proxy", False, "Skip the float32 compiles.")
flags.DEFINE_float("hbm_gb", 16.0, "Per-device memory the layout must fit (GB).")
flags.DEFINE_bool("full_collectives", False, "List every collective, not one per distinct op.")


def _device_count() -> int:
    if FLAGS.devices:
        return FLAGS.devices
    n = mesh_lib.spec_size(FLAGS.mesh)
    if n is None:
        raise UsageError("--mesh=auto needs --devices=N (how many devices to simulate)")
    return n


def main(argv) -> dict:
    del argv
    bad = [s for s in FLAGS.steps if s not in STEPS]
    if bad:
        raise UsageError(f"--steps: unknown {bad}; choose from {', '.join(STEPS)}")
    n = _device_count()
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return plan(n)


def plan(num_devices: int) -> dict:
    import json

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from omni_jax.config import load_config
    from omni_jax.models import registry
    from omni_jax.runtime import layout as layout_lib
    from omni_jax.runtime.sampling import SamplingParams, TalkerSampling
    from omni_jax.runtime.talker_engine import TalkerGenerator
    from omni_jax.runtime.thinker_engine import ThinkerSteps
    from omni_jax.sharding import mesh as mesh_lib
    from omni_jax.sharding.mesh import EXPERT, TENSOR
    from omni_jax.sharding.rules import spec_mesh_axes
    from tools import hlo_inspect

    config = load_config(FLAGS.config)
    mesh = mesh_lib.make_mesh(FLAGS.mesh, devices=jax.devices()[:num_devices], config=config)
    tp, ep = mesh.shape[TENSOR], mesh.shape[EXPERT]
    B, L, T = FLAGS.batch, FLAGS.max_len, min(FLAGS.prefill_len, FLAGS.max_len)
    greedy, talker_greedy = SamplingParams.greedy(), TalkerSampling.greedy()

    def count(boxed):
        leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        tot = sum(math.prod((x.value if isinstance(x, nn.Partitioned) else x).shape) for x in leaves)
        exp = sum(math.prod(x.value.shape) for x in leaves if isinstance(x, nn.Partitioned) and "experts" in x.names)
        return tot, exp

    def spec_shards(spec) -> int:
        return math.prod(mesh.shape[a] for d in range(len(spec)) for a in spec_mesh_axes(spec, d))

    def cache_elems(cfg) -> int:
        return 2 * cfg.num_hidden_layers * B * L * cfg.num_key_value_heads * cfg.head_dim  # k and v

    boxed = registry.boxed_abstract_params(config, jnp.float32)
    counts = {root: count(tree) for root, tree in boxed.items()}
    th_total, th_exp = counts["thinker"]
    not_built = {c.name: CHECKPOINT_COMPONENT_PARAMS.get(c.name) for c in registry.COMPONENTS if not c.built}
    report: dict = {
        "config": os.path.relpath(os.path.abspath(FLAGS.config), ROOT), "mesh": mesh_lib.mesh_spec_string(mesh),
        "devices": mesh.size, "batch": B, "max_len": L, "prefill_chunk": T, "dtype": "bfloat16",
        "params": {
            "built_total": sum(c[0] for c in counts.values()),
            "built_by_component": {root: c[0] for root, c in counts.items()},
            "thinker_experts": th_exp, "thinker_non_expert": th_total - th_exp,
            "full_checkpoint": FULL_CHECKPOINT_PARAMS, "not_built": not_built,
            "note": "components of omni_jax.models.registry; those without a module are not built",
        },
        "steps": {},
    }

    def ideal_bytes(total, experts, cache, cache_shards, itemsize, param_shards=None):
        dense_shards = tp if param_shards is None else param_shards
        return (experts * itemsize / (tp * ep) + (total - experts) * itemsize / dense_shards
                + cache * itemsize / cache_shards)

    def memory(compiled):
        m = compiled.memory_analysis()
        arg, out, alias, temp = (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                                 m.temp_size_in_bytes)
        return {"argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
                "total_bytes": arg + out - alias + temp}

    def collectives(compiled):
        colls = hlo_inspect.collectives(compiled.as_text())
        if FLAGS.full_collectives:
            return [c.describe() for c in colls]
        out: dict = {}
        for c in colls:
            d = c.describe()
            d.pop("computation")
            key = (d["op"], tuple(d["operands"]), d["replica_groups"], d["in_loop"])
            if key in out:
                out[key]["count"] += 1
            else:
                out[key] = dict(d, count=1)
        return list(out.values())

    def analyse(name, lower, total, experts, cache, cache_spec, param_shards=None):
        shards = spec_shards(cache_spec)
        entry: dict = {"kv_cache_spec": str(cache_spec), "kv_cache_shards": shards}
        for label, dt in (("bf16_on_cpu", jnp.bfloat16), ("f32_on_cpu", jnp.float32)):
            if label == "f32_on_cpu" and FLAGS.no_f32_proxy:
                continue
            t0 = time.time()
            compiled = lower(dt).compile()
            mem = memory(compiled)
            ideal = ideal_bytes(total, experts, cache, shards, jnp.dtype(dt).itemsize, param_shards)
            mem.update(ideal_bytes=int(ideal), measured_over_ideal=round(mem["total_bytes"] / ideal, 4),
                       compile_seconds=round(time.time() - t0, 1))
            entry[label] = mem
            if label == "bf16_on_cpu":
                entry["collectives"] = collectives(compiled)
        if "f32_on_cpu" in entry:
            f32 = entry["f32_on_cpu"]
            est = f32["total_bytes"] / 2
            entry["accelerator_estimate_bf16"] = {
                "per_device_bytes": int(est), "per_device_gib": round(est / 2**30, 3),
                "ideal_bytes": int(f32["ideal_bytes"] / 2), "measured_over_ideal": f32["measured_over_ideal"],
                "fits_hbm": est <= FLAGS.hbm_gb * 1e9,
            }
        report["steps"][name] = entry

    def thinker_steps(dt, impl):
        return ThinkerSteps(config, dt, mesh, layout_lib.choose(mesh, impl))

    tt = config.thinker.text
    if "thinker_decode" in FLAGS.steps:
        def lower_decode(dt):
            steps = thinker_steps(dt, FLAGS.decode_moe_impl)
            _, _, state = steps.abstract_states(B, L, greedy)
            return steps.decode_fn.lower(steps.abstract_params(), state, sampling=greedy, collect_hidden=False)

        probe = thinker_steps(jnp.float32, FLAGS.decode_moe_impl).abstract_states(B, L, greedy)[2]
        analyse("thinker_decode", lower_decode, th_total, th_exp, cache_elems(tt), probe.cache.k.sharding.spec)

    if "thinker_prefill" in FLAGS.steps:
        def lower_prefill(dt):
            steps = thinker_steps(dt, FLAGS.moe_impl)
            prompt, logits, state = steps.abstract_states(B, L, greedy)
            rows = state.num_generated
            tokens = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=state.sequence.sharding)
            offset = jax.ShapeDtypeStruct((), jnp.int32)
            return steps.chunk_fn.lower(steps.abstract_params(), prompt, logits, tokens, rows, offset)

        probe = thinker_steps(jnp.float32, FLAGS.moe_impl).abstract_states(B, L, greedy)[0]
        analyse("thinker_prefill", lower_prefill, th_total, th_exp, cache_elems(tt), probe.cache.k.sharding.spec)

    if "talker_step" in FLAGS.steps and "talker" in counts:
        tk = config.talker.text

        def lower_talker(dt):
            gen = TalkerGenerator(config, dt, mesh=mesh, layout=layout_lib.choose(mesh, FLAGS.decode_moe_impl),
                                  donate=True)  # the accelerator's program: the state is updated in place
            args = gen.abstract_step_args(B, L, FLAGS.talker_trailing, talker_greedy)
            return gen.step.lower(*args, sampling=talker_greedy)

        probe = TalkerGenerator(config, jnp.float32, mesh=mesh).abstract_step_args(B, L, FLAGS.talker_trailing,
                                                                                   talker_greedy)[1]
        analyse("talker_step", lower_talker, *counts["talker"], cache_elems(tk), probe.cache.k.sharding.spec)

    if "audio_encoder" in FLAGS.steps and "audio_tower" in counts:
        # The encoder runs replicated (omni_jax.runtime.pipeline): its whole params sit on every device.
        from jax.sharding import NamedSharding, PartitionSpec

        from omni_jax.models.audio_encoder import windows_needed
        from omni_jax.runtime.audio_encoder import AudioEncoderSteps

        acfg = config.thinker.audio
        frames = int(FLAGS.audio_seconds * 100)
        clip = jax.ShapeDtypeStruct((acfg.num_mel_bins, frames), jnp.float32)
        windows = AudioEncoderSteps(acfg).windows_for([clip])
        assert windows >= windows_needed([frames], acfg)
        replicated = NamedSharding(mesh, PartitionSpec())

        def lower_audio(dt):
            steps = AudioEncoderSteps(acfg, dt)
            params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                            registry.abstract_params(config, dt, ("audio_tower",))["audio_tower"])
            per = acfg.chunks_per_window
            sds = lambda shape, d: jax.ShapeDtypeStruct(shape, d, sharding=replicated)  # noqa: E731
            return steps.fn.lower({"params": params}, sds((windows, per, acfg.num_mel_bins, acfg.chunk_frames),
                                                          jnp.float32),
                                  sds((windows, per), jnp.int32), sds((windows, per), jnp.int32))

        analyse("audio_encoder", lower_audio, counts["audio_tower"][0], 0, 0, PartitionSpec(), param_shards=1)
        report["steps"]["audio_encoder"].update(audio_seconds=FLAGS.audio_seconds, grid_windows=windows)

    if "vision_encoder" in FLAGS.steps and "visual" in counts:
        # Replicated like the audio encoder: one image per call, its frame grid bucketed as the runtime buckets it.
        from jax.sharding import NamedSharding, PartitionSpec

        from omni_jax.processing.vision import VisualInput, image_grid, processor_for_model
        from omni_jax.runtime.vision_encoder import VisionEncoderSteps

        vcfg = config.thinker.vision
        width, height = (int(v) for v in FLAGS.image_size)
        grid = image_grid(width, height, processor_for_model(None, vcfg))
        frames, frame_len = VisionEncoderSteps(vcfg).grid_for([VisualInput("image", None, grid)])
        replicated = NamedSharding(mesh, PartitionSpec())

        def lower_vision(dt):
            steps = VisionEncoderSteps(vcfg, dt)
            params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                            registry.abstract_params(config, dt, ("visual",))["visual"])
            sds = lambda shape, d: jax.ShapeDtypeStruct((frames, frame_len) + shape, d, sharding=replicated)  # noqa
            return steps.fn.lower({"params": params}, sds((vcfg.patch_dim,), jnp.float32), sds((), jnp.bool_),
                                  sds((2,), jnp.int32), sds((4,), jnp.int32), sds((4,), jnp.float32))

        analyse("vision_encoder", lower_vision, counts["visual"][0], 0, 0, PartitionSpec(), param_shards=1)
        report["steps"]["vision_encoder"].update(image_size=[width, height], grid=list(grid),
                                                 grid_bucket=[frames, frame_len])

    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    cli.run(main)
