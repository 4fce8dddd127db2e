"""Side-by-side benchmark: omni_jax vs transformers (PyTorch) on the same converted weights, plus a roofline.

  python launch/bench.py --config=tiny               # smoke run (seconds)
  python launch/bench.py --config=bench              # real widths, 2 thinker + 2 talker layers (~2.56 B params,
                                                     #   ~10.2 GB per framework at float32: needs ~21 GB of RAM)
  python launch/bench.py --config=bench --nohf       # ours alone (e.g. on a GPU)

One process: a random transformers model is built once per (config, seed) and saved (save_pretrained) under
--work_dir/hf, converted with omni_jax.convert.convert_checkpoint into --work_dir/ckpt (float32); later runs reuse
both. Each run loads transformers (from_pretrained, float32) and ours (OmniPipeline.load, float32), then for every
phase runs one warm-up each (ours compiles there) and --repeats rounds alternating ours, theirs. Reported: medians,
ratio = ours throughput / theirs throughput (> 1: we are faster), our % of the roofline, compile time, memory.
With --bf16_too our phases run again in bfloat16 afterwards (transformers stays float32: no ratio there).

Phases (--what): prefill, decode, talker, code2wav, e2e, roofline. Definitions are in each phase function's
docstring and in the JSON's "definitions". The roofline measures the machine first (before any model is loaded):
memory bandwidth (copy of a --copy_mib float32 array, read + write bytes) and float32 matmul FLOP/s; decode-like
phases get bytes of weights read per step -> roofline steps/s; prefill and Code2Wav get FLOPs -> % of matmul rate.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

try:  # the shared launcher wrapper (exit codes, one-line errors) when this build has it
    from omni_jax import cli as _cli  # noqa: E402
except ImportError:  # pragma: no cover
    _cli = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The real model's values (configs/qwen3_omni_30b_a3b_instruct.json).
HF_THINKER_IDS = {"vision_start_token_id": 151652, "audio_start_token_id": 151669}
PHASES = ("prefill", "decode", "talker", "code2wav", "e2e", "roofline")

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
flags.DEFINE_string("prompt", "Tell me about the sea.", "Text prompt of the talker and end-to-end phases.")
flags.DEFINE_integer("stream_chunk", 4, "Frames per streamed audio chunk (e2e streaming).")
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

DEFINITIONS = {
    "ratio": "ours throughput / theirs throughput (for times and RTFs: theirs / ours); > 1 means omni_jax is faster",
    "prefill": "batch 1, prompt_len random ids; ours: ThinkerEngine.start (jitted prefill, last position's logits "
               "+ first token); theirs: thinker.model forward (use_cache=True) + lm_head on the last position "
               "(transformers' thinker has no logits_to_keep). tokens/s = prompt_len / median time",
    "decode": "greedy, EOS disabled, decode_prompt_len random ids per row; rate = N / (median t(N+1 new tokens) - "
              "median t(1 new token)); ours ThinkerEngine.generate, theirs thinker.generate(do_sample=False, "
              "min_new_tokens=max_new_tokens). tokens/s summed over rows and per row",
    "talker": "same prompt and greedy thinker for both; only the talker stage is timed (ours "
              "TalkerGenerator.generate, theirs the talker.generate call inside generate(return_audio=True), "
              "min_new_tokens set so codec EOS is suppressed there); frames/s = frames / time, 1 frame = 80 ms",
    "code2wav": "code2wav_seconds of random valid codes, batch 1; ours OmniPipeline.vocode, theirs "
                "code2wav.chunked_decode(chunk 300, left context 25); RTF = compute s / audio s",
    "e2e": "text prompt -> speech, greedy thinker (e2e_tokens) and talker (<= e2e_frames); theirs generate("
           "return_audio=True) (not streaming: first audio = total); ours OmniPipeline.stream (first audio chunk, "
           "total) and OmniPipeline.generate_ids (non-streaming total); RTF = total s / audio s",
    "bandwidth": "median copy rate of a copy_mib float32 array counting read + write bytes: numpy np.copyto and a "
                 "jitted jax scale (donated off-CPU); the roofline uses the larger; 'read_only' is a jitted jax sum",
    "matmul": "median rate of an n x n float32 jax matmul (2 n^3 FLOPs); torch for reference",
    "decode_bytes": "weights one step reads: embedding rows + per layer (q/k/v/o + norms + router + the experts "
                    "routed at that step, union over the batch rows) + final norm + head; routed counts from "
                    "transformers' routers (hooks) on the actual generated sequences, else top-k exact at batch 1 "
                    "and the uniform-routing expectation E(1-(1-k/E)^B) otherwise",
    "talker_bytes": "per frame: talker step (attention + router + routed top-k + shared expert + codec head) + "
                    "code predictor 15 steps x (all layers + final norm) + 15 group heads + 15 embedding rows",
    "roofline_pct": "decode-like: measured steps/s / (bandwidth / bytes per step); prefill and Code2Wav: "
                    "(FLOPs / s) / matmul FLOP/s. Prefill FLOPs = 2 x active params per token x tokens + causal "
                    "attention scores/values + last-position head; Code2Wav FLOPs = XLA cost_analysis of our call",
}


# ---------------------------------------------------------------------------------------------- small helpers


def _rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _div(a, b):
    return a / b if (a is not None and b) else None


class CompileTimer:
    """Sums jax.monitoring's backend-compile durations (and tracing + lowering) while `track()` is active."""

    BACKEND = "/jax/core/compile/backend_compile_duration"
    OTHER = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")

    def __init__(self):
        import jax

        self.active = False
        self.backend = self.other = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if self.active:
            if event == self.BACKEND:
                self.backend += duration
            elif event in self.OTHER:
                self.other += duration

    @contextlib.contextmanager
    def track(self, into: dict):
        b0, o0, self.active = self.backend, self.other, True
        try:
            yield
        finally:
            self.active = False
            into["compile_s"] = into.get("compile_s", 0.0) + self.backend - b0
            into["trace_lower_s"] = into.get("trace_lower_s", 0.0) + self.other - o0


def _measure(fn: Callable[[], Any]) -> dict:
    """Run fn; its dict result (extra figures, maybe its own "s") or just the wall time."""
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    out = dict(out) if isinstance(out, dict) else {}
    out.setdefault("s", dt)
    return out


def run_rounds(ctx: "Ctx", ours: list[Callable[[], Any]], theirs: list[Callable[[], Any]] | None,
               info: dict) -> tuple[list[list[dict]], list[list[dict]]]:
    """Warm-up of every function (ours twice, under the compile timer), then --repeats rounds, each running all of
    ours then all of theirs, so related measurements (e.g. t(1) and t(N+1)) are taken close together in time.
    Returns per-function lists of measurements; the raw seconds also go into info["runs_s"]."""
    with ctx.compile_timer.track(info):
        for _ in range(2):  # twice: the second call takes the cache-reuse paths (ThinkerEngine resets a kept cache)
            for fn in ours:
                _measure(fn)
    for fn in theirs or ():
        _measure(fn)
    ro: list[list[dict]] = [[] for _ in ours]
    rt: list[list[dict]] = [[] for _ in theirs or ()]
    for _ in range(ctx.repeats):
        for i, fn in enumerate(ours):
            ro[i].append(_measure(fn))
        for i, fn in enumerate(theirs or ()):
            rt[i].append(_measure(fn))
    info.setdefault("runs_s", []).append({"ours": [[r["s"] for r in x] for x in ro],
                                          "theirs": [[r["s"] for r in x] for x in rt]})
    return ro, rt


def run_pair(ctx: "Ctx", ours: Callable[[], Any], theirs: Callable[[], Any] | None, info: dict) -> tuple[list, list]:
    """Warm-ups (see run_rounds), then --repeats rounds alternating ours, theirs."""
    ro, rt = run_rounds(ctx, [ours], None if theirs is None else [theirs], info)
    return ro[0], rt[0] if rt else []


def _med(runs: list[dict], key: str = "s"):
    return _median([r.get(key) for r in runs])


# ---------------------------------------------------------------------------------------------- analytic counts


def _attn_params(t) -> int:
    h, a, kv, hd = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    n = 2 * h * a * hd + 2 * h * kv * hd
    if t.attention_bias:
        n += (a + 2 * kv) * hd + h
    return n + 2 * h + (2 * hd if t.use_qk_norm else 0)  # + input/post norms + q/k norms


def _mlp_params(t, layer: int, experts: float) -> float:
    """Weights of one layer's MLP that a step reads with `experts` routed experts (dense layers: all)."""
    h = t.hidden_size
    if not (t.num_experts and t.is_sparse(layer)):
        return 3 * h * t.intermediate_size
    n = t.num_experts * h + experts * 3 * h * t.moe_intermediate_size
    if t.shared_expert_intermediate_size:
        n += 3 * h * t.shared_expert_intermediate_size + h
    return n


def expected_union(num_experts: int, k: int, rows: int) -> float:
    """Distinct experts hit by `rows` tokens of top-k each under uniform routing (exact k for one row)."""
    if rows <= 1:
        return float(k)
    return num_experts * (1 - (1 - k / num_experts) ** rows)


def decoder_step_params(t, union_per_layer: list[float], rows: int, head_rows: int | None = None) -> float:
    """Params one decode step of a decoder stack reads: embedding rows, layers, final norm, head."""
    n = rows * t.hidden_size + t.hidden_size + t.hidden_size * t.vocab_size
    for layer in range(t.num_hidden_layers):
        n += _attn_params(t) + _mlp_params(t, layer, union_per_layer[layer])
    return n


def talker_frame_params(cfg, union_per_layer: list[float]) -> dict:
    tk = cfg.talker
    talker = decoder_step_params(tk.text, union_per_layer, rows=1)
    cp = tk.code_predictor
    steps = tk.num_code_groups - 1
    per_pass = sum(_attn_params(cp) + _mlp_params(cp, i, 0) for i in range(cp.num_hidden_layers)) + cp.hidden_size
    cp_params = steps * per_pass + steps * cp.hidden_size * cp.vocab_size + steps * cp.hidden_size
    return {"talker_step": talker, "code_predictor_frame": cp_params, "total": talker + cp_params}


def prefill_flops(t, tokens: int) -> float:
    """2 x active params per token x tokens + causal attention (scores + values) + the last position's head."""
    per_token = sum(_attn_params(t) + _mlp_params(t, i, t.num_experts_per_tok) for i in range(t.num_hidden_layers))
    attn = t.num_hidden_layers * 2 * 2 * t.num_attention_heads * t.head_dim * tokens * (tokens + 1) / 2
    return 2 * per_token * tokens + attn + 2 * t.hidden_size * t.vocab_size


# ---------------------------------------------------------------------------------------------- machine


def measure_machine(copy_mib: int, matmul_n: int, repeats: int, with_torch: bool) -> dict:
    """Memory bandwidth and float32 matmul FLOP/s of this machine (before any model is loaded)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    reps = max(3, repeats)
    n = copy_mib * 2**20 // 4
    nbytes = n * 4
    src = np.full(n, 1.0, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    numpy_bw = 2 * nbytes / statistics.median(times[1:])
    del dst
    x = jnp.asarray(src)
    del src
    donate = jax.default_backend() != "cpu"  # XLA:CPU cannot donate
    scale = jax.jit(lambda a: a * np.float32(1.0001), donate_argnums=(0,) if donate else ())
    total = jax.jit(jnp.sum)
    x = scale(x).block_until_ready()
    total(x).block_until_ready()
    times, rtimes = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        x = scale(x).block_until_ready()
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        total(x).block_until_ready()
        rtimes.append(time.perf_counter() - t0)
    jax_bw = 2 * nbytes / statistics.median(times)
    read_bw = nbytes / statistics.median(rtimes)
    del x
    a = jax.random.normal(jax.random.PRNGKey(0), (matmul_n, matmul_n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (matmul_n, matmul_n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    flops = 2 * matmul_n**3
    out = {
        "copy_bytes": nbytes, "bandwidth_numpy_copy_Bps": numpy_bw, "bandwidth_jax_scale_Bps": jax_bw,
        "bandwidth_read_only_jax_sum_Bps": read_bw,
        "bandwidth_Bps": jax_bw if jax.default_backend() != "cpu" else max(numpy_bw, jax_bw),
        "matmul_n": matmul_n, "matmul_flops_per_s": flops / statistics.median(times),
    }
    del a, b
    if with_torch:
        import torch

        ta, tb = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
        torch.matmul(ta, tb)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(ta, tb)
            times.append(time.perf_counter() - t0)
        out["torch_matmul_flops_per_s"] = flops / statistics.median(times)
    gc.collect()
    return out


# ---------------------------------------------------------------------------------------------- setup


class Ctx:
    """What the phases share: loaded models, config, flags, the compile timer and the report."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _resolve_config(name: str) -> tuple[str, str]:
    """(short name, path) of --config."""
    if name in ("tiny", "bench"):
        return name, os.path.join(ROOT, "configs", f"{name}.json")
    from omni_jax.errors import UsageError

    if not os.path.isfile(name):
        raise UsageError(f"--config={name!r}: not 'tiny', 'bench' or an existing config.json path")
    return os.path.splitext(os.path.basename(name))[0], name


def prepare_checkpoints(cfg_dict: dict, work_dir: str, seed: int) -> tuple[str, str, dict]:
    """Build (once) the random HF checkpoint in a child process and convert it to float32 (once)."""
    from omni_jax import hf_reference
    from omni_jax.convert import convert_checkpoint

    hf_dir, ckpt_dir = os.path.join(work_dir, "hf"), os.path.join(work_dir, "ckpt")
    info = {"hf_dir": hf_dir, "ckpt_dir": ckpt_dir}
    t0 = time.perf_counter()
    hf_cfg = hf_reference.hf_config_dict(cfg_dict, vocab_size=None)
    for key, value in HF_THINKER_IDS.items():  # transformers' rope index reads them; configs/tiny.json omits them
        hf_cfg["thinker_config"].setdefault(key, value)
    import jax

    from omni_jax import checkpoint
    from omni_jax.config import parse_config

    size = sum(x.size for x in jax.tree_util.tree_leaves(checkpoint.abstract_params(parse_config(cfg_dict))))
    # Big models are built in a child process: only its exit reliably returns torch's memory before the loads.
    info["hf_built"] = hf_reference.ensure_hf_checkpoint(hf_cfg, hf_dir, seed, subprocess=size > 2 * 10**8)
    info["hf_build_s"] = time.perf_counter() - t0
    info["converted"] = not os.path.isdir(ckpt_dir)  # convert_checkpoint renames into place only when complete
    if info["converted"]:
        t0 = time.perf_counter()
        convert_checkpoint(hf_dir, ckpt_dir, dtype="float32", progress=False)
        info["convert_s"] = time.perf_counter() - t0
    return hf_dir, ckpt_dir, info


def _params_bytes(tree) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def load_ours(ckpt_dir: str, dtype_name: str, max_len: int):
    from omni_jax.loading import parse_dtype
    from omni_jax.pipeline import OmniPipeline

    return OmniPipeline.load(ckpt_dir, dtype=parse_dtype(dtype_name), max_len=max_len)


# ---------------------------------------------------------------------------------------------- router counting


class RouterLog:
    """Forward hooks on transformers' MoE routers under `prefix`: distinct experts routed per call."""

    def __init__(self, model, prefix: str):
        self.calls: list[tuple[str, int, int]] = []  # (router module name, tokens, distinct experts)
        self.handles = []
        for name, mod in model.named_modules():
            if name.startswith(prefix) and type(mod).__name__.endswith("TopKRouter"):
                self.handles.append(mod.register_forward_hook(functools.partial(self._hook, name)))
        self.names = [n for n, m in model.named_modules() if n.startswith(prefix)
                      and type(m).__name__.endswith("TopKRouter")]

    def _hook(self, name, module, inputs, output):
        import torch

        idx = output[2]
        self.calls.append((name, int(idx.shape[0]), int(torch.unique(idx).numel())))

    def remove(self):
        for h in self.handles:
            h.remove()

    def union_per_layer(self, tokens: int) -> list[float] | None:
        """Mean distinct experts per router over calls with exactly `tokens` tokens (the decode steps)."""
        out = []
        for name in self.names:
            vals = [u for n, t, u in self.calls if n == name and t == tokens]
            if not vals:
                return None
            out.append(sum(vals) / len(vals))
        return out


def _union_list(t, measured: list[float] | None, rows: int) -> tuple[list[float], str]:
    """Per-layer routed-expert counts, padded to all layers (dense layers get 0 and ignore it)."""
    if measured is not None:
        it = iter(measured)
        return [next(it) if (t.num_experts and t.is_sparse(i)) else 0.0 for i in range(t.num_hidden_layers)], \
            "counted (transformers routers)"
    k = t.num_experts_per_tok
    how = "exact (top-k, one row)" if rows == 1 else "estimate (uniform routing)"
    return [expected_union(t.num_experts, k, rows) for _ in range(t.num_hidden_layers)], how


# ---------------------------------------------------------------------------------------------- phases


def phase_prefill(ctx: Ctx) -> dict:
    """Thinker prefill tokens/s: batch 1, --prompt_len random in-vocab ids."""
    import jax
    import numpy as np

    from omni_jax.sampling import SamplingParams

    t = ctx.cfg.thinker.text
    n = ctx.prompt_len
    ids = np.random.default_rng(ctx.seed).integers(0, min(t.vocab_size, 150000), n).tolist()
    engine = ctx.pipe.engine

    def ours():
        pre = engine.start([ids], 1, SamplingParams.greedy(), eos_ids=())
        jax.block_until_ready(pre.first)
        engine.release(pre.state)

    if ctx.hf is None:
        theirs = None
    else:
        import torch

        tids = torch.tensor([ids])
        mask = torch.ones_like(tids)

        def theirs():
            with torch.inference_mode():
                out = ctx.hf.thinker.model(input_ids=tids, attention_mask=mask, use_cache=True)
                ctx.hf.thinker.lm_head(out[0][:, -1:])

    res: dict = {"prompt_len": n}
    ro, rt = run_pair(ctx, ours, theirs, res)
    res["ours_s"], res["theirs_s"] = _med(ro), _med(rt)
    res["ours_tokens_per_s"], res["theirs_tokens_per_s"] = _div(n, res["ours_s"]), _div(n, res["theirs_s"])
    res["ratio"] = _div(res["ours_tokens_per_s"], res["theirs_tokens_per_s"])
    res["flops"] = prefill_flops(t, n)
    if ctx.machine:
        mm = ctx.machine["matmul_flops_per_s"]
        res["roofline_tokens_per_s"] = mm / (res["flops"] / n)
        res["ours_roofline_pct"] = 100 * _div(res["flops"], res["ours_s"]) / mm
        if res["theirs_s"]:
            res["theirs_roofline_pct"] = 100 * _div(res["flops"], res["theirs_s"]) / mm
    return res


def phase_decode(ctx: Ctx) -> dict:
    """Thinker decode tokens/s per batch size: N / (t(N+1 tokens) - t(1 token)), greedy, EOS disabled."""
    import numpy as np

    from omni_jax.sampling import SamplingParams

    t = ctx.cfg.thinker.text
    n = ctx.decode_tokens
    rng = np.random.default_rng(ctx.seed + 1)
    out = {"new_tokens": n, "prompt_len": ctx.decode_prompt_len}
    for batch in ctx.batch_sizes:
        prompts = rng.integers(0, min(t.vocab_size, 150000), (batch, ctx.decode_prompt_len)).tolist()

        def ours_gen(m):
            return lambda: ctx.pipe.engine.generate(prompts, m, SamplingParams.greedy(), eos_ids=())

        res: dict = {"batch": batch}
        ours_short, ours_long = ours_gen(1), ours_gen(n + 1)
        theirs_short = theirs_long = None
        if ctx.hf is not None:
            import torch

            tids = torch.tensor(prompts)
            mask = torch.ones_like(tids)

            def theirs_gen(m):
                def run():
                    with torch.inference_mode():
                        return ctx.hf.thinker.generate(input_ids=tids, attention_mask=mask, max_new_tokens=m,
                                                       min_new_tokens=m, do_sample=False, pad_token_id=0)
                return run

            theirs_short, theirs_long = theirs_gen(1), theirs_gen(n + 1)
        ro, rt = run_rounds(ctx, [ours_short, ours_long],
                            None if theirs_short is None else [theirs_short, theirs_long], res)
        for who, runs in (("ours", ro), ("theirs", rt)):
            ta, tb = (_med(runs[0]), _med(runs[1])) if runs else (None, None)
            res[f"{who}_t1_s"], res[f"{who}_tN1_s"] = ta, tb
            rate = n / (tb - ta) if (ta is not None and tb is not None and tb > ta) else None
            res[f"{who}_tokens_per_s"] = None if rate is None else rate * batch
            res[f"{who}_tokens_per_s_per_row"] = rate
        res["ratio"] = _div(res["ours_tokens_per_s"], res["theirs_tokens_per_s"])
        measured = None
        if ctx.hf is not None:  # untimed run with router hooks: experts actually routed per decode step
            log = RouterLog(ctx.hf, "thinker.")
            try:
                theirs_long()
            finally:
                log.remove()
            measured = log.union_per_layer(batch)
        union, how = _union_list(t, measured, batch)
        res["routed_experts_per_layer"], res["routed_experts_source"] = union, how
        res["bytes_per_step"] = decoder_step_params(t, union, batch) * ctx.dtype_bytes
        if ctx.machine:
            steps = ctx.machine["bandwidth_Bps"] / res["bytes_per_step"]
            res["roofline_tokens_per_s"] = steps * batch
            for who in ("ours", "theirs"):
                if res.get(f"{who}_tokens_per_s"):
                    res[f"{who}_roofline_pct"] = 100 * res[f"{who}_tokens_per_s"] / res["roofline_tokens_per_s"]
        out[f"batch{batch}"] = res
    return out


def _our_thinker_for_talker(ctx: Ctx):
    """Our greedy thinker on the chat prompt (collect_hidden) -> the talker's inputs, as OmniPipeline does."""
    import jax.numpy as jnp
    import numpy as np

    from omni_jax.sampling import SamplingParams
    from omni_jax.talker import tts_token_ids

    pipe = ctx.pipe
    out = pipe.engine.generate([ctx.prompt_ids], ctx.e2e_tokens, SamplingParams.greedy(), collect_hidden=True,
                               eos_ids=ctx.eos)
    table = pipe.params["thinker"]["embed_tokens"]["embedding"]
    tts = np.asarray(jnp.take(table, jnp.asarray(tts_token_ids(pipe.config)), axis=0), np.float32)
    n = out.total_lengths[0]
    inputs = pipe.talker.build_inputs(pipe.params["talker"], [np.asarray(ctx.prompt_ids)],
                                      [np.asarray(out.tokens[0])], [out.embeds[0, :n]], [out.accept_hidden[0, :n]],
                                      tts, ["ethan"], thinker_eos_ids=ctx.eos)
    return out.tokens[0], inputs


@contextlib.contextmanager
def _hf_talker_only(hf, box: dict):
    """Time transformers' talker.generate inside its full generate and skip its Code2Wav (instance patches)."""
    import torch

    original = hf.talker.generate

    def timed_generate(*args, **kwargs):
        t0 = time.perf_counter()
        result = original(*args, **kwargs)
        box["s"] = time.perf_counter() - t0
        box["frames"] = sum(1 for h in result.hidden_states if h[-1] is not None)
        return result

    hf.talker.generate = timed_generate
    hf.code2wav.chunked_decode = lambda codes, **kw: torch.zeros(codes.shape[0], 1, 1)
    try:
        yield
    finally:
        del hf.talker.generate, hf.code2wav.chunked_decode


def phase_talker(ctx: Ctx) -> dict:
    """Talker + code predictor frames/s on the same prompt; only the talker stage is timed."""
    import jax

    from omni_jax.talker import TalkerSampling

    f = ctx.talker_frames
    tokens, inputs = _our_thinker_for_talker(ctx)
    res: dict = {"target_frames": f, "thinker_tokens": len(tokens)}

    def ours():
        t0 = time.perf_counter()
        talk = ctx.pipe.talker.generate(ctx.pipe.params["talker"], inputs, f + 1, TalkerSampling.greedy(),
                                        rng=jax.random.PRNGKey(1), penalty_from=None)
        return {"s": time.perf_counter() - t0, "frames": int(talk.lengths[0])}

    if ctx.hf is None:
        theirs = None
    else:
        import torch

        tids = torch.tensor([ctx.prompt_ids])

        def theirs():
            box: dict = {}
            with _hf_talker_only(ctx.hf, box), torch.inference_mode():
                seqs, _ = ctx.hf.generate(input_ids=tids, return_audio=True, speaker="Ethan",
                                          thinker_max_new_tokens=ctx.e2e_tokens, thinker_do_sample=False,
                                          thinker_eos_token_id=list(ctx.eos), talker_max_new_tokens=f + 1,
                                          talker_min_new_tokens=f + 1, talker_do_sample=False)
            box["thinker_tokens"] = seqs[0, len(ctx.prompt_ids):].tolist()
            return box

    ro, rt = run_pair(ctx, ours, theirs, res)
    for who, runs in (("ours", ro), ("theirs", rt)):
        if runs:
            res[f"{who}_s"], res[f"{who}_frames"] = _med(runs), int(_med(runs, "frames"))
            res[f"{who}_frames_per_s"] = _median([r["frames"] / r["s"] for r in runs if r["s"] and r["frames"]])
    if rt:
        res["thinker_tokens_match"] = rt[-1]["thinker_tokens"] == list(tokens)
    res["ratio"] = _div(res.get("ours_frames_per_s"), res.get("theirs_frames_per_s"))
    tk = ctx.cfg.talker.text
    union, how = _union_list(tk, None, 1)
    res["routed_experts_source"] = how
    parts = talker_frame_params(ctx.cfg, union)
    res["bytes_per_frame"] = {k: v * ctx.dtype_bytes for k, v in parts.items()}
    if ctx.machine:
        res["roofline_frames_per_s"] = ctx.machine["bandwidth_Bps"] / res["bytes_per_frame"]["total"]
        for who in ("ours", "theirs"):
            if res.get(f"{who}_frames_per_s"):
                res[f"{who}_roofline_pct"] = 100 * res[f"{who}_frames_per_s"] / res["roofline_frames_per_s"]
    return res


def _code2wav_flops(ctx: Ctx, codes) -> float | None:
    """XLA's cost analysis of the Code2Wav call our vocode makes (<= 300 frames: one padded full decode)."""
    import jax
    import numpy as np

    from omni_jax import code2wav as c2w
    from omni_jax.pipeline import CHUNK_SIZE
    from omni_jax.talker import pow2_bucket

    n = codes.shape[-1]
    if n > CHUNK_SIZE:
        return None
    width = min(CHUNK_SIZE, pow2_bucket(n, 16))
    padded = np.pad(codes, ((0, 0), (0, 0), (0, width - n)))
    cfg = ctx.cfg.code2wav
    fn = jax.jit(lambda p, c: c2w.code2wav(p, c, cfg, dtype=ctx.pipe.dtype))
    lowered = fn.lower(ctx.pipe.params["code2wav"], padded)
    cost = None
    try:
        cost = lowered.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends only analyse compiled code
        pass
    if not cost or "flops" not in (cost if isinstance(cost, dict) else cost[0]):
        cost = lowered.compile().cost_analysis()
    cost = cost if isinstance(cost, dict) else cost[0]
    return float(cost["flops"])


def phase_code2wav(ctx: Ctx) -> dict:
    """Code2Wav real-time factor on --code2wav_seconds of random valid codes (batch 1)."""
    import numpy as np

    cfg = ctx.cfg.code2wav
    frames = max(1, round(ctx.code2wav_seconds * ctx.pipe.sample_rate / cfg.total_upsample))
    codes = np.random.default_rng(ctx.seed + 2).integers(0, cfg.codebook_size, (1, cfg.num_quantizers, frames))
    codes = codes.astype(np.int32)
    res: dict = {"frames": frames, "audio_s": frames * cfg.total_upsample / ctx.pipe.sample_rate}

    def ours():
        wav = ctx.pipe.vocode(codes, [frames])[0]
        return {"samples": len(wav)}

    if ctx.hf is None:
        theirs = None
    else:
        import torch

        tcodes = torch.tensor(codes, dtype=torch.long)

        def theirs():
            with torch.inference_mode():
                wav = ctx.hf.code2wav.chunked_decode(tcodes, chunk_size=300, left_context_size=25)
            return {"samples": int(wav.shape[-1])}

    ro, rt = run_pair(ctx, ours, theirs, res)
    res["ours_s"], res["theirs_s"] = _med(ro), _med(rt)
    res["ours_rtf"], res["theirs_rtf"] = _div(res["ours_s"], res["audio_s"]), _div(res["theirs_s"], res["audio_s"])
    res["ratio"] = _div(res["theirs_rtf"], res["ours_rtf"])
    res["flops"] = _code2wav_flops(ctx, codes)
    if ctx.machine and res["flops"]:
        mm = ctx.machine["matmul_flops_per_s"]
        res["roofline_rtf"] = res["flops"] / mm / res["audio_s"]
        res["ours_roofline_pct"] = 100 * res["flops"] / res["ours_s"] / mm
        if res["theirs_s"]:
            res["theirs_roofline_pct"] = 100 * res["flops"] / res["theirs_s"] / mm
    return res


def phase_e2e(ctx: Ctx) -> dict:
    """Text -> speech: time to first audio and total real-time factor (greedy thinker and talker)."""
    from omni_jax.sampling import SamplingParams
    from omni_jax.talker import TalkerSampling

    pipe = ctx.pipe
    kw = dict(max_new_tokens=ctx.e2e_tokens, talker_max_new_tokens=ctx.e2e_frames + 1,
              sampling=SamplingParams.greedy(), talker_sampling=TalkerSampling.greedy(), eos_ids=ctx.eos)

    def ours_stream():
        t0 = time.perf_counter()
        first_text = first_audio = None
        chunks, samples, last = [], 0, None
        for ev in pipe.stream(list(ctx.prompt_ids), chunk_frames=ctx.stream_chunk, **kw):
            now = time.perf_counter() - t0
            if ev.token_ids and first_text is None:
                first_text = now
            if ev.audio is not None and len(ev.audio):
                if first_audio is None:
                    first_audio = now
                else:
                    chunks.append((now - last) / (len(ev.audio) / pipe.sample_rate))
                last = now
                samples += len(ev.audio)
        total = time.perf_counter() - t0
        return {"s": total, "time_to_first_text_s": first_text, "time_to_first_audio_s": first_audio,
                "audio_s": samples / pipe.sample_rate, "chunk_rtf_median": _median(chunks)}

    def ours_generate():
        t0 = time.perf_counter()
        r = pipe.generate_ids([ctx.prompt_ids], **kw)[0]
        return {"s": time.perf_counter() - t0, "audio_s": r.audio_seconds, "tokens": len(r.token_ids),
                "frames": int(r.codes.shape[-1]), **r.timings}

    if ctx.hf is None:
        theirs = None
    else:
        import torch

        tids = torch.tensor([ctx.prompt_ids])

        def theirs():
            t0 = time.perf_counter()
            with torch.inference_mode():
                seqs, wav = ctx.hf.generate(input_ids=tids, return_audio=True, speaker="Ethan",
                                            thinker_max_new_tokens=ctx.e2e_tokens, thinker_do_sample=False,
                                            thinker_eos_token_id=list(ctx.eos),
                                            talker_max_new_tokens=ctx.e2e_frames + 1, talker_do_sample=False)
            total = time.perf_counter() - t0
            return {"s": total, "audio_s": wav.shape[-1] / pipe.sample_rate,
                    "tokens": int(seqs.shape[-1]) - len(ctx.prompt_ids)}

    res: dict = {"prompt_tokens": len(ctx.prompt_ids)}
    (so, go), rt = run_rounds(ctx, [ours_stream, ours_generate], None if theirs is None else [theirs], res)
    rt = rt[0] if rt else []
    med = lambda runs, k: _med(runs, k)  # noqa: E731
    res["ours_stream"] = {k: med(so, k) for k in ("s", "time_to_first_text_s", "time_to_first_audio_s", "audio_s",
                                                  "chunk_rtf_median")}
    res["ours_generate"] = {k: med(go, k) for k in ("s", "audio_s", "tokens", "frames", "thinker_s", "talker_s",
                                                    "code2wav_s")}
    if rt:
        res["theirs"] = {k: med(rt, k) for k in ("s", "audio_s", "tokens")}
    ours_rtf = _div(res["ours_generate"]["s"], res["ours_generate"]["audio_s"])
    theirs_rtf = _div(res["theirs"]["s"], res["theirs"]["audio_s"]) if rt else None
    res["ours_rtf"], res["theirs_rtf"] = ours_rtf, theirs_rtf
    res["ours_stream_rtf"] = _div(res["ours_stream"]["s"], res["ours_stream"]["audio_s"])
    res["ours_time_to_first_audio_s"] = res["ours_stream"]["time_to_first_audio_s"]
    res["theirs_time_to_first_audio_s"] = res["theirs"]["s"] if rt else None
    res["ratio"] = _div(theirs_rtf, ours_rtf)
    res["first_audio_ratio"] = _div(res["theirs_time_to_first_audio_s"], res["ours_time_to_first_audio_s"])
    res["first_audio_over_non_streaming_total"] = _div(res["ours_time_to_first_audio_s"], res["ours_generate"]["s"])
    return res


PHASE_FNS = {"prefill": phase_prefill, "decode": phase_decode, "talker": phase_talker,
             "code2wav": phase_code2wav, "e2e": phase_e2e}


# ---------------------------------------------------------------------------------------------- report


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        s = f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    else:
        s = str(v)
    return s + unit


def table_rows(phases: dict) -> list[tuple]:
    """(phase row, ours, theirs, ratio, our roofline %, target = roofline figure) for the human table."""
    rows = []
    p = phases.get("prefill")
    if p:
        rows.append(("prefill tok/s", p["ours_tokens_per_s"], p["theirs_tokens_per_s"], p["ratio"],
                     p.get("ours_roofline_pct"), p.get("roofline_tokens_per_s")))
    d = phases.get("decode")
    if d:
        for key, r in d.items():
            if key.startswith("batch"):
                rows.append((f"decode b{r['batch']} tok/s", r["ours_tokens_per_s"], r["theirs_tokens_per_s"],
                             r["ratio"], r.get("ours_roofline_pct"), r.get("roofline_tokens_per_s")))
    t = phases.get("talker")
    if t:
        rows.append(("talker+cp frames/s", t.get("ours_frames_per_s"), t.get("theirs_frames_per_s"), t["ratio"],
                     t.get("ours_roofline_pct"), t.get("roofline_frames_per_s")))
    c = phases.get("code2wav")
    if c:
        rows.append(("code2wav RTF", c["ours_rtf"], c["theirs_rtf"], c["ratio"], c.get("ours_roofline_pct"),
                     c.get("roofline_rtf")))
    e = phases.get("e2e")
    if e:
        rows.append(("e2e first audio s", e["ours_time_to_first_audio_s"], e["theirs_time_to_first_audio_s"],
                     e["first_audio_ratio"], None, None))
        rows.append(("e2e total RTF", e["ours_rtf"], e["theirs_rtf"], e["ratio"], None, None))
    return rows


def print_table(title: str, phases: dict) -> None:
    print(f"\n{title}")
    head = ("phase", "ours", "theirs", "ratio", "roofline %", "target")
    print(f"{head[0]:<22}{head[1]:>12}{head[2]:>12}{head[3]:>9}{head[4]:>12}{head[5]:>12}")
    for name, ours, theirs, ratio, pct, target in table_rows(phases):
        print(f"{name:<22}{_fmt(ours):>12}{_fmt(theirs):>12}{_fmt(ratio):>9}{_fmt(pct):>12}{_fmt(target):>12}")
    compile_s = {k: v.get("compile_s") for k, v in phases.items() if isinstance(v, dict) and "compile_s" in v}
    for k, v in phases.get("decode", {}).items():
        if k.startswith("batch"):
            compile_s[f"decode {k}"] = v.get("compile_s")
    if compile_s:
        print("our compile s: " + ", ".join(f"{k} {_fmt(v)}" for k, v in compile_s.items()))


# ---------------------------------------------------------------------------------------------- main


def _parse_what(what: str) -> list[str]:
    from omni_jax.errors import UsageError

    todo = list(PHASES) if what == "all" else [w.strip() for w in what.split(",") if w.strip()]
    bad = [w for w in todo if w not in PHASES]
    if bad or not todo:
        raise UsageError(f"--what={what!r}: unknown phase(s) {bad}; choose 'all' or from {', '.join(PHASES)}")
    return todo


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
    if FLAGS.repeats < 1 or FLAGS.decode_tokens < 1 or FLAGS.prompt_len < 1 or any(b < 1 for b in batch_sizes):
        raise UsageError("--repeats, --decode_tokens, --prompt_len and --batch_sizes must be >= 1")
    name, cfg_path = _resolve_config(FLAGS.config)
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
                                               "e2e_frames", "stream_chunk", "max_len", "bf16_too", "copy_mib",
                                               "matmul_n")},
        "definitions": DEFINITIONS, "memory": {"rss_start_mib": _rss_mib()},
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
        from omni_jax import hf_reference

        hf = hf_reference.load_hf_model(hf_dir)
        gc.collect()
        report["memory"]["rss_after_hf_load_mib"] = _rss_mib()
        report["memory"]["hf_params_bytes"] = sum(p.numel() * p.element_size() for p in hf.parameters())
    pipe = load_ours(ckpt_dir, FLAGS.dtype, FLAGS.max_len)
    gc.collect()
    report["memory"]["rss_after_ours_load_mib"] = _rss_mib()
    report["memory"]["ours_params_bytes"] = _params_bytes(pipe.params)
    report["params"] = _params_bytes(pipe.params) // (4 if FLAGS.dtype == "float32" else 2)

    compile_timer = CompileTimer()
    eos = (pipe.config.im_end_token_id,)  # transformers' generate default thinker_eos_token_id (<|im_end|>)
    common = dict(cfg=pipe.config, machine=machine, compile_timer=compile_timer, repeats=FLAGS.repeats,
                  seed=FLAGS.seed, prompt_len=FLAGS.prompt_len, decode_prompt_len=FLAGS.decode_prompt_len,
                  decode_tokens=FLAGS.decode_tokens, batch_sizes=batch_sizes, talker_frames=FLAGS.talker_frames,
                  code2wav_seconds=FLAGS.code2wav_seconds, e2e_tokens=FLAGS.e2e_tokens, e2e_frames=FLAGS.e2e_frames,
                  stream_chunk=FLAGS.stream_chunk, eos=eos, prompt_ids=pipe.encode(FLAGS.prompt))
    ctx = Ctx(pipe=pipe, hf=hf, dtype_bytes=4 if FLAGS.dtype == "float32" else 2, **common)
    report["phases"] = run_phases(ctx, todo)
    print_table(f"omni_jax ({FLAGS.dtype}) vs transformers (float32, CPU) -- config {name}, medians of "
                f"{FLAGS.repeats}; ratio > 1: ours faster; target = roofline figure", report["phases"])

    if FLAGS.bf16_too and FLAGS.dtype != "bfloat16":
        del ctx, pipe, hf
        gc.collect()
        pipe = load_ours(ckpt_dir, "bfloat16", FLAGS.max_len)
        gc.collect()
        report["memory"]["rss_after_ours_bf16_load_mib"] = _rss_mib()
        ctx = Ctx(pipe=pipe, hf=None, dtype_bytes=2, **common)
        report["bf16"] = run_phases(ctx, todo)
        print_table("omni_jax bfloat16 (ours only)", report["bf16"])
    report["memory"]["peak_rss_mib"] = _peak_rss_mib()
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
    if _cli is not None:
        _cli.run(main)
    else:  # pragma: no cover
        app.run(main)
