"""LoRA's gradients against float64 numpy: a Linear with a frozen half-precision base (its backward through
FrozenWeightMatMul: our CPU kernel x W, or MindSpore's MatMul on a cast) and a rank-4 adapter. The base has
600 output rows, so the backward kernel's tiles of 256 weight rows run twice whole and once as a tail."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from glm3.modeling.build import BuildOptions
from glm3.modeling.linear import Linear


class Loss(nn.Cell):
    """sum(layer(x) * dout): its gradient with respect to the layer's output is dout."""

    def __init__(self, layer, dout):
        super().__init__()
        self.layer, self.dout = layer, dout

    def construct(self, x):
        return (self.layer(x) * self.dout).sum()


@pytest.mark.parametrize("backend", ["cpu", "plain"])
def test_lora_gradients_equal_float64_numpy(backend):
    rng = np.random.default_rng(7)
    m, k, n, rank, alpha = 13, 48, 600, 4, 8.0
    layer = Linear(k, n, True, BuildOptions(dtype=ms.float16, backend=backend))
    w = rng.standard_normal((n, k)).astype(np.float16)
    bias = rng.standard_normal(n).astype(np.float16)
    layer.weight.set_data(Tensor(w))
    layer.bias.set_data(Tensor(bias))
    layer.freeze()
    layer.add_lora(rank, alpha)
    a = rng.standard_normal((rank, k)).astype(np.float32) * 0.3
    b = rng.standard_normal((n, rank)).astype(np.float32) * 0.3
    layer.lora_a.set_data(Tensor(a))
    layer.lora_b.set_data(Tensor(b))
    if backend == "cpu":
        assert layer.method.frozen_matmul.xw is not None  # the kernel's backward is the path under test
    x = rng.standard_normal((m, k)).astype(np.float32)
    dout = rng.standard_normal((m, n)).astype(np.float32)
    net = Loss(layer, Tensor(dout))
    net.set_train(True)
    dx, (da, db) = ms.grad(net, grad_position=0, weights=[layer.lora_a, layer.lora_b])(Tensor(x))

    x64, w64, a64, b64, d64 = (v.astype(np.float64) for v in (x, w, a, b, dout))
    s = alpha / rank
    np.testing.assert_allclose(db.asnumpy(), s * d64.T @ (x64 @ a64.T), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(da.asnumpy(), s * (d64 @ b64).T @ x64, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx.asnumpy(), d64 @ w64 + s * (d64 @ b64) @ a64, rtol=1e-5, atol=2e-4)
    assert not layer.weight.requires_grad and layer.lora_a.requires_grad
    # the forward too: the base, its bias and the update
    y = layer(Tensor(x)).asnumpy()
    np.testing.assert_allclose(y, x64 @ w64.T + bias + s * (x64 @ a64.T) @ b64.T, rtol=1e-5, atol=1e-4)
