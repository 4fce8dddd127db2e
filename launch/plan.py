"""Ahead-of-time memory / communication plan for a sharded layout, on simulated CPU devices.

    python launch/plan.py --config=configs/qwen3_omni_30b_a3b_instruct.json --mesh=tp4ep8 --batch=8 --max_len=4096

Sets XLA_FLAGS=--xla_force_host_platform_device_count=<mesh size> before jax is imported,
then lowers and compiles the thinker decode and prefill steps and the talker step on abstract
shapes that carry their shardings (jax.ShapeDtypeStruct; no weights are allocated), and
prints JSON: per-device argument/output/temp bytes from compiled.memory_analysis(),
parameter counts, the ideal per-device bytes of the layout (expert bytes/(tp*ep) + other
param bytes/tp + KV-cache bytes/its shards), measured/ideal, and every collective in the
compiled HLO with its operand shapes. Layers are nn.scan'ed, so compile time stays flat in
depth; collectives inside a while body run once per layer.

Why two compiles per step: XLA:CPU has no native bf16 arithmetic, so for a bf16 program it
materializes f32 copies of bf16 operands and hoists them out of the layer loop (f32 copies of
whole stacked expert weights and of the KV cache), which no TPU/GPU does. The float32 compile
has no such converts; its bytes/2 are reported as the accelerator estimate for bf16
("accelerator_estimate_bf16"), next to the raw bf16 CPU numbers.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from omni_jax import cli  # noqa: E402  (jax-free: XLA_FLAGS is still set before jax loads)
from omni_jax.errors import UsageError  # noqa: E402

# Facts of the released checkpoint (from its tensor manifest), for comparison with what we build.
FULL_CHECKPOINT_PARAMS = 35_259_818_545
NOT_BUILT = {"thinker.audio_tower": 647_927_168, "thinker.visual": 538_631_408}


def _device_count(spec: str, devices: int | None) -> int:
    if devices:
        return devices
    if spec.strip().lower() == "auto":
        raise UsageError("--mesh=auto needs --devices=N (how many devices to simulate)")
    sizes = [int(n) for n in re.findall(r"(?:dp|tp|ep)(\d+)", spec.lower())]
    if not sizes:
        raise UsageError(f"cannot parse --mesh={spec!r}; expected e.g. tp4ep8, ep8, dp2tp4, tp1, auto")
    return math.prod(sizes)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "qwen3_omni_30b_a3b_instruct.json"))
    p.add_argument("--mesh", default="tp4ep8")
    p.add_argument("--devices", type=int, default=None, help="simulated device count (default: the mesh's size)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max_len", type=int, default=4096)
    p.add_argument("--prefill_len", type=int, default=256,
                   help="tokens per prefill call (chunked prefill); attention scores grow with it")
    p.add_argument("--talker_trailing", type=int, default=512, help="talker trailing-text columns (step input)")
    p.add_argument("--moe_impl", default="auto",
                   help="MoE dispatch for prefill; auto = dense on CPU (XLA:CPU lowers ragged_dot through an "
                        "[M, M] mask, which no accelerator does)")
    p.add_argument("--decode_moe_impl", default="auto")
    p.add_argument("--steps", default="thinker_decode,thinker_prefill,talker_step")
    p.add_argument("--no_f32_proxy", action="store_true", help="skip the float32 compiles")
    p.add_argument("--hbm_gb", type=float, default=16.0, help="per-device memory the layout must fit (GB)")
    p.add_argument("--full_collectives", action="store_true", help="list every collective, not one per distinct op")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    n = _device_count(args.mesh, args.devices)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import json

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from omni_jax import hlo_inspect, parallel, sharding, thinker
    from omni_jax.config import load_config
    from omni_jax.mesh import make_mesh, mesh_spec_string

    config = load_config(args.config)
    mesh = make_mesh(args.mesh, num_experts=config.thinker.text.num_experts)
    tp, ep = mesh.shape[sharding.TENSOR], mesh.shape[sharding.EXPERT]
    B, L, T = args.batch, args.max_len, min(args.prefill_len, args.max_len)
    steps_wanted = [s for s in args.steps.split(",") if s]

    def count(boxed):
        leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        tot = sum(math.prod((x.value if isinstance(x, nn.Partitioned) else x).shape) for x in leaves)
        exp = sum(math.prod(x.value.shape) for x in leaves if isinstance(x, nn.Partitioned) and "experts" in x.names)
        return tot, exp

    def spec_shards(spec) -> int:
        return math.prod(mesh.shape[a] for d in range(len(spec)) for a in sharding.spec_mesh_axes(spec, d))

    def cache_elems(layers, kv, hd) -> int:
        return 2 * layers * B * L * kv * hd  # k and v

    th_boxed = thinker.boxed_abstract_params(config)
    th_total, th_exp = count(th_boxed)
    tt = config.thinker.text
    th_layout = parallel.thinker_layout(config, mesh, B, L, T, boxed_params=th_boxed)
    th_cache = cache_elems(tt.num_hidden_layers, tt.num_key_value_heads, tt.head_dim)
    th_cache_spec = th_layout.cache.k.spec
    th_cache_shards = spec_shards(th_cache_spec)

    components = {"thinker_text": th_total}
    tk_total = tk_exp = None
    try:
        from omni_jax import talker

        tk_total, tk_exp = count(talker.boxed_abstract_params(config))
        components["talker_incl_code_predictor"] = tk_total
    except ImportError:
        talker = None
    try:
        from omni_jax import code2wav

        components["code2wav"] = count(code2wav.boxed_abstract_params(config))[0]
    except (ImportError, AttributeError):
        pass

    report: dict = {
        "config": os.path.relpath(os.path.abspath(args.config), ROOT),
        "mesh": mesh_spec_string(mesh),
        "devices": mesh.size,
        "batch": B,
        "max_len": L,
        "prefill_chunk": T,
        "dtype": "bfloat16",
        "params": {
            "built_total": sum(components.values()),
            "built_by_component": components,
            "thinker_experts": th_exp,
            "thinker_non_expert": th_total - th_exp,
            "full_checkpoint": FULL_CHECKPOINT_PARAMS,
            "not_built": NOT_BUILT,
            "note": "we build thinker text model, talker (+code predictor) and code2wav; the audio and vision "
                    "towers are not built, which is the whole difference to the full checkpoint",
        },
        "steps": {},
    }

    def ideal_bytes(total, experts, cache_elems, cache_shards, itemsize):
        return (experts * itemsize / (tp * ep) + (total - experts) * itemsize / tp
                + cache_elems * itemsize / cache_shards)

    def memory(compiled):
        m = compiled.memory_analysis()
        arg, out, alias, temp = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes
        return {"argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
                "total_bytes": arg + out - alias + temp}

    def collectives(compiled):
        colls = hlo_inspect.collectives(compiled.as_text())
        if args.full_collectives:
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

    def analyse(name, build, total, experts, cache_elems, cache_shards, cache_spec):
        entry: dict = {"kv_cache_spec": str(cache_spec), "kv_cache_shards": cache_shards}
        for label, dt in (("bf16_on_cpu", jnp.bfloat16), ("f32_on_cpu", jnp.float32)):
            if label == "f32_on_cpu" and args.no_f32_proxy:
                continue
            t0 = time.time()
            fn, fn_args, kwargs = build(dt)
            compiled = fn.lower(*fn_args, **kwargs).compile()
            mem = memory(compiled)
            isz = jnp.dtype(dt).itemsize
            ideal = ideal_bytes(total, experts, cache_elems, cache_shards, isz)
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
                "fits_hbm": est <= args.hbm_gb * 1e9,
            }
        report["steps"][name] = entry

    if "thinker_decode" in steps_wanted:
        def build_decode(dt):
            model = thinker.Thinker(config, dtype=dt, param_dtype=dt, moe_impl=args.decode_moe_impl)
            lay = th_layout
            fn = parallel.sharded_jit(
                parallel.thinker_decode_fn(model), mesh,
                (lay.params, lay.step_tokens, lay.step_positions, lay.cache), (lay.logits, lay.cache), (3,),
            )
            return fn, parallel.abstract_thinker_args(config, lay, B, L, T, dt)[1], {}

        analyse("thinker_decode", build_decode, th_total, th_exp, th_cache, th_cache_shards, th_cache_spec)

    if "thinker_prefill" in steps_wanted:
        def build_prefill(dt):
            model = thinker.Thinker(config, dtype=dt, param_dtype=dt, moe_impl=args.moe_impl)
            lay = th_layout
            fn = parallel.sharded_jit(
                parallel.thinker_prefill_fn(model), mesh,
                (lay.params, lay.tokens, lay.positions, lay.cache, lay.rows), (lay.logits, lay.cache), (3,),
            )
            return fn, parallel.abstract_thinker_args(config, lay, B, L, T, dt)[0], {}

        analyse("thinker_prefill", build_prefill, th_total, th_exp, th_cache, th_cache_shards, th_cache_spec)

    if "talker_step" in steps_wanted and talker is not None:
        tk = config.talker.text

        def build_talker(dt):
            # As TalkerGenerator(mesh=...) jits it on accelerators: the state (with its KV cache) is donated.
            model = talker.Talker(config, dt, dt, args.decode_moe_impl)
            step = parallel.sharded_jit(
                functools.partial(talker.talker_step, model), mesh, static_argnames=("sampling",),
                donate_argnames=("state",),
            )
            sampling = talker.TalkerSampling.greedy()
            fn_args = parallel.abstract_talker_step_args(config, mesh, B, L, args.talker_trailing, dt, sampling=sampling)
            return step, fn_args, {"sampling": sampling}

        probe = parallel.abstract_talker_step_args(config, mesh, B, L, args.talker_trailing, jnp.float32)[1]
        tk_spec = probe.cache.k.sharding.spec
        analyse("talker_step", build_talker, tk_total, tk_exp, cache_elems(tk.num_hidden_layers, tk.num_key_value_heads,
                tk.head_dim), spec_shards(tk_spec), tk_spec)

    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    cli.guard(main)
