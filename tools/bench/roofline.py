"""What the machine can do and what a step must do: measured bandwidth and matmul rate, analytic
weight bytes / FLOPs per step, and the experts transformers actually routes (router hooks)."""

from __future__ import annotations

import functools
import gc
import statistics
import time


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


def union_list(t, measured: list[float] | None, rows: int) -> tuple[list[float], str]:
    """Per-layer routed-expert counts, padded to all layers (dense layers get 0 and ignore it)."""
    if measured is not None:
        it = iter(measured)
        return [next(it) if (t.num_experts and t.is_sparse(i)) else 0.0 for i in range(t.num_hidden_layers)], \
            "counted (transformers routers)"
    k = t.num_experts_per_tok
    how = "exact (top-k, one row)" if rows == 1 else "estimate (uniform routing)"
    return [expected_union(t.num_experts, k, rows) for _ in range(t.num_hidden_layers)], how
