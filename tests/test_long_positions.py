"""Positions near the end of a 32k context with rope_ratio 50 (ChatGLM3-6B-32k's RoPE base of 500000), through
every path that takes positions: prefill, paged decode with the CPU kernels (one kernel a layer), static
decode with MindSpore's operators, and the paged export's decode graph, each against the float64 reference
run over the same tokens at the same positions."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

import glm3
from conftest import hf_config, hf_weights
from glm3.deploy.export import export_model
from glm3.deploy.infer import MindIRRunner
from glm3.runtime.steps import DecodeStep, PagedDecodeStep
from reference_torch import forward

SEQ = 32768
FIRST = SEQ - 12  # the tokens sit at positions 32756 .. 32765
STEPS = 10


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    cfg = glm3.GLM3Config.from_name("tiny", rope_ratio=50.0, seq_length=SEQ)
    return glm3.write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny32k", cfg, seed=9)


@pytest.fixture(scope="module")
def tokens_and_reference(long_dir):
    ids = np.random.default_rng(4).integers(3, 2000, size=STEPS).tolist()
    cfg = hf_config(long_dir)
    weights = hf_weights(long_dir)
    expected = forward(weights, cfg, ids, first_position=FIRST).numpy()
    moved = forward(weights, {**cfg, "rope_ratio": 1.0}, ids, first_position=FIRST).numpy()
    assert np.abs(moved - expected).max() > 1e-2  # the base changes these logits: a wrong one would show
    return ids, expected


def i32(*values):
    """An int32 tensor of one row: i32([5]) is [[5]] (a token, a position), i32(5) is [5] (a slot, a length)."""
    return Tensor(np.array(values, np.int32))


def paged_caches(config, num_blocks=2, block_size=16):
    shape = (num_blocks, block_size, config.num_kv_groups, config.kv_channels)
    return ms.mutable(tuple(Tensor(np.zeros(shape, np.float32)) for _ in range(2 * config.num_layers)))


def test_prefill_at_the_end_of_a_32k_context(long_dir, tokens_and_reference):
    ids, expected = tokens_and_reference
    model = glm3.load_model(long_dir)
    positions = Tensor(np.arange(FIRST, FIRST + STEPS, dtype=np.int32)[None])
    keep = Tensor(np.tril(np.ones((STEPS, STEPS), bool))[None, None])
    logits, _ = model.transformer.prefill(Tensor([ids], ms.int32), positions, keep)
    np.testing.assert_allclose(logits.asnumpy()[0], expected[-1], atol=1e-4)


def test_paged_decode_with_the_cpu_kernels_at_the_end_of_a_32k_context(long_dir, tokens_and_reference):
    ids, expected = tokens_and_reference
    model = glm3.load_model(long_dir, kernels_backend="cpu")
    assert model.transformer.encoder.has_decode_kernel()
    step, caches = PagedDecodeStep(model), paged_caches(model.config)
    for k, token in enumerate(ids):  # token k at position FIRST + k, slot k, attending to the k + 1 so far
        logits = step(i32([token]), i32([FIRST + k]), i32(k), i32([0, 1]), i32(k + 1), caches)
        np.testing.assert_allclose(logits.asnumpy()[0], expected[k], atol=1e-4)


def test_static_decode_at_the_end_of_a_32k_context(long_dir, tokens_and_reference):
    ids, expected = tokens_and_reference
    model = glm3.load_model(long_dir, kernels_backend="plain")
    config, width = model.config, 16
    step = DecodeStep(model, width)
    shape = (1, config.num_kv_groups, width, config.kv_channels)
    caches = tuple(Tensor(np.zeros(shape, np.float32)) for _ in range(2 * config.num_layers))
    for k, token in enumerate(ids):
        key_mask = np.zeros((1, width), bool)
        key_mask[0, : k + 1] = True
        logits, caches = step(i32([token]), i32([FIRST + k]), Tensor(key_mask), Tensor(np.int32(k)), ms.mutable(caches))
        np.testing.assert_allclose(logits.asnumpy()[0], expected[k], atol=1e-4)


def test_the_paged_exports_decode_graph_at_the_end_of_a_32k_context(long_dir, tokens_and_reference, tmp_path):
    ids, expected = tokens_and_reference
    directory = export_model(long_dir, tmp_path / "export", batch_size=1, prompt_length=16, paged=True, num_blocks=2)
    runner = MindIRRunner(directory)
    assert runner.config.seq_length == SEQ
    caches = tuple(paged_caches(glm3.GLM3Config.from_hf(directory)))
    table = np.zeros((1, runner.config.max_blocks), np.int32)
    table[0, 1] = 1
    for k, token in enumerate(ids):
        logits, caches = runner.decode(
            i32([token]), i32([FIRST + k]), i32(k), Tensor(table), i32(k + 1), ms.mutable(tuple(caches))
        )
        np.testing.assert_allclose(logits.asnumpy()[0], expected[k], atol=1e-4)
