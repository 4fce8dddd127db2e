"""Orbax checkpoints of omni_jax params: on-disk layout, writer and (sharded) loader.

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

The loader restores item by item with Orbax straight into the target shardings (each device reads
only its shard) and writes split slices into a preallocated stacked buffer with a donated
dynamic_update_slice, so peak memory is the final params plus one layer.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import shutil
import sys
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from omni_jax import convert
from omni_jax.errors import CheckpointError, CheckpointNotFoundError, UsageError

Path = tuple[str, ...]
LAYOUT_FILE = "omni_jax_checkpoint.json"
PARAMS_DIR = "params"
FORMAT = "omni_jax.checkpoint/1"


# CheckpointError and CheckpointNotFoundError live in omni_jax.errors; `checkpoint.CheckpointError` stays valid.


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


# ---- abstract params ----

def default_roots(config) -> tuple[str, ...]:
    """Components a model needs: the thinker, plus talker and code2wav when it speaks."""
    return ("thinker", "talker", "code2wav") if config.enable_audio_output else ("thinker",)


def boxed_abstract_params(config, dtype=jnp.float32, roots: Iterable[str] | None = None) -> dict:
    """{root: boxed abstract params of that component} (logical-axis boxes kept); allocates nothing."""
    roots = default_roots(config) if roots is None else tuple(roots)
    return {root: _component_abstract(config, jnp.dtype(dtype), root) for root in roots}


@functools.lru_cache(maxsize=32)
def _component_abstract(config, dtype, root: str):
    # Cached: tracing a model's init costs seconds and converter + loader both need it.
    mod = convert.component_module(root)
    if mod is None:
        raise CheckpointError(f"component {root!r} is needed but omni_jax.{root} is not available")
    return mod.boxed_abstract_params(config, dtype)


def abstract_params(config, dtype=jnp.float32, roots: Iterable[str] | None = None) -> dict:
    """{root: jax.ShapeDtypeStruct tree} — the exact tree load_params returns."""
    return nn.unbox(boxed_abstract_params(config, dtype, roots))


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


# ---- loading ----

@functools.lru_cache(maxsize=None)
def _zeros_fn(specs: tuple[tuple[tuple[int, ...], Any], ...], shardings: tuple):
    """Zero stacked buffers for a group of leaves (one compile per distinct group, not per leaf)."""
    return jax.jit(lambda: tuple(jnp.zeros(shape, dtype) for shape, dtype in specs), out_shardings=shardings)


@functools.lru_cache(maxsize=None)
def _update_fn(shardings: tuple):
    """bufs[k][index[k]] = xs[k] for a group of stacked leaves, donating the buffers."""

    def update(bufs, xs, index):
        return tuple(jax.lax.dynamic_update_index_in_dim(b, x.astype(b.dtype), index[k], 0)
                     for k, (b, x) in enumerate(zip(bufs, xs)))

    return jax.jit(update, donate_argnums=0, out_shardings=shardings)


def _slice_sharding(sharding: jax.sharding.Sharding, path: Path) -> jax.sharding.Sharding:
    """Sharding of one leading-axis slice of a stacked leaf: the target's spec minus its first entry."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    raise CheckpointError(
        f"{_pstr(path)}: sharding {type(sharding).__name__} is not supported for stacked leaves; use NamedSharding"
    )


def _check_against_layout(directory: str, layout: Mapping[Path, Mapping], target: Mapping[Path, Any]) -> None:
    missing = [p for p in target if p not in layout]
    if missing:
        by_root: dict[str, list[Path]] = {}
        for p in missing:
            by_root.setdefault(p[0], []).append(p)
        lines = []
        for root, paths in by_root.items():
            total = sum(1 for p in target if p[0] == root)
            if len(paths) == total:
                lines.append(f"the checkpoint has no params for {root!r} at all (was it converted from a model without "
                             f"the {root}, or before omni_jax.{root} existed?); load without it via roots=")
            else:
                lines.append(f"{root}: {len(paths)} of {total} params missing, e.g. {', '.join(map(_pstr, paths[:5]))}")
        raise CheckpointError(f"{directory}: " + "; ".join(lines))
    bad = [f"{_pstr(p)}: checkpoint {tuple(layout[p]['shape'])} != model {tuple(s.shape)}"
           for p, s in target.items() if tuple(layout[p]["shape"]) != tuple(s.shape)]
    if bad:
        more = f"\n... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise CheckpointError(
            f"{directory}: the checkpoint was written for a different config — {len(bad)} param shape(s) do not match "
            "the config it is loaded with:\n" + "\n".join(bad[:20]) + more + "\nLoad it with the config it was "
            "converted with (its own config.json), or pass the config that matches the weights."
        )


def _stored_shape(spec: Mapping[str, Any]) -> tuple[int, ...]:
    """Shape of what one item holds for a leaf: the whole leaf, or one leading-axis slice of it."""
    return tuple(spec["shape"][1:] if "slices" in spec else spec["shape"])


def _check_items(directory: str, layout: Mapping[Path, Mapping], stored_in: Mapping[str, Sequence[Path]],
                 items: Iterable[str], ckptr) -> None:
    """Compare every item's Orbax metadata (a few small files) with the layout before anything is allocated.

    Orbax restores what is on disk whatever shape the target asks for, so a corrupt item, or one
    copied from another conversion, would otherwise surface as a wrong-shaped param much later.
    """
    bad: list[str] = []
    for item in sorted(items):
        where = os.path.join(directory, PARAMS_DIR, item)
        try:
            meta = ckptr.metadata(os.path.abspath(where))
            stored = flatten(getattr(meta, "item_metadata", meta))
        except Exception as e:  # noqa: BLE001 - any Orbax/tensorstore failure here means unreadable files
            raise CheckpointError(f"{where} cannot be read ({type(e).__name__}: {_first_line(e)}): the checkpoint is "
                                  f"corrupt or partially copied; {_RECONVERT.format(dir=directory)}") from e
        extra = sorted(set(stored) - set(stored_in[item]))
        bad += [f"{PARAMS_DIR}/{item}: holds param {_pstr(p)}, which {LAYOUT_FILE} does not list there" for p in extra]
        for p in stored_in[item]:
            spec = layout[p]
            want_shape, want_dtype = _stored_shape(spec), spec.get("dtype")
            got = stored.get(p)
            if got is None:
                bad.append(f"{PARAMS_DIR}/{item}: param {_pstr(p)} is missing")
                continue
            got_shape, got_dtype = tuple(got.shape), jnp.dtype(got.dtype).name if got.dtype is not None else None
            if got_shape != want_shape or (want_dtype and got_dtype and got_dtype != jnp.dtype(want_dtype).name):
                bad.append(f"{PARAMS_DIR}/{item}: param {_pstr(p)} is stored as {got_shape} {got_dtype}, "
                           f"{LAYOUT_FILE} says {want_shape} {want_dtype}")
    if bad:
        more = f"\n... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise CheckpointError(f"{directory}: the stored params do not match its {LAYOUT_FILE} (corrupt, or items "
                              "from different conversions mixed):\n" + "\n".join(bad[:20]) + more +
                              f"\n{_RECONVERT.format(dir=directory)}")


class _HeldStderr:
    """Holds back what Python writes to sys.stderr during one Orbax restore; replayed unless drain() was called.

    Orbax gives up on an item at its first unreadable array while the item's other reads are still in
    flight; as each finishes, TensorStore hands it to an event loop Orbax has already closed, which
    prints a 'RuntimeError: Event loop is closed' traceback, and the abandoned coroutines print
    'Exception ignored' when collected. drain() lets those reads finish and collects the coroutines,
    then drops the held text, so a corrupt checkpoint reads as one clear error, not pages of tracebacks.
    """

    def __enter__(self):
        import contextlib
        import io

        self._buf = io.StringIO()
        self._redirect = contextlib.redirect_stderr(self._buf)
        self._redirect.__enter__()
        self._keep = True
        return self

    def drain(self, path: str, seconds: float = 0.5) -> None:
        import gc
        import logging as std_logging
        import time

        # Abandoned tasks collected later (even at exit) report through the 'asyncio' logger; drop just
        # the reports about this item's files.
        std_logging.getLogger("asyncio").addFilter(lambda record: path not in record.getMessage())
        time.sleep(seconds)
        gc.collect()
        self._keep = False

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        if self._keep and self._buf.getvalue():
            sys.stderr.write(self._buf.getvalue())
        return False


def _first_line(e: BaseException) -> str:
    """The gist of an Orbax / TensorStore error (whose full text dumps the whole TensorStore spec)."""
    text = str(e).strip().splitlines()
    line = text[0].split(" See full TensorStore details")[0] if text else ""
    return line[:240]


def load_params(
    checkpoint_dir: str,
    config=None,
    dtype=jnp.float32,
    shardings: Mapping[str, Any] | None = None,
    roots: Sequence[str] | None = None,
) -> dict:
    """Restore {root: params} in the scanned layout the modules expect.

    config: OmniConfig (default: the checkpoint's config.json). dtype: float dtype of the returned
    params (cast on read). shardings: a tree like the params of jax.sharding.Sharding (NamedSharding
    for stacked leaves); each leaf is restored straight into it, with no full host copy. roots:
    components to load (default: thinker, plus talker and code2wav if config.enable_audio_output).
    """
    import orbax.checkpoint as ocp

    from omni_jax.config import load_config

    doc = read_layout(checkpoint_dir)
    layout = doc["leaves"]
    if config is None:
        if not os.path.exists(os.path.join(checkpoint_dir, "config.json")):
            raise CheckpointError(f"{checkpoint_dir} has no config.json; pass the config the checkpoint was converted "
                                  "with (config=)")
        config = load_config(checkpoint_dir)
    roots = default_roots(config) if roots is None else tuple(roots)
    target = flatten(abstract_params(config, dtype, roots))
    _check_against_layout(checkpoint_dir, layout, target)

    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if shardings is None:
        sharding_of = {p: default for p in target}
    else:
        sharding_of = flatten(shardings)
        absent = [p for p in target if p not in sharding_of]
        if absent:
            raise CheckpointError(f"shardings lacks {len(absent)} params, e.g. {', '.join(map(_pstr, absent[:5]))}")

    # item -> {path in item: (target path, slice index or None)}
    wanted: dict[str, dict[Path, tuple[Path, int | None]]] = {}
    for p in target:
        spec = layout[p]
        if "slices" in spec:
            for i, item in enumerate(spec["slices"]):
                wanted.setdefault(item, {})[p] = (p, i)
        else:
            wanted.setdefault(spec["item"], {})[p] = (p, None)
    stored_in: dict[str, list[Path]] = {}
    for p, spec in layout.items():
        for item in spec.get("slices", [spec.get("item")]):
            stored_in.setdefault(item, []).append(p)

    out: dict[Path, jax.Array] = {}
    ckptr = ocp.StandardCheckpointer()
    try:
        _check_items(checkpoint_dir, layout, stored_in, wanted, ckptr)
        for item in sorted(wanted):
            restore_target = {}
            for p in stored_in[item]:
                spec = layout[p]
                shape = tuple(spec["shape"][1:] if "slices" in spec else spec["shape"])
                if p in wanted[item]:
                    sh = sharding_of[p] if "item" in spec else _slice_sharding(sharding_of[p], p)
                    restore_target[p] = jax.ShapeDtypeStruct(shape, target[p].dtype, sharding=sh)
                else:  # stored but not part of this model: read to satisfy Orbax, then dropped
                    logging.warning("%s: ignoring checkpoint param %s not in the model", checkpoint_dir, _pstr(p))
                    restore_target[p] = jax.ShapeDtypeStruct(shape, jnp.dtype(spec.get("dtype", "float32")))
            where = os.path.join(checkpoint_dir, PARAMS_DIR, item)
            failure = None
            with _HeldStderr() as held:
                try:
                    restored = flatten(ckptr.restore(os.path.abspath(where), unflatten(restore_target)))
                except Exception as e:  # noqa: BLE001 - tensorstore raises plain Exceptions for unreadable data
                    if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
                        raise
                    failure = CheckpointError(f"{where} cannot be read ({type(e).__name__}: {_first_line(e)}): its "
                                              f"files are corrupt or truncated; {_RECONVERT.format(dir=checkpoint_dir)}")
                if failure is not None:  # outside the except block: the Orbax error and its frames are dropped
                    held.drain(os.path.abspath(where))
            if failure is not None:
                raise failure
            split = sorted((tp, p, index) for p, (tp, index) in wanted[item].items() if index is not None)
            for p, (tp, index) in wanted[item].items():
                if index is None:
                    out[tp] = restored[p]
            if split:
                new = [tp for tp, _, _ in split if tp not in out]
                if new:
                    bufs = _zeros_fn(tuple((tuple(target[tp].shape), jnp.dtype(target[tp].dtype)) for tp in new),
                                     tuple(sharding_of[tp] for tp in new))()
                    out.update(zip(new, bufs))
                shs = tuple(sharding_of[tp] for tp, _, _ in split)
                bufs = _update_fn(shs)(tuple(out.pop(tp) for tp, _, _ in split), tuple(restored[p] for _, p, _ in split),
                                       jnp.asarray([i for _, _, i in split], jnp.int32))
                out.update(zip((tp for tp, _, _ in split), bufs))
            del restored
    finally:
        ckptr.close()
    return unflatten(out)
