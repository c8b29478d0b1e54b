"""`glm3 finetune` as real processes: msrun data parallel, SIGTERM then resume, bad data; the parallel config."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import SAMPLE, ckpt_arrays, free_port
from conftest import subprocess_env as env
from glm3.train.parallel import ParallelConfig, ParallelConfigError, apply_shard_strategies, msrun_command

GLM3 = [sys.executable, "-m", "glm3.cli"]
SHAPE = [
    "--max-source-length",
    "32",
    "--max-target-length",
    "32",
    "--seq-length",
    "65",
    "--batch-size",
    "2",
    "--lr",
    "1e-3",
    "--quiet",
]


def finetune(*args, **kwargs):
    return subprocess.run([*GLM3, "finetune", *args], capture_output=True, text=True, env=env(), timeout=600, **kwargs)


def _equal_length_records(path, n=8):
    """ADGEN records whose answers are all equally long (the same summary), so every example carries the same
    number of labelled tokens: then the mean loss of a batch is the mean of its halves' mean losses."""
    contents = [
        "类型#裙*颜色#黑色",
        "类型#上衣*材质#棉",
        "类型#裤*风格#简约",
        "类型#裙*图案#碎花",
        "类型#外套*版型#宽松",
        "类型#鞋*颜色#白色",
        "类型#包*材质#皮",
        "类型#帽*风格#休闲",
    ]
    with open(path, "w", encoding="utf-8") as f:
        for content in contents[:n]:
            f.write(json.dumps({"content": content, "summary": "简约大方，舒适百搭。"}, ensure_ascii=False) + "\n")
    return str(path)


def test_two_msrun_workers_train_as_one_process_with_their_joint_batch(tiny_dir, tmp_path):
    """Data parallel: 2 workers with batch 2 each make the update of 1 process with batch 4 (gradients averaged,
    not summed), and the ranks hold bit-identical weights while each reads its own half of the data."""
    data = _equal_length_records(tmp_path / "train.json")
    config = tmp_path / "ft.yaml"
    config.write_text("shuffle: false\nsave_every: 1\nkeep_checkpoints: 3\n")  # the same examples in each step
    common = [
        "--config",
        str(config),
        "--model",
        tiny_dir,
        "--data",
        data,
        "--steps",
        "3",
        "--max-source-length",
        "32",
        "--max-target-length",
        "32",
        "--seq-length",
        "65",
        "--lr",
        "1e-3",
        "--quiet",
    ]
    out, one = tmp_path / "dp", tmp_path / "one"
    result = finetune(
        *common, "--output", str(out), "--batch-size", "2", "--workers", "2", "--master-port", str(free_port())
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single = finetune(*common, "--output", str(one), "--batch-size", "4")
    assert single.returncode == 0, single.stderr[-3000:]

    def state(run, rank, step):
        return ckpt_arrays(str(run / "checkpoint" / f"rank_{rank}" / f"step_{step:08d}" / "state.ckpt"))

    rank0, rank1 = state(out, 0, 3), state(out, 1, 3)
    assert rank0.keys() == rank1.keys() and any(k.startswith("moment1.") for k in rank0)
    for name in rank0:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)  # bit-identical
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ranks"] == 2 and metrics["global_batch_size"] == 4
    logs = [(out / "msrun_log" / f"worker_{r}.log").read_text(errors="replace") for r in (0, 1)]
    firsts = [next(line for line in log.splitlines() if "first batch" in line) for log in logs]
    assert firsts[0].split("first batch")[1] != firsts[1].split("first batch")[1]  # each rank its own half

    rows = [list(csv.DictReader(open(run / "train_log.tsv", encoding="utf-8"), delimiter="\t")) for run in (out, one)]
    for key in ("loss", "grad_norm"):  # a sum of the ranks' gradients would double the norm
        np.testing.assert_allclose(
            [float(r[key]) for r in rows[0]], [float(r[key]) for r in rows[1]], rtol=1e-5, err_msg=key
        )
    first_dp, first_one = state(out, 0, 1), state(one, 0, 1)
    for name in (k for k in first_one if k.startswith("moment1.")):  # (1 - beta1) times the step's gradient
        np.testing.assert_allclose(first_dp[name], first_one[name], rtol=1e-4, atol=1e-9, err_msg=name)
    # Adam divides by the root of the second moment, which magnifies float32 rounding of near-zero gradients:
    # the weights agree to 2% of one step's size (lr 1e-3).
    last_one = state(one, 0, 3)
    for name in (k for k in last_one if not k.startswith(("moment", "global_step", "adam", "beta"))):
        np.testing.assert_allclose(rank0[name], last_one[name], rtol=0, atol=2e-5, err_msg=name)


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes_like_an_uninterrupted_run(tiny_dir, tmp_path):
    args = ["--model", tiny_dir, "--data", SAMPLE, "--steps", "60", "--save-every", "1000", *SHAPE]
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*GLM3, "finetune", "--output", str(out), *args],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = out / "train_log.tsv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 4:  # header + 3 steps
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "checkpoint saved" in stderr and "resume" in stderr
    saved = os.listdir(out / "checkpoint" / "rank_0")
    assert len(saved) == 1 and 3 <= int(saved[0][len("step_") :]) < 60
    assert not (out / "model").exists() and not (out / "metrics.json").exists()

    resumed = finetune("--output", str(out), *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = finetune("--output", str(tmp_path / "straight"), *args)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = ckpt_arrays(str(out / "model" / "mindspore_model.ckpt"))
    b = ckpt_arrays(str(tmp_path / "straight" / "model" / "mindspore_model.ckpt"))
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    rows = [list(csv.reader(open(p / "train_log.tsv"), delimiter="\t")) for p in (out, tmp_path / "straight")]
    assert [r[:5] for r in rows[0]] == [r[:5] for r in rows[1]] and len(rows[0]) == 61


def test_ctrl_c_is_reported_as_the_signal_that_arrived(tiny_dir, tmp_path):
    """Ctrl-C, then the SIGTERM a launcher (DVC, msrun) sends its children: the user's Ctrl-C is what is named."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*GLM3, "finetune", "--output", str(out), "--model", tiny_dir, "--data", SAMPLE, "--steps", "200", *SHAPE],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log, deadline = out / "train_log.tsv", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "stopped by SIGINT (Ctrl-C) after step" in stderr and "signal 15" not in stderr


def test_malformed_data_is_rejected_with_its_line_number(tiny_dir, tmp_path):
    bad = tmp_path / "train.json"
    lines = open(SAMPLE, encoding="utf-8").read().splitlines()
    lines[6] = lines[6][:-5]
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = finetune(
        "--model", tiny_dir, "--data", str(bad), "--output", str(tmp_path / "out"), "--steps", "2", *SHAPE
    )
    assert result.returncode == 2 and "train.json:7" in result.stderr
    assert "--skip-bad-lines" in result.stderr and "finetune.skip_bad_lines" in result.stderr  # how to skip it
    skipped = finetune(
        "--model",
        tiny_dir,
        "--data",
        str(bad),
        "--output",
        str(tmp_path / "out2"),
        "--steps",
        "2",
        "--skip-bad-lines",
        *SHAPE,
    )
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    metrics = json.loads((tmp_path / "out2" / "metrics.json").read_text())
    assert metrics["examples"] == 23 and metrics["skipped_lines"] == 1  # reported, not silently dropped
    assert "skipped 1 malformed line(s)" in skipped.stderr


def test_finetune_reads_a_yaml_config_and_flags_override_it(tiny_dir, tmp_path):
    from glm3.cli import build_parser
    from glm3.cli.training import finetune_config_from_args

    config = tmp_path / "ft.yaml"
    config.write_text(
        f"model: {tiny_dir}\ndata: {SAMPLE}\noutput: {tmp_path}/o\nlr: 1e-4\nsteps: 3\n"
        "lora: {{rank: 2, targets: [dense]}}\nparallel: {{data_parallel: 2}}\n".replace("{{", "{").replace("}}", "}")
    )
    args = build_parser().parse_args(["finetune", "--config", str(config), "--lora-alpha", "4", "--steps", "5"])
    cfg = finetune_config_from_args(args)
    assert cfg.lr == 1e-4 and cfg.steps == 5 and cfg.parallel.data_parallel == 2
    assert cfg.lora.rank == 2 and cfg.lora.alpha == 4 and cfg.lora.targets == ("dense",)
    full = finetune_config_from_args(build_parser().parse_args(["finetune", "--config", str(config), "--full"]))
    assert full.lora is None
    config.write_text(config.read_text() + "learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown finetune setting\(s\) \['learning_rate'\]"):
        finetune_config_from_args(build_parser().parse_args(["finetune", "--config", str(config)]))


def test_parallel_config_checks_and_msrun_command():
    with pytest.raises(ParallelConfigError, match="need Ascend or GPU"):
        ParallelConfig(data_parallel=2, model_parallel=2).validate("CPU")
    with pytest.raises(ParallelConfigError, match="need Ascend or GPU"):
        ParallelConfig(pipeline_stage=2, micro_batch_num=2).validate("CPU")
    ParallelConfig(data_parallel=2, model_parallel=4, pipeline_stage=2, micro_batch_num=4).validate("Ascend", 28)
    with pytest.raises(ParallelConfigError, match="micro_batch_num"):
        ParallelConfig(pipeline_stage=4, micro_batch_num=2).validate("Ascend")
    with pytest.raises(ParallelConfigError, match="split evenly"):
        ParallelConfig(pipeline_stage=3, micro_batch_num=3).validate("Ascend", 28)
    with pytest.raises(ParallelConfigError, match="worker_num"):
        ParallelConfig(data_parallel=4, worker_num=8).validate("Ascend")

    # Two nodes of eight: this is node 1.
    two_nodes = ParallelConfig(
        data_parallel=2,
        model_parallel=8,
        worker_num=16,
        local_worker_num=8,
        node_rank=1,
        master_addr="10.0.0.1",
        master_port=9123,
        rank_table_file="/etc/hccl_16p.json",
    )
    two_nodes.validate("Ascend")
    cmd = msrun_command(two_nodes, ["finetune", "--config", "c.json"], "/logs")
    assert os.path.basename(cmd[0]) == "msrun"
    assert cmd[1:9] == [
        "--worker_num=16",
        "--local_worker_num=8",
        "--master_addr=10.0.0.1",
        "--master_port=9123",
        "--log_dir=/logs",
        "--join=True",
        "--cluster_time_out=600",
        "--node_rank=1",
    ]
    assert "--rank_table_file=/etc/hccl_16p.json" in cmd
    assert cmd[-4].endswith(os.path.join("glm3", "launch", "msrun_worker.py")) and cmd[-3:] == [
        "finetune",
        "--config",
        "c.json",
    ]


def test_shard_strategies_follow_the_megatron_layout(tiny_model):
    import glm3

    model = glm3.GLM3ForCausalLM(tiny_model.config, kernels_backend="plain", param_init="lazy")
    applied = apply_shard_strategies(
        model, ParallelConfig(data_parallel=2, model_parallel=4, pipeline_stage=2, micro_batch_num=2, recompute=True)
    )
    layer = "transformer.encoder.layers.1."
    assert applied[layer + "self_attention.query_key_value"] == ((2, 1), (4, 1))  # output dim split
    assert applied[layer + "mlp.dense_h_to_4h"] == ((2, 1), (4, 1))
    assert applied[layer + "self_attention.dense"] == ((2, 4), (1, 4))  # input dim split
    assert applied[layer + "mlp.dense_4h_to_h"] == ((2, 4), (1, 4))
    assert applied["transformer.output_layer"] == ((2, 1), (4, 1))  # vocab split
    assert applied["transformer.embedding"] == ((4, 1), (2, 1))
    qkv = model.transformer.encoder.layers[1].self_attention.query_key_value.method.matmul
    assert qkv.in_strategy == ((2, 1), (4, 1))  # set on the MindSpore primitive itself
    assert [layer.pipeline_stage for layer in model.transformer.encoder.layers] == [0, 1]
