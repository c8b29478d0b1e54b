"""Tensor files read and written one tensor at a time: MindSpore .ckpt, safetensors, PyTorch .bin.

Why our own .ckpt and safetensors codecs: `mindspore.load_checkpoint` reads a whole file into memory
and parses it (two copies of the file), and both `mindspore.save_checkpoint` and `safetensors.save_file`
need every tensor of a file in memory at once. Converting or loading a 12.5 GB model on a 24 GiB machine
needs streaming instead. The formats are small and stable:

* MindSpore .ckpt is a protobuf `Checkpoint { repeated Value value = 1 }` with
  `Value { string tag = 1; TensorProto tensor = 2 }` and
  `TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3 }`.
  Concatenated messages are one message, so MindSpore itself writes a large tensor as several Values with
  the same tag, each holding a slice of the bytes; an optional trailer `b"crc_num"` + 10-byte big-endian
  CRC32 of everything before it may follow. Files we write load with `mindspore.load_checkpoint`.
* safetensors is an 8-byte little-endian header length, a JSON header (which may be padded with spaces)
  and the raw data. We reserve the header space first and fill it in when the file is complete.

Readers yield (name, numpy array); bfloat16 comes back as float32 (exact), as numpy has no bfloat16.
"""

from __future__ import annotations

import binascii
import dataclasses
import json
import os
import struct
from collections.abc import Callable, Iterator

import numpy as np

from glm3.dtypes import FLOAT_DTYPES, ITEMSIZE, QUANTIZED_DTYPES


class TensorFileError(ValueError):
    """A tensor file that cannot be read: truncated, corrupt, or of an unsupported kind."""


STORAGE_DTYPES = FLOAT_DTYPES
# The data of quantized weights (glm3.quantization), stored exactly as given.

# ------------------------------------------------------------------------------------------- dtypes
_CKPT_TYPES = {"float32": "Float32", "float16": "Float16", "bfloat16": "BFloat16", "int8": "Int8", "uint8": "UInt8"}
_CKPT_NUMPY = {
    "Float32": np.float32,
    "Float16": np.float16,
    "Float64": np.float64,
    "BFloat16": np.uint16,
    "Int8": np.int8,
    "UInt8": np.uint8,
    "Int16": np.int16,
    "UInt16": np.uint16,
    "Int32": np.int32,
    "UInt32": np.uint32,
    "Int64": np.int64,
    "UInt64": np.uint64,
    "Bool": np.bool_,
}
_ST_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "I8", "uint8": "U8"}


def bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(array)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_storage(array: np.ndarray, dtype: str) -> np.ndarray:
    """The array as the bytes of `dtype` storage (float32/float16 as such, bfloat16 as uint16 bits)."""
    if dtype == "float32":
        return np.ascontiguousarray(array, dtype=np.float32)
    if dtype == "float16":
        return np.ascontiguousarray(array, dtype=np.float16)
    if dtype == "bfloat16":
        return bfloat16_bits(array)
    if dtype in QUANTIZED_DTYPES:
        if array.dtype != np.dtype(dtype):
            raise ValueError(f"quantized data must be {dtype} already, got {array.dtype}")
        return np.ascontiguousarray(array)
    raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")


def storage_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]


# ------------------------------------------------------------------------------- protobuf helpers
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(field: int, payload_len: int) -> bytes:
    return _varint(field << 3 | 2) + _varint(payload_len)


class _Reader:
    """Sequential reads of a file region that report truncation clearly and, when the file carries a CRC
    trailer (track_crc), keep a running CRC32 of everything read."""

    def __init__(self, f, path: str, end: int, track_crc: bool):
        self.f, self.path, self.end, self.pos, self.crc = f, path, end, 0, 0
        self.track_crc = track_crc

    def read(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise TensorFileError(f"{self.path} is truncated or corrupt (a record runs past the end of the file)")
        data = self.f.read(n)
        if len(data) != n:
            raise TensorFileError(f"{self.path} is truncated")
        self.pos += n
        if self.track_crc:
            self.crc = binascii.crc32(data, self.crc)
        return data

    def read_into(self, buffer: memoryview) -> None:
        n = len(buffer)
        if self.pos + n > self.end:
            raise TensorFileError(f"{self.path} is truncated or corrupt (tensor data runs past the end of the file)")
        got = self.f.readinto(buffer)
        if got != n:
            raise TensorFileError(f"{self.path} is truncated")
        self.pos += n
        if self.track_crc:
            self.crc = binascii.crc32(buffer, self.crc)

    def skip(self, n: int) -> None:
        if self.pos + n > self.end:
            raise TensorFileError(f"{self.path} is truncated or corrupt")
        if not self.track_crc:
            self.f.seek(n, os.SEEK_CUR)
            self.pos += n
            return
        # Skipped bytes still count for the CRC: read them in bounded pieces.
        while n:
            step = min(n, 1 << 24)
            self.crc = binascii.crc32(self.f.read(step), self.crc)
            self.pos += step
            n -= step

    def varint(self) -> int:
        shift = result = 0
        while True:
            byte = self.read(1)[0]
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise TensorFileError(f"{self.path} is corrupt (bad varint)")


# -------------------------------------------------------------------------------- MindSpore .ckpt
_CRC_TRAILER = b"crc_num"
_CKPT_SLICE = 512 * 1024 * 1024  # bytes per Value, like MindSpore's own writer


def iter_ms_ckpt(
    path: str, want: Callable[[str], bool] | None = None, types: dict[str, str] | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Stream the tensors of a MindSpore .ckpt; tensors for which want(name) is False are skipped (never
    held in memory; read only when a CRC trailer must be verified). `types`, if given, receives every
    tensor's stored type ("Float16", ...).

    Memory: one tensor at a time, read straight into its final array. A CRC trailer, when present, is
    verified after the last record. A big tensor may span several records (slices), which are joined.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        end, expected_crc = _crc_trailer(f, size)
        r = _Reader(f, path, end, track_crc=expected_crc is not None)
        current: _Tensor | None = None  # the tensor being assembled from one or more records
        while r.pos < end:
            tag, dims, ttype, content_len, record_end = _record_header(r, path)
            if types is not None:
                types[tag] = ttype
            current, finished = _ckpt_slice(r, path, current, tag, dims, ttype, content_len, want)
            if finished is not None:
                yield tag, finished
            if r.pos != record_end:
                raise TensorFileError(f"{path} is corrupt (record {tag!r} does not end after its data)")
        if current is not None and current.buffer is not None:
            raise TensorFileError(
                f"{path} is truncated: tensor {current.tag} has {current.filled} of {current.nbytes} bytes"
            )
        if expected_crc is not None and r.crc != expected_crc:
            raise TensorFileError(f"{path} failed its CRC check: the file is corrupt")


def _crc_trailer(f, size: int) -> tuple[int, int | None]:
    """(where the records end, the CRC32 the trailer expects or None): MindSpore may append b"crc_num" and
    the checksum of the records as a 17-byte trailer."""
    if size >= 17:
        f.seek(size - 17)
        tail = f.read(17)
        f.seek(0)
        if tail[:7] == _CRC_TRAILER:
            return size - 17, int.from_bytes(tail[7:], "big")
    return size, None


def _record_header(r: _Reader, path: str) -> tuple[str, list[int], str, int, int]:
    """Read one record (a Checkpoint.Value: tag, then a TensorProto of dims, type and data) up to the start of
    its data. Returns (tag, dims, type, data length, the record's end)."""
    if r.varint() != (1 << 3 | 2):
        raise TensorFileError(f"{path} is not a MindSpore checkpoint (unexpected field at byte {r.pos})")
    value_len = r.varint()
    value_end = r.pos + value_len
    tag = None
    while r.pos < value_end:
        key = r.varint()
        field, wire = key >> 3, key & 7
        if wire != 2:
            raise TensorFileError(f"{path} is corrupt (field {field} of a record has wire type {wire})")
        length = r.varint()
        if field == 1:
            tag = r.read(length).decode("utf-8")
        elif field == 2:
            if r.pos + length != value_end:
                raise TensorFileError(f"{path} is corrupt (tensor record length mismatch)")
            dims, ttype, content_len = _tensor_header(r, path, tag, r.pos + length)
            return tag, dims, ttype, content_len, value_end
        elif field == 3:
            raise TensorFileError(f"{path}: entry {tag} is a map tensor, which is not supported")
        else:
            raise TensorFileError(f"{path} is corrupt (unexpected record field {field})")
    raise TensorFileError(f"{path} is corrupt (incomplete record {tag!r})")


def _tensor_header(r: _Reader, path: str, tag: str | None, tensor_end: int) -> tuple[list[int], str, int]:
    """Read a TensorProto's dims and type up to its data (its last field): (dims, type, data length)."""
    dims, ttype = [], None
    while r.pos < tensor_end:
        key = r.varint()
        field, wire = key >> 3, key & 7
        if field == 1 and wire == 0:
            dims.append(r.varint())
        elif field == 1 and wire == 2:
            packed_len = r.varint()
            packed_end = r.pos + packed_len
            while r.pos < packed_end:
                dims.append(r.varint())
        elif field == 2 and wire == 2:
            ttype = r.read(r.varint()).decode("utf-8")
        elif field == 3 and wire == 2:
            content_len = r.varint()
            if tag is None or ttype is None:
                raise TensorFileError(f"{path}: a record's data precedes its name or type")
            if r.pos + content_len != tensor_end:
                raise TensorFileError(f"{path} is corrupt (tensor record length mismatch)")
            return dims, ttype, content_len
        else:
            raise TensorFileError(f"{path} is corrupt (unexpected tensor field {field})")
    raise TensorFileError(f"{path} is corrupt (incomplete record {tag!r})")


@dataclasses.dataclass
class _Tensor:
    tag: str
    shape: tuple[int, ...]
    nbytes: int
    buffer: np.ndarray | None  # flat uint8; None when the tensor is skipped
    filled: int = 0


def _ckpt_slice(
    r: _Reader, path: str, current: _Tensor | None, tag: str, dims: list[int], ttype: str, length: int, want
) -> tuple[_Tensor | None, np.ndarray | None]:
    """Read one record's bytes into the tensor being assembled: (still assembling, finished array)."""
    if ttype not in _CKPT_NUMPY:
        raise TensorFileError(f"{path}: tensor {tag} has unsupported type {ttype!r}")
    if current is not None and current.tag != tag:
        if current.buffer is not None:
            raise TensorFileError(
                f"{path}: tensor {current.tag} is incomplete ({current.filled} of "
                f"{current.nbytes} bytes) before {tag} starts"
            )
        current = None
    if current is None:
        shape = tuple(int(d) for d in dims)
        if shape == (0,):
            shape = ()
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_CKPT_NUMPY[ttype]).itemsize
        keep = want is None or want(tag)
        current = _Tensor(tag, shape, nbytes, np.empty(nbytes, dtype=np.uint8) if keep else None)
    if current.filled + length > current.nbytes:
        raise TensorFileError(f"{path}: tensor {tag} holds more bytes than its shape {current.shape} allows")
    if current.buffer is None:
        r.skip(length)
    else:
        r.read_into(memoryview(current.buffer)[current.filled : current.filled + length])
    current.filled += length
    if current.filled < current.nbytes:
        return current, None
    if current.buffer is None:
        return None, None
    array = current.buffer.view(_CKPT_NUMPY[ttype]).reshape(current.shape)
    return None, bfloat16_to_float32(array) if ttype == "BFloat16" else array


class MsCkptWriter:
    """Write a MindSpore .ckpt tensor by tensor (no tensor is copied or buffered)."""

    def __init__(self, path: str):
        self.path = path
        self.f = open(path, "wb")
        self.nbytes = 0

    def add(self, name: str, array: np.ndarray, dtype: str) -> None:
        data = to_storage(array, dtype)
        tag = name.encode("utf-8")
        dims = b"".join(_varint(1 << 3 | 0) + _varint(d) for d in (data.shape or (0,)))
        ttype = _CKPT_TYPES[dtype].encode()
        flat = memoryview(data.reshape(-1)).cast("B")
        for start in range(0, max(len(flat), 1), _CKPT_SLICE):
            chunk = flat[start : start + _CKPT_SLICE]
            tensor_len = (
                len(dims) + len(_len_field(2, len(ttype))) + len(ttype) + len(_len_field(3, len(chunk))) + len(chunk)
            )
            value_len = len(_len_field(1, len(tag))) + len(tag) + len(_len_field(2, tensor_len)) + tensor_len
            self.f.write(
                _len_field(1, value_len)
                + _len_field(1, len(tag))
                + tag
                + _len_field(2, tensor_len)
                + dims
                + _len_field(2, len(ttype))
                + ttype
                + _len_field(3, len(chunk))
            )
            self.f.write(chunk)
        self.nbytes += data.nbytes

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def abort(self) -> None:
        self.f.close()


# ----------------------------------------------------------------------------------- safetensors
def safetensors_header_bound(entries: list[tuple[str, tuple[int, ...]]], metadata: dict | None = None) -> int:
    """An upper bound of the JSON header size for any subset of `entries` (name, shape)."""
    worst = {name: {"dtype": "BF16", "shape": list(shape), "data_offsets": [10**15, 10**15]} for name, shape in entries}
    if metadata:
        worst["__metadata__"] = metadata
    n = len(json.dumps(worst, separators=(",", ":")).encode("utf-8")) + 64
    return (n + 7) // 8 * 8


class SafetensorsWriter:
    """Write a .safetensors file tensor by tensor into a reserved header of `header_bytes`."""

    def __init__(self, path: str, header_bytes: int, metadata: dict[str, str] | None = None):
        self.path, self.header_bytes, self.metadata = path, header_bytes, metadata
        self.f = open(path, "wb")
        self.f.write(b"\0" * (8 + header_bytes))
        self.entries: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, array: np.ndarray, dtype: str) -> None:
        data = to_storage(array, dtype)
        self.f.write(memoryview(data.reshape(-1)).cast("B"))
        self.entries[name] = {
            "dtype": _ST_TYPES[dtype],
            "shape": list(data.shape),
            "data_offsets": [self.nbytes, self.nbytes + data.nbytes],
        }
        self.nbytes += data.nbytes

    def close(self) -> None:
        header = dict(self.entries)
        if self.metadata:
            header["__metadata__"] = self.metadata
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        if len(text) > self.header_bytes:
            raise TensorFileError(
                f"safetensors header of {self.path} needs {len(text)} bytes, {self.header_bytes} were reserved"
            )
        self.f.seek(0)
        self.f.write(struct.pack("<Q", self.header_bytes) + text + b" " * (self.header_bytes - len(text)))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def abort(self) -> None:
        self.f.close()


def _torch():
    import torch

    return torch


def _torch_to_numpy(tensor) -> np.ndarray:
    torch = _torch()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy()  # float32 holds bfloat16 exactly
    return tensor.numpy()


def ckpt_tensor_types(path: str) -> dict[str, str]:
    """{tensor: stored type} of a MindSpore .ckpt, without reading any tensor data."""
    types: dict[str, str] = {}
    for _ in iter_ms_ckpt(path, want=lambda name: False, types=types):
        pass
    return types


def safetensors_tensor_types(path: str) -> dict[str, str]:
    """{tensor: dtype} ("F16", ...) from a .safetensors header."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        if size > 100 << 20:
            raise TensorFileError(f"{path}: a safetensors header of {size} bytes is not plausible")
        header = json.loads(f.read(size))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, _torch_to_numpy(f.get_tensor(name))
    except SafetensorError as exc:
        raise TensorFileError(f"{path} is not a valid safetensors file: {exc}") from exc


def iter_torch_bin(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a PyTorch pickle, loaded with weights_only=True and mmap (no code in the file can run)."""
    torch = _torch()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError... all mean "not a safe, valid file"
        raise TensorFileError(f"cannot load {path} safely (weights_only=True): {exc}") from exc
    if not isinstance(state, dict):
        raise TensorFileError(f"{path} does not hold a state dict")
    for name in list(state):
        tensor = state.pop(name)
        if not isinstance(tensor, torch.Tensor):
            raise TensorFileError(f"{path}: entry {name} is not a tensor")
        yield name, _torch_to_numpy(tensor)
