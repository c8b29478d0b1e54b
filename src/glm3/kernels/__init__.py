"""Compute kernels of the model: plain MindSpore ops that run everywhere, and faster paths where they exist.

The backend is chosen once, when a model is built (`GLM3ForCausalLM(config, kernels_backend=...)`):
- "plain": MindSpore operators only (any device; what export and training use).
- "cpu": plain, plus our kernels (csrc/): the linear layers' products, which read float32, float16 or
  bfloat16 weights as stored: decoding-size products at about twice MindSpore's MatMul speed with float32
  weights (decoding is bound by reading weights) and half the bytes again with half precision; and every
  product with a half-precision weight, so no float32 copy of one is ever made (inference and LoRA
  training); the paged cache's write (in place) and decode attention, fused with the qkv projection's bias
  and RoPE (glm3.kernels.paged_attention); and in inference RMSNorm and SwiGLU as one operator each
  (glm3.kernels.elementwise); products with int8 / int4 weight-only quantized weights read as stored
  (glm3.kernels.quantized); and, in paged decoding, each whole layer as one operator composed of those
  (glm3.kernels.decode_layer).
- "ascend": MindSpore's fused RmsNorm, RotaryPositionEmbedding and FlashAttentionScore (Ascend only).
- "auto": "ascend" on Ascend, else "cpu" when the kernel can be built, else "plain".
"""

from __future__ import annotations

import mindspore as ms

from glm3.kernels.attention import attention
from glm3.kernels.broadcast import like
from glm3.kernels.decode_layer import DecodeLayerKernel
from glm3.kernels.elementwise import ElementwiseKernels
from glm3.kernels.library import kernel_library
from glm3.kernels.linear import SMALL_M, FrozenWeightMatMul, xw_op, xwt_op
from glm3.kernels.paged_attention import PagedCacheKernels, paged_attention, write_cache
from glm3.kernels.quantized import dequantize, quantized_xwt_op
from glm3.kernels.rms_norm import rms_norm
from glm3.kernels.rope import apply_rotary, rope_tables

BACKENDS = ("auto", "plain", "cpu", "ascend")


def resolve_backend(name: str = "auto") -> str:
    """Return "plain", "cpu" or "ascend" for a requested backend, failing clearly where it cannot run."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    device = ms.get_context("device_target")
    if name == "auto":
        if device == "Ascend":
            return "ascend"
        return "cpu" if device == "CPU" and kernel_library() else "plain"
    if name == "ascend" and device != "Ascend":
        raise RuntimeError(f"kernel backend 'ascend' needs an Ascend device; the device target is {device}")
    if name == "cpu":
        if device != "CPU":
            raise RuntimeError(f"kernel backend 'cpu' needs the CPU device target; it is {device}")
        if kernel_library() is None:
            raise RuntimeError(
                "kernel backend 'cpu' needs the CPU kernels, which could not be built "
                "(is a C++ compiler with OpenMP installed?)"
            )
    return name


__all__ = [
    "BACKENDS",
    "DecodeLayerKernel",
    "ElementwiseKernels",
    "SMALL_M",
    "FrozenWeightMatMul",
    "PagedCacheKernels",
    "apply_rotary",
    "attention",
    "kernel_library",
    "like",
    "dequantize",
    "quantized_xwt_op",
    "paged_attention",
    "resolve_backend",
    "rms_norm",
    "rope_tables",
    "write_cache",
    "xw_op",
    "xwt_op",
]
