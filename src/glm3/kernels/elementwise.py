"""A decoding layer's elementwise steps as single CPU kernels (csrc/elementwise.cc): RMSNorm and SwiGLU.

Inference only (no gradients): on CPU each MindSpore operator costs 10-20 us to launch, and at one token per
row these steps take far longer to launch than to compute (RMSNorm alone is nine operators).
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops


class ElementwiseKernels:
    """RMSNorm and SwiGLU over float32 activations (`library` from glm3.kernels.kernel_library)."""

    def __init__(self, library: str):
        self.rms_norm_op = ops.Custom(
            f"{library}:glm3_rms_norm",
            out_shape=lambda x, w, eps: x,
            out_dtype=lambda x, w, eps: ms.float32,
            func_type="aot",
        )
        self.swiglu_op = ops.Custom(
            f"{library}:glm3_swiglu",
            out_shape=lambda x: (x[0], x[1] // 2),
            out_dtype=lambda x: ms.float32,
            func_type="aot",
        )

    def rms_norm(self, x, weight, eps: Tensor):
        """x [..., h] (float32) normalised over h, times weight [h] (any float dtype); eps: a [1] float32 tensor."""
        shape = x.shape
        return self.rms_norm_op(x.reshape(-1, shape[-1]), weight, eps).reshape(shape)

    def swiglu(self, x):
        """silu(a) * b for x = [a | b] on the last axis."""
        shape = x.shape
        return self.swiglu_op(x.reshape(-1, shape[-1])).reshape(shape[:-1] + (shape[-1] // 2,))
