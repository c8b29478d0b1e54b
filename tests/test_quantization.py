"""Weight-only quantization: the format against an independent element-by-element reference, the int8/int4 CPU
kernels against the dequantized matmul at every row count, `glm3 quantize` as a real subprocess, and quantized
models through load, generate, export + infer and the server."""

import json
import os
import subprocess
import sys

import httpx
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

import glm3
from conftest import Server, paged_decode_logits, subprocess_env, without_layer_kernel
from glm3.kernels import dequantize as ms_dequantize
from glm3.kernels import kernel_library, quantized_xwt_op
from glm3.modeling.config import ConfigError
from glm3.quantization import (
    QuantizationConfig,
    QuantizationError,
    dequantize,
    pack_int4,
    quantize,
    unpack_int4,
)
from glm3.weights.checkpoint import CheckpointError

LIB = kernel_library()


def reference_quantize(w, bits, group):
    """Element by element, as the format's docstring says: the scale of each group, then each weight's code."""
    qmax = 127 if bits == 8 else 7
    rows, cols = w.shape
    codes = np.zeros((rows, cols), np.int64)
    scales = np.zeros((rows, cols // group), np.float16)
    for r in range(rows):
        for g in range(cols // group):
            chunk = [float(v) for v in w[r, g * group : (g + 1) * group]]
            scale = np.float16(max(abs(v) for v in chunk) / qmax)
            scales[r, g] = scale
            for i, v in enumerate(chunk):
                code = 0 if float(scale) == 0 else round(v / float(scale))
                codes[r, g * group + i] = max(-qmax, min(qmax, code))
    return codes, scales


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 64])
def test_quantize_and_dequantize_follow_the_format(bits, group):
    rng = np.random.default_rng(bits + group)
    w = rng.standard_normal((5, 128), dtype=np.float32)
    w[1, :group] = 0.0  # an all-zero group: scale 0, codes 0
    config = QuantizationConfig(bits, group)
    data, scales = quantize(w, config)
    codes, ref_scales = reference_quantize(w, bits, group)
    np.testing.assert_array_equal(scales, ref_scales)
    assert scales[1, 0] == 0
    if bits == 8:
        assert data.dtype == np.int8 and data.shape == (5, 128)
        stored = data.astype(np.int64)
    else:
        assert data.dtype == np.uint8 and data.shape == (5, 64)
        # byte i of each 16-byte block: weight i + 8 (low nibble), weight i + 16 + 8 (high nibble)
        block = data[0, :16]
        for i in range(16):
            assert block[i] & 15 == codes[0, i] + 8 and block[i] >> 4 == codes[0, 16 + i] + 8
        stored = unpack_int4(data).astype(np.int64)
    # rint rounds half to even and Python's round too; ties (v / scale exactly .5) may still differ by one code
    assert np.abs(stored - codes).max() <= 1 and (stored == codes).mean() > 0.99
    back = dequantize(data, scales, config)
    step = np.repeat(scales.astype(np.float32), group, axis=1)
    assert np.all(np.abs(back - w) <= step * 0.5 + np.abs(w) * 1e-3 + 1e-8)  # half a step, plus fp16 scale rounding
    codes8 = rng.integers(-8, 8, size=(3, 64)).astype(np.int8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(codes8)), codes8)


def test_quantizing_in_blocks_of_rows_changes_nothing(monkeypatch):
    import glm3.quantization as quantization

    w = np.random.default_rng(3).standard_normal((37, 64), dtype=np.float32)
    for bits in (8, 4):
        whole = quantize(w, QuantizationConfig(bits))
        monkeypatch.setattr(quantization, "BLOCK_ELEMENTS", 64 * 5)  # 5 rows at a time, a ragged last block
        blocks = quantize(w, QuantizationConfig(bits))
        monkeypatch.undo()
        np.testing.assert_array_equal(whole[0], blocks[0])
        np.testing.assert_array_equal(whole[1], blocks[1])


def test_bad_settings_and_shapes_are_refused():
    for bits, group in ((3, 32), (8, 16), (8, 48), (4, 0)):
        with pytest.raises(QuantizationError):
            QuantizationConfig(bits, group)
    with pytest.raises(QuantizationError, match="multiple of group_size"):
        quantize(np.ones((4, 96), np.float32), QuantizationConfig(8, 64))
    with pytest.raises(QuantizationError, match="inf or NaN"):
        quantize(np.full((1, 32), np.nan, np.float32), QuantizationConfig(8))
    with pytest.raises(QuantizationError, match="format_version"):
        QuantizationConfig.from_dict({"format_version": 99, "bits": 8})


class Product(nn.Cell):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, x, data, scales):
        return self.op(x, data, scales)


class Dequantized(nn.Cell):
    def __init__(self, bits):
        super().__init__()
        self.bits = bits

    def construct(self, data, scales):
        return ms_dequantize(data, scales, self.bits)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 65])
def test_kernels_equal_the_dequantized_matmul_at_every_row_count(bits, rows):
    """Rows 1-4 stream the weights once; more rows go in blocks of four over panels of 64 weight rows. n = 70
    leaves tails of both; group 64 over k = 192 spans several packing blocks per group (the default group of 32
    is one block: a path of its own, which the model tests take)."""
    rng = np.random.default_rng(rows * bits)
    n, k = 70, 192
    config = QuantizationConfig(bits, 64)
    data, scales = quantize(rng.standard_normal((n, k), dtype=np.float32), config)
    w = dequantize(data, scales, config).astype(np.float64)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    y = Product(quantized_xwt_op(LIB, bits))(Tensor(x), Tensor(data), Tensor(scales)).asnumpy()
    assert y.shape == (rows, n) and y.dtype == np.float32
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-4)
    plain = Dequantized(bits)(Tensor(data), Tensor(scales)).asnumpy()
    np.testing.assert_array_equal(plain, w.astype(np.float32))  # the fallback dequantizes exactly
    # a row's result does not depend on how many rows come with it (the serving engine's batch invariance)
    alone = Product(quantized_xwt_op(LIB, bits))(Tensor(x[-1:]), Tensor(data), Tensor(scales)).asnumpy()
    np.testing.assert_array_equal(alone[0], y[-1])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k, n", [(4096, 640), (13696, 96)])
def test_kernels_at_the_6b_widths_equal_numpy(bits, k, n):
    """The 6B shape's widths: k = 4096 (query_key_value, dense_h_to_4h) and k = 13696 (dense_4h_to_h) at the
    default group of 32, i.e. 128 and 428 scale groups a row, so the decoding tiles (one or two x rows) reload
    their widened scales many times over a row and the four-row tiles (prefill) cross many groups; n: slices
    of the output rows (13696 and 4096 at 6B), with a panel tail. Against float64 numpy on the dequantized
    weights, each row alone too."""
    rng = np.random.default_rng(k + n + bits)
    config = QuantizationConfig(bits, 32)
    data, scales = quantize(rng.standard_normal((n, k), dtype=np.float32), config)
    assert scales.shape == (n, k // 32) and k // 32 > 16
    w = dequantize(data, scales, config).astype(np.float64)
    op = Product(quantized_xwt_op(LIB, bits))
    for rows in (1, 2, 5):
        x = rng.standard_normal((rows, k), dtype=np.float32)
        y = op(Tensor(x), Tensor(data), Tensor(scales)).asnumpy()
        reference = x.astype(np.float64) @ w.T
        assert np.abs(reference).max() > 50  # outputs of the real size's magnitude
        np.testing.assert_allclose(y, reference, rtol=1e-5, atol=2e-3 * np.sqrt(k / 1024))


def run_glm3(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "glm3.cli", *args], capture_output=True, text=True, cwd=cwd, env=subprocess_env()
    )


@pytest.fixture(scope="module")
def quantized(tiny_dir, tmp_path_factory):
    """The tiny model in our layout, and its 8-bit (embedding included) and 4-bit quantizations made by
    `glm3 quantize`."""
    root = tmp_path_factory.mktemp("quantized")
    base = root / "float"
    glm3.convert_checkpoint(tiny_dir, base, progress=False)
    out = {"float": base}
    for bits in (8, 4):
        dst = root / f"q{bits}"
        flags = ["--embedding"] if bits == 8 else []  # the 8-bit model quantizes its embedding table too
        r = run_glm3(
            "quantize", "--src", str(base), "--dst", str(dst), "--bits", str(bits), *flags, "--quiet", cwd=root
        )
        assert r.returncode == 0, r.stderr
        assert f"to {bits} bits" in r.stdout
        out[bits] = dst
    return out


def test_quantize_writes_the_format_and_loads_with_every_backend(quantized):
    base = glm3.load_model(quantized["float"], kernels_backend="plain")
    ids = np.array([[5, 9, 33, 7, 100, 2000, 41, 8]], np.int32)
    reference = base(Tensor(ids)).asnumpy()
    for bits in (8, 4):
        with open(os.path.join(quantized[bits], "config.json"), encoding="utf-8") as f:
            meta = json.load(f)["glm3_quantization"]
        assert meta["format_version"] == 1 and meta["bits"] == bits and meta["group_size"] == 32
        logits = {}
        for backend in ("cpu", "plain"):
            model = glm3.load_model(quantized[bits], kernels_backend=backend)
            qkv = model.transformer.encoder.layers[0].self_attention.query_key_value
            assert qkv.weight.dtype == (ms.int8 if bits == 8 else ms.uint8) and qkv.weight_scale.dtype == ms.float16
            table = model.transformer.embedding.embedding_table
            assert table.dtype == (ms.int8 if bits == 8 else ms.float32)
            logits[backend] = model(Tensor(ids)).asnumpy()
        np.testing.assert_allclose(logits["cpu"], logits["plain"], atol=1e-5)
        error = np.abs(logits["cpu"] - reference).max() / np.abs(reference).max()
        assert error < (0.02 if bits == 8 else 0.3), error  # 4 bits on a random tiny model is coarse
        assert error > 0  # it is quantized: not the float model


@pytest.mark.parametrize("bits", [8, 4])
def test_the_layer_kernel_decodes_quantized_weights_as_the_single_kernels_do(quantized, bits):
    """One kernel a block reads int8 / int4 weights as the quantized product kernels do: the same logits to the
    bit, and close to the dequantized plain operators."""
    one = paged_decode_logits(glm3.load_model(quantized[bits], kernels_backend="cpu"))
    apart = paged_decode_logits(without_layer_kernel(glm3.load_model(quantized[bits], kernels_backend="cpu")))
    plain = paged_decode_logits(glm3.load_model(quantized[bits], kernels_backend="plain"))
    assert np.abs(plain).max() > 0.1
    np.testing.assert_array_equal(one, apart)
    np.testing.assert_allclose(one, plain, rtol=1e-4, atol=2e-5)


def test_a_quantized_model_generates_exports_and_runs_from_mindir(quantized, tmp_path):
    model = glm3.load_model(quantized[4])
    ids = np.array([[5, 9, 33, 7, 100]], np.int32)
    tokens = glm3.generate(model, ids, max_new_tokens=6, eos_token_id=[])
    plain = glm3.generate(
        glm3.load_model(quantized[4], kernels_backend="plain"), ids, max_new_tokens=6, eos_token_id=[]
    )
    np.testing.assert_array_equal(tokens, plain)
    from glm3.deploy.export import export_model
    from glm3.deploy.infer import MindIRRunner

    dst = export_model(quantized[4], tmp_path / "export", paged=True, prompt_length=32, seq_length=64)
    runner = MindIRRunner(dst)
    new = tokens[0, ids.shape[1] :].tolist()
    stops = set(runner.config.stop_token_ids)
    expected = new[: next((i + 1 for i, t in enumerate(new) if t in stops), len(new))]
    assert runner.generate([ids[0].tolist()], max_new_tokens=6) == [expected]


def test_quantized_inputs_that_cannot_work_are_refused(quantized, tmp_path):
    r = run_glm3("quantize", "--src", str(quantized[8]), "--dst", str(tmp_path / "x"), "--bits", "4", cwd=tmp_path)
    assert r.returncode == 2 and "already quantized" in r.stderr and "Traceback" not in r.stderr
    r = run_glm3("convert", "--src", str(quantized[8]), "--dst", str(tmp_path / "y"), "--to", "hf", cwd=tmp_path)
    assert r.returncode == 2 and "quantized model" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")
    # a tensor of the wrong dtype in a quantized checkpoint is named
    bad = tmp_path / "bad"
    bad.mkdir()
    config = glm3.GLM3Config.from_hf(quantized[8])
    model = glm3.load_model(quantized["float"])
    from glm3.weights.loading import model_tensors
    from glm3.weights.shards import write_model_weights

    with pytest.raises(CheckpointError, match="expected int8"):
        write_model_weights(model_tensors(model), str(bad), config, "float32")
    data = json.loads((quantized[8] / "config.json").read_text())
    data["glm3_quantization"]["format_version"] = 2
    with pytest.raises(ConfigError, match="format_version 2"):
        glm3.GLM3Config.from_hf(data)


@pytest.mark.integration
def test_the_server_serves_a_quantized_model(quantized, tmp_path):
    server = Server(quantized[8], tmp_path)
    try:
        url = server.url
        body = {
            "model": "chatglm3-6b",
            "prompt": [5, 9, 33, 7, 100],
            "max_tokens": 6,
            "temperature": 0,
            "ignore_eos": True,
        }
        reply = httpx.post(url + "/v1/completions", json={**body, "return_token_ids": True}, timeout=120)
        assert reply.status_code == 200, reply.text
        model = glm3.load_model(quantized[8])
        expected = glm3.generate(model, np.array([[5, 9, 33, 7, 100]]), max_new_tokens=6, eos_token_id=[])[0, 5:]
        assert reply.json()["choices"][0]["token_ids"] == expected.tolist()
    finally:
        assert server.stop() == 0
