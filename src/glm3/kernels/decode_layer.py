"""A whole decoding layer over the paged KV cache as one CPU kernel (csrc/decode_layer.cc), for inference.

At one token per row a layer is a dozen small operators, and on CPU MindSpore spends 50-100 us of its own on
each; one call per layer takes that cost out of the step. The kernel runs the same C++ functions as the
single operators (glm3.kernels.linear, .quantized, .elementwise, .paged_attention) in the same order, so a
layer computes the same result either way.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops


class DecodeLayerKernel:
    """The fused decoding layer (`library` from glm3.kernels.kernel_library)."""

    def __init__(self, library: str):
        self.op = ops.Custom(
            f"{library}:glm3_decode_layer",
            out_shape=lambda x, *rest: x,
            out_dtype=lambda x, *rest: ms.float32,
            func_type="aot",
        )

    @staticmethod
    def constants(eps: float, scale: float, heads: int, residual_from_norm: bool) -> Tensor:
        """The layer's constants as the kernel takes them (one [4] float32 tensor, made once per layer)."""
        return Tensor(np.array([eps, scale, heads, float(residual_from_norm)], np.float32))

    def __call__(self, x, norms, linears, qkv_bias, rope, positions, caches, slots, block_tables, context_lens, consts):
        """x [b, hidden] float32 -> [b, hidden]. `norms`: the two RMSNorm weights; `linears`: (weight, scales) of
        qkv, dense, dense_h_to_4h and dense_4h_to_h (scales: a placeholder for a float weight); qkv_bias: of any
        float dtype; `rope`: the cos and sin tables [seq, rotary_dim / 2]; positions [b]; `caches`: the layer's
        key and value block caches, written in place: returns the output and the caches ordered after the
        write."""
        (qkv, qkv_scale), (dense, dense_scale), (up, up_scale), (down, down_scale) = linears
        out = self.op(
            x,
            norms[0],
            qkv,
            qkv_scale,
            qkv_bias,
            dense,
            dense_scale,
            norms[1],
            up,
            up_scale,
            down,
            down_scale,
            rope[0],
            rope[1],
            positions,
            caches[0],
            caches[1],
            slots,
            block_tables,
            context_lens,
            consts,
        )
        return out, ops.depend(caches[0], out), ops.depend(caches[1], out)
