"""Torch-free, lazy safetensors reading (single file or sharded with model.safetensors.index.json).

The header is parsed here (8-byte little-endian length, JSON {key: {dtype, shape, data_offsets}})
and each tensor is an `np.memmap` view opened only when asked for, so converting a 66 GB
checkpoint touches one tensor at a time and memory stays flat. bf16 maps to ml_dtypes.bfloat16,
which numpy alone lacks (the reason safetensors' own numpy backend cannot read bf16 files).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np
from omni_jax.errors import CheckpointError, CheckpointNotFoundError

DTYPES: Mapping[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 200 * 1024 * 1024


class SafetensorsError(CheckpointError):
    """A safetensors file or index is malformed, truncated or inconsistent (messages name the file and the fix)."""


_REDOWNLOAD = "re-download it from the model repository"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset of its data, dtype name and shape."""

    key: str
    path: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def load(self) -> np.ndarray:
        """A read-only memmap of the tensor (data are paged in only when touched)."""
        if self.nbytes == 0:
            return np.zeros(self.shape, self.np_dtype)
        return np.memmap(self.path, dtype=self.np_dtype, mode="r", offset=self.offset, shape=self.shape)


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse one .safetensors header; validates dtype, byte counts and bounds against the file size.

    A truncated file (an interrupted download) is caught here from the header and the file size
    alone: the data are never read.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file ({size} bytes): truncated or not a "
                                   f"safetensors file; {_REDOWNLOAD}")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path}: header length {n} is implausible for a {size}-byte file: truncated or "
                                   f"not a safetensors file; {_REDOWNLOAD}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e}): corrupt file; {_REDOWNLOAD}") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object: corrupt file; {_REDOWNLOAD}")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    end_of_data, last_key = 0, None
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = meta.get("dtype")
            shape = tuple(int(s) for s in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path}: header entry of tensor {key!r} is malformed ({e!r}): corrupt file; "
                                   f"{_REDOWNLOAD}") from e
        if dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {key!r} has unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
        want = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != want:
            raise SafetensorsError(f"{path}: tensor {key!r} {dtype}{list(shape)} needs {want} bytes, header gives "
                                   f"{end - begin}: corrupt file; {_REDOWNLOAD}")
        if begin < 0:
            raise SafetensorsError(f"{path}: tensor {key!r} has a negative data offset: corrupt file; {_REDOWNLOAD}")
        if end > end_of_data:
            end_of_data, last_key = end, key
        out[key] = TensorInfo(key, path, dtype, shape, base + begin, want)
    if base + end_of_data > size:
        raise SafetensorsError(
            f"{path} is truncated: its header describes {base + end_of_data} bytes (tensor {last_key!r} ends there) but "
            f"the file has only {size}; the download or copy was interrupted: {_REDOWNLOAD}"
        )
    return out


def index_checkpoint(hf_dir: str) -> dict[str, TensorInfo]:
    """All tensors of an HF checkpoint dir: via model.safetensors.index.json when present, else every *.safetensors."""
    if not os.path.isdir(hf_dir):
        raise CheckpointNotFoundError(f"checkpoint directory {hf_dir!r} does not exist (or is not a directory)")
    index_path = os.path.join(hf_dir, INDEX_NAME)
    if os.path.exists(index_path):
        with open(index_path) as f:
            try:
                doc = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{index_path} is not valid JSON ({e}); {_REDOWNLOAD}") from e
        weight_map = doc.get("weight_map") if isinstance(doc, Mapping) else None
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise SafetensorsError(f"{index_path}: missing or empty 'weight_map'; {_REDOWNLOAD}")
        headers: dict[str, dict[str, TensorInfo]] = {}
        out: dict[str, TensorInfo] = {}
        for key, fname in weight_map.items():
            if fname not in headers:
                fpath = os.path.join(hf_dir, fname)
                if not os.path.isfile(fpath):
                    raise SafetensorsError(f"{index_path} names shard {fname!r} (holding {key!r}) but {fpath} does not "
                                           f"exist: the download is incomplete; download the missing shard {fname}")
                headers[fname] = read_header(fpath)
            if key not in headers[fname]:
                raise SafetensorsError(f"{index_path} maps tensor {key!r} to shard {fname!r}, but that shard does not "
                                       f"hold it: the index and the shard come from different downloads; re-download "
                                       f"{fname} and {INDEX_NAME}")
            out[key] = headers[fname][key]
        return out
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{hf_dir}: no *.safetensors files and no {INDEX_NAME}: not a Hugging Face safetensors "
                              "checkpoint (or the download is incomplete)")
    out = {}
    for fname in files:
        for key, info in read_header(os.path.join(hf_dir, fname)).items():
            if key in out:
                raise SafetensorsError(f"{hf_dir}: {key!r} appears in both {os.path.basename(out[key].path)} and {fname}")
            out[key] = info
    return out


def iter_tensors(hf_dir: str) -> Iterator[tuple[str, np.ndarray]]:
    """(key, memmap) for every tensor, in file/offset order (sequential reads)."""
    for info in sorted(index_checkpoint(hf_dir).values(), key=lambda i: (i.path, i.offset)):
        yield info.key, info.load()


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file from numpy arrays (bf16 via ml_dtypes included), streaming one tensor at a time."""
    names = {v: k for k, v in DTYPES.items()}
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for key, arr in tensors.items():
        dt = names.get(np.dtype(arr.dtype))
        if dt is None:
            raise SafetensorsError(f"cannot write {key!r}: dtype {arr.dtype} has no safetensors name")
        header[key] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [pos, pos + arr.nbytes]}
        pos += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data section 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
