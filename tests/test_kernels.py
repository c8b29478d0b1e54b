"""The CPU linear-layer kernels (glm3/csrc/linear.cc) against numpy, at every row count and weight dtype
they handle, as MindSpore custom operators in compiled graphs; and the frozen-weight product's backward."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from glm3.kernels import FrozenWeightMatMul, kernel_library, xw_op, xwt_op
from glm3.weights.tensor_files import bfloat16_bits, bfloat16_to_float32

LIB = kernel_library()  # None (and every test here failing) if the host's C++ compiler cannot build them

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def weight(rng, shape, dtype):
    """(MindSpore tensor stored as dtype, the float64 values it holds)."""
    w = rng.standard_normal(shape, dtype=np.float32)
    if dtype == "float16":
        w16 = w.astype(np.float16)
        return Tensor(w16), w16.astype(np.float64)
    if dtype == "bfloat16":
        exact = bfloat16_to_float32(bfloat16_bits(w))
        return Tensor(exact).astype(ms.bfloat16), exact.astype(np.float64)
    return Tensor(w), w.astype(np.float64)


class Product(nn.Cell):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, x, w):
        return self.op(x, w)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 65])
def test_xwt_and_xw_equal_numpy_at_every_row_count(dtype, rows):
    """Rows 1-8 take the streaming (decode) path, more rows the tiled (chunked) one."""
    rng = np.random.default_rng(rows)
    n, k = 70, 45  # neither a multiple of the 4-row, 8-lane or 16-row tiles: every tail path runs
    w, w64 = weight(rng, (n, k), dtype)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    y = Product(xwt_op(LIB))(Tensor(x), w).asnumpy()
    assert y.shape == (rows, n) and y.dtype == np.float32
    np.testing.assert_allclose(y, x.astype(np.float64) @ w64.T, rtol=1e-5, atol=1e-4)
    matmul = Product(ops.MatMul(transpose_b=True))(Tensor(x), w.astype(ms.float32)).asnumpy()
    np.testing.assert_allclose(y, matmul, rtol=1e-5, atol=1e-5)  # what MindSpore's MatMul computes
    dy = rng.standard_normal((rows, n), dtype=np.float32)
    dx = Product(xw_op(LIB))(Tensor(dy), w).asnumpy()
    assert dx.shape == (rows, k)
    np.testing.assert_allclose(dx, dy.astype(np.float64) @ w64, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_frozen_weight_matmul_gradient_is_dy_w_and_nothing_for_w(dtype):
    rng = np.random.default_rng(0)
    w, w64 = weight(rng, (40, 24), dtype)
    x = rng.standard_normal((13, 24), dtype=np.float32)
    dy = rng.standard_normal((13, 40), dtype=np.float32)
    for library in (LIB, None):  # the kernels, and MindSpore's MatMul on a cast
        cell = FrozenWeightMatMul(library)
        np.testing.assert_allclose(cell(Tensor(x), w).asnumpy(), x @ w64.T, rtol=1e-5, atol=1e-4)
        grad = ops.GradOperation(sens_param=True)(cell)
        dx = grad(Tensor(x), w, Tensor(dy)).asnumpy()
        np.testing.assert_allclose(dx, dy.astype(np.float64) @ w64, rtol=1e-5, atol=1e-4)


class Elementwise(nn.Cell):
    def __init__(self, kernels, which):
        super().__init__()
        self.kernels, self.which = kernels, which

    def construct(self, x, w, eps):
        if self.which == "rms_norm":
            return self.kernels.rms_norm(x, w, eps)
        return self.kernels.swiglu(x)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows", [1, 3, 4, 37])
def test_rms_norm_and_swiglu_kernels_equal_numpy(dtype, rows):
    """Fewer than 4 rows run on the calling thread, more on the pool: both give numpy's values."""
    from glm3.kernels import ElementwiseKernels

    rng = np.random.default_rng(rows)
    kernels = ElementwiseKernels(LIB)
    x = rng.standard_normal((2, rows, 48), dtype=np.float32)
    w, w64 = weight(rng, (48,), dtype)
    eps = Tensor(np.array([1e-5], np.float32))
    y = Elementwise(kernels, "rms_norm")(Tensor(x), w, eps).asnumpy()
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5) * w64
    np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5)
    z = Elementwise(kernels, "swiglu")(Tensor(x), w, eps).asnumpy()
    a, b = x64[..., :24], x64[..., 24:]
    assert z.shape == (2, rows, 24)
    np.testing.assert_allclose(z, a / (1 + np.exp(-a)) * b, rtol=2e-5, atol=2e-6)


def test_the_streaming_read_kernel_reads_every_float():
    from glm3.kernels.bandwidth import stream_read_bandwidth

    rate = stream_read_bandwidth(nbytes=8 << 20, repeats=2)  # raises if the sum of the ones is wrong
    assert rate is not None and 1e8 < rate < 1e13  # bytes per second: between 0.1 GB/s and 10 TB/s
