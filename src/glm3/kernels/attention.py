"""Grouped-query causal attention over explicit key/value tensors (a full sequence or a static KV cache)."""
from __future__ import annotations

import mindspore as ms
from mindspore import ops


def attention(q, k, v, keep_mask, scale: float, fused: bool = False):
    """softmax(q k^T * scale, masked) v with key/value groups shared by consecutive query heads.

    q: [batch, heads, q_len, d]; k, v: [batch, groups, kv_len, d]; heads % groups == 0 and query head h
    uses group h // (heads / groups). keep_mask: bool [batch or 1, 1, q_len, kv_len], True where a query may
    attend to a key. Returns [batch, heads, q_len, d] in q's dtype; softmax is computed in float32.
    """
    b, heads, q_len, d = q.shape
    groups, kv_len = k.shape[1], k.shape[2]
    if fused:
        drop = ops.logical_not(keep_mask).astype(ms.uint8)
        return ops.flash_attention_score(q, k, v, heads, attn_mask=drop, scalar_value=scale,
                                         input_layout="BNSD")
    rep = heads // groups
    # Queries of one group attend to the same keys: fold the group's heads into the query axis.
    qg = q.reshape(b, groups, rep * q_len, d)
    scores = ops.matmul(qg, k.swapaxes(-1, -2)).astype(ms.float32) * scale
    scores = scores.reshape(b, groups, rep, q_len, kv_len)
    keep = keep_mask.expand_dims(1)  # [batch or 1, 1, 1, q_len, kv_len]
    scores = ops.masked_fill(scores, ops.logical_not(keep), ms.Tensor(-1e30, ms.float32))
    probs = ops.softmax(scores, -1).astype(v.dtype).reshape(b, groups, rep * q_len, kv_len)
    out = ops.matmul(probs, v)
    return out.reshape(b, heads, q_len, d)
