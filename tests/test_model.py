"""Model parity against an independent PyTorch reference, KV cache, modes, dtypes, padding, kernels."""

import os

import mindspore as ms
import numpy as np
import pytest

import glm3
from conftest import StepDriver, hf_config, hf_weights
from glm3.runtime.model_runner import StaticRunner
from glm3.runtime.steps import compiled_step
from reference_torch import forward, greedy

IDS = [1501, 1503, 1506, 13, 885, 519, 1507, 7, 300, 42, 999, 5]


@pytest.mark.parametrize("which", ["tiny_dir", "odd_bin_dir"])
def test_logits_match_reference(which, request):
    directory = request.getfixturevalue(which)
    cfg = hf_config(directory)
    ids = [i % cfg["padded_vocab_size"] for i in IDS]
    expected = forward(hf_weights(directory), cfg, ids).numpy()
    model = glm3.load_model(directory)
    got = model(ms.Tensor([ids], ms.int32)).asnumpy()[0]
    assert got.shape == (len(ids), cfg["padded_vocab_size"]) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_odd_config_is_really_odd(odd_bin_dir):
    cfg = glm3.GLM3Config.from_hf(odd_bin_dir)
    assert cfg.num_attention_heads * cfg.kv_channels != cfg.hidden_size and cfg.multi_query_group_num != 2


def test_greedy_generation_matches_reference(odd_bin_dir):
    cfg = hf_config(odd_bin_dir)
    ids = [i % cfg["padded_vocab_size"] for i in IDS]
    expected = greedy(hf_weights(odd_bin_dir), cfg, ids, 8)
    model = glm3.load_model(odd_bin_dir)
    out = glm3.generate(model, [ids], max_new_tokens=8, do_sample=False, eos_token_id=[])
    assert out[0, len(ids) :].tolist() == expected


def test_kv_cache_decode_equals_full_forward(tiny_model):
    """Prefill then one-token steps give the logits of a full forward over the same tokens."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 1500, size=(2, 9)).astype(np.int32)
    extra = rng.integers(3, 1500, size=(2, 4)).astype(np.int32)
    full = tiny_model(ms.Tensor(np.concatenate([ids, extra], 1))).asnumpy()
    runner = StaticRunner(compiled_step(tiny_model, "prefill", 64), compiled_step(tiny_model, "decode", 64), 64, 2)
    rows = [[0], [1]]  # each sequence's row
    logits = runner.prefill(ids.tolist(), rows)  # left-padded to 32 columns
    np.testing.assert_allclose(logits, full[:, 8], atol=1e-5)
    for step in range(4):
        logits = runner.decode(extra[:, step].tolist(), [9 + step] * 2, rows)
        np.testing.assert_allclose(logits, full[:, 9 + step], atol=1e-5)


def test_left_padded_batch_equals_single_rows(tiny_model):
    a = [1501, 1503, 17, 29, 31, 400, 401, 402, 403]
    b = [1501, 1503, 88, 99]
    batch = glm3.generate(tiny_model, [a, b], max_new_tokens=6, eos_token_id=[])
    alone_a = glm3.generate(tiny_model, [a], max_new_tokens=6, eos_token_id=[])
    alone_b = glm3.generate(tiny_model, [b], max_new_tokens=6, eos_token_id=[])
    assert batch[0, -6:].tolist() == alone_a[0, -6:].tolist()
    assert batch[1, -6:].tolist() == alone_b[0, -6:].tolist()
    assert batch[1, :5].tolist() == [0] * 5  # the prompt as given, left-padded
    # Padded logits too: the full forward with a mask gives the unpadded row's logits.
    ids = np.array([[0] * 5 + b], np.int32)
    mask = np.array([[0] * 5 + [1] * 4], np.int32)
    padded = tiny_model(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()[0, 5:]
    plain = tiny_model(ms.Tensor([b], ms.int32)).asnumpy()[0]
    np.testing.assert_allclose(padded, plain, atol=1e-5)


def test_decoding_steps_run_one_graph_per_shape_through_the_fast_path(tiny_dir):
    """A decode step is a Cell per input shape on MindSpore's inference fast path (which keeps one graph a
    Cell): generations of different widths, interleaved step by step, each get what they get alone."""
    model = glm3.load_model(tiny_dir)
    rng = np.random.default_rng(3)
    prompts = {b: rng.integers(3, 2000, size=(b, 20)).astype(np.int32) for b in (1, 3)}
    tokens = {b: rng.integers(3, 2000, size=(6, b)) for b in (1, 3)}

    def alone(b):
        steps = StepDriver(glm3.load_model(tiny_dir), b, 64)
        return [steps.start(prompts[b], np.ones_like(prompts[b]))] + [steps.step(t) for t in tokens[b]]

    steps = {b: StepDriver(model, b, 64) for b in (1, 3)}
    together = {b: [steps[b].start(prompts[b], np.ones_like(prompts[b]))] for b in (1, 3)}
    for i in range(6):
        for b in (1, 3):
            together[b].append(steps[b].step(tokens[b][i]))
    decode = compiled_step(model, "paged_decode")
    assert len(decode.cells) == 2
    assert all(c.phase == "increment" and "increment" in c.phase_cache for c in decode.cells.values())
    for b in (1, 3):
        np.testing.assert_array_equal(np.stack(together[b]), np.stack(alone(b)))


def test_graph_and_pynative_agree(tiny_dir, tiny_model):
    ids = ms.Tensor([IDS], ms.int32)
    graph = tiny_model(ids).asnumpy()
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        model = glm3.load_model(tiny_dir)
        pynative = model(ids).asnumpy()
        gen_py = glm3.generate(model, [IDS], max_new_tokens=5, eos_token_id=[])
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    np.testing.assert_allclose(graph, pynative, atol=1e-5)
    assert gen_py.tolist() == glm3.generate(tiny_model, [IDS], max_new_tokens=5, eos_token_id=[]).tolist()


def test_float16_parameters_close_to_float32(tiny_dir, tiny_model):
    half = glm3.load_model(tiny_dir, dtype="float16")
    assert all(p.dtype == ms.float16 for p in half.get_parameters())
    ids = ms.Tensor([IDS], ms.int32)
    ref = tiny_model(ids).asnumpy()
    got = half(ids).asnumpy()
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_cpu_kernel_matches_plain_matmul(tiny_dir, tiny_model):
    assert tiny_model.kernels_backend == "cpu"
    plain = glm3.load_model(tiny_dir, kernels_backend="plain")
    # Decode steps multiply 1, 3 and 8 rows (the streaming path); the prefill, 32 rows per prompt (the tiled one).
    for batch in ([IDS], [IDS, IDS[::-1], IDS[3:]], [IDS[i:] + IDS[:i] for i in range(8)]):
        assert (
            glm3.generate(plain, batch, max_new_tokens=6, eos_token_id=[]).tolist()
            == glm3.generate(tiny_model, batch, max_new_tokens=6, eos_token_id=[]).tolist()
        )


def test_seeded_sampling_is_reproducible(tiny_model):
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.9, top_k=50, eos_token_id=[])
    a = glm3.generate(tiny_model, [IDS], seed=7, **kw)
    b = glm3.generate(tiny_model, [IDS], seed=7, **kw)
    c = glm3.generate(tiny_model, [IDS], seed=8, **kw)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_generation_stops_and_pads(tiny_model):
    greedy_out = glm3.generate(tiny_model, [IDS], max_new_tokens=6, eos_token_id=[])[0, len(IDS) :].tolist()
    stop = greedy_out[2]
    out = glm3.generate(tiny_model, [IDS], max_new_tokens=6, eos_token_id=[stop], pad_token_id=0)
    assert out[0, len(IDS) :].tolist()[:3] == greedy_out[:3]
    assert out.shape[1] == len(IDS) + 3  # every row stopped: no further steps
    streamed = []
    glm3.generate(tiny_model, [IDS], max_new_tokens=4, eos_token_id=[], streamer=lambda t: streamed.append(t.tolist()))
    assert [s[0] for s in streamed] == greedy_out[:4]


def test_max_length_and_bad_inputs(tiny_model):
    out = glm3.generate(tiny_model, [IDS], max_length=len(IDS) + 3, eos_token_id=[])
    assert out.shape == (1, len(IDS) + 3)
    with pytest.raises(ValueError, match="seq_length"):
        glm3.generate(tiny_model, [IDS], max_new_tokens=5000)
    with pytest.raises(ValueError, match="input_ids must be in"):
        glm3.generate(tiny_model, [[5, 999999]], max_new_tokens=2)
    with pytest.raises(ValueError, match="left-padded"):
        glm3.generate(tiny_model, np.array([[5, 6, 0]]), attention_mask=np.array([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        glm3.generate(tiny_model, [IDS], max_new_tokens=2, do_sample=True, top_p=0.0)


def test_ascend_backend_refuses_cpu():
    with pytest.raises(RuntimeError, match="Ascend"):
        glm3.GLM3ForCausalLM(glm3.GLM3Config.from_name("tiny"), kernels_backend="ascend")


def test_lazy_parameters_are_not_allocated():
    """Building the 6B model for loading allocates no weight memory (no random init to overwrite)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = glm3.GLM3ForCausalLM(glm3.GLM3Config.from_name("glm3_6b"), dtype="float16", param_init="lazy")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert model.num_parameters() == 6_243_584_000
    assert grown_mb < 500, grown_mb


def test_32k_rope_ratio_matches_the_reference_thousands_of_positions_in(tmp_path):
    """rope_ratio 50 (ChatGLM3-6B-32k: base 500000) against the float64 reference, at positions past 4000, where
    a wrong base shows; the checkpoint's inv_freq buffer is at base 10000, as the 32k release stores it."""
    from safetensors.numpy import load_file

    cfg = glm3.GLM3Config.from_name("tiny", rope_ratio=50.0, seq_length=8192)
    hf = glm3.write_synthetic_checkpoint(tmp_path / "hf32k", cfg, seed=5)
    stored = load_file(os.path.join(hf, "model-00001-of-00002.safetensors"))["transformer.rotary_pos_emb.inv_freq"]
    np.testing.assert_array_equal(stored, glm3.modeling.config.rope_inv_freq(cfg.rotary_dim, 10000.0))
    again = glm3.convert_checkpoint(
        glm3.convert_checkpoint(hf, tmp_path / "ms", progress=False).dst, tmp_path / "hf_again", to="hf", progress=False
    ).dst
    written = {
        k: v
        for name in os.listdir(again)
        if name.endswith(".safetensors")
        for k, v in load_file(os.path.join(again, name)).items()
    }
    np.testing.assert_array_equal(written["transformer.rotary_pos_emb.inv_freq"], stored)  # as released

    ids = np.random.default_rng(0).integers(3, 1500, size=4160).tolist()
    model = glm3.load_model(again)
    got = model(ms.Tensor([ids], ms.int32)).asnumpy()[0, -64:]
    weights, hf_cfg = hf_weights(again), hf_config(again)
    assert hf_cfg["rope_ratio"] == 50.0
    expected = forward(weights, hf_cfg, ids).numpy()[-64:]
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
    plain = forward(weights, {**hf_cfg, "rope_ratio": 1.0}, ids).numpy()[-64:]
    assert np.abs(plain - expected).max() > 100 * np.abs(got - expected).max()  # the base matters here
