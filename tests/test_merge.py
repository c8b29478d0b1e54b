"""Merging per-rank checkpoints: tensor-parallel split -> merge round trip, data-parallel verified selection,
LoRA folding, and clear errors for mismatches."""

import json
import os
import shutil
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

import glm3
from conftest import SAMPLE, ckpt_arrays
from glm3.train import FinetuneConfig, finetune
from glm3.train.merge import MergeError, merge_adapter, merge_run, split_model
from glm3.train.strategy import read_strategy_file, write_strategy_file, write_tensor_parallel_strategy


def original(model_dir):
    return {p.name: p.asnumpy() for p in glm3.load_model(model_dir).get_parameters()}


def test_tensor_parallel_split_then_merge_is_bit_exact(tiny_dir, tmp_path):
    config = glm3.GLM3Config.from_hf(tiny_dir)
    strategy = write_tensor_parallel_strategy(tmp_path / "tp2.ckpt", config, model_parallel=2)
    layout = read_strategy_file(strategy)
    assert layout["transformer.encoder.layers.0.self_attention.dense.weight"] == {
        "dev_matrix": [1, 2],
        "tensor_map": [-1, 0],
    }
    files = split_model(tiny_dir, strategy, tmp_path / "split")
    assert [os.path.relpath(f, tmp_path / "split") for f in files] == ["rank_0/model.ckpt", "rank_1/model.ckpt"]
    full = original(tiny_dir)
    shards = [ckpt_arrays(f) for f in files]
    p = "transformer.encoder.layers.1."
    half_qkv, half_ffn = full[p + "self_attention.query_key_value.weight"].shape[0] // 2, config.ffn_hidden_size
    for rank, shard in enumerate(shards):  # the Megatron layout, checked by slicing the full tensors here
        rows = slice(rank * half_qkv, (rank + 1) * half_qkv)
        np.testing.assert_array_equal(
            shard[p + "self_attention.query_key_value.weight"], full[p + "self_attention.query_key_value.weight"][rows]
        )
        np.testing.assert_array_equal(
            shard[p + "self_attention.query_key_value.bias"], full[p + "self_attention.query_key_value.bias"][rows]
        )
        np.testing.assert_array_equal(
            shard[p + "mlp.dense_h_to_4h.weight"],
            full[p + "mlp.dense_h_to_4h.weight"][rank * half_ffn : (rank + 1) * half_ffn],
        )
        cols = slice(rank * 32, (rank + 1) * 32)
        np.testing.assert_array_equal(
            shard[p + "self_attention.dense.weight"], full[p + "self_attention.dense.weight"][:, cols]
        )
        np.testing.assert_array_equal(
            shard[p + "mlp.dense_4h_to_h.weight"], full[p + "mlp.dense_4h_to_h.weight"][:, rank * 80 : (rank + 1) * 80]
        )
        vocab = slice(rank * 1024, (rank + 1) * 1024)
        np.testing.assert_array_equal(
            shard["transformer.embedding.embedding_table"], full["transformer.embedding.embedding_table"][vocab]
        )
        np.testing.assert_array_equal(
            shard["transformer.output_layer.weight"], full["transformer.output_layer.weight"][vocab]
        )
        np.testing.assert_array_equal(shard[p + "input_layernorm.weight"], full[p + "input_layernorm.weight"])

    summary = merge_run(tmp_path / "split", tmp_path / "merged", tiny_dir, strategy=strategy)
    assert summary.method == "strategy" and summary.ranks == 2
    merged = original(tmp_path / "merged")
    assert merged.keys() == full.keys()
    for name in full:
        np.testing.assert_array_equal(merged[name], full[name], err_msg=name)
    assert os.path.isfile(tmp_path / "merged" / "tokenizer.model")


def test_strategy_mismatches_are_clear_errors(tiny_dir, tmp_path):
    config = glm3.GLM3Config.from_hf(tiny_dir)
    strategy = write_tensor_parallel_strategy(tmp_path / "tp2.ckpt", config, model_parallel=2)
    split_model(tiny_dir, strategy, tmp_path / "split")
    # A missing rank.
    shutil.copytree(tmp_path / "split", tmp_path / "one")
    shutil.rmtree(tmp_path / "one" / "rank_1")
    with pytest.raises(MergeError, match="strategy describes 2 rank"):
        merge_run(tmp_path / "one", tmp_path / "out", tiny_dir, strategy=strategy)
    shutil.copytree(tmp_path / "split", tmp_path / "gap")
    os.rename(tmp_path / "gap" / "rank_1", tmp_path / "gap" / "rank_2")
    with pytest.raises(MergeError, match="a rank is missing"):
        merge_run(tmp_path / "gap", tmp_path / "out", tiny_dir, strategy=strategy)
    # A different strategy: four-way.
    four = write_tensor_parallel_strategy(tmp_path / "tp4.ckpt", config, model_parallel=4)
    with pytest.raises(MergeError, match="strategy describes 4 rank"):
        merge_run(tmp_path / "split", tmp_path / "out", tiny_dir, strategy=four)
    # Same rank count, but the row-parallel weights split the other way: the merged shapes are wrong.
    layout = {k: v["tensor_map"] for k, v in read_strategy_file(strategy).items()}
    layout["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"] = [0, -1]
    other = write_strategy_file(tmp_path / "other.ckpt", layout, [1, 2])
    with pytest.raises((MergeError, glm3.CheckpointError), match="dense_4h_to_h"):
        merge_run(tmp_path / "split", tmp_path / "out", tiny_dir, strategy=other)
    # A shard of the wrong shape.
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "split", bad)
    shard = ckpt_arrays(bad / "rank_1" / "model.ckpt")
    shard["transformer.encoder.layers.0.self_attention.dense.weight"] = np.zeros((64, 30), np.float32)
    ms.save_checkpoint([{"name": k, "data": Tensor(v)} for k, v in shard.items()], str(bad / "rank_1" / "model.ckpt"))
    with pytest.raises((MergeError, glm3.CheckpointError)):
        merge_run(bad, tmp_path / "out", tiny_dir, strategy=strategy)
    assert not (tmp_path / "out").exists()


def _run(tiny_dir, out, **overrides):
    values = {
        "model": str(tiny_dir),
        "data": SAMPLE,
        "output": str(out),
        "max_source_length": 32,
        "max_target_length": 32,
        "seq_length": 65,
        "batch_size": 2,
        "steps": 3,
        "lr": 1e-3,
        "progress": False,
    }
    return finetune(FinetuneConfig(**{**values, **overrides}))


def test_data_parallel_ranks_merge_by_verified_selection(tiny_dir, tmp_path):
    result = _run(tiny_dir, tmp_path / "run")
    # A second rank with the same state, as a data-parallel run leaves it (two real msrun ranks are checked
    # bit-identical in test_finetune_cli).
    shutil.copytree(tmp_path / "run" / "checkpoint" / "rank_0", tmp_path / "run" / "checkpoint" / "rank_1")
    summary = merge_run(tmp_path / "run", tmp_path / "merged", tiny_dir)
    assert (summary.method, summary.ranks, summary.step) == ("data-parallel", 2, 3)
    trained = ckpt_arrays(os.path.join(result.weights, "mindspore_model.ckpt"))
    merged = ckpt_arrays(tmp_path / "merged" / "mindspore_model.ckpt")
    assert merged.keys() == trained.keys()  # optimizer state left behind
    for name in trained:
        np.testing.assert_array_equal(merged[name], trained[name], err_msg=name)

    state_path = tmp_path / "run" / "checkpoint" / "rank_1" / "step_00000003" / "state.ckpt"
    state = ckpt_arrays(state_path)
    state["transformer.output_layer.weight"][0, 0] += 1.0
    ms.save_checkpoint([{"name": k, "data": Tensor(v)} for k, v in state.items()], str(state_path))
    with pytest.raises(MergeError, match="rank 1 disagrees with rank 0 on transformer.output_layer.weight"):
        merge_run(tmp_path / "run", tmp_path / "merged2", tiny_dir)
    with pytest.raises(MergeError, match="no checkpoint of step 2"):
        merge_run(tmp_path / "run", tmp_path / "merged2", tiny_dir, step=2)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_lora_merge_gives_the_adapter_models_logits(dtype, tiny_dir, tmp_path):
    base_dir = (
        tiny_dir
        if dtype == "float32"
        else glm3.convert_checkpoint(tiny_dir, tmp_path / "f16", dtype="float16", progress=False).dst
    )
    lora = {
        "rank": 4,
        "alpha": 16,
        "dropout": 0.0,
        "targets": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    }
    result = _run(base_dir, tmp_path / "run", lora=lora, steps=4, lr=5e-3)
    ids = Tensor(np.array([[64790, 64792, 30, 31, 32, 33, 34]], np.int32) % 2048)
    adapted = glm3.load_adapter(glm3.load_model(base_dir, kernels_backend="plain"), result.weights)
    expected = adapted(ids).asnumpy()
    base = glm3.load_model(base_dir)(ids).asnumpy()
    changed = np.abs(expected - base).max()
    assert changed > 1e-3  # the adapter changed something
    for summary in (
        merge_adapter(base_dir, result.weights, tmp_path / "from_adapter"),
        merge_run(tmp_path / "run", tmp_path / "from_run", base_dir),
    ):
        assert summary.method == "lora"
        merged = glm3.load_model(summary.dst)
        assert merged.dtype == glm3.dtypes.to_mindspore(dtype)  # stored back in the base's dtype
        error = np.abs(merged(ids).asnumpy() - expected).max()
        if dtype == "float32":
            assert error < 2e-5
        else:  # W + B·A·alpha/r rounded once to float16: about 2^-11 relative, far below what the adapter changed
            assert error < 2e-3 * np.abs(expected).max() and error < changed / 20, (error, changed)
        assert not any("lora" in p.name for p in merged.get_parameters())


def test_cli_strategy_split_merge(tiny_dir, tmp_path):
    glm3_cli = [sys.executable, "-m", "glm3.cli"]

    def run(*args):
        result = subprocess.run([*glm3_cli, *args], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    run("strategy", "--model", tiny_dir, "--model-parallel", "2", "--out", str(tmp_path / "tp.ckpt"))
    run("split", "--model", tiny_dir, "--strategy", str(tmp_path / "tp.ckpt"), "--dst", str(tmp_path / "split"))
    out = run(
        "merge",
        "--run",
        str(tmp_path / "split"),
        "--strategy",
        str(tmp_path / "tp.ckpt"),
        "--base",
        tiny_dir,
        "--dst",
        str(tmp_path / "merged"),
    )
    assert "merged 2 rank(s) by strategy" in out
    merged, full = original(tmp_path / "merged"), original(tiny_dir)
    assert all(np.array_equal(merged[k], full[k]) for k in full)
    bad = subprocess.run(
        [*glm3_cli, "merge", "--base", tiny_dir, "--dst", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "exactly one of --run" in bad.stderr


def test_pipeline_stage_strategies_split_then_merge_is_bit_exact(tiny_dir, tmp_path):
    from glm3.train.strategy import write_pipeline_strategies

    config = glm3.GLM3Config.from_hf(tiny_dir)
    files = write_pipeline_strategies(tmp_path / "stages", config, pipeline_stages=2, model_parallel=2)
    assert [os.path.basename(f) for f in files] == ["stage_0.ckpt", "stage_1.ckpt"]
    assert "transformer.embedding.embedding_table" in read_strategy_file(files[0])
    assert "transformer.output_layer.weight" in read_strategy_file(files[1])
    ms.merge_pipeline_strategys(str(tmp_path / "stages"), str(tmp_path / "all_stages.ckpt"))
    shards = split_model(tiny_dir, str(tmp_path / "all_stages.ckpt"), tmp_path / "split")
    assert len(shards) == 4  # 2 stages x 2 model-parallel ranks
    # Stage 0's ranks hold the embedding and layer 0, stage 1's the rest.
    assert any("embedding" in k for k in ckpt_arrays(shards[0]))
    assert not any("embedding" in k for k in ckpt_arrays(shards[3]))
    summary = merge_run(tmp_path / "split", tmp_path / "merged", tiny_dir, strategy=str(tmp_path / "stages"))
    assert summary.ranks == 4
    merged, full = original(tmp_path / "merged"), original(tiny_dir)
    for name in full:
        np.testing.assert_array_equal(merged[name], full[name], err_msg=name)


def test_lora_fold_is_w_plus_b_a_times_alpha_over_rank_computed_by_hand(tiny_dir, tmp_path):
    """The merged weight of every target is W + B·A·alpha/r (here alpha/r = 12/4 = 3), other tensors untouched."""
    from glm3.train.lora import adapter_shapes
    from glm3.train.settings import LoraConfig
    from glm3.weights.tensor_files import MsCkptWriter

    config = glm3.GLM3Config.from_hf(tiny_dir)
    lora = LoraConfig(rank=4, alpha=12.0, dropout=0.0, targets=("query_key_value", "dense_4h_to_h"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {"rank": 4, "alpha": 12.0, "dropout": 0.0, "targets": list(lora.targets), "base_config": config.to_hf()}
        )
    )
    rng = np.random.default_rng(0)
    tensors = {
        name: rng.standard_normal(shape).astype(np.float32) for name, shape in adapter_shapes(config, lora).items()
    }
    writer = MsCkptWriter(str(adapter / "adapter_model.ckpt"))
    for name, value in tensors.items():
        writer.add(name, value, "float32")
    writer.close()

    merged = ckpt_arrays(
        os.path.join(merge_adapter(tiny_dir, adapter, tmp_path / "merged").dst, "mindspore_model.ckpt")
    )
    base = original(tiny_dir)
    folded = 0
    for name, w in base.items():
        prefix = name[: -len(".weight")]
        if f"{prefix}.lora_a" in tensors:
            a, b = tensors[f"{prefix}.lora_a"].astype(np.float64), tensors[f"{prefix}.lora_b"].astype(np.float64)
            np.testing.assert_allclose(
                merged[name], w.astype(np.float64) + 3.0 * (b @ a), rtol=1e-6, atol=1e-6, err_msg=name
            )
            folded += 1
        else:
            np.testing.assert_array_equal(merged[name], w, err_msg=name)
    assert folded == 2 * config.num_layers  # qkv and dense_4h_to_h of every layer
