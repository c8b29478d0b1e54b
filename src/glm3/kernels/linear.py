"""The products of a linear layer: MindSpore's MatMul, or on CPU our kernels (csrc/linear.cc), which read
float32, float16 or bfloat16 weights as stored and never make a float32 copy of a half-precision weight.

- `xwt` (x W^T, the forward pass; any number of rows, streaming W once for up to 8 rows, i.e. decoding);
- `xw` (x W, the backward pass of the forward: dx = dy W);
- FrozenWeightMatMul: x W^T for a weight that gets no gradient (LoRA's base), whose backward computes dx only.

The kernels are compiled on first use (glm3.kernels.library); without a working compiler the model keeps
MindSpore's MatMul (`kernel_library()` returns None and says why in the log).
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

# Rows of x up to which the kernel streams the weights (decoding); above it MindSpore's MatMul is faster
# for float32 weights (half-precision weights always go through the kernel: no float32 copy).
SMALL_M = 8


def xwt_op(library: str):
    """AOT custom op: x [m, k] . w [n, k]^T -> [m, n]; x and the result float32, w float32/float16/bfloat16."""
    return ops.Custom(
        f"{library}:glm3_linear_xwt", out_shape=lambda x, w: (x[0], w[0]), out_dtype=lambda x, w: x, func_type="aot"
    )


def xw_op(library: str):
    """AOT custom op: x [m, n] . w [n, k] -> [m, k]; x and the result float32, w float32/float16/bfloat16."""
    return ops.Custom(
        f"{library}:glm3_linear_xw", out_shape=lambda x, w: (x[0], w[1]), out_dtype=lambda x, w: x, func_type="aot"
    )


class FrozenWeightMatMul(nn.Cell):
    """x [m, k] . w [n, k]^T in float32 for a weight that gets no gradient (the frozen base of LoRA).

    Autodiff of `MatMul(x, Cast(w))` keeps the float32 cast of every half-precision weight alive from the
    forward pass until the backward pass needs it for dx (measured on 8 layers of 4096x4096 float16
    weights: 0.54 GB held for 0.27 GB of weights; recompute() did not release it). This cell's backward
    computes dx only, and with the CPU kernels (`library`) neither pass ever makes a float32 copy of w: LoRA
    over a 12.5 GB float16 base then costs its own storage plus activations.
    """

    def __init__(self, library: str | None = None):
        super().__init__()
        self.xwt = xwt_op(library) if library else None
        self.xw = xw_op(library) if library else None
        self.matmul = ops.MatMul(transpose_b=True)
        self.matmul_nn = ops.MatMul()

    def construct(self, x, w):
        if self.xwt is not None:
            return self.xwt(x, w)
        return self.matmul(x, ops.depend(w, x).astype(ms.float32))

    def bprop(self, x, w, out, dout):
        if self.xw is not None:
            dx = self.xw(dout, w)
        else:
            dx = self.matmul_nn(dout, ops.depend(w, dout).astype(ms.float32))
        return dx, ops.zeros((), w.dtype)  # w is frozen: its gradient is never used
