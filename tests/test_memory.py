"""Fail fast on what cannot fit: the memory estimates refuse what this host cannot hold and accept what it can,
before any weight is read; and the streaming merge's peak memory does not grow with the model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import glm3
from conftest import SAMPLE, subprocess_env
from glm3.memory import (
    GB,
    MemoryBudgetError,
    available_bytes,
    check_memory,
    finetune_estimate,
    inference_estimate,
    peak_rss_bytes,
    weight_bytes,
)
from glm3.train.lora import LoraConfig, adapter_shapes
from glm3.weights.tensor_files import MsCkptWriter

GLM3 = [sys.executable, "-m", "glm3.cli"]
GIB = 2**30
SIX_B = glm3.GLM3Config.from_name("glm3_6b")


def test_the_6b_shape_on_a_24_gib_host():
    assert weight_bytes(SIX_B, "float16") == 12_487_168_000  # the release's 12.49 GB: 6,243,584,000 parameters
    lora = LoraConfig(rank=8, targets=("query_key_value",))
    trainable = sum(a * b for a, b in adapter_shapes(SIX_B, lora).values())
    assert trainable == 28 * 8 * (4096 + 4608)
    fits = check_memory(finetune_estimate(SIX_B, "float16", trainable, 1, 65), available=24 * GIB)
    assert 12.5 * GB < fits.total < 16 * GIB  # LoRA over the float16 base, as measured: 14.5 GB
    with pytest.raises(MemoryBudgetError) as full:
        check_memory(finetune_estimate(SIX_B, "float32", None, 1, 65), available=24 * GIB)
    message = str(full.value)
    assert "needs about 102" in message and "25.8 GB available" in message and "LoRA" in message
    assert "optimizer state 49.9" in message  # the parts, so a user sees where it goes
    with pytest.raises(MemoryBudgetError, match="half-precision checkpoint"):
        check_memory(inference_estimate(SIX_B, "float32"), available=24 * GIB)
    assert check_memory(inference_estimate(SIX_B, "float16"), available=24 * GIB).total < 16 * GIB


def test_available_memory_is_what_the_kernel_reports():
    with open("/proc/meminfo", encoding="ascii") as f:
        meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    assert 0 < available_bytes() <= meminfo["MemTotal"]


def _config_only(directory, **shape):
    """A model directory with a config.json and no weights at all: anything that reads weights fails."""
    os.makedirs(directory)
    glm3.GLM3Config.from_name("glm3_6b", **shape).save(directory)
    return str(directory)


def test_commands_refuse_what_cannot_fit_in_seconds_before_reading_weights(tmp_path):
    # 2,800 layers: about 620 B parameters, more than any host holds, LoRA or not.
    huge = _config_only(tmp_path / "huge", num_layers=2800)
    for args in (
        ["finetune", "--model", huge, "--data", SAMPLE, "--output", str(tmp_path / "run"), "--full"],
        ["finetune", "--model", huge, "--data", SAMPLE, "--output", str(tmp_path / "run"), "--lora"],
        ["generate", "--model", huge, "--prompt", "hi"],
        ["eval", "ceval", "--model", huge, "--data", str(tmp_path)],
    ):
        done = subprocess.run([*GLM3, *args], capture_output=True, text=True, env=subprocess_env(), timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "needs about" in done.stderr and "GB available" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and "missing" not in done.stderr  # no weight was looked for
    assert not (tmp_path / "run" / "checkpoint").exists()
    # The streaming stages hold one tensor at a time: refused only when one tensor cannot fit (a 17 GB one here).
    wide = _config_only(tmp_path / "wide", hidden_size=1 << 17)
    for args, out in (
        (["merge", "--adapter", str(tmp_path / "adapter"), "--base", wide, "--dst"], "merged"),
        (["export", "--model", wide, "--prompt-length", "8", "--seq-length", "16", "--dst"], "export"),
    ):
        done = subprocess.run(
            [*GLM3, *args, str(tmp_path / out)], capture_output=True, text=True, env=subprocess_env(), timeout=120
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert "needs about" in done.stderr and "largest tensor float16" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and not (tmp_path / out).exists()


def test_what_fits_is_accepted(tiny_dir, tmp_path):
    done = subprocess.run(
        [*GLM3, "generate", "--model", tiny_dir, "--prompt", "hi", "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loading" in done.stderr and "GB available" in done.stderr  # the estimate is logged


def _adapter(directory, config, rank=4):
    """An adapter directory for `config` with random LoRA tensors (as a LoRA run saves it)."""
    lora = LoraConfig(rank=rank, alpha=8.0, dropout=0.0, targets=("query_key_value", "dense_h_to_4h"))
    os.makedirs(directory)
    with open(os.path.join(directory, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "peft_type": "LORA",
                "rank": rank,
                "alpha": 8.0,
                "dropout": 0.0,
                "targets": list(lora.targets),
                "base_config": config.to_hf(),
            },
            f,
        )
    rng = np.random.default_rng(0)
    writer = MsCkptWriter(os.path.join(directory, "adapter_model.ckpt"))
    for name, shape in adapter_shapes(config, lora).items():
        writer.add(name, rng.standard_normal(shape, dtype=np.float32) * 0.01, "float32")
    writer.close()
    return str(directory)


# Runs `glm3 <args>` and prints the process's peak RSS as the kernel counts it for this program (VmHWM: the
# high-water mark of its own address space, which exec starts afresh, unlike ru_maxrss after a fork from
# this big test process).
_MEASURED = """
import sys
from glm3.cli import main
from glm3.memory import peak_rss_bytes
code = main(sys.argv[1:])
print(peak_rss_bytes())
sys.exit(code)
"""


def test_peak_rss_is_the_process_own_not_its_parents():
    """A benchmark's child reports its own peak: ru_maxrss of a process started from a big parent starts from
    the parent's peak (measured: every format of benchmarks/decode.py reported the coordinator's 1.76 GB)."""
    big = np.ones(600 * 2**20 // 8)  # 600 MiB resident in this process
    parent = peak_rss_bytes()
    assert parent >= big.nbytes
    code = "from glm3.memory import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=subprocess_env()
        ).stdout
    )
    assert 0 < child < big.nbytes / 2
    assert peak_rss_bytes(os.getpid()) == peak_rss_bytes() and peak_rss_bytes(2**22 + 12345) == 0


def test_streaming_merge_peak_memory_does_not_grow_with_the_number_of_layers(tmp_path):
    peaks, sizes, outputs = {}, {}, {}
    for layers in (2, 12):
        config = glm3.GLM3Config.from_name("bench", num_layers=layers, padded_vocab_size=8192)
        hf = glm3.write_synthetic_checkpoint(tmp_path / f"hf{layers}", config, dtype="float16")
        base = glm3.convert_checkpoint(hf, tmp_path / f"base{layers}", progress=False).dst  # as the pipeline has it
        adapter = _adapter(tmp_path / f"adapter{layers}", config)
        outputs[layers] = str(tmp_path / f"merged{layers}")
        done = subprocess.run(
            [sys.executable, "-c", _MEASURED, "merge", "--adapter", adapter, "--base", base, "--dst", outputs[layers]],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[layers] = int(done.stdout.strip().splitlines()[-1])
        sizes[layers] = weight_bytes(config, "float16")
    grown, model_grown = peaks[12] - peaks[2], sizes[12] - sizes[2]
    assert model_grown > 200e6  # ten more layers: 220 MB more weights to fold and write
    assert grown < 0.2 * model_grown, f"peak RSS grew {grown / 1e6:.0f} MB for {model_grown / 1e6:.0f} MB of weights"
    assert peaks[12] < 1.5e9  # the runtime and one tensor, not the model
    for out in outputs.values():
        assert glm3.load_model(out).dtype == glm3.dtypes.to_mindspore("float16")
