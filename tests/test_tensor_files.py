"""Streaming .ckpt / safetensors codecs, checked against MindSpore's and safetensors' own readers/writers."""

import json
import struct

import mindspore as ms
import mindspore.train.serialization as ms_serialization
import numpy as np
import pytest
from safetensors import safe_open

from glm3.weights.tensor_files import (
    MsCkptWriter,
    SafetensorsWriter,
    TensorFileError,
    bfloat16_bits,
    bfloat16_to_float32,
    iter_ms_ckpt,
    iter_safetensors,
    safetensors_header_bound,
)

RNG = np.random.default_rng(0)
A = RNG.standard_normal((300, 7)).astype(np.float32)
B = RNG.standard_normal((5,)).astype(np.float16)


def test_our_ckpt_loads_in_mindspore(tmp_path):
    path = str(tmp_path / "ours.ckpt")
    w = MsCkptWriter(path)
    w.add("a", A, "float32")
    w.add("b", B, "float16")
    w.add("c", A, "bfloat16")
    w.close()
    loaded = ms.load_checkpoint(path)
    assert loaded["a"].dtype == ms.float32 and loaded["b"].dtype == ms.float16 and loaded["c"].dtype == ms.bfloat16
    np.testing.assert_array_equal(loaded["a"].asnumpy(), A)
    np.testing.assert_array_equal(loaded["b"].asnumpy(), B)
    # Our float32 -> bfloat16 rounding equals MindSpore's cast, bit for bit.
    np.testing.assert_array_equal(
        loaded["c"].astype(ms.float32).asnumpy(), ms.Tensor(A).astype(ms.bfloat16).astype(ms.float32).asnumpy()
    )
    assert {n: a.dtype for n, a in iter_ms_ckpt(path)} == {"a": np.float32, "b": np.float16, "c": np.float32}


def test_mindspore_ckpt_with_slices_and_crc_streams(tmp_path, monkeypatch):
    """MindSpore splits big tensors into several records and may append a CRC: both are handled."""
    monkeypatch.setattr(ms_serialization, "SLICE_SIZE", 1)  # 1 KB slices
    big = RNG.standard_normal((1000, 300)).astype(np.float32)
    path = str(tmp_path / "theirs.ckpt")
    ms.save_checkpoint(
        [
            {"name": "big", "data": ms.Tensor(big)},
            {"name": "bf", "data": ms.Tensor(A).astype(ms.bfloat16)},
            {"name": "global_step", "data": ms.Tensor(np.array([3], np.int32))},
        ],
        path,
        crc_check=True,
    )
    out = dict(iter_ms_ckpt(path))
    np.testing.assert_array_equal(out["big"], big)
    np.testing.assert_array_equal(out["bf"], ms.Tensor(A).astype(ms.bfloat16).astype(ms.float32).asnumpy())
    assert out["global_step"].tolist() == [3]
    assert sorted(n for n, _ in iter_ms_ckpt(path, want=lambda n: n != "big")) == ["bf", "global_step"]

    data = bytearray(open(path, "rb").read())
    data[100] ^= 0x01  # one flipped bit inside the first record's tensor data
    (tmp_path / "flip.ckpt").write_bytes(bytes(data))
    with pytest.raises(TensorFileError, match="CRC"):
        list(iter_ms_ckpt(str(tmp_path / "flip.ckpt")))
    (tmp_path / "cut.ckpt").write_bytes(open(path, "rb").read()[:-5000])
    with pytest.raises(TensorFileError, match="truncated"):
        list(iter_ms_ckpt(str(tmp_path / "cut.ckpt")))
    (tmp_path / "junk.ckpt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(TensorFileError, match="not a MindSpore checkpoint"):
        list(iter_ms_ckpt(str(tmp_path / "junk.ckpt")))


def test_safetensors_writer_is_standard(tmp_path):
    path = str(tmp_path / "x.safetensors")
    bound = safetensors_header_bound([("a", A.shape), ("b", B.shape), ("c", A.shape)], {"format": "pt"})
    w = SafetensorsWriter(path, bound, {"format": "pt"})
    w.add("a", A, "float32")
    w.add("c", A, "bfloat16")
    w.close()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    assert n == bound and n % 8 == 0 and header["c"]["dtype"] == "BF16"
    with safe_open(path, "np") as f:
        assert f.metadata() == {"format": "pt"}
        np.testing.assert_array_equal(f.get_tensor("a"), A)
    out = dict(iter_safetensors(path))
    np.testing.assert_array_equal(out["c"], bfloat16_to_float32(bfloat16_bits(A)))
    loaded = ms.load_checkpoint(path, format="safetensors")
    np.testing.assert_array_equal(loaded["c"].astype(ms.float32).asnumpy(), out["c"])


def test_bfloat16_rounding_edges():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0, np.inf, np.nan, 3.0e38], np.float32)
    y = bfloat16_to_float32(bfloat16_bits(x))
    assert y[0] == 1.0 and y[1] == 1.0  # a tie rounds to even
    assert y[2] == 1.0 + 2**-6  # a tie rounds to even (up)
    assert np.signbit(y[3]) and np.isinf(y[4]) and np.isnan(y[5]) and np.isfinite(y[6])
