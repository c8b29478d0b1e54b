"""The paged KV cache: block manager bookkeeping, and paged attention (MindSpore operators, and the CPU kernels that
write the cache in place) against dense attention in numpy; decoding with one CPU kernel a layer against the plain
operators and against the single kernels."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

import glm3
from conftest import paged_decode_logits, without_layer_kernel
from glm3.kernels import PagedCacheKernels, kernel_library
from glm3.kernels.paged_attention import paged_attention, write_cache
from glm3.runtime.kv_cache_manager import KVCacheManager, OutOfBlocks


def test_the_kv_cache_manager_allocates_appends_frees_and_runs_out_clearly():
    bm = KVCacheManager(num_blocks=6, block_size=4)
    np.testing.assert_array_equal(bm.allocate(7, 6), [0, 1, 2, 3, 4, 5])  # blocks 0 and 1
    np.testing.assert_array_equal(bm.allocate(8, 3), [8, 9, 10])  # block 2
    assert bm.append_slots(7).tolist() == [6] and bm.append_slots(7).tolist() == [7]  # block 1 fills up
    assert bm.append_slots(7).tolist() == [12] and bm.tables[7] == [0, 1, 3]  # then a new block
    assert bm.free_blocks == 2 and bm.can_allocate(8) and not bm.can_allocate(9)
    np.testing.assert_array_equal(bm.block_tables([7, 8]), [[0, 1, 3], [2, 0, 0]])
    with pytest.raises(OutOfBlocks, match="needs 3 more cache block"):
        bm.allocate(9, 9)
    assert 9 not in bm.tables and bm.free_blocks == 2  # a failed allocation takes nothing
    bm.free(7)
    assert bm.free_blocks == 5 and bm.allocate(9, 9).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 12]  # blocks 0, 1, 3 again
    with pytest.raises(ValueError, match="already holds"):
        bm.allocate(9, 1)
    assert KVCacheManager().num_blocks == 224 and KVCacheManager().block_size == 16


class _InGraph(nn.Cell):
    """A function of the paged kernels as a compiled graph, as the model's steps run them."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def construct(self, *args):
        return self.fn(*args)


def _plain():
    return write_cache, lambda *args: paged_attention(*args, 0.5)


class _Attend(nn.Cell):
    def __init__(self, kernels):
        super().__init__()
        self.kernels = kernels

    def construct(self, q, key_cache, value_cache, block_tables, context_lens):
        return self.kernels.attention(q, key_cache, value_cache, block_tables, context_lens, 0.5)


def _cpu_kernels():
    """The CPU kernels, whose write changes the cache it is given (and returns it)."""
    ops = PagedCacheKernels(kernel_library())
    return _InGraph(ops.write), _Attend(ops)


@pytest.mark.parametrize("d", [8, 13, 20, 64])
@pytest.mark.parametrize("kernels", [_plain, _cpu_kernels], ids=["plain", "cpu"])
def test_paged_attention_equals_dense_attention(kernels, d):
    """Head dims of whole 8-lane vectors (8, 64: the model's 128 halves) and with tails (13, 20)."""
    write, attend = kernels()
    rng = np.random.default_rng(d)
    heads, groups, block_size = 4, 2, 4
    bm = KVCacheManager(num_blocks=12, block_size=block_size)
    lengths = {0: 9, 1: 3, 2: 6}
    key_cache = Tensor(np.zeros((12, block_size, groups, d), np.float32))
    value_cache = Tensor(np.zeros((12, block_size, groups, d), np.float32))
    dense = {}
    # Interleave the sequences so that their blocks are not contiguous.
    for seq in lengths:
        bm.allocate(seq, 1)
        dense[seq] = [rng.standard_normal((1, groups, d)).astype(np.float32) for _ in range(2)]
        slots = bm.slots(seq, [0])
        key_cache = write(key_cache, Tensor(dense[seq][0]), Tensor(slots))
        value_cache = write(value_cache, Tensor(dense[seq][1]), Tensor(slots))
    for step in range(1, max(lengths.values())):
        for seq, n in lengths.items():
            if step < n:
                k, v = (rng.standard_normal((1, groups, d)).astype(np.float32) for _ in range(2))
                slot = bm.append_slots(seq)
                key_cache = write(key_cache, Tensor(k), Tensor(slot))
                value_cache = write(value_cache, Tensor(v), Tensor(slot))
                dense[seq] = [np.concatenate([dense[seq][0], k]), np.concatenate([dense[seq][1], v])]
    for seq, (keys, _) in dense.items():  # every token in its slot, whichever way it was written
        np.testing.assert_array_equal(key_cache.asnumpy().reshape(-1, groups, d)[bm.slots(seq, range(len(keys)))], keys)
    seqs = list(lengths)
    q = rng.standard_normal((len(seqs), 1, heads, d)).astype(np.float32)  # the projection's layout
    out = attend(
        Tensor(q),
        key_cache,
        value_cache,
        Tensor(bm.block_tables(seqs)),
        Tensor(np.array([lengths[s] for s in seqs], np.int32)),
    ).asnumpy()
    assert out.shape == (len(seqs), 1, heads * d)  # heads side by side, in order
    for row, seq in enumerate(seqs):
        keys, values = dense[seq]  # [n, groups, d]
        for h in range(heads):
            g = h // (heads // groups)
            scores = keys[:, g] @ q[row, 0, h] * 0.5
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            np.testing.assert_allclose(out[row, 0, h * d : (h + 1) * d], probs @ values[:, g], atol=1e-5)


def test_the_cpu_kernels_write_in_place_and_refuse_slots_outside_the_cache():
    ops = PagedCacheKernels(kernel_library())
    write = _InGraph(ops.write)
    cache = Tensor(np.zeros((3, 2, 1, 8), np.float32))
    rows = np.arange(16, dtype=np.float32).reshape(2, 1, 8)
    returned = write(cache, Tensor(rows), Tensor(np.array([5, 0], np.int32)))
    flat = cache.asnumpy().reshape(6, 8)  # the tensor passed in holds the rows now
    np.testing.assert_array_equal(flat[[5, 0]], rows[:, 0])
    assert not flat[1:5].any() and returned.asnumpy().reshape(6, 8)[5].tolist() == rows[0, 0].tolist()
    with pytest.raises(RuntimeError):
        write(cache, Tensor(rows), Tensor(np.array([6, 0], np.int32))).asnumpy()


def test_the_fused_cpu_decode_layer_equals_the_plain_operators(tiny_dir):
    """The CPU model decodes on the paged cache with one kernel per layer (RMSNorm, qkv with its bias, RoPE,
    cache writes, attention, dense, residuals, SwiGLU MLP); the plain model runs MindSpore's operators on a
    static cache. Every step's logits agree, for a left-padded batch at positions past the first block."""
    fused = glm3.load_model(tiny_dir, kernels_backend="cpu")
    plain = glm3.load_model(tiny_dir, kernels_backend="plain")
    assert fused.paged_kernels is not None and plain.paged_kernels is None
    assert fused.transformer.encoder.has_decode_kernel() and not plain.transformer.encoder.has_decode_kernel()
    runs = [paged_decode_logits(model) for model in (fused, plain)]
    assert np.abs(runs[1]).max() > 0.1
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_layer_kernel_computes_the_same_bits_as_the_kernels_one_by_one(tiny_dir, dtype):
    """One kernel a block runs the very functions of the single kernels in the same order: the same logits to
    the bit as decoding operator by operator, whatever the weights' storage."""
    one = paged_decode_logits(glm3.load_model(tiny_dir, dtype=dtype, kernels_backend="cpu"))
    apart = paged_decode_logits(without_layer_kernel(glm3.load_model(tiny_dir, dtype=dtype, kernels_backend="cpu")))
    assert np.abs(one).max() > 0.1
    np.testing.assert_array_equal(one, apart)


def test_a_model_with_lora_adapters_decodes_operator_by_operator_until_merged(tiny_dir):
    """The layer kernel knows no adapters: a LoRA model decodes through the single kernels, which add them, and
    takes the layer kernel again once they are merged, with the adapted result either way."""
    from glm3.train.lora import LoraConfig, apply_lora, merge_lora

    model = glm3.load_model(tiny_dir, kernels_backend="cpu")
    base = paged_decode_logits(model, steps=4)
    apply_lora(model, LoraConfig(4, 8.0, 0.0, ("query_key_value", "dense_4h_to_h")), seed=0)
    rng = np.random.default_rng(1)
    for p in model.trainable_params():
        if p.name.endswith("lora_b"):
            p.set_data(Tensor(rng.normal(0, 0.05, p.shape).astype(np.float32)))
    assert not model.transformer.encoder.has_decode_kernel()
    adapted = paged_decode_logits(model, steps=4)
    assert np.abs(adapted - base).max() > 1e-2  # the adapters count
    merge_lora(model)
    assert model.transformer.encoder.has_decode_kernel()
    np.testing.assert_allclose(paged_decode_logits(model, steps=4), adapted, atol=2e-5)


def test_the_layer_kernel_refuses_positions_and_slots_outside_their_tables(tiny_dir):
    """A position past the rotary tables or a slot outside the cache is an error MindSpore raises, not a read
    or a write out of bounds."""
    from glm3.runtime.kv_cache_manager import DEFAULT_BLOCK_SIZE
    from glm3.runtime.steps import PagedDecodeStep

    model = glm3.load_model(tiny_dir, kernels_backend="cpu")
    config = model.config
    step = PagedDecodeStep(model)
    shape = (4, DEFAULT_BLOCK_SIZE, config.num_kv_groups, config.kv_channels)
    caches = ms.mutable(tuple(Tensor(np.zeros(shape, np.float32)) for _ in range(2 * config.num_layers)))

    def run(position, slot):
        i32 = lambda *v: Tensor(np.array(v, np.int32))  # noqa: E731
        return step(i32([5]), i32([position]), i32(slot), i32([0]), i32(1), caches).asnumpy()

    assert np.isfinite(run(0, 0)).all()
    with pytest.raises(RuntimeError):
        run(config.seq_length, 0)
    with pytest.raises(RuntimeError):
        run(0, 4 * DEFAULT_BLOCK_SIZE)
