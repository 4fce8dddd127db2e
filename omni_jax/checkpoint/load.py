"""Restore an omni_jax checkpoint (omni_jax.checkpoint.layout) item by item, straight into target shardings.

Each item is restored with Orbax into the shardings the caller asks for (each device reads only its
shard); split leaves are written slice by slice into a preallocated stacked buffer with a donated
dynamic_update_slice, so peak memory is the final params plus one layer.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
from absl import logging

from omni_jax.checkpoint.layout import (LAYOUT_FILE, PARAMS_DIR, _RECONVERT, Path, _pstr, flatten, read_layout,
                                        unflatten)
from omni_jax.config import load_config
from omni_jax.errors import CheckpointError
from omni_jax.models import registry

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

    doc = read_layout(checkpoint_dir)
    layout = doc["leaves"]
    if config is None:
        if not os.path.exists(os.path.join(checkpoint_dir, "config.json")):
            raise CheckpointError(f"{checkpoint_dir} has no config.json; pass the config the checkpoint was converted "
                                  "with (config=)")
        config = load_config(checkpoint_dir)
    if roots is None:
        # An optional component (the audio tower) loads when the checkpoint has it: one converted before omni_jax
        # built it still loads, without it.
        saved = {p[0] for p in layout}
        roots = tuple(r for r in registry.default_roots(config) if r in saved or not registry.get(r).optional)
    roots = tuple(roots)
    target = flatten(registry.abstract_params(config, dtype, roots))
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
