"""Broken checkpoints fail with a clear message and the right exit code, through the real launchers.

Contract (omni_jax.errors / omni_jax.cli): a missing input dir or an existing output is a usage error
(exit 2); corrupt, truncated or mismatched content is exit 1. Either way stderr holds one
`error: ...` line naming what is wrong, where and how to fix it, never a traceback, and nothing is
written at the output path. The conversion is atomic: a SIGKILL at any point leaves nothing that
loads at --out_dir (an overwrite that is killed leaves the old checkpoint intact), and a rerun completes.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import orbax.checkpoint as ocp

from omni_jax import checkpoint
from omni_jax.checkpoint import convert
from omni_jax.checkpoint import layout as checkpoint_layout
from omni_jax.errors import CheckpointError, CheckpointNotFoundError, UsageError
from omni_jax.checkpoint.safetensors import INDEX_NAME, SafetensorsError, read_header, write_safetensors

from tests import launcher_cases, procs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, "launch", "convert.py")
INFER = os.path.join(ROOT, "launch", "infer.py")
ENV = procs.env()


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=ENV, timeout=300)


def _assert_fails(res: dict, code: int, fragments: tuple[str, ...], output: str) -> None:
    """res: one launcher run's {"returncode", "stderr", ...} (tests.launcher_cases)."""
    err = res["stderr"]
    assert res["returncode"] == code, f"exit {res['returncode']}, want {code}; stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines, err[-3000:]
    for frag in fragments:
        assert frag in err, f"{frag!r} not in stderr:\n{err[-3000:]}"
    assert not os.path.exists(output), f"{output} was written"
    assert not os.path.exists(checkpoint.partial_dir(output)), f"{checkpoint.partial_dir(output)} left behind"


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def hf_base(hf_checkpoints):
    model, hf_dir, _ = hf_checkpoints["base"]
    return model, hf_dir


@pytest.fixture(scope="module")
def hf_sharded(hf_base, tmp_path_factory):
    """The base model as a few shards + model.safetensors.index.json (what real downloads look like)."""
    model, _ = hf_base
    d = str(tmp_path_factory.mktemp("hf_sharded"))
    model.save_pretrained(d, max_shard_size="5MB")
    assert os.path.exists(os.path.join(d, INDEX_NAME))
    return d


@pytest.fixture(scope="module")
def reference_ckpt(hf_base, tmp_path_factory):
    """An uninterrupted in-process float32 conversion of the base model."""
    out = str(tmp_path_factory.mktemp("ref")) + "/ckpt"
    convert.convert_checkpoint(hf_base[1], out, "float32", progress=False)
    return out


def _linked_copy(src: str, dst: str, copy: tuple[str, ...] = ()) -> str:
    """dst with symlinks to src's files, except `copy` (real copies, to be modified)."""
    os.makedirs(dst)
    for f in os.listdir(src):
        if f in copy:
            shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
        else:
            os.symlink(os.path.join(src, f), os.path.join(dst, f))
    return dst


def _index(d: str) -> dict:
    with open(os.path.join(d, INDEX_NAME)) as f:
        return json.load(f)


def _edit_json(path: str, edit) -> None:
    with open(path) as f:
        doc = json.load(f)
    edit(doc)
    if os.path.islink(path):
        os.remove(path)
    with open(path, "w") as f:
        json.dump(doc, f)


def _thinker_text(doc: dict) -> dict:
    return doc["thinker_config"]["text_config"]


# ---------------------------------------------------------------------------- broken HF checkpoints

def _missing_dir(sharded, tmp):
    return str(tmp / "no_such_dir")


def _missing_shard(sharded, tmp):
    d = _linked_copy(sharded, str(tmp / "hf"))
    victim = sorted(set(_index(d)["weight_map"].values()))[1]
    os.remove(os.path.join(d, victim))
    return d


def _truncated_shard(sharded, tmp):
    victim = sorted(set(_index(sharded)["weight_map"].values()))[-1]
    d = _linked_copy(sharded, str(tmp / "hf"), copy=(victim,))
    path = os.path.join(d, victim)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    return d


def _index_names_missing_tensor(sharded, tmp):
    d = _linked_copy(sharded, str(tmp / "hf"), copy=(INDEX_NAME,))
    shards = sorted(set(_index(d)["weight_map"].values()))

    def edit(doc):  # point one tensor at a shard that does not hold it
        key = next(k for k, f in doc["weight_map"].items() if k.startswith("thinker.model.layers.") and f != shards[0])
        doc["weight_map"][key] = shards[0]

    _edit_json(os.path.join(d, INDEX_NAME), edit)
    return d


def _config_moe_size_edited(sharded, tmp):
    d = _linked_copy(sharded, str(tmp / "hf"), copy=("config.json",))
    _edit_json(os.path.join(d, "config.json"), lambda doc: _thinker_text(doc).update(moe_intermediate_size=48))
    return d


def _config_num_experts_edited(sharded, tmp):
    d = _linked_copy(sharded, str(tmp / "hf"), copy=("config.json",))
    _edit_json(os.path.join(d, "config.json"), lambda doc: _thinker_text(doc).update(num_experts=16))
    return d


def _int_tensor(sharded, tmp):
    """One shard rewritten with a norm weight stored as int32 (same shape)."""
    wm = _index(sharded)["weight_map"]
    key = "thinker.model.layers.1.input_layernorm.weight"
    shard = wm[key]
    d = _linked_copy(sharded, str(tmp / "hf"), copy=())
    os.remove(os.path.join(d, shard))
    infos = read_header(os.path.join(sharded, shard))
    tensors = {k: np.asarray(i.load()) for k, i in infos.items()}
    tensors[key] = tensors[key].astype(np.int32)
    write_safetensors(os.path.join(d, shard), tensors)
    return d


HF_CASES = {
    # case: (make dir, exit code, stderr fragments)
    "missing_dir": (_missing_dir, 2, ("no_such_dir", "does not exist")),
    "missing_shard": (_missing_shard, 1, ("does not exist", "download the missing shard")),
    "truncated_shard": (_truncated_shard, 1, ("is truncated", "re-download")),
    "index_names_missing_tensor": (_index_names_missing_tensor, 1, ("does not hold it", "re-download")),
    # thinker expert gate_proj is [moe_intermediate, hidden] = [32, 64] in HF -> kernel slice (64, 32); the edited
    # config wants (64, 48): both shapes and the param are named.
    "config_shape_mismatch": (_config_moe_size_edited, 1, (
        "config.json", "thinker/layers/layers_0/mlp/gate_proj", "(64, 32)", "(64, 48)", "config.json that came with")),
    "config_num_experts_mismatch": (_config_num_experts_edited, 1, (
        "config.json", "not fully covered", "thinker/layers/layers_0/mlp/gate_proj")),
    "dtype_mismatch": (_int_tensor, 1, (
        "thinker.model.layers.1.input_layernorm.weight", "I32", "thinker/layers/layers_0/input_layernorm/scale[1]")),
}


def _broken_runs(script: str, cases: dict, source: str, work, argv) -> dict:
    """{case: (result, output path)}: each case's broken copy of `source` through `script`, all in one launcher
    process (tests.launcher_cases). argv(broken path, case dir) -> (launcher args, the path it must not write)."""
    jobs, outs = [], {}
    for case, (make, _, _) in sorted(cases.items()):
        tmp = work / case
        tmp.mkdir()
        args, outs[case] = argv(make(source, tmp), tmp)
        jobs.append({"args": args, "cwd": str(tmp)})
    results = launcher_cases.run_cases(script, jobs, str(work))
    return {case: (res, outs[case]) for case, res in zip(sorted(cases), results)}


@pytest.fixture(scope="module")
def convert_runs(hf_sharded, tmp_path_factory):
    """Every broken HF directory through launch/convert.py."""
    def argv(hf_dir, tmp):
        out = str(tmp / "out")
        return [f"--hf_dir={hf_dir}", f"--out_dir={out}", "--dtype=float32", "--noprogress"], out

    return _broken_runs(CONVERT, HF_CASES, hf_sharded, tmp_path_factory.mktemp("convert_cases"), argv)


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_convert_rejects_broken_hf_checkpoint(case, convert_runs):
    _, code, fragments = HF_CASES[case]
    res, out = convert_runs[case]
    print(f"{case}: exit {res['returncode']}:", res["stderr"][res["stderr"].find("error: "):][:400])
    _assert_fails(res, code, fragments, out)


def test_truncation_found_from_header_without_reading_data(hf_sharded, tmp_path, monkeypatch):
    """read_header decides 'truncated' from the header and the file size: the data are never read or mapped."""
    d = _truncated_shard(hf_sharded, tmp_path)
    victim = os.path.join(d, sorted(set(_index(d)["weight_map"].values()))[-1])
    reads: list[int] = []

    class CountingFile:
        def __init__(self, f):
            self._f = f

        def read(self, n=-1):
            reads.append(n)
            return self._f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    from omni_jax.checkpoint import safetensors as safetensors_io

    monkeypatch.setattr(safetensors_io, "open", lambda path, mode="r": CountingFile(open(path, mode)), raising=False)
    monkeypatch.setattr(np, "memmap", lambda *a, **k: pytest.fail("tensor data mapped"))
    with pytest.raises(SafetensorsError, match="is truncated"):
        read_header(victim)
    with open(victim, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    assert reads == [8, n]  # the length prefix and the JSON header, nothing else


# ---------------------------------------------------------------------------- broken omni_jax checkpoints

def _orbax_missing(ref, tmp):
    return str(tmp / "no_such_ckpt")


def _orbax_no_marker(ref, tmp):
    d = str(tmp / "ckpt")
    shutil.copytree(ref, d)
    os.remove(os.path.join(d, checkpoint.LAYOUT_FILE))
    return d


def _orbax_truncated_item(ref, tmp):
    d = str(tmp / "ckpt")
    shutil.copytree(ref, d)
    files = glob.glob(os.path.join(d, checkpoint.PARAMS_DIR, "thinker.model.layers.0", "**", "d", "*"), recursive=True)
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    return d


def _orbax_other_config(ref, tmp):
    d = str(tmp / "ckpt")
    shutil.copytree(ref, d)
    _edit_json(os.path.join(d, "config.json"), lambda doc: _thinker_text(doc).update(moe_intermediate_size=48))
    return d


ORBAX_CASES = {
    "missing_dir": (_orbax_missing, 2, ("no_such_ckpt",)),
    "partial_no_marker": (_orbax_no_marker, 1, (checkpoint.LAYOUT_FILE, "did not finish", "convert again")),
    "truncated_item": (_orbax_truncated_item, 1, ("thinker.model.layers.0", "corrupt", "--overwrite")),
    # gate_proj of the first scanned segment (2 layers, cut at the talker's accept_hidden_layer) is stored
    # [layers, experts, hidden, moe_intermediate] = (2, 8, 64, 32); the edited config wants (2, 8, 64, 48).
    "other_config": (_orbax_other_config, 1, (
        "different config", "thinker/layers/layers_0/mlp/gate_proj", "(2, 8, 64, 32)", "(2, 8, 64, 48)")),
}


@pytest.fixture(scope="module")
def infer_runs(reference_ckpt, tmp_path_factory):
    """Every broken omni_jax checkpoint through launch/infer.py."""
    def argv(ckpt, tmp):
        wav = str(tmp / "o.wav")
        return [f"--checkpoint={ckpt}", "--text_only", "--prompt=hi", f"--output={wav}"], wav

    return _broken_runs(INFER, ORBAX_CASES, reference_ckpt, tmp_path_factory.mktemp("infer_cases"), argv)


@pytest.mark.parametrize("case", sorted(ORBAX_CASES))
def test_infer_rejects_broken_omni_jax_checkpoint(case, infer_runs):
    _, code, fragments = ORBAX_CASES[case]
    res, wav = infer_runs[case]
    print(f"{case}: exit {res['returncode']}:", res["stderr"][res["stderr"].find("error: "):][:400])
    _assert_fails(res, code, fragments, wav)


def test_item_from_another_conversion_is_caught_before_restore(reference_ckpt, tmp_path):
    """An item whose stored arrays disagree with the layout (mixed conversions): named from Orbax metadata,
    before anything is allocated (Orbax itself would restore the on-disk shape whatever the target says)."""
    d = str(tmp_path / "ckpt")
    shutil.copytree(reference_ckpt, d)
    item = os.path.join(d, checkpoint.PARAMS_DIR, "thinker.model.layers.1")
    ckptr = ocp.StandardCheckpointer()
    tree = ckptr.restore(os.path.abspath(item))
    layer = tree["thinker"]["layers"]["layers_0"]
    layer["mlp"]["gate_proj"] = np.zeros((8, 64, 16), np.float32)  # the layout says (8, 64, 32)
    shutil.rmtree(item)
    ckptr.save(os.path.abspath(item), tree)
    ckptr.wait_until_finished()
    ckptr.close()
    with pytest.raises(CheckpointError, match=r"(?s)thinker.model.layers.1: param thinker/layers/layers_0/mlp/"
                                              r"gate_proj is stored as \(8, 64, 16\) float32.*says \(8, 64, 32\)"):
        checkpoint.load_params(d, roots=("thinker",))


# ---------------------------------------------------------------------------- SIGKILL and overwrite

def _convert_and_kill(hf_dir: str, out: str, *flags: str, min_items: int = 2) -> int:
    """Start launch/convert.py, SIGKILL it once `min_items` items exist in <out>.partial/params; its exit status."""
    params = os.path.join(checkpoint.partial_dir(out), checkpoint.PARAMS_DIR)
    with open(out + ".log", "w") as log:
        proc = subprocess.Popen([sys.executable, CONVERT, f"--hf_dir={hf_dir}", f"--out_dir={out}", "--noprogress",
                                 *flags], stdout=log, stderr=log, env=ENV)
        try:
            deadline = time.time() + 240
            while proc.poll() is None and time.time() < deadline:
                if os.path.isdir(params) and len(os.listdir(params)) >= min_items:
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
            return proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()


def _assert_same_params(a: str, b: str) -> None:
    pa, pb = checkpoint.flatten(checkpoint.load_params(a)), checkpoint.flatten(checkpoint.load_params(b))
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]), err_msg="/".join(k))  # exact: same source


def test_sigkill_mid_conversion_then_rerun(hf_base, reference_ckpt, tmp_path):
    hf_dir = hf_base[1]
    out = str(tmp_path / "ckpt")
    partial = checkpoint.partial_dir(out)
    rc = _convert_and_kill(hf_dir, out, "--dtype=float32")
    assert rc == -signal.SIGKILL, f"conversion finished before it could be killed (exit {rc})"
    n_items = len(os.listdir(os.path.join(partial, checkpoint.PARAMS_DIR)))
    print(f"killed with {n_items} item(s) in {partial}")
    # Nothing loads: out_dir was never created, and the .partial dir has no completion marker.
    assert not os.path.exists(out)
    with pytest.raises(CheckpointNotFoundError, match=r"\.partial exists: a conversion into it was interrupted"):
        checkpoint.load_params(out)
    with pytest.raises(checkpoint.IncompleteCheckpointError, match="interrupted conversion"):
        checkpoint.load_params(partial)
    # A rerun discards the stale .partial and completes; the result equals an uninterrupted conversion.
    proc = _run(CONVERT, f"--hf_dir={hf_dir}", f"--out_dir={out}", "--dtype=float32", "--noprogress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not os.path.exists(partial)
    _assert_same_params(out, reference_ckpt)

    # A complete output is refused without --overwrite (usage error) and left untouched.
    marker = os.path.join(out, checkpoint.LAYOUT_FILE)
    before = os.stat(marker).st_mtime_ns
    proc = _run(CONVERT, f"--hf_dir={hf_dir}", f"--out_dir={out}", "--dtype=bfloat16", "--noprogress")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert os.stat(marker).st_mtime_ns == before and not os.path.exists(partial)

    # An overwrite killed partway leaves the old checkpoint complete and loadable.
    rc = _convert_and_kill(hf_dir, out, "--dtype=bfloat16", "--overwrite")
    assert rc == -signal.SIGKILL, f"overwrite finished before it could be killed (exit {rc})"
    assert checkpoint.read_layout(out)["dtype"] == "float32"
    _assert_same_params(out, reference_ckpt)
    # ... and the next overwrite swaps the new one in, leaving no .partial / .old dirs behind.
    convert.convert_checkpoint(hf_dir, out, "bfloat16", overwrite=True, progress=False)
    assert checkpoint.read_layout(out)["dtype"] == "bfloat16"
    assert sorted(p for p in os.listdir(tmp_path) if not p.endswith(".log")) == ["ckpt"]
    params = checkpoint.load_params(out)
    ref = checkpoint.load_params(reference_ckpt)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(  # bf16 storage: the f32 values rounded to bf16
        np.asarray(a), np.asarray(b.astype(jax.numpy.bfloat16).astype(np.float32))), params, ref)


def test_partial_dir_of_a_live_conversion_is_not_clobbered(hf_base, tmp_path):
    """Only a .partial dir whose writer is dead is discarded; a live writer's (here: our parent's pid) is refused."""
    out = str(tmp_path / "ckpt")
    tmp = checkpoint.partial_dir(out)
    os.makedirs(tmp)
    owner = os.path.join(tmp, checkpoint_layout._OWNER)
    with open(owner, "w") as f:
        f.write(f"{socket.gethostname()} {os.getppid()}\n")
    with pytest.raises(UsageError, match=f"another running conversion \\(pid {os.getppid()}\\)"):
        convert.convert_checkpoint(hf_base[1], out, "float32", progress=False)
    assert os.path.exists(owner) and not os.path.exists(out)
