"""The linear layer, y = x W^T (+ b), and its methods: how the product is computed on each backend, chosen once
when the layer is built (as vLLM's linear layers delegate to a quant_method's apply), so the layer itself only
adds its bias and LoRA update.

- FloatKernelMethod: our CPU kernels (glm3.kernels.linear) read a half-precision W as stored for every
  product, and a float32 W for products of up to `kernel_rows` rows (decoding); MindSpore's MatMul above that.
- FloatMatMulMethod: MindSpore's MatMul, a half-precision W cast per call in blocks of rows (CAST_BLOCK_BYTES
  of float32 each, each cast when the previous block's product is done: what the exported graphs do; at 6B,
  0.6 GB above the weights instead of 1.9 GB with the output layer cast in two halves).
- QuantizedKernelMethod / QuantizedMatMulMethod: int8 / packed-int4 W with float16 scales, through our CPU
  kernels, or dequantized a block of rows at a time into MindSpore's MatMul.
A frozen W (Linear.freeze: LoRA's base) trains through FrozenWeightMatMul, whose backward computes dx only.
"""

from __future__ import annotations

import math

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import Uniform, Zero

from glm3 import kernels
from glm3.dtypes import CAST_BLOCK_BYTES
from glm3.modeling.build import BuildOptions, as_compute, new_param


def _cast_block_rows(out_features: int, in_features: int, converted: bool) -> int:
    """Rows of W cast (or dequantized) at a time: all of them when W needs no conversion."""
    blocks = -(-out_features * in_features * 4 // CAST_BLOCK_BYTES) if converted else 1
    return -(-out_features // blocks)


class FloatMatMulMethod(nn.Cell):
    """x W^T with MindSpore's MatMul; W cast to the compute dtype per call, in blocks of rows when it is stored
    in another dtype (inference), whole (training: one op for autodiff)."""

    def __init__(self, out_features: int, in_features: int, dtype, compute_dtype):
        super().__init__()
        self.compute_dtype, self.out_features = compute_dtype, out_features
        self.matmul = ops.MatMul(transpose_b=True)
        self.cast_block_rows = _cast_block_rows(out_features, in_features, dtype != compute_dtype)
        self.frozen_matmul = None  # Linear.freeze: the weight gets no gradient

    def _blockwise(self, x2, weight):
        outs, done = (), x2
        for block in ops.split(ops.depend(weight, x2), self.cast_block_rows, 0):
            done = self.matmul(x2, ops.depend(block, done).astype(self.compute_dtype))
            outs = outs + (done,)
        return ops.concat(outs, -1)

    def _full(self, x2, weight):
        if self.training and self.frozen_matmul is not None:
            return self.frozen_matmul(x2, weight)
        if not self.training and self.cast_block_rows < self.out_features:
            return self._blockwise(x2, weight)
        return self.matmul(x2, as_compute(weight, x2, self.compute_dtype))

    def construct(self, x2, weight, scale):
        return self._full(x2, weight)


class FloatKernelMethod(FloatMatMulMethod):
    """x W^T with our CPU kernels at inference (every product with a half-precision W, up to kernel_rows rows
    with a float32 one); MindSpore's MatMul otherwise."""

    def __init__(self, out_features: int, in_features: int, dtype, compute_dtype, library: str, kernel_rows: int):
        super().__init__(out_features, in_features, dtype, compute_dtype)
        self.xwt = kernels.xwt_op(library)
        self.kernel_rows = 1 << 62 if dtype != ms.float32 else kernel_rows  # rows the kernel takes

    def construct(self, x2, weight, scale):
        if not self.training and x2.shape[0] <= self.kernel_rows:
            return self.xwt(x2, weight)
        return self._full(x2, weight)


class QuantizedMatMulMethod(nn.Cell):
    """x W^T for a quantized W with MindSpore's MatMul: W dequantized a block of rows at a time, each block
    after the previous product."""

    def __init__(self, out_features: int, in_features: int, compute_dtype, bits: int):
        super().__init__()
        self.compute_dtype, self.bits = compute_dtype, bits
        self.matmul = ops.MatMul(transpose_b=True)
        self.cast_block_rows = _cast_block_rows(out_features, in_features, True)

    def construct(self, x2, weight, scale):
        outs, done = (), x2
        data = ops.split(ops.depend(weight, x2), self.cast_block_rows, 0)
        scales = ops.split(ops.depend(scale, x2), self.cast_block_rows, 0)
        for block, block_scale in zip(data, scales):
            w = kernels.dequantize(ops.depend(block, done), ops.depend(block_scale, done), self.bits)
            done = self.matmul(x2, w.astype(self.compute_dtype))
            outs = outs + (done,)
        return ops.concat(outs, -1) if len(outs) > 1 else outs[0]


class QuantizedKernelMethod(nn.Cell):
    """x W^T for a quantized W with our CPU kernels, which read the int8 / int4 data as stored."""

    def __init__(self, library: str, bits: int):
        super().__init__()
        self.qxwt = kernels.quantized_xwt_op(library, bits)

    def construct(self, x2, weight, scale):
        return self.qxwt(x2, weight, scale)


def linear_method(out_features: int, in_features: int, options: BuildOptions, quantized: bool) -> nn.Cell:
    """The method of a linear layer of this build: our CPU kernels when the build runs them, else MindSpore's."""
    library = options.cpu_library()
    if quantized:
        bits = options.quantization.bits
        if library:
            return QuantizedKernelMethod(library, bits)
        return QuantizedMatMulMethod(out_features, in_features, options.compute_dtype, bits)
    if library:
        return FloatKernelMethod(
            out_features, in_features, options.dtype, options.compute_dtype, library, options.kernel_rows
        )
    return FloatMatMulMethod(out_features, in_features, options.dtype, options.compute_dtype)


class Linear(nn.Cell):
    """y = x W^T (+ b), with W stored [out, in] as in PyTorch (any storage dtype), computed in compute_dtype by
    the build's linear method (see the module), plus an optional LoRA update."""

    def __init__(self, in_features: int, out_features: int, bias: bool, options: BuildOptions, quantized: bool = False):
        super().__init__()
        dtype, compute_dtype = options.dtype, options.compute_dtype
        self.in_features, self.out_features = in_features, out_features
        # A quantized W: int8 / packed-int4 data under the name `weight` and float16 scales beside it.
        self.quant = options.quantization if quantized else None
        self.weight_scale = None
        if self.quant is not None:
            shape = (out_features, in_features)
            self.quant.check_shape("a linear weight", shape)
            stored = ms.int8 if self.quant.bits == 8 else ms.uint8
            self.weight = new_param(self.quant.stored_shape(shape), stored, Zero(), "weight")
            self.weight_scale = new_param(self.quant.scale_shape(shape), ms.float16, Zero(), "weight_scale")
        else:
            self.weight = new_param((out_features, in_features), dtype, options.initializer(), "weight")
        self.bias = new_param((out_features,), dtype, Zero(), "bias") if bias else None
        self.compute_dtype = compute_dtype
        self.method = linear_method(out_features, in_features, options, self.quant is not None)
        self.library = options.cpu_library()
        self.matmul = ops.MatMul(transpose_b=True)  # LoRA's low-rank products
        self.lora_a = self.lora_b = self.lora_mask = None

    def freeze(self, frozen: bool = True) -> None:
        """Train without a gradient for W (LoRA's base): W's backward keeps no float32 copy of it."""
        if self.quant is not None:
            raise ValueError(
                "a quantized model cannot be trained: fine-tune its float source, then quantize (glm3 quantize)"
            )
        self.weight.requires_grad = not frozen
        if self.bias is not None:
            self.bias.requires_grad = not frozen
        frozen_float32 = frozen and self.compute_dtype == ms.float32
        library = self.library if self.weight.dtype != ms.float32 else None
        self.method.frozen_matmul = kernels.FrozenWeightMatMul(library) if frozen_float32 else None

    def add_lora(self, rank: int, alpha: float) -> None:
        """Add a low-rank update: y = x W^T + drop(x) A^T B^T * alpha/rank, with B = 0 so it starts as a no-op.

        A is [rank, in] (Kaiming-uniform, as in the LoRA paper's reference code), B is [out, rank], both
        float32 whatever the base weight's dtype.
        Dropout, in training only, multiplies x by `lora_mask`, a Parameter the trainer refills from its
        own seeded generator before each step (so a resumed run draws the same masks; see glm3.train.lora).
        """
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_a = new_param((rank, self.in_features), ms.float32, Uniform(bound), "lora_a")
        self.lora_b = new_param((self.out_features, rank), ms.float32, Zero(), "lora_b")
        self.lora_scale = alpha / rank

    def remove_lora(self) -> None:
        for name in ("lora_a", "lora_b", "lora_mask"):
            if getattr(self, name) is not None:
                delattr(self, name)  # drops the Parameter from the cell, then a plain None stands in
                object.__setattr__(self, name, None)

    def construct(self, x, with_bias: bool = True):
        """y = x W^T (+ b unless with_bias is False: a caller that adds it itself, see SelfAttention)."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).astype(self.compute_dtype)
        y = self.method(x2, self.weight, self.weight_scale)
        if self.bias is not None and with_bias:
            y = y + kernels.like(self.bias.astype(self.compute_dtype), y)
        if self.lora_a is not None:
            h = x2 * self.lora_mask.astype(x2.dtype) if self.lora_mask is not None and self.training else x2
            h = self.matmul(h, self.lora_a.astype(self.compute_dtype))
            y = y + self.matmul(h, self.lora_b.astype(self.compute_dtype)) * self.lora_scale
        return y.reshape(shape[:-1] + (self.out_features,))
