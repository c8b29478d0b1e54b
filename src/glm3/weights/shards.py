"""Sharded model weights: tensors rolled into numbered checkpoint files plus an index, one tensor at a time.

The layout `glm3 convert` writes and every stage after it keeps: `mindspore_model-0000N-of-0000M.ckpt` (or
`.safetensors`) of at most `shard_size` bytes each and `mindspore_model.ckpt.index.json` mapping every tensor
to its file, or a single `mindspore_model.ckpt` when everything fits in one shard. Memory stays at one
tensor: each is converted to the storage dtype and written as it arrives.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

import numpy as np

from glm3.io import atomic_write_text
from glm3.modeling.config import GLM3Config
from glm3.weights.checkpoint import MS_CKPT_INDEX, MS_ST_INDEX, CheckpointError, expected_dtypes, expected_shapes
from glm3.weights.tensor_files import (
    STORAGE_DTYPES,
    MsCkptWriter,
    SafetensorsWriter,
    safetensors_header_bound,
    storage_nbytes,
)

DEFAULT_SHARD_SIZE = "2GB"
MS_STEM = "mindspore_model"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """Bytes of "2GB", "500MiB", "123" (0 means: no sharding)."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ValueError(f"invalid size {size!r}: use e.g. 2GB, 500MiB or 0 for a single file")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value < 0:
        raise ValueError(f"size must be >= 0, got {size!r}")
    return value


class ShardedWriter:
    """Rolls tensors into numbered shard files of at most `shard_bytes` (0: one file; a tensor is never split).

    Files are written under temporary names in `directory` and get their final names in finish(), which
    also writes the index; the caller owns `directory` (normally an atomic_directory being built).
    """

    def __init__(
        self,
        directory: str,
        stem: str = MS_STEM,
        fmt: str = "ckpt",
        shard_bytes: int = 0,
        header_bound: int = 0,
        metadata: dict | None = None,
    ):
        if fmt not in ("ckpt", "safetensors"):
            raise ValueError(f"format must be 'ckpt' or 'safetensors', got {fmt!r}")
        if fmt == "safetensors" and header_bound <= 0:
            raise ValueError("a safetensors output needs the header bound of its tensors")
        self.directory, self.stem, self.fmt = directory, stem, fmt
        self.ext = "ckpt" if fmt == "ckpt" else "safetensors"
        self.shard_bytes, self.header_bound, self.metadata = shard_bytes, header_bound, metadata
        self.writer = None
        self.parts: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
        self.total = 0

    def add(self, name: str, array: np.ndarray, dtype: str) -> None:
        nbytes = storage_nbytes(array.shape, dtype)
        if self.writer is None or (
            self.shard_bytes and self.writer.nbytes and self.writer.nbytes + nbytes > self.shard_bytes
        ):
            self._open()
        self.writer.add(name, array, dtype)
        self.parts[-1][1].append(name)
        self.total += nbytes

    def _open(self) -> None:
        if self.writer is not None:
            self.writer.close()
        path = os.path.join(self.directory, f".part{len(self.parts):05d}.{self.ext}")
        self.writer = (
            MsCkptWriter(path) if self.fmt == "ckpt" else SafetensorsWriter(path, self.header_bound, self.metadata)
        )
        self.parts.append((path, []))

    def finish(self, index_name: str) -> list[str]:
        """Close the last shard, give the shards their final names and write the index (if sharded)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        n = len(self.parts)
        names = (
            [f"{self.stem}.{self.ext}"]
            if n == 1
            else [f"{self.stem}-{i + 1:05d}-of-{n:05d}.{self.ext}" for i in range(n)]
        )
        weight_map = {}
        for (tmp, tensors), final in zip(self.parts, names):
            os.replace(tmp, os.path.join(self.directory, final))
            weight_map.update({t: final for t in tensors})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            atomic_write_text(os.path.join(self.directory, index_name), json.dumps(index, indent=2) + "\n")
        return names

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def write_model_weights(
    tensors: Iterable[tuple[str, np.ndarray]],
    directory: str,
    config: GLM3Config,
    dtype: str,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    fmt: str = "ckpt",
    where: str = "the model",
) -> list[str]:
    """Write (name, float array) pairs as the sharded weights of a model directory, each checked against the
    config (a known name, its shape, a floating dtype) and stored as `dtype`. Returns the file names.

    Every expected tensor must come exactly once; a missing or repeated one is a CheckpointError.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    expected = expected_shapes(config)
    exact = expected_dtypes(config)  # a quantized model's data and scales: stored as they are
    header_bound = safetensors_header_bound(list(expected.items())) if fmt == "safetensors" else 0
    out = ShardedWriter(directory, MS_STEM, fmt, parse_size(shard_size), header_bound)
    seen: set[str] = set()
    try:
        for name, array in tensors:
            if name not in expected:
                raise CheckpointError(f"{where}: unexpected tensor {name} for this config")
            if name in seen:
                raise CheckpointError(f"{where}: tensor {name} appears twice")
            if tuple(array.shape) != tuple(expected[name]):
                raise CheckpointError(f"{where}: {name} has shape {tuple(array.shape)}, expected {expected[name]}")
            if name in exact:
                if array.dtype != np.dtype(exact[name]):
                    raise CheckpointError(f"{where}: {name} has dtype {array.dtype}, expected {exact[name]}")
                out.add(name, array, exact[name])
                seen.add(name)
                continue
            if array.dtype.kind != "f":
                raise CheckpointError(f"{where}: {name} has dtype {array.dtype}, expected a float type")
            out.add(name, array, dtype)
            seen.add(name)
        missing = [n for n in expected if n not in seen]
        if missing:
            raise CheckpointError(f"{where}: missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        return out.finish(MS_CKPT_INDEX if fmt == "ckpt" else MS_ST_INDEX)
    except BaseException:
        out.abort()
        raise


def weight_files(directory: str) -> list[str]:
    """The weight files (and index) of a model directory in our MindSpore layout, by name."""
    names = sorted(os.listdir(directory))
    found = [n for n in names if n.startswith(MS_STEM) and n.endswith((".ckpt", ".safetensors", ".index.json"))]
    if not any(n.endswith((".ckpt", ".safetensors")) for n in found):
        raise CheckpointError(f"{directory} holds no {MS_STEM}*.ckpt or *.safetensors weights")
    return found
