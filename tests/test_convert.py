"""HF safetensors -> Orbax conversion and loading: exact values, sharded/bf16 inputs, real-checkpoint name
coverage, failure modes (unknown keys, overwrite, interrupted writes) and sharded restores."""

import copy
import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch

from omni_jax import checkpoint, load_config, parse_config
from omni_jax.checkpoint import convert
from omni_jax.checkpoint.safetensors import index_checkpoint, read_header, write_safetensors
from omni_jax.models import registry
from omni_jax.models.thinker import Thinker
from omni_jax.nn.kv_cache import KVCache

from tests import procs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = os.path.join(ROOT, "tools", "data", "qwen3_omni_weight_manifest.tsv.gz")
REAL_CONFIG = os.path.join(ROOT, "configs", "qwen3_omni_30b_a3b_instruct.json")


def _torch_tensors(hf_dir):
    """Reference reader independent of ours: safetensors' torch backend, cast to fp32 numpy."""
    from safetensors import safe_open

    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(hf_dir, name), "pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key).float().numpy()


@pytest.fixture(scope="module")
def converted(hf_checkpoints, tmp_path_factory):
    """{case: (hf_model, hf_dir, out_dir)}: fp32 single file, fp32 sharded (many shards), bf16 source."""
    out = {}
    model, hf_dir, _ = hf_checkpoints["base"]
    out["single_f32"] = (model, hf_dir, "float32")
    model, _, _ = hf_checkpoints["gqa1_noNorm_mlponly"]
    sharded = str(tmp_path_factory.mktemp("hf_sharded"))
    model.save_pretrained(sharded, max_shard_size="200KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    out["sharded_f32"] = (model, sharded, "float32")
    model, _, _ = hf_checkpoints["mha_hd8_sparse2"]
    bf16 = str(tmp_path_factory.mktemp("hf_bf16"))
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    model_bf16.save_pretrained(bf16)
    out["bf16"] = (model_bf16, bf16, "bfloat16")
    result = {}
    for case, (model, hf_dir, dtype) in out.items():
        ckpt = str(tmp_path_factory.mktemp(f"ckpt_{case}")) + "/out"
        convert.convert_checkpoint(hf_dir, ckpt, dtype, progress=False)
        result[case] = (model, hf_dir, ckpt)
    return result


def test_safetensors_reader_dtypes(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(4, 2, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "i64": torch.arange(7, dtype=torch.int64) - 3,
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, str(tmp_path / "a.safetensors"))
    infos = index_checkpoint(str(tmp_path))
    assert {k: i.dtype for k, i in infos.items()} == {"f32": "F32", "f16": "F16", "bf16": "BF16", "i64": "I64",
                                                      "i32": "I32", "empty": "F32"}
    for k, t in tensors.items():
        ours = infos[k].load()
        assert ours.shape == tuple(t.shape)
        np.testing.assert_array_equal(np.asarray(ours, np.float64), t.double().numpy())  # exact: same bits
    # Our writer round-trips through the reference reader (bf16 included).
    write_safetensors(str(tmp_path / "b.safetensors"), {k: np.asarray(infos[k].load()) for k in infos})
    from safetensors.torch import load_file

    back = load_file(str(tmp_path / "b.safetensors"))
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="bad.safetensors"):
        read_header(str(tmp_path / "bad.safetensors"))


@pytest.mark.parametrize("case", ["single_f32", "sharded_f32", "bf16"])
def test_converted_checkpoint_equals_in_memory_conversion(converted, case):
    model, hf_dir, ckpt = converted[case]
    config = load_config(hf_dir)
    params = checkpoint.load_params(ckpt)  # all of thinker, audio tower, talker, code2wav (config speaks)
    assert set(params) == set(registry.default_roots(config)) == {"thinker", "audio_tower", "visual", "talker",
                                                                  "code2wav"}
    tensors = [(k, v) for k, v in _torch_tensors(hf_dir) if registry.owner(k).built]
    ref = convert.convert_tensors(tensors, registry.abstract_params(config), registry.hf_rules(config))
    flat_ref, flat = checkpoint.flatten(ref), checkpoint.flatten(params)
    assert flat.keys() == flat_ref.keys()
    for path, want in flat_ref.items():
        got = flat[path]
        assert got.dtype == jnp.float32 and got.shape == want.shape, path
        # Exact: both sides apply the same transforms to the same values; a bf16 source stays bf16 on disk.
        np.testing.assert_array_equal(np.asarray(got), want, err_msg="/".join(path))
    layout = json.load(open(os.path.join(ckpt, checkpoint.LAYOUT_FILE)))
    stacked = [k for k, v in layout["leaves"].items() if "slices" in v]
    assert stacked and all(k.split("/")[0] in {"thinker", "talker", "code2wav"} for k in stacked)
    assert layout["skipped"] == {}  # every component is built, the vision tower included
    assert os.path.exists(os.path.join(ckpt, "config.json"))


def test_loaded_thinker_logits_match_transformers(converted):
    hf_model, hf_dir, ckpt = converted["single_f32"]
    config = load_config(ckpt)
    params = checkpoint.load_params(ckpt, roots=("thinker",))
    B, T = 2, 9
    tokens = np.random.default_rng(0).integers(0, config.thinker.text.vocab_size, (B, T))
    pos = np.stack([np.arange(T) * s + o for s, o in ((1, 0), (2, 1), (3, 2))])[:, None, :].repeat(B, 1)
    with torch.no_grad():
        out = hf_model.thinker.model(input_ids=torch.tensor(tokens), position_ids=torch.tensor(pos), use_cache=False)
        hf_logits = hf_model.thinker.lm_head(out.last_hidden_state).numpy()
    ours = jax.jit(Thinker(config).apply)(
        {"params": params["thinker"]}, jnp.asarray(tokens), jnp.asarray(pos), KVCache.create(config.thinker.text, B, T),
        jnp.zeros((B,), jnp.int32)
    )
    rel = float(np.max(np.abs(np.asarray(ours.logits) - hf_logits)) / np.max(np.abs(hf_logits)))
    print("thinker logits rel err", rel)
    assert rel <= 1e-4, rel  # fp32 both sides: summation order only (test_thinker_parity measures ~4e-7)


def test_save_params_round_trip_and_part_checks(converted, tmp_path):
    _, _, ckpt = converted["bf16"]
    config = load_config(ckpt)
    params = checkpoint.load_params(ckpt, roots=("thinker",), dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    out = str(tmp_path / "saved")
    checkpoint.save_params(params, out, config)
    again = checkpoint.load_params(out, roots=("thinker",), dtype=jnp.bfloat16)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)), params, again)
    # A checkpoint without the talker cannot serve a model that speaks: the error names the part.
    with pytest.raises(checkpoint.CheckpointError, match="no params for 'talker'"):
        checkpoint.load_params(out)
    # A config whose shapes differ is rejected with the leaf named.
    other = parse_config({**config.raw, "thinker_config": {**config.raw["thinker_config"], "text_config": {
        **config.raw["thinker_config"]["text_config"], "vocab_size": 2048}}})
    with pytest.raises(checkpoint.CheckpointError, match="embed_tokens"):
        checkpoint.load_params(out, config=other, roots=("thinker",))


def _manifest():
    with gzip.open(MANIFEST, "rt") as f:
        header, *rows = [line.rstrip("\n").split("\t") for line in f]
    assert header == ["name", "shape"]
    return [(k, tuple(int(x) for x in s.strip("[]").split(","))) for k, s in rows]


@pytest.mark.parametrize("root", registry.built_names())
def test_real_checkpoint_manifest_maps_exactly_onto_real_model(root):
    """All 28,010 real tensor names: each maps to a param slice of the right shape, and every element of every
    param is written exactly once. jax.eval_shape only."""
    entries = _manifest()
    assert len(entries) == 28010
    config = load_config(REAL_CONFIG)
    leaf_shapes = {p: s.shape for p, s in checkpoint.flatten(registry.abstract_params(config, roots=(root,))).items()}
    mine = [(k, s) for k, s in entries if registry.owner(k).name == root]  # the towers' keys sit under "thinker."
    plan = convert.plan_conversion(mine, leaf_shapes, registry.hf_rules(config, (root,)), (root,))
    # Independent exact-cover check on top of plan_conversion's own: right slice shapes, distinct slots,
    # and element counts that add up to every leaf's size.
    slots = {(kp.path, kp.index) for kp in plan.keys}
    assert len(slots) == len(plan.keys)
    for kp in plan.keys:
        assert kp.slice_shape == tuple(leaf_shapes[kp.path][len(kp.index):]), kp.key
    written: dict = {}
    for kp in plan.keys:
        written[kp.path] = written.get(kp.path, 0) + int(np.prod(kp.slice_shape))
    assert written == {p: int(np.prod(s)) for p, s in leaf_shapes.items()}
    skipped = sum(plan.skipped.values())
    assert len(plan.keys) + skipped == len(mine)
    assert skipped == 0
    if root in ("audio_tower", "visual"):
        assert len(mine) == {"audio_tower": 525, "visual": 351}[root]
        assert sum(int(np.prod(s)) for s in leaf_shapes.values()) == {"audio_tower": 647_927_168,
                                                                       "visual": 538_631_408}[root]
    # Streaming layout: one item per HF decoder layer of a stacked layer tree, plus one for the component's other
    # params. The towers' layers are unrolled leaves: one item each (1.3 / 1.1 GB in bf16, a thinker layer's size).
    _, items = convert.assign_items(plan, leaf_shapes)
    layers = {"thinker": 48, "audio_tower": 0, "visual": 0, "talker": 20 + 5, "code2wav": 8}[root]
    assert len(items) == layers + 1, sorted(items)[:5]


def _write_with_extra_key(src_dir, dst_dir, key):
    os.makedirs(dst_dir)
    for f in os.listdir(src_dir):
        os.symlink(os.path.join(src_dir, f), os.path.join(dst_dir, f))
    write_safetensors(os.path.join(dst_dir, "extra.safetensors"), {key: np.zeros((4, 4), np.float32)})


def test_unknown_key_is_an_error(hf_checkpoints, tmp_path):
    _, hf_dir, _ = hf_checkpoints["base"]
    bad = str(tmp_path / "hf_bad")
    _write_with_extra_key(hf_dir, bad, "thinker.model.layers.0.mlp.bogus_proj.weight")
    out = str(tmp_path / "out")
    with pytest.raises(convert.UnknownKeyError, match="thinker.model.layers.0.mlp.bogus_proj.weight"):
        convert.convert_checkpoint(bad, out, "float32", progress=False)
    assert not os.path.exists(out) and not os.path.exists(checkpoint.partial_dir(out))


def test_overwrite_refusal(converted, tmp_path):
    _, hf_dir, _ = converted["bf16"]
    out = str(tmp_path / "ckpt")
    convert.convert_checkpoint(hf_dir, out, "bfloat16", progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        convert.convert_checkpoint(hf_dir, out, "bfloat16", progress=False)
    convert.convert_checkpoint(hf_dir, out, "float32", overwrite=True, progress=False)
    assert json.load(open(os.path.join(out, checkpoint.LAYOUT_FILE)))["dtype"] == "float32"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no .partial / .old left behind
    other = tmp_path / "not_a_checkpoint"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an omni_jax checkpoint"):
        convert.convert_checkpoint(hf_dir, str(other), overwrite=True, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"


def test_interrupted_conversion_is_not_loadable(converted, tmp_path, monkeypatch):
    _, hf_dir, done = converted["bf16"]
    out = str(tmp_path / "ckpt")
    calls = []

    def failing_save(self, path, tree):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real_save(self, path, tree)

    from omni_jax.checkpoint import layout

    real_save = layout.ItemWriter.save
    monkeypatch.setattr(layout.ItemWriter, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        convert.convert_checkpoint(hf_dir, out, "bfloat16", progress=False)
    monkeypatch.undo()
    assert not os.path.exists(out)
    with pytest.raises(FileNotFoundError):
        checkpoint.load_params(out)
    # A killed run leaves <out>.partial without the marker (or with an item missing): never loadable.
    killed = checkpoint.partial_dir(out)
    shutil.copytree(done, killed)
    os.remove(os.path.join(killed, checkpoint.LAYOUT_FILE))
    with pytest.raises(checkpoint.IncompleteCheckpointError, match="did not finish"):
        checkpoint.load_params(killed)
    lost_item = str(tmp_path / "lost_item")
    shutil.copytree(done, lost_item)
    shutil.rmtree(os.path.join(lost_item, checkpoint.PARAMS_DIR, "thinker.model.layers.1"))
    with pytest.raises(checkpoint.IncompleteCheckpointError, match="thinker.model.layers.1"):
        checkpoint.load_params(lost_item)
    # The next conversion replaces the stale .partial and finishes.
    convert.convert_checkpoint(hf_dir, out, "bfloat16", progress=False)
    assert not os.path.exists(killed)
    assert checkpoint.read_layout(out)["dtype"] == "bfloat16"


_SHARDED_LOAD = textwrap.dedent("""
    import os, sys
    import jax, numpy as np, flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P
    from omni_jax import checkpoint, load_config
    ckpt = sys.argv[1]
    config = load_config(ckpt)
    mesh = jax.make_mesh((1, 2, 2), ("data", "expert", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = {"experts": "expert", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "expert_mlp": "tensor",
             "vocab": "tensor"}
    def spec(box):
        if not isinstance(box, nn.Partitioned):
            return NamedSharding(mesh, P())
        used, out = set(), []
        for name, n in zip(box.names, box.value.shape):
            axis = rules.get(name)
            ok = axis is not None and axis not in used and n % mesh.shape[axis] == 0
            out.append(axis if ok else None)
            used.add(axis) if ok else None
        return NamedSharding(mesh, P(*out))
    from omni_jax.models import registry
    boxed = registry.boxed_abstract_params(config, roots=("thinker",))
    shardings = jax.tree.map(spec, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    sharded = checkpoint.load_params(ckpt, shardings=shardings, roots=("thinker",))
    plain = checkpoint.load_params(ckpt, roots=("thinker",))
    n_split = 0
    for path, x in checkpoint.flatten(sharded).items():
        want = checkpoint.flatten(shardings)[path]
        assert x.sharding.is_equivalent_to(want, x.ndim), (path, x.sharding, want)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(checkpoint.flatten(plain)[path]))
        n_split += x.addressable_shards[0].data.size < x.size
    gp = sharded["thinker"]["layers"]["layers_0"]["mlp"]["gate_proj"]
    assert gp.addressable_shards[0].data.shape == (gp.shape[0], gp.shape[1] // 2, gp.shape[2], gp.shape[3] // 2)
    print("OK", n_split)
""")


def test_sharded_restore_on_four_devices(converted):
    """Restore straight into NamedShardings over a (1, 2, 2) CPU mesh; values equal the unsharded load."""
    _, _, ckpt = converted["sharded_f32"]
    proc = subprocess.run([sys.executable, "-c", _SHARDED_LOAD, ckpt], capture_output=True, text=True,
                          env=procs.env(devices=4), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ok = [line for line in proc.stdout.splitlines() if line.startswith("OK")]
    assert ok and int(ok[0].split()[1]) > 10, proc.stdout[-2000:]  # many leaves really split across devices
