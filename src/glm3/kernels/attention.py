"""Grouped-query causal attention over explicit key/value tensors (a full sequence or a static KV cache)."""

from __future__ import annotations

import mindspore as ms
from mindspore import ops

from glm3.kernels.broadcast import like

_BMM_NT = ops.BatchMatMul(transpose_b=True)


def attention(q, k, v, keep_mask, scale: float, fused: bool = False):
    """softmax(q k^T * scale, masked) v, with key/value groups shared by consecutive query heads.

    q: [batch, q_len, heads, d] (the projection's own layout); k, v: [batch, groups, kv_len, d] (the KV
    cache's); heads % groups == 0 and query head h uses group h // (heads / groups). keep_mask: bool
    [batch or 1, 1, q_len, kv_len], True where a query may attend to a key. Returns [batch, q_len, heads * d]
    in q's dtype, heads in order; softmax is computed in float32.

    The plain version runs one batched matmul per group on a slice of q, with no transpose of q or of the
    result: on MindSpore's CPU backend every Transpose of an activation keeps a buffer of its size alive
    for the graph's lifetime (see glm3.kernels.broadcast), and these are the biggest activations here.
    One query per row (decoding) takes _one_query.
    """
    b, q_len, heads, d = q.shape
    groups, kv_len = k.shape[1], k.shape[2]
    if fused:
        drop = ops.logical_not(keep_mask).astype(ms.uint8)
        out = ops.flash_attention_score(
            q.transpose(0, 2, 1, 3), k, v, heads, attn_mask=drop, scalar_value=scale, input_layout="BNSD"
        )
        return out.transpose(0, 2, 1, 3).reshape(b, q_len, heads * d)
    rep = heads // groups
    if q_len == 1:
        return _one_query(q, k, v, keep_mask, scale)
    # Rows of a group's scores are (query position, head within the group); the mask repeats over heads.
    drop = ops.logical_not(keep_mask.reshape(keep_mask.shape[0], q_len, 1, kv_len))
    outs = ()
    for g in range(groups):
        qg = q[:, :, g * rep : (g + 1) * rep].reshape(b, q_len * rep, d)
        scores = _BMM_NT(qg, k[:, g]).astype(ms.float32) * scale  # [b, q_len * rep, kv_len]
        if g == 0:
            drop = like(drop, scores.reshape(b, q_len, rep, kv_len)).reshape(b, q_len * rep, kv_len)
        scores = ops.masked_fill(scores, drop, ms.Tensor(-1e30, ms.float32))
        probs = ops.softmax(scores, -1).astype(v.dtype)
        outs = outs + (ops.matmul(probs, v[:, g]).reshape(b, q_len, rep * d),)
    return ops.concat(outs, -1) if groups > 1 else outs[0]


def _one_query(q, k, v, keep_mask, scale: float):
    """Decoding: q [b, 1, heads, d] is [b * groups, rep, d] as it lies and k, v [b, groups, kv_len, d] are
    [b * groups, kv_len, d], so one batched matmul serves every group, with no slice, concat or transpose.

    Half the operators of the per-group loop (on CPU each costs far more to launch than these sizes take to
    compute), and the batch of the matmuls is never 1 with two or more groups: MindSpore's batched matmul
    takes another path, which rounds differently, for a batch of one, and a row's result must not depend on
    the number of rows (glm3.runtime.engine)."""
    b, _, heads, d = q.shape
    groups, kv_len = k.shape[1], k.shape[2]
    rep = heads // groups
    qg = q.reshape(b * groups, rep, d)
    scores = _BMM_NT(qg, k.reshape(b * groups, kv_len, d)).astype(ms.float32) * scale  # [b * groups, rep, kv_len]
    drop = ops.logical_not(keep_mask.reshape(keep_mask.shape[0], 1, 1, kv_len))
    drop = like(drop, scores.reshape(b, groups, rep, kv_len)).reshape(b * groups, rep, kv_len)
    scores = ops.masked_fill(scores, drop, ms.Tensor(-1e30, ms.float32))
    probs = ops.softmax(scores, -1).astype(v.dtype)
    return ops.matmul(probs, v.reshape(b * groups, kv_len, d)).reshape(b, 1, heads * d)
