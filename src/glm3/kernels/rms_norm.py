"""RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, computed in float32."""

import mindspore as ms
from mindspore import ops

from glm3.kernels.broadcast import like


def rms_norm(x, weight, eps: float, fused: bool = False):
    """Normalise the last axis of x; the result has x's dtype."""
    if fused:
        return ops.rms_norm(x, weight.astype(x.dtype), eps)[0]
    x32 = x.astype(ms.float32)
    variance = ops.mean(x32 * x32, -1, keep_dims=True)
    normed = x32 * like(ops.rsqrt(variance + eps), x32)
    return (normed * like(weight.astype(ms.float32), normed)).astype(x.dtype)
