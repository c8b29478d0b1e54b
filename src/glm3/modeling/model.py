"""ChatGLM3 in MindSpore, one module for the family (6B, 32k, and any shape a GLM3Config describes).

Parameter names are MindFormers' names for this model, which are the HuggingFace names with
`word_embeddings.weight` renamed `embedding_table`, so checkpoints move between the two unchanged.

The model is built from its config and a BuildOptions (storage and compute dtypes, kernel backend, lazy or
fresh weights). The transformer (ChatGLMModel) has one named entry point per use, each a documented contract:
the full pass (`construct`), `prefill`, `decode_static` (a [batch, groups, max_len, head_dim] key and value
cache per layer, passed in and returned) and `decode_paged` (block caches). Compiled steps over them live in
glm3.runtime.steps; the generation loop in glm3.runtime.generation. This module knows nothing of either.
"""

from __future__ import annotations

import math
import time

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.common.initializer import One, Zero

from glm3 import kernels
from glm3.modeling.build import BuildOptions, as_compute, new_param, to_ms_dtype
from glm3.modeling.config import GLM3Config, rope_inv_freq
from glm3.modeling.linear import Linear


def _elementwise_kernels(options: BuildOptions):
    """The CPU kernels of RMSNorm and SwiGLU (inference), when the build uses them."""
    library = options.cpu_library()
    return kernels.ElementwiseKernels(library) if library else None


class RMSNorm(nn.Cell):
    def __init__(self, size: int, eps: float, options: BuildOptions):
        super().__init__()
        self.weight = new_param((size,), options.dtype, One(), "weight")
        self.eps, self.fused = eps, options.backend == "ascend"
        self.kernels = _elementwise_kernels(options)
        self.eps_tensor = Tensor([eps], ms.float32)

    def construct(self, x):
        if self.kernels is not None and not self.training:
            return self.kernels.rms_norm(x, self.weight, self.eps_tensor)
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
    def __init__(self, vocab: int, hidden: int, options: BuildOptions):
        super().__init__()
        dtype, backend = options.dtype, options.backend
        q = options.quantization
        self.quant = q if q is not None and q.embedding else None
        if self.quant is not None:  # quantized rows, dequantized after the lookup
            stored = ms.int8 if self.quant.bits == 8 else ms.uint8
            self.embedding_table = new_param(
                self.quant.stored_shape((vocab, hidden)), stored, Zero(), "embedding_table"
            )
            self.embedding_table_scale = new_param(
                self.quant.scale_shape((vocab, hidden)), ms.float16, Zero(), "embedding_table_scale"
            )
        else:
            self.embedding_table = new_param((vocab, hidden), dtype, options.initializer(), "embedding_table")
        self.compute_dtype = options.compute_dtype
        self.gather = ops.Gather()  # a primitive, so the parallel config can shard() it
        # On Ascend MindSpore's own gradient stays (it is fast there and known to its auto-parallel).
        self.lookup = _ScatterAddGradLookup(self.gather) if backend != "ascend" else None
        self.frozen = False
        # MindSpore's CPU Gather has no bfloat16 kernel: a bfloat16 table is cast (per call) before the lookup.
        self.cast_table = dtype == ms.bfloat16 and backend != "ascend"

    def freeze(self, frozen: bool = True) -> None:
        """No gradient for the table: the backward pass stops here instead of building a zero table."""
        if self.quant is not None:
            raise ValueError(
                "a quantized model cannot be trained: fine-tune its float source, then quantize (glm3 quantize)"
            )
        self.embedding_table.requires_grad = not frozen
        self.frozen = frozen

    def construct(self, input_ids):
        if self.quant is not None:
            shape = input_ids.shape
            ids = input_ids.reshape(-1)
            rows = self.gather(self.embedding_table, ids, 0)
            scales = self.gather(self.embedding_table_scale, ids, 0)
            out = kernels.dequantize(rows, scales, self.quant.bits).astype(self.compute_dtype)
            return out.reshape(shape + (out.shape[-1],))
        table = as_compute(self.embedding_table, input_ids, ms.float32) if self.cast_table else self.embedding_table
        if self.frozen:
            return ops.stop_gradient(self.gather(table, input_ids, 0)).astype(self.compute_dtype)
        if self.lookup is not None:
            return self.lookup(table, input_ids).astype(self.compute_dtype)
        return as_compute(self.gather(table, input_ids, 0), input_ids, self.compute_dtype)


class SelfAttention(nn.Cell):
    """Grouped-query attention with a fused qkv projection laid out [all q heads | all k groups | all v groups].

    One entry point per use: `construct` (the whole sequence: training, prompt prefill), `decode_static` (one new
    token against a static cache) and `decode_paged` (one new token against a block cache). Each returns the
    output [b, s, hidden] and the keys and values to keep."""

    def __init__(self, config: GLM3Config, options: BuildOptions):
        super().__init__()
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.num_kv_groups, config.kv_channels
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.fused = options.backend == "ascend"
        library = options.cpu_library()
        # The CPU kernels write the paged cache in place and attend through its block tables.
        self.paged_kernels = kernels.PagedCacheKernels(library) if library else None
        quantized = options.quantization is not None
        self.query_key_value = Linear(config.hidden_size, config.qkv_size, config.add_qkv_bias, options, quantized)
        self.no_qkv_bias = Tensor(np.zeros(config.qkv_size, np.float32))
        self.heads_tensor = Tensor([self.heads], ms.int32)  # the fused decode kernel's constants
        self.scale_tensor = Tensor([self.scale], ms.float32)
        self.dense = Linear(config.q_size, config.hidden_size, config.add_bias_linear, options, quantized)

    def _project(self, x, cos, sin):
        """q [b, s, heads, d] and k, v [b, s, groups, d], q and k rotated."""
        b, s, _ = x.shape
        qkv = self.query_key_value(x)
        q = qkv[:, :, : self.q_size].reshape(b, s, self.heads, self.head_dim)
        k = qkv[:, :, self.q_size : self.q_size + self.kv_size].reshape(b, s, self.groups, self.head_dim)
        v = qkv[:, :, self.q_size + self.kv_size :].reshape(b, s, self.groups, self.head_dim)
        return kernels.apply_rotary(q, cos, sin, self.fused), kernels.apply_rotary(k, cos, sin, self.fused), v

    def construct(self, x, cos, sin, keep_mask):
        """The whole sequence: keys and values [b, groups, s, d] are returned for a cache."""
        q, k, v = self._project(x, cos, sin)  # q stays [b, s, heads, d]: attention takes it as it is
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        out = kernels.attention(q, k, v, keep_mask, self.scale, self.fused)
        return self.dense(out), k, v

    def decode_static(self, x, cos, sin, keep_mask, cache_k, cache_v, write_mask):
        """One token per row, its key/value written into the static cache [b, groups, max_len, d] at the column
        write_mask marks; attends over the columns keep_mask allows. Returns the updated caches."""
        q, k, v = self._project(x, cos, sin)
        write = kernels.like(write_mask, cache_k)
        k = ops.select(write, kernels.like(k.transpose(0, 2, 1, 3).astype(cache_k.dtype), cache_k), cache_k)
        v = ops.select(write, kernels.like(v.transpose(0, 2, 1, 3).astype(cache_v.dtype), cache_v), cache_v)
        out = kernels.attention(q, k.astype(q.dtype), v.astype(q.dtype), keep_mask, self.scale, self.fused)
        return self.dense(out), k, v

    def decode_paged(
        self, x, cos, sin, cache_k, cache_v, slots, block_tables, context_lens, fused_paged_attention=False
    ):
        """One token per row, stored in its slot of the block caches [num_blocks, block_size, groups, d], then
        attention over the row's blocks (MindSpore's PagedAttention operator with fused_paged_attention, for
        MindSpore Lite on Ascend). Returns the updated caches (with the CPU kernels: the caches given, written
        in place)."""
        b = x.shape[0]
        if self.paged_kernels is not None and not (fused_paged_attention or self.fused):
            # One kernel from the projection to attention's output: bias, RoPE, the cache writes, attention.
            qkv = self.query_key_value(x, with_bias=False).reshape(b, -1)
            bias = self.query_key_value.bias
            bias = self.no_qkv_bias if bias is None else bias.astype(ms.float32)
            out, cache_k, cache_v = self.paged_kernels.decode(
                qkv,
                bias,
                cos.reshape(b, -1),
                sin.reshape(b, -1),
                cache_k,
                cache_v,
                slots,
                block_tables,
                context_lens,
                self.heads_tensor,
                self.scale_tensor,
            )
            return self.dense(out.reshape(b, 1, -1)), cache_k, cache_v
        q, k, v = self._project(x, cos, sin)
        cache_k = kernels.write_cache(cache_k, k.reshape(b, self.groups, self.head_dim), slots)
        cache_v = kernels.write_cache(cache_v, v.reshape(b, self.groups, self.head_dim), slots)
        out = kernels.paged_attention(
            q, cache_k, cache_v, block_tables, context_lens, self.scale, fused_paged_attention or self.fused
        )
        return self.dense(out), cache_k, cache_v


class MLP(nn.Cell):
    """SwiGLU: dense_h_to_4h gives [a | b]; out = dense_4h_to_h(silu(a) * b)."""

    def __init__(self, config: GLM3Config, options: BuildOptions):
        super().__init__()
        self.ffn = config.ffn_hidden_size
        quantized = options.quantization is not None
        self.dense_h_to_4h = Linear(config.hidden_size, 2 * self.ffn, config.add_bias_linear, options, quantized)
        self.dense_4h_to_h = Linear(self.ffn, config.hidden_size, config.add_bias_linear, options, quantized)
        self.kernels = _elementwise_kernels(options)

    def construct(self, x):
        h = self.dense_h_to_4h(x)
        if self.kernels is not None and not self.training:
            return self.dense_4h_to_h(self.kernels.swiglu(h))
        return self.dense_4h_to_h(ops.silu(h[..., : self.ffn]) * h[..., self.ffn :])


class GLMBlock(nn.Cell):
    """Pre-norm block: x + attention(norm(x)), then + MLP(norm(x)). Entry points as SelfAttention's, and
    `decode_layer`: the whole block in one CPU kernel (paged decoding, inference; see has_decode_kernel)."""

    def __init__(self, config: GLM3Config, options: BuildOptions):
        super().__init__()
        eps = config.layernorm_epsilon
        self.residual_from_norm = config.apply_residual_connection_post_layernorm
        self.input_layernorm = RMSNorm(config.hidden_size, eps, options)
        self.self_attention = SelfAttention(config, options)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, options)
        self.mlp = MLP(config, options)
        library = options.cpu_library() if not config.add_bias_linear else None
        self.decode_kernel = kernels.DecodeLayerKernel(library) if library else None
        attention = self.self_attention
        self.decode_constants = kernels.DecodeLayerKernel.constants(
            eps, attention.scale, attention.heads, self.residual_from_norm
        )
        self.no_scale = Tensor(np.zeros(1, np.float16))  # the scales input of a float weight (unused)

    def _linears(self):
        return (
            self.self_attention.query_key_value,
            self.self_attention.dense,
            self.mlp.dense_h_to_4h,
            self.mlp.dense_4h_to_h,
        )

    def has_decode_kernel(self) -> bool:
        """Whether decode_layer computes this block: the CPU kernels, and no LoRA adapters (merge them first)."""
        if self.decode_kernel is None:
            return False
        for linear in self._linears():
            if linear.lora_a is not None:
                return False
        return True

    def _rest(self, x, normed, attn):
        """The attention residual, then the MLP and its residual."""
        x = (normed if self.residual_from_norm else x) + attn
        normed = self.post_attention_layernorm(x)
        return (normed if self.residual_from_norm else x) + self.mlp(normed)

    def construct(self, x, cos, sin, keep_mask):
        normed = self.input_layernorm(x)
        attn, k, v = self.self_attention(normed, cos, sin, keep_mask)
        return self._rest(x, normed, attn), k, v

    def decode_static(self, x, cos, sin, keep_mask, cache_k, cache_v, write_mask):
        normed = self.input_layernorm(x)
        attn, k, v = self.self_attention.decode_static(normed, cos, sin, keep_mask, cache_k, cache_v, write_mask)
        return self._rest(x, normed, attn), k, v

    def decode_layer(self, x, positions, rope, cache_k, cache_v, slots, block_tables, context_lens):
        """decode_paged in one kernel: x [b, hidden], positions [b], rope the model's (cos, sin) tables."""
        attention = self.self_attention
        bias = attention.query_key_value.bias
        linears = ()
        for linear in self._linears():
            linears = linears + ((linear.weight, self.no_scale if linear.quant is None else linear.weight_scale),)
        return self.decode_kernel(
            x,
            (self.input_layernorm.weight, self.post_attention_layernorm.weight),
            linears,
            attention.no_qkv_bias if bias is None else bias,
            rope,
            positions,
            (cache_k, cache_v),
            slots,
            block_tables,
            context_lens,
            self.decode_constants,
        )

    def decode_paged(
        self, x, cos, sin, cache_k, cache_v, slots, block_tables, context_lens, fused_paged_attention=False
    ):
        normed = self.input_layernorm(x)
        attn, k, v = self.self_attention.decode_paged(
            normed, cos, sin, cache_k, cache_v, slots, block_tables, context_lens, fused_paged_attention
        )
        return self._rest(x, normed, attn), k, v


class GLMTransformer(nn.Cell):
    """The HF "encoder": the stack of blocks and the final RMSNorm. Each entry point returns the hidden states
    and the per-layer keys and values (k0, v0, k1, v1, ...)."""

    def __init__(self, config: GLM3Config, options: BuildOptions):
        super().__init__()
        self.layers = nn.CellList([GLMBlock(config, options) for _ in range(config.num_layers)])
        self.final_layernorm = (
            RMSNorm(config.hidden_size, config.layernorm_epsilon, options) if config.post_layer_norm else None
        )

    def _final(self, x):
        return self.final_layernorm(x) if self.final_layernorm is not None else x

    def construct(self, x, cos, sin, keep_mask):
        kv = ()
        for layer in self.layers:
            x, k, v = layer(x, cos, sin, keep_mask)  # a Cell call: recompute and pipeline stages apply per layer
            kv = kv + (k, v)
        return self._final(x), kv

    def decode_static(self, x, cos, sin, keep_mask, caches, write_mask):
        kv = ()
        for i, layer in enumerate(self.layers):
            x, k, v = layer.decode_static(x, cos, sin, keep_mask, caches[2 * i], caches[2 * i + 1], write_mask)
            kv = kv + (k, v)
        return self._final(x), kv

    def decode_paged(self, x, cos, sin, caches, slots, block_tables, context_lens, fused_paged_attention=False):
        kv = ()
        for i, layer in enumerate(self.layers):
            x, k, v = layer.decode_paged(
                x, cos, sin, caches[2 * i], caches[2 * i + 1], slots, block_tables, context_lens, fused_paged_attention
            )
            kv = kv + (k, v)
        return self._final(x), kv

    def has_decode_kernel(self) -> bool:
        """Whether every block decodes in one kernel (GLMBlock.has_decode_kernel)."""
        for layer in self.layers:
            if not layer.has_decode_kernel():
                return False
        return True

    def decode_layers(self, x, positions, rope, caches, slots, block_tables, context_lens):
        """decode_paged with each block in one kernel: x [b, 1, hidden], positions [b, 1] -> [b, hidden]."""
        b, _, hidden = x.shape
        x = x.reshape(b, hidden)
        positions = positions.reshape(b)
        kv = ()
        for i, layer in enumerate(self.layers):
            x, k, v = layer.decode_layer(
                x, positions, rope, caches[2 * i], caches[2 * i + 1], slots, block_tables, context_lens
            )
            kv = kv + (k, v)
        return self._final(x), kv


class ChatGLMModel(nn.Cell):
    """Embedding, rotary tables, encoder and output layer: HF's `transformer` module.

    The contract of each cache mode, with float32 logits:
    - construct(input_ids, position_ids, keep_mask) -> logits [b, s, V] (the full pass: training, scoring);
    - prefill(input_ids, position_ids, keep_mask) -> (logits [b, V] of the last position, kv), kv being
      2 x layers tensors [b, groups, s, d] (keys and values per layer) for a cache;
    - decode_static(input_ids [b, 1], position_ids, keep_mask, caches, write_mask) -> (logits [b, V], caches):
      caches are 2 x layers tensors [b, groups, max_len, d], write_mask [1, 1, max_len, 1] marks the column of
      the new token, keep_mask [b, 1, 1, max_len] the columns to attend to;
    - decode_paged(input_ids [b, 1], position_ids, caches, slots [b], block_tables [b, max_blocks],
      context_lens [b], fused_paged_attention) -> (logits [b, V], caches): caches are 2 x layers block caches
      [num_blocks, block_size, groups, d] shared by the batch (see glm3.runtime.kv_cache_manager).
    """

    def __init__(self, config: GLM3Config, options: BuildOptions):
        super().__init__()
        self.config = config
        self.embedding = Embedding(config.padded_vocab_size, config.hidden_size, options)
        self.encoder = GLMTransformer(config, options)
        q = options.quantization
        self.output_layer = Linear(
            config.hidden_size, config.padded_vocab_size, False, options, q is not None and q.output_layer
        )
        cos, sin = kernels.rope_tables(config.seq_length, rope_inv_freq(config.rotary_dim, config.rope_base))
        # Constants, not Parameters: they are not part of the checkpoint (HF's inv_freq is recomputable).
        self.rope_cos = Tensor(cos)
        self.rope_sin = Tensor(sin)

    def _embed(self, input_ids, position_ids):
        """Hidden states [b, s, hidden] and the rotary tables of the positions [b, s, 1, rotary_dim / 2]."""
        cos = ops.gather(self.rope_cos, position_ids, 0).expand_dims(2)
        sin = ops.gather(self.rope_sin, position_ids, 0).expand_dims(2)
        return self.embedding(input_ids), cos, sin

    def _logits(self, x):
        logits = self.output_layer(x)
        return logits if logits.dtype == ms.float32 else logits.astype(ms.float32)

    def construct(self, input_ids, position_ids, keep_mask):
        x, cos, sin = self._embed(input_ids, position_ids)
        x, _ = self.encoder(x, cos, sin, keep_mask)
        return self._logits(x)

    def prefill(self, input_ids, position_ids, keep_mask):
        x, cos, sin = self._embed(input_ids, position_ids)
        x, kv = self.encoder(x, cos, sin, keep_mask)
        return self._logits(x[:, -1]), kv

    def decode_static(self, input_ids, position_ids, keep_mask, caches, write_mask):
        x, cos, sin = self._embed(input_ids, position_ids)
        x, caches = self.encoder.decode_static(x, cos, sin, keep_mask, caches, write_mask)
        return self._logits(x[:, -1]), caches

    def decode_paged(
        self, input_ids, position_ids, caches, slots, block_tables, context_lens, fused_paged_attention=False
    ):
        if self.encoder.has_decode_kernel() and not fused_paged_attention:  # CPU kernels: a kernel per block
            x = self.embedding(input_ids)
            slots = slots.reshape(-1)
            slots = slots if slots.dtype == ms.int32 else slots.astype(ms.int32)
            rope = (self.rope_cos, self.rope_sin)
            x, caches = self.encoder.decode_layers(x, position_ids, rope, caches, slots, block_tables, context_lens)
            return self._logits(x), caches
        x, cos, sin = self._embed(input_ids, position_ids)
        x, caches = self.encoder.decode_paged(
            x, cos, sin, caches, slots, block_tables, context_lens, fused_paged_attention
        )
        return self._logits(x[:, -1]), caches


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
    kernel_rows: see BuildOptions (None: its default).
    The cache modes (prefill, static and paged decoding) are `model.transformer`'s entry points (ChatGLMModel);
    generation (glm3.runtime.generation) compiles steps over them.
    """

    def __init__(
        self,
        config: GLM3Config,
        dtype="float32",
        compute_dtype="float32",
        kernels_backend="auto",
        param_init="normal",
        seed=None,
        kernel_rows: int | None = None,
    ):
        super().__init__()
        config.validate()
        if param_init not in ("normal", "lazy"):
            raise ValueError(f"param_init must be 'normal' or 'lazy', got {param_init!r}")
        self.config = config
        self.options = BuildOptions(
            to_ms_dtype(dtype),
            to_ms_dtype(compute_dtype),
            kernels.resolve_backend(kernels_backend),
            param_init,
            kernels.SMALL_M if kernel_rows is None else kernel_rows,
            config.quantization,
        )
        if seed is not None:
            ms.set_seed(seed)
        self.transformer = ChatGLMModel(config, self.options)
        # Extra stop tokens for generation (<|user|>, <|observation|>), filled from the tokenizer by load_model.
        self.stop_token_ids: tuple[int, ...] = ()
        self.structure_version = 0  # bumped by structure_changed(): compiled steps of older versions are stale

    @property
    def dtype(self) -> ms.Type:
        return self.options.dtype

    @property
    def compute_dtype(self) -> ms.Type:
        return self.options.compute_dtype

    @property
    def kernels_backend(self) -> str:
        return self.options.backend

    @property
    def end_token_ids(self) -> frozenset[int]:
        """Every token that ends a reply: the config's eos and stop_token_ids."""
        return frozenset({self.config.eos_token_id, *self.stop_token_ids})

    @property
    def paged_kernels(self):
        """The CPU kernels of the paged cache (glm3.kernels.PagedCacheKernels) when the model has them: its paged
        entry points then write the block caches in place."""
        return self.transformer.encoder.layers[0].self_attention.paged_kernels

    def construct(self, input_ids, attention_mask=None):
        positions, keep = positions_and_mask(attention_mask, input_ids.shape[1])
        positions = ops.broadcast_to(positions, input_ids.shape)
        return self.transformer(input_ids, positions, keep)

    def freeze_base(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) every weight the model was built with, as LoRA trains only its adapters.

        Frozen weights get no gradient and their backward keeps no full-precision copy of them (see
        Linear.freeze), so a half-precision base costs its own storage while training the adapters.
        """
        for param in self.get_parameters():
            if not param.name.endswith((".lora_a", ".lora_b", ".lora_mask")):
                param.requires_grad = not frozen
        for _, cell in self.cells_and_names():
            if isinstance(cell, (Linear, Embedding)):
                cell.freeze(frozen)
        self.structure_changed()

    def structure_changed(self) -> None:
        """Forget graphs compiled for this model: call after adding or removing cells or parameters (LoRA).

        MindSpore keys a Cell's compiled graphs by the Cell's creation time and the call's arguments, not by
        its structure, so without this a changed model would keep running its old graph; steps compiled
        over it (glm3.runtime.generation) check `structure_version`.
        """
        object.__setattr__(self, "_create_time", time.time_ns())
        self.structure_version += 1

    def num_parameters(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.get_parameters())
