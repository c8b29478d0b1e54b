"""Loading every layout, and clear errors for every kind of bad checkpoint."""

import json
import os
import shutil

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import glm3
from glm3.weights.checkpoint import CheckpointError, expected_shapes, hf_to_ms_name, ms_to_hf_name

IDS = [[1501, 1503, 10, 20, 30, 40]]


def logits(model):
    return model(ms.Tensor(IDS, ms.int32)).asnumpy()


def test_name_map_round_trip():
    cfg = glm3.GLM3Config.from_name("glm3_6b")
    names = expected_shapes(cfg)
    assert len(names) == 199  # 200 released tensors minus the recomputable inv_freq
    assert "transformer.embedding.embedding_table" in names
    assert "transformer.encoder.layers.0.self_attention.query_key_value.weight" in names
    assert names["transformer.encoder.layers.27.mlp.dense_h_to_4h.weight"] == (27392, 4096)
    assert ms_to_hf_name("transformer.embedding.embedding_table") == "transformer.embedding.word_embeddings.weight"
    assert all(hf_to_ms_name(ms_to_hf_name(n)) == n for n in names)


@pytest.mark.parametrize("fmt, shards", [("safetensors", 1), ("bin", 1), ("bin", 2)])
def test_all_hf_layouts_load_the_same_model(tiny_dir, tiny_model, tmp_path, fmt, shards):
    other = glm3.write_synthetic_checkpoint(tmp_path / "m", "tiny", seed=1, fmt=fmt, num_shards=shards)
    np.testing.assert_array_equal(logits(glm3.load_model(other)), logits(tiny_model))


def test_save_model_round_trip_and_mindformers_names(tiny_dir, tiny_model, tmp_path):
    out = glm3.save_model(tiny_model, tmp_path / "ms", tokenizer_dir=tiny_dir)
    assert sorted(os.listdir(out)) == [
        "config.json",
        "mindspore_model.ckpt",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    names = set(ms.load_checkpoint(os.path.join(out, "mindspore_model.ckpt")))
    assert names == set(expected_shapes(tiny_model.config))
    np.testing.assert_array_equal(logits(glm3.load_model(out)), logits(tiny_model))
    with pytest.raises(FileExistsError):
        glm3.save_model(tiny_model, out)
    # A MindFormers-style single .ckpt under another name loads too.
    os.rename(os.path.join(out, "mindspore_model.ckpt"), os.path.join(out, "glm3_6b.ckpt"))
    np.testing.assert_array_equal(logits(glm3.load_model(out)), logits(tiny_model))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _shards(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))


def _edit_first_shard(directory, edit):
    path = os.path.join(directory, _shards(directory)[0])
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


EMB = "transformer.embedding.word_embeddings.weight"


def test_missing_tensor(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    _edit_first_shard(d, lambda t: t.pop(EMB))
    with pytest.raises(CheckpointError, match="missing.*word_embeddings"):
        glm3.load_model(d)


def test_unexpected_tensor(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    _edit_first_shard(d, lambda t: t.update({"transformer.encoder.layers.9.mlp.extra": np.zeros(3, np.float32)}))
    with pytest.raises(
        CheckpointError,
        match="layers.9.mlp.extra is in model-00001-of-00002.safetensors but the index does not list it",
    ):
        glm3.load_model(d)
    index_path = os.path.join(d, "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"]["transformer.encoder.layers.9.mlp.extra"] = _shards(d)[0]
    json.dump(index, open(index_path, "w"))
    with pytest.raises(
        CheckpointError, match="unexpected tensor transformer.encoder.layers.9.mlp.extra in model-00001"
    ):
        glm3.load_model(d)


def test_wrong_shape(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    _edit_first_shard(d, lambda t: t.update({EMB: t[EMB][:100]}))
    with pytest.raises(
        CheckpointError, match=r"word_embeddings.weight in model-00001-of-00002.safetensors has shape \(100, 64\)"
    ):
        glm3.load_model(d)


def test_duplicated_tensor(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    first, second = _shards(d)
    dup = load_file(os.path.join(d, first))[EMB]
    path = os.path.join(d, second)
    tensors = load_file(path)
    tensors[EMB] = dup
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=f"{EMB} is in {second} but the index maps it to {first}"):
        glm3.load_model(d)
    os.remove(os.path.join(d, "model.safetensors.index.json"))  # without an index: caught as a duplicate
    with pytest.raises(CheckpointError, match="several .safetensors files but no model.safetensors.index.json"):
        glm3.load_model(d)


def test_shard_listed_but_absent_and_truncated(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    os.remove(os.path.join(d, _shards(d)[1]))
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-00002.safetensors, which is missing"):
        glm3.load_model(d)
    d = _copy(tiny_dir, tmp_path / "t")
    path = os.path.join(d, _shards(d)[0])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        glm3.load_model(d)


def test_wrong_config_for_weights(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    cfg["num_layers"] = 1
    open(os.path.join(d, "config.json"), "w").write(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected tensor transformer.encoder.layers.1"):
        glm3.load_model(d)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_with_code_is_refused_and_never_runs(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    for f in _shards(d) + ["model.safetensors.index.json"]:
        os.remove(os.path.join(d, f))
    torch.save({"x": _Exploit()}, os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        glm3.load_model(d)
    assert not os.path.exists("pwned") and not os.path.exists(os.path.join(d, "pwned"))


def test_no_checkpoint(tmp_path):
    glm3.GLM3Config.from_name("tiny").save(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        glm3.load_model(tmp_path)


def test_tie_word_embeddings_true_loads_as_the_official_code_does(tiny_dir, tiny_model, tmp_path):
    """transformers' save_pretrained writes "tie_word_embeddings": true for a ChatGLMConfig built without the
    key; the official code ignores it (output_layer is never tied). Only a missing output_layer is an error."""
    tensors = {}
    for name in sorted(os.listdir(tiny_dir)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(tiny_dir, name)))
    with open(os.path.join(tiny_dir, "config.json"), encoding="utf-8") as f:
        config = {**json.load(f), "tie_word_embeddings": True}
    for name, drop in (("tied", None), ("no_output_layer", "transformer.output_layer.weight")):
        os.makedirs(tmp_path / name)
        save_file({k: v for k, v in tensors.items() if k != drop}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tied = glm3.load_model(tmp_path / "tied")
    np.testing.assert_array_equal(logits(tied), logits(tiny_model))
    assert glm3.GLM3Config.from_hf(tmp_path / "tied").to_hf()["tie_word_embeddings"] is True  # kept as written
    with pytest.raises(CheckpointError, match="missing.*transformer.output_layer.weight"):
        glm3.load_model(tmp_path / "no_output_layer")
