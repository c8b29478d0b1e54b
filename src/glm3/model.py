"""ChatGLM3 in MindSpore, one module for the family (6B, 32k, and any shape a GLM3Config describes).

Parameter names are MindFormers' names for this model, which are the HuggingFace names with
`word_embeddings.weight` renamed `embedding_table`, so checkpoints move between the two unchanged.

The transformer body takes explicit position ids, an attention keep-mask and, optionally, a static
KV cache (one [batch, groups, max_len, head_dim] key and value tensor per layer, passed in and returned),
so the same code serves the full forward pass, the prompt prefill and one-token decoding in graph mode.
"""
from __future__ import annotations

import math
import time

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, One, Uniform, Zero, initializer

from glm3 import kernels
from glm3.config import GLM3Config

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def to_ms_dtype(dtype) -> ms.Type:
    """Accept "float16"/"float32"/"bfloat16" or a MindSpore dtype."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if dtype in _DTYPES.values():
        return dtype
    raise ValueError(f"unsupported dtype {dtype!r}")


def _param(shape, dtype, init, name):
    # An initializer-backed Parameter allocates nothing until it is used or init_data() is called;
    # load_model replaces the data of every one, so a big model is never randomly initialised first.
    return Parameter(initializer(init, shape, dtype), name=name)


class Linear(nn.Cell):
    """y = x W^T (+ b), with W stored [out, in] as in PyTorch and cast to the compute dtype.

    With the "cpu" kernel backend, float32 products with at most SMALL_M rows (decoding) go through our
    streaming kernel; everything else (prefill, training) through MindSpore's MatMul.
    """

    def __init__(self, in_features, out_features, bias, dtype, compute_dtype, init, backend="plain"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param((out_features, in_features), dtype, init, "weight")
        self.bias = _param((out_features,), dtype, Zero(), "bias") if bias else None
        self.compute_dtype = compute_dtype
        self.matmul = ops.MatMul(transpose_b=True)
        use_small_m = backend == "cpu" and dtype == ms.float32 and compute_dtype == ms.float32
        self.small_m = kernels.small_m_op(kernels.small_m_kernel()) if use_small_m else None
        self.lora_a = self.lora_b = self.lora_mask = None

    def add_lora(self, rank: int, alpha: float) -> None:
        """Add a low-rank update: y = x W^T + drop(x) A^T B^T * alpha/rank, with B = 0 so it starts as a no-op.

        A is [rank, in] (Kaiming-uniform, as in the LoRA paper's reference code), B is [out, rank].
        Dropout, in training only, multiplies x by `lora_mask`, a Parameter the trainer refills from its
        own seeded generator before each step (so a resumed run draws the same masks; see glm3.lora).
        """
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_a = _param((rank, self.in_features), ms.float32, Uniform(bound), "lora_a")
        self.lora_b = _param((self.out_features, rank), ms.float32, Zero(), "lora_b")
        self.lora_scale = alpha / rank

    def remove_lora(self) -> None:
        for name in ("lora_a", "lora_b", "lora_mask"):
            if getattr(self, name) is not None:
                delattr(self, name)  # drops the Parameter from the cell, then a plain None stands in
                object.__setattr__(self, name, None)

    def construct(self, x):
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).astype(self.compute_dtype)
        if self.small_m is not None and x2.shape[0] <= kernels.SMALL_M:
            y = self.small_m(x2, self.weight)
        else:
            y = self.matmul(x2, self.weight.astype(self.compute_dtype))
        if self.bias is not None:
            y = y + self.bias.astype(self.compute_dtype)
        if self.lora_a is not None:
            h = x2 * self.lora_mask.astype(x2.dtype) if self.lora_mask is not None and self.training else x2
            h = self.matmul(h, self.lora_a.astype(self.compute_dtype))
            y = y + self.matmul(h, self.lora_b.astype(self.compute_dtype)) * self.lora_scale
        return y.reshape(shape[:-1] + (self.out_features,))


class RMSNorm(nn.Cell):
    def __init__(self, size, eps, dtype, backend):
        super().__init__()
        self.weight = _param((size,), dtype, One(), "weight")
        self.eps, self.fused = eps, backend == "ascend"

    def construct(self, x):
        return kernels.rms_norm(x, self.weight, self.eps, self.fused)


class _ScatterAddGradLookup(nn.Cell):
    """table[ids], with the backward written as one scatter-add into a zero table.

    MindSpore's own Gather gradient (an UnsortedSegmentSum) is several times slower on CPU; with a
    65k-row vocabulary that was the largest single cost of a training step.
    """

    def __init__(self, gather):
        super().__init__()
        self.gather = gather

    def construct(self, table, ids):
        return self.gather(table, ids, 0)

    def bprop(self, table, ids, out, dout):
        rows = ids.reshape(-1, 1)
        grad = ops.tensor_scatter_add(ops.zeros(table.shape, dout.dtype), rows, dout.reshape(-1, table.shape[1]))
        return grad.astype(table.dtype), ops.zeros_like(ids)


class Embedding(nn.Cell):
    def __init__(self, vocab, hidden, dtype, compute_dtype, init, backend="plain"):
        super().__init__()
        self.embedding_table = _param((vocab, hidden), dtype, init, "embedding_table")
        self.compute_dtype = compute_dtype
        self.gather = ops.Gather()  # a primitive, so the parallel config can shard() it
        # On Ascend MindSpore's own gradient stays (it is fast there and known to its auto-parallel).
        self.lookup = _ScatterAddGradLookup(self.gather) if backend != "ascend" else None

    def construct(self, input_ids):
        if self.lookup is not None:
            return self.lookup(self.embedding_table, input_ids).astype(self.compute_dtype)
        return self.gather(self.embedding_table, input_ids, 0).astype(self.compute_dtype)


class SelfAttention(nn.Cell):
    """Grouped-query attention with a fused qkv projection laid out [all q heads | all k groups | all v groups]."""

    def __init__(self, config: GLM3Config, dtype, compute_dtype, init, backend):
        super().__init__()
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.num_kv_groups, config.kv_channels
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.fused = backend == "ascend"
        self.fused_paged = self.fused  # export_model may switch it on alone, to emit PagedAttention for Lite
        self.query_key_value = Linear(config.hidden_size, config.qkv_size, config.add_qkv_bias, dtype,
                                      compute_dtype, init, backend)
        self.dense = Linear(config.q_size, config.hidden_size, config.add_bias_linear, dtype, compute_dtype, init,
                            backend)

    def construct(self, x, cos, sin, keep_mask, cache_k=None, cache_v=None, write_mask=None, paged=None):
        b, s, _ = x.shape
        qkv = self.query_key_value(x)
        q = qkv[:, :, :self.q_size].reshape(b, s, self.heads, self.head_dim)
        k = qkv[:, :, self.q_size:self.q_size + self.kv_size].reshape(b, s, self.groups, self.head_dim)
        v = qkv[:, :, self.q_size + self.kv_size:].reshape(b, s, self.groups, self.head_dim)
        q = kernels.apply_rotary(q, cos, sin, self.fused).transpose(0, 2, 1, 3)
        k = kernels.apply_rotary(k, cos, sin, self.fused)
        if paged is not None:
            # Paged decode (one token per row): store this step's key/value in its slot, attend over the blocks.
            slots, block_tables, context_lens = paged
            cache_k = kernels.write_cache(cache_k, k.reshape(b, self.groups, self.head_dim), slots)
            cache_v = kernels.write_cache(cache_v, v.reshape(b, self.groups, self.head_dim), slots)
            out = kernels.paged_attention(q, cache_k, cache_v, block_tables, context_lens, self.scale,
                                          self.fused_paged)
            out = out.transpose(0, 2, 1, 3).reshape(b, s, self.q_size)
            return self.dense(out), cache_k, cache_v
        k = k.transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 1, 3)
        if cache_k is not None:
            # Decode: write this step's key/value into the static cache column chosen by write_mask.
            k = ops.select(write_mask, k.astype(cache_k.dtype), cache_k)
            v = ops.select(write_mask, v.astype(cache_v.dtype), cache_v)
        out = kernels.attention(q, k.astype(q.dtype), v.astype(q.dtype), keep_mask, self.scale, self.fused)
        out = out.transpose(0, 2, 1, 3).reshape(b, s, self.q_size)
        return self.dense(out), k, v


class MLP(nn.Cell):
    """SwiGLU: dense_h_to_4h gives [a | b]; out = dense_4h_to_h(silu(a) * b)."""

    def __init__(self, config: GLM3Config, dtype, compute_dtype, init, backend):
        super().__init__()
        self.ffn = config.ffn_hidden_size
        self.dense_h_to_4h = Linear(config.hidden_size, 2 * self.ffn, config.add_bias_linear, dtype,
                                    compute_dtype, init, backend)
        self.dense_4h_to_h = Linear(self.ffn, config.hidden_size, config.add_bias_linear, dtype, compute_dtype, init,
                                    backend)

    def construct(self, x):
        h = self.dense_h_to_4h(x)
        return self.dense_4h_to_h(ops.silu(h[..., :self.ffn]) * h[..., self.ffn:])


class GLMBlock(nn.Cell):
    def __init__(self, config: GLM3Config, dtype, compute_dtype, init, backend):
        super().__init__()
        eps = config.layernorm_epsilon
        self.residual_from_norm = config.apply_residual_connection_post_layernorm
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype, backend)
        self.self_attention = SelfAttention(config, dtype, compute_dtype, init, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype, backend)
        self.mlp = MLP(config, dtype, compute_dtype, init, backend)

    def construct(self, x, cos, sin, keep_mask, cache_k=None, cache_v=None, write_mask=None, paged=None):
        normed = self.input_layernorm(x)
        attn, k, v = self.self_attention(normed, cos, sin, keep_mask, cache_k, cache_v, write_mask, paged)
        x = (normed if self.residual_from_norm else x) + attn
        normed = self.post_attention_layernorm(x)
        x = (normed if self.residual_from_norm else x) + self.mlp(normed)
        return x, k, v


class GLMTransformer(nn.Cell):
    """The HF "encoder": the stack of blocks and the final RMSNorm."""

    def __init__(self, config: GLM3Config, dtype, compute_dtype, init, backend):
        super().__init__()
        self.layers = nn.CellList([GLMBlock(config, dtype, compute_dtype, init, backend)
                                   for _ in range(config.num_layers)])
        self.final_layernorm = (RMSNorm(config.hidden_size, config.layernorm_epsilon, dtype, backend)
                                if config.post_layer_norm else None)

    def construct(self, x, cos, sin, keep_mask, caches=None, write_mask=None, paged=None):
        new_caches = ()
        for i, layer in enumerate(self.layers):
            if caches is None:
                x, k, v = layer(x, cos, sin, keep_mask)
            else:
                x, k, v = layer(x, cos, sin, keep_mask, caches[2 * i], caches[2 * i + 1], write_mask, paged)
            new_caches = new_caches + (k, v)
        if self.final_layernorm is not None:
            x = self.final_layernorm(x)
        return x, new_caches


class ChatGLMModel(nn.Cell):
    """Embedding, rotary tables, encoder and output layer: HF's `transformer` module."""

    def __init__(self, config: GLM3Config, dtype, compute_dtype, init, backend):
        super().__init__()
        self.config = config
        self.embedding = Embedding(config.padded_vocab_size, config.hidden_size, dtype, compute_dtype, init, backend)
        self.encoder = GLMTransformer(config, dtype, compute_dtype, init, backend)
        self.output_layer = Linear(config.hidden_size, config.padded_vocab_size, False, dtype, compute_dtype, init,
                                   backend)
        cos, sin = kernels.rope_tables(config.seq_length, config.rotary_dim, config.rope_base)
        # Constants, not Parameters: they are not part of the checkpoint (HF's inv_freq is recomputable).
        self.rope_cos = Tensor(cos)
        self.rope_sin = Tensor(sin)

    def construct(self, input_ids, position_ids, keep_mask, caches=None, write_mask=None, last_only=False,
                  paged=None):
        """Hidden states -> float32 logits ([b, s, V], or [b, V] for the last position) and the K/V tensors.

        paged: (slots [b], block_tables [b, max_blocks], context_lens [b]) for a paged-cache decode step,
        with `caches` the per-layer block caches [num_blocks, block_size, groups, head_dim]."""
        x = self.embedding(input_ids)
        cos = ops.gather(self.rope_cos, position_ids, 0).expand_dims(2)
        sin = ops.gather(self.rope_sin, position_ids, 0).expand_dims(2)
        x, new_caches = self.encoder(x, cos, sin, keep_mask, caches, write_mask, paged)
        if last_only:
            x = x[:, -1]
        return self.output_layer(x).astype(ms.float32), new_caches


def positions_and_mask(attention_mask, seq_len):
    """Position ids and the causal keep-mask for a (left-)padded batch.

    Positions count real tokens only (0 at each row's first real token), so a padded row gets the same
    positions as it would alone. The official code numbers padded rows 0..n-1 regardless; RoPE depends
    only on position differences, so both give the same attention scores.
    """
    causal = ops.tril(ops.ones((seq_len, seq_len), ms.bool_))
    if attention_mask is None:
        positions = ops.arange(seq_len, dtype=ms.int32).expand_dims(0)
        return positions, causal.reshape(1, 1, seq_len, seq_len)
    mask = attention_mask.astype(ms.int32)
    positions = ops.relu(ops.cumsum(mask, 1) - 1)
    keep = ops.logical_and(causal.expand_dims(0), mask.astype(ms.bool_).expand_dims(1))
    return positions, keep.expand_dims(1)


class GLM3ForCausalLM(nn.Cell):
    """ChatGLM3 causal LM. `model(input_ids[, attention_mask])` -> float32 logits [batch, seq, padded_vocab].

    dtype: parameter storage (float32, float16, bfloat16); compute_dtype: matmul precision (float32 on CPU).
    kernels_backend: "auto", "plain", "cpu" or "ascend" (see glm3.kernels).
    param_init: "normal" for a freshly initialised model, "lazy" to allocate nothing (weights loaded next).
    """

    def __init__(self, config: GLM3Config, dtype="float32", compute_dtype="float32", kernels_backend="auto",
                 param_init="normal", seed=None):
        super().__init__()
        config.validate()
        self.config = config
        self.dtype = to_ms_dtype(dtype)
        self.compute_dtype = to_ms_dtype(compute_dtype)
        self.kernels_backend = kernels.resolve_backend(kernels_backend)
        if param_init not in ("normal", "lazy"):
            raise ValueError(f"param_init must be 'normal' or 'lazy', got {param_init!r}")
        if seed is not None:
            ms.set_seed(seed)
        init = Normal(0.02) if param_init == "normal" else Zero()
        self.transformer = ChatGLMModel(config, self.dtype, self.compute_dtype, init, self.kernels_backend)
        # Extra stop tokens for generation (<|user|>, <|observation|>), filled from the tokenizer by load_model.
        self.stop_token_ids: tuple[int, ...] = ()
        self._runners = {}

    def construct(self, input_ids, attention_mask=None):
        positions, keep = positions_and_mask(attention_mask, input_ids.shape[1])
        positions = ops.broadcast_to(positions, input_ids.shape)
        logits, _ = self.transformer(input_ids, positions, keep)
        return logits

    def generate(self, input_ids, **kwargs):
        """Autoregressive generation with the static KV cache; see glm3.generation.generate."""
        from glm3.generation import generate

        return generate(self, input_ids, **kwargs)

    def structure_changed(self) -> None:
        """Forget graphs compiled for this model: call after adding or removing cells or parameters (LoRA).

        MindSpore keys a Cell's compiled graphs by the Cell's creation time and the call's arguments, not by
        its structure, so without this a changed model would keep running its old graph.
        """
        object.__setattr__(self, "_create_time", time.time_ns())
        self._runners = {}

    def num_parameters(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.get_parameters())
