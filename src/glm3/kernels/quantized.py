"""Products with weight-only quantized weights (glm3.quantization's format): our CPU kernels
(csrc/quantized.cc), which read int8 / packed int4 data and float16 scales as stored, for any number of rows
(decoding and prefill); and plain MindSpore operators that dequantize a block of rows at a time (any device,
exported graphs)."""

from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops

from glm3.kernels.broadcast import like
from glm3.quantization import BLOCK


def quantized_xwt_op(library: str, bits: int):
    """AOT custom op: x [m, k] (float32) . dequant(data, scales)^T -> [m, n] float32."""
    name = "glm3_linear_q8" if bits == 8 else "glm3_linear_q4"
    return ops.Custom(
        f"{library}:{name}",
        out_shape=lambda x, data, scales: (x[0], data[0]),
        out_dtype=lambda x, data, scales: ms.float32,
        func_type="aot",
    )


def dequantize(data, scales, bits: int):
    """The float32 weight [rows, cols] of quantized `data` (int8 [rows, cols] or uint8 [rows, cols / 2]) and
    float16 `scales` [rows, groups], with MindSpore operators (exact: the integers are small).

    Every operand is broadcast explicitly (glm3.kernels.broadcast): an implicitly broadcasting elementwise op
    keeps an output-sized buffer alive for the graph's lifetime, which here is a float32 copy of every weight
    block (measured: a 6B 4-bit export ran out of 24 GiB in `glm3 infer` without it)."""
    rows, groups = scales.shape
    if bits == 8:
        q = data.astype(ms.float32)
    else:
        packed = data.astype(ms.float32).reshape(rows, -1, BLOCK // 2)  # [rows, blocks, 16]
        high = ops.floor(packed * like(Tensor(0.0625, ms.float32), packed))
        low = packed - high * like(Tensor(16.0, ms.float32), high)
        q = ops.concat((low, high), -1).reshape(rows, -1)
        q = q - like(Tensor(8.0, ms.float32), q)
    cols = q.shape[1]
    q = q.reshape(rows, groups, cols // groups)
    w = q * like(scales.astype(ms.float32).reshape(rows, groups, 1), q)
    return w.reshape(rows, cols)
