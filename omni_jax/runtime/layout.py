"""The layout step: which parameter layout and MoE dispatch a run uses, chosen once at load time.

Model modules run whatever layout their params have (omni_jax.nn.decoder, omni_jax.nn.moe); this is
the one place that decides it, keyed by backend and mesh:

  * one CPU device: unrolled layers with [out, in] kernels, experts split into their own arrays and
    the code predictor's heads split (`unrolled`). XLA:CPU copies every slice of a stacked weight
    before a matmul, so the checkpoint's stacked layout reads each weight twice per step; measured
    in one process on the bench checkpoint: split experts 1.23x (prefill), 1.17x / 1.25x (decode
    batch 1 / 8) over the stacked loop; [out, in] kernels and split heads 5.05 -> 6.34 talker frames/s.
    Code2Wav's pre-transformer is unstacked too: a streamed 1-frame vocoder step 182 -> 134 ms.
  * a mesh, or an accelerator: the checkpoint's scanned, stacked layout (compile time flat in depth,
    expert-parallel shard_map), with the gather dispatch for decode and ragged_dot for prefill; on
    CPU meshes the grouped loop (XLA:CPU lowers ragged_dot densely).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from omni_jax.config import OmniConfig
from omni_jax.models import registry
from omni_jax.nn.moe import DISPATCH, Dispatch

#: moe_impl values a user may force (launch/plan.py --moe_impl, OmniPipeline(moe_impl=...)).
MOE_IMPLS = ("auto", "split") + tuple(sorted(DISPATCH))


@dataclasses.dataclass(frozen=True)
class Layout:
    unrolled: bool  # layers unstacked with [out, in] kernels (and split code-predictor heads)
    split_experts: bool  # experts in their own arrays (only with unrolled layers)
    dispatch: Dispatch  # for stacked experts

    def prepare(self, config: OmniConfig, params: dict, consume: bool = False) -> dict:
        """{root: params} from the checkpoint layout into this one. consume: convert in place, segment by
        segment, so the peak is one segment above the params (nothing else may hold them)."""
        if not self.unrolled:
            return params
        return registry.unroll(config, params, self.split_experts, consume)


def choose(mesh: Any = None, moe_impl: str = "auto", backend: str | None = None) -> Layout:
    """The layout for this backend and mesh (module docstring); moe_impl forces a dispatch ("split": split
    experts, needs one device)."""
    if moe_impl not in MOE_IMPLS:
        raise ValueError(f"unknown moe_impl {moe_impl!r}; choose from {MOE_IMPLS}")
    backend = backend or jax.default_backend()
    single = mesh is None  # a mesh, even of one device, keeps the sharded (scanned) program
    if moe_impl == "split" and not (single and backend == "cpu"):
        raise ValueError("moe_impl='split' runs unrolled layers on a single CPU device only")
    if moe_impl not in ("auto", "split"):
        forced = Dispatch.always(moe_impl)
        return Layout(unrolled=single and backend == "cpu", split_experts=False, dispatch=forced)
    if backend == "cpu":
        return Layout(unrolled=single, split_experts=single, dispatch=Dispatch.always("grouped"))
    return Layout(unrolled=False, split_experts=False, dispatch=Dispatch())
