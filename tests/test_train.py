"""Fine-tuning on the tiny preset: loss, schedules, accumulation, LoRA, loss scaling and exact resume, in-process."""

import csv
import json
import os
import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

import glm3
from conftest import ADGEN_DEV, SAMPLE, ckpt_arrays
from glm3.train import FinetuneConfig, ResumeError, TrainingInterrupted, finetune, lr_schedule
from glm3.train.lora import LoraConfig, LoraError, apply_lora, load_adapter, merge_lora, save_adapter
from glm3.train.step import CausalLMLoss


def make_config(model_dir, output, **overrides):
    values = {
        "model": str(model_dir),
        "data": SAMPLE,
        "output": str(output),
        "max_source_length": 32,
        "max_target_length": 32,
        "seq_length": 65,
        "batch_size": 2,
        "steps": 4,
        "lr": 1e-3,
        "progress": False,
    }
    return FinetuneConfig(**{**values, **overrides})


def read_log(output):
    with open(os.path.join(output, "train_log.tsv"), encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_lr_schedules():
    warm = lr_schedule(1.0, 10, warmup_steps=4, kind="constant")
    np.testing.assert_allclose(warm, [0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 1, 1])
    cos = lr_schedule(1.0, 5, kind="cosine", min_lr=0.1)
    # cosine over 5 steps from 1.0 towards 0.1: 0.1 + 0.9 * (1 + cos(pi * i / 5)) / 2
    np.testing.assert_allclose(cos, [1.0, 0.91405765, 0.68905765, 0.41094235, 0.18594235], rtol=1e-6)
    lin = lr_schedule(2.0, 4, warmup_steps=0, kind="linear")
    np.testing.assert_allclose(lin, [2.0, 1.5, 1.0, 0.5])
    for bad in ({"kind": "step"}, {"warmup_steps": 11}, {"min_lr": 2.0}):
        with pytest.raises(ValueError):
            lr_schedule(1.0, 10, **bad)


def test_loss_is_the_mean_cross_entropy_over_labelled_tokens(tiny_model):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1500, size=(2, 9)).astype(np.int32)
    labels = np.roll(ids, -1, axis=1)
    labels[0, :3] = -100
    labels[:, -1] = -100
    loss = float(CausalLMLoss(tiny_model)(Tensor(ids), Tensor(labels)).asnumpy())
    logits = tiny_model(Tensor(ids)).asnumpy().astype(np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    picked = [-logp[b, s, labels[b, s]] for b in range(2) for s in range(9) if labels[b, s] != -100]
    assert abs(loss - np.mean(picked)) < 1e-5


def test_full_finetune_trains_logs_and_writes_a_loadable_model(tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = finetune(make_config(tiny_dir, out, steps=14, warmup_steps=2, save_every=5))
    rows = read_log(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 15))
    assert list(rows[0]) == ["step", "epoch", "loss", "lr", "grad_norm", "loss_scale"]
    losses = [float(r["loss"]) for r in rows]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05  # it learns
    assert float(rows[0]["lr"]) == pytest.approx(5e-4) and float(rows[1]["lr"]) == pytest.approx(1e-3)
    assert [int(r["epoch"]) for r in rows] == [0] * 12 + [1] * 2  # 24 examples: 12 batches of 2 per epoch
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 14 and metrics["final_loss"] == pytest.approx(losses[-1], rel=1e-5)
    assert metrics["mode"] == "full" and metrics["trainable_parameters"] == metrics["total_parameters"]
    assert "tokens_per_second" not in metrics and metrics["skipped_lines"] == 0
    timing = json.loads((out / "timing.json").read_text())  # the speeds, apart from the results
    assert [s["step"] for s in timing["steps"]] == list(range(1, 15)) and timing["timed_steps"] == 13
    assert [s["includes_compilation"] for s in timing["steps"]] == [True] + [False] * 13
    assert all(s["tokens"] == 2 * 65 and 0 < s["real_tokens"] < s["tokens"] for s in timing["steps"])
    assert 0 < timing["real_tokens_per_second"] < timing["tokens_per_second"]
    # Checkpoints at 5, 10 and the end; the newest two are kept.
    assert sorted(os.listdir(out / "checkpoint" / "rank_0")) == ["step_00000010", "step_00000014"]
    # The trained model loads like any model directory and gives its own logits, not the base model's.
    trained = glm3.load_model(result.weights)
    base = glm3.load_model(tiny_dir)
    ids = Tensor(np.array([[64790, 64792, 300, 301]], np.int32) % 2000)
    assert not np.allclose(trained(ids).asnumpy(), base(ids).asnumpy(), atol=1e-4)
    assert os.path.isfile(os.path.join(result.weights, "tokenizer.model"))


def test_accumulation_equals_the_larger_batch(tiny_dir, tmp_path):
    big = finetune(make_config(tiny_dir, tmp_path / "big", batch_size=2, grad_accumulation=1, steps=3, shuffle=False))
    acc = finetune(make_config(tiny_dir, tmp_path / "acc", batch_size=1, grad_accumulation=2, steps=3, shuffle=False))
    for a, b in zip(read_log(tmp_path / "big"), read_log(tmp_path / "acc")):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=1e-4)
    wa = ckpt_arrays(os.path.join(big.weights, "mindspore_model.ckpt"))
    wb = ckpt_arrays(os.path.join(acc.weights, "mindspore_model.ckpt"))
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], atol=1e-4, err_msg=name)


def test_gradient_clipping_caps_the_update(tiny_dir, tmp_path):
    finetune(
        make_config(
            tiny_dir,
            tmp_path / "a",
            steps=1,
            lr=1e-2,
            max_grad_norm=0.0,
            lr_schedule="constant",
            weight_decay=0.0,
            adam_beta1=0.5,
            adam_beta2=0.5,
            adam_eps=1e-3,
        )
    )
    finetune(
        make_config(
            tiny_dir,
            tmp_path / "b",
            steps=1,
            lr=1e-2,
            max_grad_norm=1e-3,
            lr_schedule="constant",
            weight_decay=0.0,
            adam_beta1=0.5,
            adam_beta2=0.5,
            adam_eps=1e-3,
        )
    )
    base = glm3.load_model(tiny_dir)
    name = "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"
    w0 = {p.name: p.asnumpy() for p in base.get_parameters()}[name]
    step_a = np.abs(ckpt_arrays(str(tmp_path / "a" / "model" / "mindspore_model.ckpt"))[name] - w0).max()
    step_b = np.abs(ckpt_arrays(str(tmp_path / "b" / "model" / "mindspore_model.ckpt"))[name] - w0).max()
    # The first Adam step is about lr * g / (|g| + eps): clipping g to a tiny norm makes eps dominate.
    assert step_b < 0.2 * step_a
    assert float(read_log(tmp_path / "b")[0]["grad_norm"]) == pytest.approx(
        float(read_log(tmp_path / "a")[0]["grad_norm"]), rel=1e-5
    )


def test_lora_adapter_starts_as_identity_saves_loads_and_merges(tiny_dir, tmp_path):
    ms.set_seed(0)
    model = glm3.load_model(tiny_dir, kernels_backend="plain")
    ids = Tensor(np.array([[5, 6, 7, 8, 9, 10]], np.int32))
    base = model(ids).asnumpy()
    names = apply_lora(
        model, LoraConfig(4, 8.0, 0.0, ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")), seed=0
    )
    assert len(names) == 2 * 4 * 2 and all(".encoder.layers." in n for n in names)
    assert {p.name for p in model.trainable_params()} == set(names)
    np.testing.assert_array_equal(model(ids).asnumpy(), base)  # B = 0: no change yet
    rng = np.random.default_rng(1)
    for p in model.trainable_params():
        if p.name.endswith("lora_b"):
            p.set_data(Tensor(rng.normal(0, 0.05, p.shape).astype(np.float32)))
    adapted = model(ids).asnumpy()
    assert np.abs(adapted - base).max() > 1e-2
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(glm3.load_model(tiny_dir, kernels_backend="plain"), tmp_path / "adapter")
    np.testing.assert_array_equal(reloaded(ids).asnumpy(), adapted)
    merged = merge_lora(reloaded)
    assert not any(p.name.endswith(("lora_a", "lora_b")) for p in merged.get_parameters())
    np.testing.assert_allclose(merged(ids).asnumpy(), adapted, atol=2e-5)
    with pytest.raises(LoraError, match="subset"):
        LoraConfig(targets=("embedding",))
    with pytest.raises(LoraError, match="no LoRA"):
        save_adapter(glm3.load_model(tiny_dir), tmp_path / "none")


def test_lora_finetune_trains_only_adapters(tiny_dir, tmp_path):
    lora = {"rank": 4, "alpha": 16, "dropout": 0.1, "targets": ["query_key_value", "dense_4h_to_h"]}
    result = finetune(make_config(tiny_dir, tmp_path / "lora", steps=6, lora=lora))
    metrics = result.metrics
    # Per layer: qkv A [4, 64] + B [128, 4], dense_4h_to_h A [4, 160] + B [64, 4]; two layers.
    assert metrics["mode"] == "lora" and metrics["trainable_parameters"] == 2 * (4 * 64 + 128 * 4 + 4 * 160 + 64 * 4)
    assert sorted(os.listdir(result.weights)) == ["adapter_config.json", "adapter_model.ckpt"]
    saved = ms.load_checkpoint(os.path.join(result.weights, "adapter_model.ckpt"))
    assert all(k.endswith(("lora_a", "lora_b")) for k in saved)
    assert any(np.abs(v.asnumpy()).max() > 0 for k, v in saved.items() if k.endswith("lora_b"))


def test_resume_gives_the_same_losses_and_weights(tiny_dir, tmp_path):
    # LoRA with dropout and accumulation, stopping mid-epoch: data position, dropout RNG, optimizer state and
    # the accumulation all have to come back exactly.
    settings = {
        "steps": 9,
        "grad_accumulation": 2,
        "batch_size": 2,
        "warmup_steps": 2,
        "save_every": 4,
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.2, "targets": ["query_key_value", "dense_h_to_4h"]},
    }
    finetune(make_config(tiny_dir, tmp_path / "straight", **settings))
    with pytest.raises(TrainingInterrupted) as stopped:
        finetune(make_config(tiny_dir, tmp_path / "resumed", stop_after=5, **settings))
    assert stopped.value.step == 5 and stopped.value.checkpoint.endswith("step_00000005")
    assert len(read_log(tmp_path / "resumed")) == 5
    finetune(make_config(tiny_dir, tmp_path / "resumed", **settings))
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [(r["step"], r["epoch"], r["loss"], r["lr"], r["grad_norm"]) for r in straight] == [
        (r["step"], r["epoch"], r["loss"], r["lr"], r["grad_norm"]) for r in resumed
    ]
    a = ckpt_arrays(str(tmp_path / "straight" / "adapter" / "adapter_model.ckpt"))
    b = ckpt_arrays(str(tmp_path / "resumed" / "adapter" / "adapter_model.ckpt"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # A checkpoint of different settings is refused, not silently mixed in.
    with pytest.raises(ResumeError, match="different settings"):
        finetune(make_config(tiny_dir, tmp_path / "resumed", **{**settings, "steps": 12, "lr": 5e-4}))


def test_float16_compute_uses_loss_scaling_and_skips_overflowing_steps(tiny_dir, tmp_path):
    result = finetune(make_config(tiny_dir, tmp_path / "fp16", steps=2, compute_dtype="float16"))
    rows = read_log(tmp_path / "fp16")
    assert all(np.isfinite(float(r["loss"])) for r in rows) and float(rows[0]["loss_scale"]) == 65536
    assert result.metrics["final_loss"] is not None
    # A scale that overflows float32 gradients: the step is skipped (weights unchanged) and the scale halves.
    finetune(make_config(tiny_dir, tmp_path / "overflow", steps=1, compute_dtype="float16", loss_scale=3e38))
    row = read_log(tmp_path / "overflow")[0]
    assert float(row["loss_scale"]) == pytest.approx(1.5e38, rel=1e-6)
    before = {p.name: p.asnumpy() for p in glm3.load_model(tiny_dir).get_parameters()}
    after = ckpt_arrays(str(tmp_path / "overflow" / "model" / "mindspore_model.ckpt"))
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_the_same_run_in_another_place_writes_the_same_files(tiny_dir, tmp_path):
    """Results are bit-identical for the same inputs, wherever the model, data and run directory are: no
    timing, no paths in them (the timing file is the one file that differs)."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_dir, moved / "model")
    shutil.copy(SAMPLE, moved / "data.json")
    runs = [
        finetune(make_config(tiny_dir, tmp_path / "a", steps=4, save_every=2)),
        finetune(make_config(moved / "model", moved / "b", data=str(moved / "data.json"), steps=4, save_every=2)),
    ]

    def files(root):
        return {
            os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root)
            for n in names
            if "data_cache" not in d
        }

    a, b = (files(r.output) for r in runs)
    assert set(a) == set(b) and "timing.json" in a and any(name.endswith("state.ckpt") for name in a)
    assert [name for name in a if a[name] != b[name]] == ["timing.json"]


def test_bad_settings_fail_before_training(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="bfloat16"):
        finetune(make_config(tiny_dir, tmp_path / "x", compute_dtype="bfloat16"))
    with pytest.raises(ValueError, match="too few"):
        finetune(make_config(tiny_dir, tmp_path / "x", batch_size=25))
    for wrong in (60, 128):  # the reference requires seq_length = 32 + 32 + 1
        with pytest.raises(ValueError, match=rf"seq_length \({wrong}\) must equal .* = 32 \+ 32 \+ 1 = 65"):
            finetune(make_config(tiny_dir, tmp_path / "x", seq_length=wrong))
    with pytest.raises(ValueError, match="Ascend or GPU"):
        finetune(make_config(tiny_dir, tmp_path / "x", parallel={"model_parallel": 2, "data_parallel": 1}))
    with pytest.raises(FileNotFoundError):
        finetune(make_config(tiny_dir, tmp_path / "x", data=str(tmp_path / "missing.json")))
    # Warmup longer than the run: refused before the model is loaded (a directory with no weights at all).
    no_weights = tmp_path / "config_only"
    no_weights.mkdir()
    glm3.GLM3Config.from_hf(tiny_dir).save(no_weights)
    shutil.copy(os.path.join(tiny_dir, "tokenizer.model"), no_weights)
    with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, steps=2\], got 3"):
        finetune(make_config(no_weights, tmp_path / "x", steps=2, warmup_steps=3))
    with pytest.raises(ValueError, match="warmup_steps \\(3\\) exceeds the run's 2 optimizer step"):
        finetune(make_config(no_weights, tmp_path / "x", steps=0, epochs=0.3, batch_size=4, warmup_steps=3))


def test_loss_falls_on_real_adgen_records(tiny_dir, tmp_path):
    assert os.path.isfile(ADGEN_DEV), f"ADGEN dev set not found at {ADGEN_DEV} (set GLM3_ADGEN_DEV)"
    finetune(
        make_config(
            tiny_dir,
            tmp_path / "adgen",
            data=ADGEN_DEV,
            max_source_length=64,
            max_target_length=64,
            seq_length=129,
            batch_size=4,
            steps=40,
            lr=2e-3,
            warmup_steps=4,
        )
    )
    losses = [float(r["loss"]) for r in read_log(tmp_path / "adgen")]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5
