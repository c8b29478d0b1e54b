"""Paged attention: one query token per sequence against keys and values kept in cache blocks.

key_cache / value_cache: [num_blocks, block_size, groups, head_dim]; block_tables: int32 [batch, max_blocks];
context_lens: int32 [batch] (tokens in the cache for each sequence, the current one included).
The plain version, MindSpore ops for any device, gathers each sequence's blocks into a contiguous
[batch, groups, max_blocks*block_size, d] view and runs the masked grouped-query attention of
glm3.kernels.attention on it. The fused version is MindSpore's PagedAttention operator (float16, same cache
layout), which MindSpore itself cannot execute: it exists to be exported to MindIR for MindSpore Lite on Ascend.

On CPU, PagedCacheKernels (csrc/paged_attention.cc) writes a token into the cache where it belongs, in place,
and attends through the block table without gathering: the plain ops copy the whole cache at every write
(they are functional; the cache is a graph input) and gather every row's blocks into a copy. Steps built with
them change the caches they are given and return none (glm3.runtime.steps).
"""

from __future__ import annotations

import mindspore as ms
from mindspore import ops

from glm3.kernels.attention import attention


def write_cache(cache, values, slot_mapping):
    """Scatter `values` [tokens, groups, d] into `cache` at flat slots [tokens]; returns the updated cache."""
    num_blocks, block_size, groups, d = cache.shape
    flat = cache.reshape(num_blocks * block_size, groups, d)
    flat = ops.tensor_scatter_update(flat, slot_mapping.reshape(-1, 1).astype(ms.int32), values.astype(cache.dtype))
    return flat.reshape(num_blocks, block_size, groups, d)


def gather_blocks(cache, block_tables):
    """[batch, groups, max_blocks*block_size, d]: each sequence's blocks, in order."""
    b, max_blocks = block_tables.shape
    _, block_size, groups, d = cache.shape
    picked = ops.gather(cache, block_tables.reshape(-1), 0)  # [b*max_blocks, block_size, groups, d]
    return picked.reshape(b, max_blocks * block_size, groups, d).transpose(0, 2, 1, 3)


def paged_attention(q, key_cache, value_cache, block_tables, context_lens, scale: float, fused: bool = False):
    """q: [batch, 1, heads, d] -> [batch, 1, heads * d], attending to the first context_lens[b] cached tokens."""
    if fused:
        b, _, heads, d = q.shape
        op = ops.PagedAttention(heads, scale, key_cache.shape[2])
        out = op(
            q.reshape(b, heads, d).astype(ms.float16),
            key_cache.astype(ms.float16),
            value_cache.astype(ms.float16),
            block_tables,
            context_lens,
        )
        return out.reshape(b, 1, heads * d).astype(q.dtype)
    k = gather_blocks(key_cache, block_tables).astype(q.dtype)
    v = gather_blocks(value_cache, block_tables).astype(q.dtype)
    span = k.shape[2]
    keep = ops.arange(span, dtype=ms.int32).reshape(1, span) < context_lens.reshape(-1, 1).astype(ms.int32)
    return attention(q, k, v, keep.reshape(-1, 1, 1, span), scale)


def _heads(qkv_shape, cache_shape) -> int:
    """Query heads of a qkv row of `qkv_shape` [b, (heads + 2 groups) d] for a cache [nb, bs, groups, d]."""
    groups, d = cache_shape[2], cache_shape[3]
    return qkv_shape[1] // d - 2 * groups


class PagedCacheKernels:
    """The CPU kernels of the paged cache (float32 caches; `library` from glm3.kernels.kernel_library)."""

    def __init__(self, library: str):
        self.write_op = ops.Custom(
            f"{library}:glm3_cache_write",
            out_shape=lambda cache, rows, slots: (1,),
            out_dtype=lambda cache, rows, slots: ms.int32,
            func_type="aot",
        )
        self.attention_op = ops.Custom(
            f"{library}:glm3_paged_attention",
            out_shape=lambda q, k, v, tables, lens, scale: (q[0], q[1] * q[2]),
            out_dtype=lambda q, k, v, tables, lens, scale: ms.float32,
            func_type="aot",
        )
        self.decode_op = ops.Custom(
            f"{library}:glm3_paged_decode",
            out_shape=lambda qkv, bias, cos, sin, k, v, slots, tables, lens, scale, heads: (
                qkv[0],
                k[3] * _heads(qkv, k),
            ),
            out_dtype=lambda *args: ms.float32,
            func_type="aot",
        )

    def decode(self, qkv, bias, cos, sin, key_cache, value_cache, slots, block_tables, context_lens, heads, scale):
        """One decoding layer's attention from its qkv projection: qkv [b, (heads + 2 groups) d] (float32, without
        its bias), bias [(heads + 2 groups) d], cos/sin [b, rotary_dim / 2]. Adds the bias, rotates q and k,
        writes k and v into the caches at `slots` in place and attends: returns [b, heads * d] and the caches
        ordered after the write. heads ([1] int32) and scale ([1] float32) are the caller's constant tensors (no
        fill operator per call)."""
        out = self.decode_op(
            qkv,
            bias,
            cos,
            sin,
            key_cache,
            value_cache,
            slots.reshape(-1).astype(ms.int32),
            block_tables,
            context_lens,
            scale,
            heads,
        )
        return out, ops.depend(key_cache, out), ops.depend(value_cache, out)

    def write(self, cache, values, slot_mapping):
        """`values` [tokens, groups, d] into `cache` at flat slots [tokens], in place: returns `cache` ordered
        after the write (a depend edge), to be read from then on."""
        flag = self.write_op(cache, values.astype(ms.float32), slot_mapping.reshape(-1).astype(ms.int32))
        return ops.depend(cache, flag)

    def attention(self, q, key_cache, value_cache, block_tables, context_lens, scale: float):
        """q: [batch, 1, heads, d] -> [batch, 1, heads * d], as paged_attention."""
        b, _, heads, d = q.shape
        out = self.attention_op(
            q.reshape(b, heads, d).astype(ms.float32),
            key_cache,
            value_cache,
            block_tables,
            context_lens,
            ops.fill(ms.float32, (1,), scale),
        )
        return out.reshape(b, 1, heads * d).astype(q.dtype)
