"""ChatGLM's rotary position embedding: partial (first half of each head) and interleaved (adjacent pairs)."""

from __future__ import annotations

import numpy as np
from mindspore import ops

from glm3.kernels.broadcast import like


def rope_tables(max_positions: int, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of pos * theta_i, shape [max_positions, len(theta)], float32.

    theta: the inverse frequencies (glm3.modeling.config.rope_inv_freq). The angles are computed in float32,
    as the reference implementation does, so they round the same way.
    """
    angles = np.outer(np.arange(max_positions, dtype=np.float32), theta).astype(np.float32)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rotary(x, cos, sin, fused: bool = False):
    """Rotate the first 2 * cos.shape[-1] channels of every head of x in adjacent pairs.

    x: [batch, seq, heads, head_dim]; cos, sin: [batch, seq, 1, rotary_dim // 2] (float32).
    Channel pair (2i, 2i+1) becomes (x0 cos - x1 sin, x1 cos + x0 sin).
    """
    half = cos.shape[-1]
    rot = 2 * half
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if fused:
        # The Ascend operator wants full-width interleaved tables: every angle repeated for its pair.
        cos2 = ops.repeat_interleave(cos, 2, -1).astype(x.dtype)
        sin2 = ops.repeat_interleave(sin, 2, -1).astype(x.dtype)
        rotated = ops.rotary_position_embedding(
            x_rot.transpose(0, 2, 1, 3), cos2.transpose(0, 2, 1, 3), sin2.transpose(0, 2, 1, 3), 1
        ).transpose(0, 2, 1, 3)
        return ops.concat((rotated, x_pass), -1)
    b, s, h, _ = x.shape
    pairs = x_rot.astype(cos.dtype).reshape(b, s, h, half, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = like(cos, x0), like(sin, x0)  # over the heads, explicitly (see glm3.kernels.broadcast)
    out0 = x0 * cos - x1 * sin
    out1 = x1 * cos + x0 * sin
    rotated = ops.stack((out0, out1), -1).reshape(b, s, h, rot).astype(x.dtype)
    return ops.concat((rotated, x_pass), -1)
