"""Weight-only quantization: the format of a quantized checkpoint and its numpy reference.

Symmetric, per group of `group_size` consecutive input channels of each output row: scale = max|w| / qmax
(stored float16), q = round(w / scale) clipped to [-qmax, qmax], w ~ q * scale. qmax is 127 at 8 bits and 7 at
4 bits. Storage, under the weight's own name, with the scales beside it as `<name>_scale` [rows, cols / group]:
- 8 bits: int8 [rows, cols];
- 4 bits: uint8 [rows, cols / 2]; each block of 32 weights is 16 bytes, byte i holding weight i + 8 in its low
  nibble and weight i + 16 + 8 in its high one (the layout the CPU kernels unpack 16 lanes at a time).
config.json records it as `glm3_quantization` (QuantizationConfig.to_dict) with a format version; a reader
refuses versions it does not know. The linear layers' weights are always quantized, the output layer by
default, the embedding table on request; norms and biases stay in floating point.

Our own code, not a library's: the quantizers of PyPI (bitsandbytes, optimum-quanto, torchao, GPTQ/AWQ) work
on PyTorch modules and their own kernels, not on a streamed checkpoint read by MindSpore kernels.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

FORMAT_VERSION = 1
BITS = (8, 4)
BLOCK = 32  # weights per packing block; a group is a multiple of it
CONFIG_KEY = "glm3_quantization"
SCALE_SUFFIX = "_scale"
BLOCK_ELEMENTS = 1 << 24  # weights quantized at a time (64 MB of float32 temporaries)
OUTPUT_LAYER = "transformer.output_layer.weight"
EMBEDDING = "transformer.embedding.embedding_table"
_LINEAR = re.compile(
    r"transformer\.encoder\.layers\.\d+\.(self_attention\.(query_key_value|dense)|mlp\.(dense_h_to_4h|dense_4h_to_h))"
    r"\.weight"
)


class QuantizationError(ValueError):
    """A quantization setting or quantized tensor that is not valid."""


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """bits: 8 or 4; group_size: input channels per scale (a multiple of 32); output_layer / embedding: whether
    those are quantized too (the linear layers always are)."""

    bits: int
    group_size: int = 32
    output_layer: bool = True
    embedding: bool = False

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise QuantizationError(f"bits must be 8 or 4, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < BLOCK:
            raise QuantizationError(f"group_size must be a multiple of {BLOCK}, got {self.group_size!r}")
        if self.group_size % BLOCK:
            raise QuantizationError(f"group_size must be a multiple of {BLOCK}, got {self.group_size}")

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 7

    @property
    def storage_dtype(self) -> str:
        """The numpy dtype name of the quantized data."""
        return "int8" if self.bits == 8 else "uint8"

    def covers(self, name: str) -> bool:
        """Whether the weight `name` (our parameter name) is stored quantized."""
        if name == OUTPUT_LAYER:
            return self.output_layer
        if name == EMBEDDING:
            return self.embedding
        return _LINEAR.fullmatch(name) is not None

    def stored_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        rows, cols = shape
        return (rows, cols if self.bits == 8 else cols // 2)

    def scale_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        return (shape[0], shape[1] // self.group_size)

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) != 2 or shape[1] % self.group_size:
            raise QuantizationError(
                f"{name} {tuple(shape)}: its input size must be a multiple of group_size {self.group_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "method": "symmetric-weight-only",
            "bits": self.bits,
            "group_size": self.group_size,
            "scale_dtype": "float16",
            "output_layer": self.output_layer,
            "embedding": self.embedding,
        }

    @classmethod
    def from_dict(cls, data: Any) -> QuantizationConfig:
        if not isinstance(data, dict):
            raise QuantizationError(f"{CONFIG_KEY} must be an object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise QuantizationError(
                f"{CONFIG_KEY} format_version {version!r} is not supported (this glm3 reads version "
                f"{FORMAT_VERSION}); re-quantize the model with this version"
            )
        if (
            data.get("method", "symmetric-weight-only") != "symmetric-weight-only"
            or data.get("scale_dtype", "float16") != "float16"
        ):
            raise QuantizationError(f"{CONFIG_KEY}: unknown method or scale dtype in {data}")
        try:
            return cls(
                bits=data["bits"],
                group_size=data.get("group_size", 32),
                output_layer=bool(data.get("output_layer", True)),
                embedding=bool(data.get("embedding", False)),
            )
        except KeyError as exc:
            raise QuantizationError(f"{CONFIG_KEY} lacks {exc}") from None


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


# ------------------------------------------------------------------------------------ numpy reference
def quantize(weight: np.ndarray, config: QuantizationConfig) -> tuple[np.ndarray, np.ndarray]:
    """(data, scales) of a [rows, cols] floating-point weight, as stored (see the module docstring). Works in
    blocks of rows, so the float32 temporaries stay at about 64 MB whatever the weight's size."""
    rows, cols = weight.shape
    config.check_shape("weight", weight.shape)
    out_cols = cols if config.bits == 8 else cols // 2
    data = np.empty((rows, out_cols), np.int8 if config.bits == 8 else np.uint8)
    scales = np.empty((rows, cols // config.group_size), np.float16)
    step = max(1, BLOCK_ELEMENTS // cols)
    for r in range(0, rows, step):
        data[r : r + step], scales[r : r + step] = _quantize_rows(weight[r : r + step], config)
    return data, scales


def _quantize_rows(weight: np.ndarray, config: QuantizationConfig) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = weight.shape
    w = np.asarray(weight, dtype=np.float32).reshape(rows, cols // config.group_size, config.group_size)
    amax = np.abs(w).max(axis=-1)
    if not np.isfinite(amax).all():
        raise QuantizationError("the weight holds inf or NaN")
    scales = (amax / np.float32(config.qmax)).astype(np.float16)
    if np.isinf(scales).any():
        raise QuantizationError("a weight group is beyond float16 scales (|w| > 8e6)")
    s = scales.astype(np.float32)[..., None]
    q = np.divide(w, s, out=np.zeros_like(w), where=s > 0)
    q = np.clip(np.rint(q), -config.qmax, config.qmax).astype(np.int8).reshape(rows, cols)
    return (q if config.bits == 8 else pack_int4(q)), scales


def dequantize(data: np.ndarray, scales: np.ndarray, config: QuantizationConfig) -> np.ndarray:
    """The float32 weight [rows, cols] that (data, scales) stand for."""
    q = data.astype(np.int8) if config.bits == 8 else unpack_int4(data)
    rows, cols = q.shape
    groups = scales.shape[1]
    w = q.astype(np.float32).reshape(rows, groups, cols // groups) * scales.astype(np.float32)[..., None]
    return w.reshape(rows, cols)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], [rows, cols] -> uint8 [rows, cols / 2] in the block layout."""
    rows, cols = q.shape
    u = (q.astype(np.int16) + 8).astype(np.uint8).reshape(rows, cols // BLOCK, 2, BLOCK // 2)
    return (u[:, :, 0, :] | (u[:, :, 1, :] << 4)).reshape(rows, cols // 2)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [rows, cols / 2] in the block layout -> int8 [rows, cols]."""
    rows, half = packed.shape
    p = packed.reshape(rows, half // (BLOCK // 2), BLOCK // 2)
    lo = (p & 15).astype(np.int8) - 8
    hi = (p >> 4).astype(np.int8) - 8
    return np.stack([lo, hi], axis=2).reshape(rows, half * 2)
