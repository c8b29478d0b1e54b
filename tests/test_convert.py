"""glm3 convert: HF/MindFormers -> MindSpore -> HF, parity with the reference, and every kind of bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import glm3
from conftest import ODD_CONFIG, hf_config, hf_weights
from glm3.weights.checkpoint import CheckpointError, expected_shapes
from glm3.weights.convert import convert_checkpoint, parse_size
from glm3.weights.tensor_files import MsCkptWriter
from reference_torch import forward

IDS = [1501, 1503, 10, 20, 30, 40, 7]


def logits(model_dir, dtype="float32"):
    model = glm3.load_model(model_dir, dtype=dtype, kernels_backend="plain")
    return model(ms.Tensor([IDS], ms.int32)).asnumpy()[0]


def convert(src, dst, **kw):
    return convert_checkpoint(src, dst, progress=False, **kw)


def listing(directory):
    return sorted(os.listdir(directory))


def no_leftovers(parent, name):
    """Neither the destination nor any temporary of it exists."""
    return not [e for e in os.listdir(parent) if e == name or e.startswith(f".{name}.")]


# ------------------------------------------------------------------------------------ conversions
def test_hf_bin_to_mindspore_matches_the_reference(odd_bin_dir, tmp_path):
    """A held-out official-format checkpoint (.bin shards + index, odd shapes) converts to the same model."""
    out = convert(odd_bin_dir, tmp_path / "ms", shard_size="40KB")
    shards = [f for f in listing(out.dst) if f.endswith(".ckpt")]
    assert len(shards) == len(out.files) > 1 and "mindspore_model.ckpt.index.json" in listing(out.dst)
    index = json.load(open(tmp_path / "ms" / "mindspore_model.ckpt.index.json"))
    assert set(index["weight_map"]) == set(expected_shapes(glm3.GLM3Config(**ODD_CONFIG)))
    expected = forward(hf_weights(odd_bin_dir), hf_config(odd_bin_dir), IDS).numpy()
    np.testing.assert_allclose(logits(tmp_path / "ms"), expected, atol=1e-4)
    # Each shard is a plain MindSpore checkpoint.
    assert set(ms.load_checkpoint(os.path.join(out.dst, shards[0]))) <= set(index["weight_map"])


@pytest.mark.parametrize("dtype, fmt", [("float32", "bin"), ("float16", "safetensors")])
def test_hf_to_mindspore_to_hf_is_bit_exact(tmp_path, dtype, fmt):
    src = glm3.write_synthetic_checkpoint(tmp_path / "hf", "tiny", seed=3, fmt=fmt, dtype=dtype, num_shards=3)
    ms_dir = convert(src, tmp_path / "ms").dst
    assert json.load(open(os.path.join(ms_dir, "config.json")))["torch_dtype"] == dtype
    back = convert(ms_dir, tmp_path / "back", to="hf", shard_size="300KB")
    assert "model.safetensors.index.json" in listing(back.dst) and len(back.files) > 1
    a, b = hf_weights(src), hf_weights(back.dst)
    assert sorted(a) == sorted(b)  # inv_freq included
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    cfg = json.load(open(os.path.join(back.dst, "config.json")))
    assert cfg["model_type"] == "chatglm" and cfg["auto_map"]["AutoModel"] and cfg["torch_dtype"] == dtype
    assert {"tokenizer.model", "tokenizer_config.json"} <= set(listing(back.dst))
    from safetensors import safe_open

    with safe_open(os.path.join(back.dst, back.files[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers requires


def test_dtypes_and_safetensors_output(tiny_dir, tmp_path):
    reference = logits(tiny_dir)
    half = convert(tiny_dir, tmp_path / "f16", dtype="float16", fmt="safetensors")
    assert half.files == ["mindspore_model.safetensors"]
    np.testing.assert_allclose(logits(half.dst), reference, atol=2e-2)
    bf16 = convert(tiny_dir, tmp_path / "bf16", dtype="bfloat16")
    loaded = ms.load_checkpoint(os.path.join(bf16.dst, "mindspore_model.ckpt"))
    assert loaded["transformer.output_layer.weight"].dtype == ms.bfloat16
    np.testing.assert_allclose(logits(bf16.dst), reference, atol=1e-1)


def test_mindformers_single_ckpt_with_optimizer_state(tiny_dir, tmp_path):
    """MindFormers' glm3_6b.ckpt: one MindSpore file, MindFormers names, no config, optimizer state inside."""
    weights = {glm3.hf_to_ms_name(k): v.numpy() for k, v in hf_weights(tiny_dir).items() if "inv_freq" not in k}
    entries = []
    for name, array in weights.items():
        entries.append({"name": name, "data": ms.Tensor(array).astype(ms.bfloat16)})
        entries.append({"name": "adam_m." + name, "data": ms.Tensor(np.zeros_like(array))})
    entries.append({"name": "global_step", "data": ms.Tensor(np.array([10], np.int32))})
    src = tmp_path / "mf" / "glm3_6b.ckpt"
    src.parent.mkdir()
    ms.save_checkpoint(entries, str(src))
    with pytest.raises(glm3.ConfigError, match="no config.json.*--config"):
        convert(str(src), tmp_path / "x")
    out = convert(str(src), tmp_path / "ms", config="tiny", tokenizer=tiny_dir, dtype="float32")
    assert out.skipped_training_state == len(weights) + 1 and out.tokenizer
    bf16_reference = {k: torch.from_numpy(v).bfloat16().float() for k, v in weights.items()}
    bf16_reference[glm3.ms_to_hf_name("transformer.embedding.embedding_table")] = bf16_reference.pop(
        "transformer.embedding.embedding_table"
    )
    expected = forward(bf16_reference, hf_config(tiny_dir), IDS).numpy()
    np.testing.assert_allclose(logits(out.dst), expected, atol=1e-4)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("0") == 0
    with pytest.raises(ValueError, match="invalid size"):
        parse_size("lots")


# -------------------------------------------------------------------------------------- bad input
def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _expect_failure(src, tmp_path, match, **kw):
    with pytest.raises((CheckpointError, OSError, ValueError), match=match):
        convert(src, tmp_path / "out", **kw)
    assert no_leftovers(tmp_path, "out")


ST1, ST2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
EMB = "transformer.embedding.word_embeddings.weight"


def test_truncated_and_corrupt_shards(tiny_dir, odd_bin_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "t")
    with open(os.path.join(d, ST2), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(d, ST2)) - 1000)
    _expect_failure(d, tmp_path, "not a valid safetensors file")
    d = _copy(tiny_dir, tmp_path / "c")
    with open(os.path.join(d, ST1), "r+b") as f:
        f.seek(20)
        f.write(b"\xff\xfe{{{{")
    _expect_failure(d, tmp_path, "not a valid safetensors file")
    b = _copy(odd_bin_dir, tmp_path / "b")
    shard = os.path.join(b, "pytorch_model-00002-of-00003.bin")
    assert listing(b)[:3] == ["config.json", "pytorch_model-00001-of-00003.bin", "pytorch_model-00002-of-00003.bin"]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    _expect_failure(b, tmp_path, "cannot load .*pytorch_model-00002-of-00003.bin safely")
    ms_dir = convert(tiny_dir, tmp_path / "ms").dst
    ckpt = os.path.join(ms_dir, "mindspore_model.ckpt")
    with open(ckpt, "r+b") as f:
        f.truncate(os.path.getsize(ckpt) - 10)
    _expect_failure(ms_dir, tmp_path, "mindspore_model.ckpt is truncated")


def test_index_inconsistencies(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "missing_entry")
    index_path = os.path.join(d, "model.safetensors.index.json")
    index = json.load(open(index_path))
    del index["weight_map"][EMB]
    json.dump(index, open(index_path, "w"))
    _expect_failure(d, tmp_path, f"{EMB} is in {ST1} but the index does not list it")

    d = _copy(tiny_dir, tmp_path / "absent")
    os.remove(os.path.join(d, ST2))
    _expect_failure(d, tmp_path, f"lists shard {ST2}, which is missing")

    d = _copy(tiny_dir, tmp_path / "lost")  # listed in the index and in the right file name, but not in the file
    path = os.path.join(d, ST1)
    tensors = load_file(path)
    tensors.pop(EMB)
    save_file(tensors, path, metadata={"format": "pt"})
    _expect_failure(d, tmp_path, f"missing .*{EMB} \\(the index puts it in {ST1}\\)")


def test_wrong_shape_and_duplicates(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "shape")
    path = os.path.join(d, ST1)
    tensors = load_file(path)
    tensors[EMB] = tensors[EMB][:, :10].copy()
    save_file(tensors, path)
    _expect_failure(d, tmp_path, rf"{EMB} in {ST1} has shape \(2048, 10\), expected \(2048, 64\)")

    d = _copy(tiny_dir, tmp_path / "dup_index")  # the tensor sits in both shards; the index names one
    tensors = load_file(os.path.join(d, ST2))
    tensors[EMB] = load_file(os.path.join(d, ST1))[EMB]
    save_file(tensors, os.path.join(d, ST2))
    _expect_failure(d, tmp_path, f"{EMB} is in {ST2} but the index maps it to {ST1}")

    # A MindSpore checkpoint holding a tensor twice (no index to catch it first).
    dup = tmp_path / "dup_ckpt"
    dup.mkdir()
    shutil.copy(os.path.join(tiny_dir, "config.json"), dup)
    w = MsCkptWriter(str(dup / "model.ckpt"))
    weights = hf_weights(tiny_dir)
    for name, tensor in weights.items():
        if "inv_freq" not in name:
            w.add(glm3.hf_to_ms_name(name), tensor.numpy(), "float32")
    w.add("transformer.embedding.embedding_table", weights[EMB].numpy(), "float32")
    w.close()
    _expect_failure(str(dup), tmp_path, "embedding_table appears twice")


def test_inv_freq_that_disagrees_with_the_config(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "rope")
    path = os.path.join(d, ST1)
    tensors = load_file(path)
    tensors["transformer.rotary_pos_emb.inv_freq"] = tensors["transformer.rotary_pos_emb.inv_freq"] ** 1.5
    save_file(tensors, path)
    _expect_failure(d, tmp_path, "inv_freq .* is not a RoPE buffer of this model")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_carrying_code_never_runs(odd_bin_dir, tmp_path):
    d = _copy(odd_bin_dir, tmp_path / "evil")
    shard = os.path.join(d, "pytorch_model-00001-of-00003.bin")
    torch.save({"transformer.embedding.word_embeddings.weight": _Exploit()}, shard)
    _expect_failure(d, tmp_path, "weights_only=True")
    assert not os.path.exists("pwned") and not os.path.exists(os.path.join(d, "pwned"))


def test_destination_problems_fail_before_any_work(tiny_dir, tmp_path):
    convert(tiny_dir, tmp_path / "out")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(tiny_dir, tmp_path / "out")
    again = convert(tiny_dir, tmp_path / "out", overwrite=True, dtype="float16")
    assert again.dtype == "float16" and os.path.isdir(tmp_path / "out")
    assert [e for e in os.listdir(tmp_path) if e.startswith(".out.")] == []  # old version and temporary gone
    (tmp_path / "plain_file").write_text("x")
    with pytest.raises(NotADirectoryError, match="plain_file is not a directory"):
        convert(tiny_dir, tmp_path / "plain_file" / "out")
    with pytest.raises(PermissionError, match="cannot write into /proc"):  # read-only even for root
        convert(tiny_dir, "/proc/glm3-convert-test/out")
    with pytest.raises(ValueError, match="must not be the source"):
        convert(tiny_dir, os.path.join(tiny_dir, "inside"))


def test_kill_9_leaves_nothing_and_rerun_succeeds(tmp_path):
    """A converter killed mid-way leaves no destination; the next run cleans its temporary and succeeds."""
    src = glm3.write_synthetic_checkpoint(tmp_path / "hf", "bench", seed=0, dtype="float16", num_shards=4)
    cmd = [
        sys.executable,
        "-m",
        "glm3.cli",
        "convert",
        "--src",
        src,
        "--dst",
        str(tmp_path / "ms"),
        "--shard-size",
        "20MB",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and proc.poll() is None:
        temps = [e for e in os.listdir(tmp_path) if e.startswith(".ms.") and e.endswith(".tmp")]
        if temps and any(f.startswith(".part00002") for f in os.listdir(tmp_path / temps[0])):
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    proc.wait()
    assert killed, "the conversion finished before it could be interrupted"
    assert not os.path.exists(tmp_path / "ms")
    assert [e for e in os.listdir(tmp_path) if e.startswith(".ms.")]  # the killed run's temporary
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [e for e in os.listdir(tmp_path) if e.startswith(".ms.")] == []
    assert "mindspore_model.ckpt.index.json" in listing(tmp_path / "ms")
