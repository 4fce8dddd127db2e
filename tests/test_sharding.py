"""Sharding: mesh specs, the rules table, expert-parallel MoE parity and HLO, multi-process runs.

Multi-device checks run tests/sharding_worker.py in subprocesses (XLA_FLAGS must be set before
jax loads): one process with 32 simulated CPU devices for the meshes, two processes with 4
devices each for the multi-host check. The tiny config has 8 experts, 4 heads and 2 KV heads,
so tp4 exercises the replicate-what-does-not-divide fallback on KV heads / cache. The engine's
loop and the talker under the same meshes are compared with transformers end to end in
tests/test_mesh_pipeline.py.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jax.sharding import AbstractMesh, PartitionSpec as P

from omni_jax import load_config
from omni_jax.sharding import rules as sharding
from omni_jax.sharding.mesh import MeshSpecError, parse_mesh_spec

from tests import procs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("tp4ep8", "ep8", "tp2ep2")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


# ----------------------------------------------------------------------------- mesh specs


@pytest.mark.parametrize(
    "spec,n,want",
    [
        ("tp4ep8", 32, (1, 8, 4)),
        ("ep8", 8, (1, 8, 1)),
        ("dp2tp4", 8, (2, 1, 4)),
        ("tp1", 1, (1, 1, 1)),
        ("EP2TP2", 4, (1, 2, 2)),
        ("dp2ep2tp2", 8, (2, 2, 2)),
    ],
)
def test_parse_mesh_spec(spec, n, want):
    got = parse_mesh_spec(spec, n)
    assert (got["data"], got["expert"], got["tensor"]) == want


def test_parse_mesh_spec_auto():
    assert parse_mesh_spec("auto", 8, num_experts=128) == {"data": 1, "expert": 8, "tensor": 1}
    # 12 devices, 8 experts: the expert axis takes gcd(12, 8) = 4, the rest goes to tensor.
    assert parse_mesh_spec("auto", 12, num_experts=8) == {"data": 1, "expert": 4, "tensor": 3}
    assert parse_mesh_spec("auto", 4) == {"data": 1, "expert": 4, "tensor": 1}


@pytest.mark.parametrize("spec", ["", "tp", "tp4x", "pp2", "tp4tp2", "tp0", "4tp", "tp4 ep2"])
def test_parse_mesh_spec_rejects(spec):
    with pytest.raises(MeshSpecError):
        parse_mesh_spec(spec, 4)


def test_mesh_spec_device_count_error():
    with pytest.raises(MeshSpecError, match=r"needs 32 devices .* jax sees 8 device\(s\)"):
        parse_mesh_spec("tp4ep8", 8)


# ----------------------------------------------------------------------------- rules table


def test_logical_spec_rules_and_fallback(caplog):
    mesh = AbstractMesh((1, 8, 4), ("data", "expert", "tensor"))
    cfg = load_config("tiny").thinker.text
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert sharding.logical_spec(("layers", "experts", "embed", "expert_mlp"), (4, e, h, i), mesh) == P(
        None, "expert", None, "tensor"
    )
    # Size-1 mesh axes are dropped: batch -> data (size 1) is simply replicated.
    assert sharding.logical_spec(("batch", "length", "vocab"), (2, 5, 152064), mesh) == P(None, None, "tensor")
    caplog.set_level(logging.WARNING)
    axes, shape = ("layers", "embed", "kv_heads", "head_dim"), (4, h, 2, cfg.head_dim)
    for _ in range(3):  # 2 KV heads under tp4: replicated, logged once per (name, dim)
        assert sharding.logical_spec(axes, shape, mesh, name="test/k_proj") == P(None, None, None, None)
    hits = [r for r in caplog.records if "test/k_proj dim 2" in r.getMessage()]
    assert len(hits) == 1 and "replicating" in hits[0].getMessage()


def test_param_logical_axes_cover_every_thinker_param():
    """Every param leaf is boxed with logical axes, so the rules table decides every layout."""
    from omni_jax.models import registry

    axes = sharding.logical_axes(registry.boxed_abstract_params(load_config("tiny")))
    leaves, _ = __import__("jax").tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: x is None or isinstance(x, tuple))
    missing = [p for p, a in leaves if a is None]
    assert not missing, missing


# ----------------------------------------------------------------------------- multi-device runs


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sharding_meshes"))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sharding_worker", "meshes", out], cwd=ROOT, env=procs.env(),
        capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(os.path.join(out, "report.json")) as f:
        return out, json.load(f)


@pytest.mark.heavy
@pytest.mark.parametrize("spec", MESHES)
def test_thinker_sharded_matches_single_device(mesh_run, spec):
    out, report = mesh_run
    assert report["devices"] == 32
    ref = np.load(os.path.join(out, "thinker_single.npz"))
    got = np.load(os.path.join(out, f"thinker_{spec}.npz"))
    # fp32: only the summation order of the sharded matmuls / psums differs.
    assert _rel(got["logits"], ref["logits"]) <= 1e-4, (spec, _rel(got["logits"], ref["logits"]))
    np.testing.assert_array_equal(got["tokens"], ref["tokens"])


def _expert_weight_like(shape, tp: int) -> bool:
    """A tensor holding expert weights has the hidden dim and the (possibly tp-split) expert FFN dim.

    The tiny test shapes keep these distinct from activations: tokens are 10 (prefill) or 2 (decode).
    """
    cfg = load_config("tiny").thinker.text
    dims = [d for d in shape if d != 1]
    return cfg.hidden_size in dims and (cfg.moe_intermediate_size in dims or cfg.moe_intermediate_size // tp in dims)


def _shapes(ops):
    import re

    return [tuple(int(x) for x in re.findall(r"\d+", s.split("[", 1)[1])) for s in ops]


@pytest.mark.heavy
def test_no_allgather_of_expert_weights(mesh_run):
    _, report = mesh_run
    moe = report["moe"]
    # The detector does see a real expert-weight all-gather (control: sharded weights forced replicated).
    control = [c for c in moe["control_allgather"] if c["op"] == "all-gather"]
    assert control and any(_expert_weight_like(s, 4) for c in control for s in _shapes(c["operands"]))
    # Expert weights stay sharded over (expert, tensor) ...
    for name, spec in report["moe_param_specs"].items():
        if not name.endswith("router"):
            assert "'expert'" in spec and "'tensor'" in spec, (name, spec)
    # ... and no compiled program (one MoE layer per dispatch, the full decode step) all-gathers them.
    programs = {f"moe_{k}": v for k, v in moe.items() if k in ("gather", "grouped", "dense", "ragged")}
    programs["thinker_decode"] = report["thinker_decode_collectives"]
    for name, colls in programs.items():
        assert colls, f"{name}: expected the expert/tensor psum in the HLO"
        for c in colls:
            if c["op"] in ("all-gather", "all-to-all", "collective-permute"):
                bad = [s for s in _shapes(c["operands"]) if _expert_weight_like(s, 4)]
                assert not bad, f"{name}: {c['op']} of expert-weight-shaped operands {bad}"
    # The MoE layer's only collective is one all-reduce of the [tokens, hidden] partial sums.
    for impl in ("gather", "grouped", "dense", "ragged"):
        assert [(c["op"], c["operands"]) for c in moe[impl]] == [("all-reduce", ["f32[10,64]"])], moe[impl]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.heavy
def test_two_processes_match_one(mesh_run, tmp_path):
    out, _ = mesh_run
    port = _free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.sharding_worker", "multiprocess", str(tmp_path), str(i), "2", str(port), "tp2ep4"],
            cwd=ROOT, env=procs.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in workers:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in workers:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in workers), "\n".join(log[-3000:] for log in logs)
    with open(tmp_path / "multiprocess.json") as f:
        got = json.load(f)
    assert got["process_count"] == 2 and got["devices"] == 8
    ref = np.load(os.path.join(out, "thinker_single.npz"))["tokens"]
    np.testing.assert_array_equal(np.asarray(got["tokens"]), ref)
