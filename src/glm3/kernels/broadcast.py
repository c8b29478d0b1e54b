"""Explicit broadcasting for elementwise ops on MindSpore's CPU backend.

An elementwise Mul/Add/Select whose operands broadcast implicitly (x [s, h] * r [s, 1], x * weight [h])
keeps an output-sized buffer alive for as long as the compiled graph lives: one per such op, so memory grows
with the number of layers and tokens (measured: 24 RMSNorm-like steps on [256, 4096] float32 held 0.45 GB,
the same steps with explicit broadcast_to 0.02 GB; in LoRA training of the 6B shape it was ~1.6 MB per token
per layer). Broadcasting the small operand to the full shape first gives two same-shaped operands, and
MindSpore reuses those buffers like any other.
"""

from mindspore import ops


def like(small, big):
    """`small` broadcast to `big`'s shape, ready for a same-shape elementwise op with it."""
    return ops.broadcast_to(small, big.shape)
