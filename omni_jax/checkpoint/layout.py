"""Orbax checkpoints of omni_jax params: the on-disk layout, its marker file and the atomic writer.

Layout of a checkpoint dir:

    omni_jax_checkpoint.json   leaf layout + completion marker (written last; the loader requires it)
    config.json, tokenizer.json, vocab.json, merges.txt, ...   copied from the HF dir
    params/<item>/             one standard Orbax checkpoint (StandardCheckpointer) per item

Why items: a scanned leaf of the real model is far bigger than host RAM allows to build at once
(thinker expert gate_proj stacked over 24 layers is ~9.7 GB bf16), so the converter never
builds stacked arrays. Each HF decoder layer becomes one item (e.g. `params/thinker.model.layers.7`)
holding that layer's slice of every stacked leaf, nested by param path; leaves that are not
per-layer (embeddings, heads, the vocoder's non-transformer parts) go whole into one item per
component (`params/thinker`, `params/talker`, `params/code2wav`). `omni_jax_checkpoint.json` maps
every param path to its item (or, for split leaves, to the ordered items of its slices). Every
item restores on its own with `ocp.StandardCheckpointer().restore(dir/params/<item>)`.

Writers (the converter, `save_params`) fill `<out_dir>.partial` and swap it into place only when
complete; the loader is omni_jax.checkpoint.load.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from absl import logging

from omni_jax.errors import CheckpointError, CheckpointNotFoundError, UsageError

Path = tuple[str, ...]
LAYOUT_FILE = "omni_jax_checkpoint.json"
PARAMS_DIR = "params"
FORMAT = "omni_jax.checkpoint/1"


class IncompleteCheckpointError(CheckpointError):
    """The dir lacks the completion marker or an item: not a checkpoint, or its writing did not finish."""


class OutputExistsError(UsageError, FileExistsError):
    """The output dir already holds something and --overwrite was not given (or cannot apply): exit 2."""


_RECONVERT = "convert it again (launch/convert.py --hf_dir=<HF checkpoint> --out_dir={dir} --overwrite)"


# ---- trees ----

def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """Nested mapping -> {path tuple: leaf}."""
    out: dict[Path, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = leaf
    return out


def _pstr(path: Path) -> str:
    return "/".join(path)


# ---- writing ----

def partial_dir(out_dir: str) -> str:
    return os.path.normpath(out_dir) + ".partial"


_OWNER = ".omni_jax_writer"  # "<host> <pid>" of the process writing a .partial dir


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def claim_partial_dir(out_dir: str) -> str:
    """Create a fresh `<out_dir>.partial` owned by this process and return it.

    A .partial dir left by a run that died (SIGKILL, power loss) is discarded; one that a live process
    on this host is still writing is refused, so two conversions into the same out_dir cannot clobber
    each other.
    """
    import socket

    tmp = partial_dir(out_dir)
    if os.path.exists(tmp):
        try:
            with open(os.path.join(tmp, _OWNER)) as f:
                host, pid = f.read().split()
            pid = int(pid)
        except (OSError, ValueError):
            host, pid = None, -1
        if host == socket.gethostname() and pid != os.getpid() and _alive(pid):
            raise UsageError(f"{tmp} is being written by another running conversion (pid {pid}); wait for it to "
                             "finish or stop it, then run this again")
        logging.warning("removing %s left by an interrupted conversion", tmp)
        _remove_dir(tmp)
    os.makedirs(os.path.join(tmp, PARAMS_DIR))
    with open(os.path.join(tmp, _OWNER), "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    return tmp


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse to write over a non-empty dir unless `overwrite`; even then only over an omni_jax checkpoint."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise OutputExistsError(f"{out_dir} exists and is not a directory; choose another --out_dir")
    if not os.listdir(out_dir):
        return
    is_ckpt = os.path.exists(os.path.join(out_dir, LAYOUT_FILE))
    if not overwrite:
        what = "holds an omni_jax checkpoint" if is_ckpt else "is not empty"
        raise OutputExistsError(f"{out_dir} {what}; pass overwrite=True (--overwrite) to replace it (the old one stays "
                                "in place until the new one is complete), or choose another --out_dir")
    if not is_ckpt:
        raise OutputExistsError(
            f"{out_dir} is not empty and is not an omni_jax checkpoint (no {LAYOUT_FILE}); refusing to delete it even "
            "with overwrite — remove it yourself"
        )


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel / file system without exchange
        return False
    raise OSError(err, os.strerror(err), b)


def _remove_dir(path: str) -> None:
    """Delete a checkpoint dir marker first, so a kill during the delete never leaves a loadable remnant."""
    try:
        os.remove(os.path.join(path, LAYOUT_FILE))
    except FileNotFoundError:
        pass
    shutil.rmtree(path)


def finalize_dir(tmp: str, out_dir: str) -> None:
    """Move the finished `tmp` into place, replacing an existing out_dir (already cleared by check_out_dir).

    The replacement is one atomic directory exchange where the OS has it (Linux), so whenever the
    process dies, out_dir is either the complete old checkpoint or the complete new one; elsewhere
    two renames leave a window of one rename in which out_dir is absent (the old one is then at
    `<out_dir>.old-<pid>`).
    """
    out_dir = os.path.normpath(out_dir)
    try:
        os.remove(os.path.join(tmp, _OWNER))
    except FileNotFoundError:
        pass
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
    elif _exchange(tmp, out_dir):
        _remove_dir(tmp)  # now holds the old checkpoint
    else:
        old = f"{out_dir}.old-{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        _remove_dir(old)


class ItemWriter:
    """Saves one item (a nested dict of numpy / jax arrays) synchronously with Orbax."""

    def __init__(self):
        import orbax.checkpoint as ocp

        self._ckptr = ocp.StandardCheckpointer()

    def save(self, path: str, tree: Mapping[str, Any]) -> None:
        self._ckptr.save(os.path.abspath(path), tree)
        self._ckptr.wait_until_finished()

    def close(self) -> None:
        self._ckptr.close()


def write_layout(directory: str, leaves: Mapping[Path, Mapping[str, Any]], meta: Mapping[str, Any] | None = None) -> None:
    """Write the leaf layout + completion marker (the last file written)."""
    items = sorted({s["item"] for s in leaves.values() if "item" in s} | {i for s in leaves.values() for i in s.get("slices", ())})
    doc = {"format": FORMAT, **(dict(meta) if meta else {}), "items": items,
           "leaves": {_pstr(p): dict(s) for p, s in sorted(leaves.items())}}
    path = os.path.join(directory, LAYOUT_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".tmp", path)


def read_layout(directory: str) -> dict:
    """The layout document; IncompleteCheckpointError if the marker or an item dir is missing,
    CheckpointNotFoundError (a usage error) if `directory` does not exist."""
    path = os.path.join(directory, LAYOUT_FILE)
    if not os.path.isdir(directory):
        hint = ""
        if os.path.isdir(partial_dir(directory)):
            hint = (f"; {partial_dir(directory)} exists: a conversion into it was interrupted — run the conversion "
                    "again (it discards the .partial dir)")
        raise CheckpointNotFoundError(f"checkpoint dir {directory} does not exist{hint}")
    if not os.path.exists(path):
        if os.path.normpath(directory).endswith(".partial"):
            fix = ("an interrupted conversion leaves such a '.partial' dir: run the conversion again (it discards "
                   "the .partial dir)")
        else:
            fix = "if it is a conversion output, delete it and convert again"
        raise IncompleteCheckpointError(
            f"{directory} has no {LAYOUT_FILE}: not an omni_jax checkpoint, or its writing did not finish; {fix}"
        )
    try:
        with open(path) as f:
            doc = json.load(f)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("format") == FORMAT:
            items, leaves = list(doc["items"]), dict(doc["leaves"])
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is corrupt ({e}); {_RECONVERT.format(dir=directory)}") from e
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}; "
                              f"{_RECONVERT.format(dir=directory)}")
    for item in items:
        if not os.path.isdir(os.path.join(directory, PARAMS_DIR, item)):
            raise IncompleteCheckpointError(f"{directory}: item {PARAMS_DIR}/{item} listed in {LAYOUT_FILE} is missing "
                                            f"(files were deleted or the copy is incomplete); "
                                            f"{_RECONVERT.format(dir=directory)}")
    doc["leaves"] = {tuple(k.split("/")): v for k, v in leaves.items()}
    return doc


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def save_params(params: Mapping[str, Any], out_dir: str, config=None, *, overwrite: bool = False) -> str:
    """Save an in-memory {root: params} tree (numpy or jax arrays, boxed or not) as a loadable checkpoint.

    Each root is one item holding whole leaves; `config` (an OmniConfig) is written as config.json.
    """
    params = nn.unbox(params)
    check_out_dir(out_dir, overwrite)
    tmp = claim_partial_dir(out_dir)
    try:
        writer = ItemWriter()
        leaves: dict[Path, dict] = {}
        for root, tree in params.items():
            for path, leaf in flatten({root: tree}).items():
                leaves[path] = {"shape": list(np.shape(leaf)), "dtype": _dtype_name(leaf.dtype), "item": root}
            writer.save(os.path.join(tmp, PARAMS_DIR, root), {root: tree})  # item trees nest by full param path
        writer.close()
        if config is not None:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                f.write(config.to_json())
        write_layout(tmp, leaves, {"roots": list(params)})
        finalize_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
