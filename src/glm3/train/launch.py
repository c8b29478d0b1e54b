"""run_finetune: train in this process, or start `msrun` workers when the parallel config asks for several.

This is what `glm3 finetune`, the DVC stage and the Prefect task call. With more than one worker the
launcher tokenizes the data once, writes the run config to `<output>/finetune_config.json`, starts
`msrun ... glm3 finetune --config that-file` for this node's workers, waits, and reads rank 0's metrics.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess

from glm3.io import atomic_write_text, tail_lines
from glm3.train.checkpoint import list_checkpoints, rank_dir
from glm3.train.parallel import launch_environment, launched_by_msrun, msrun_command
from glm3.train.trainer import METRICS_FILE, FinetuneConfig, FinetuneResult, finetune, memory_estimate, prepare_data

CONFIG_FILE = "finetune_config.json"


class LaunchError(ChildProcessError):
    """msrun or a worker failed (an OSError, so the CLI reports it without importing this module)."""


def check_run_memory(config: FinetuneConfig) -> None:
    """Fail now if this node cannot hold its workers (glm3.memory): one rank's estimate times the local ranks."""
    from glm3.memory import check_memory

    estimate = memory_estimate(config)
    local = config.parallel.local_worker_num or config.parallel.world_size
    if local > 1:
        estimate.what = f"fine-tuning with {local} workers on this host"
        estimate.parts = {name: value * local for name, value in estimate.parts.items()}
    check_memory(estimate)


def run_finetune(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune as the config says: in-process for one worker (or inside msrun), else through msrun."""
    config.validate()
    import mindspore as ms

    if not launched_by_msrun():  # the launcher checks for all of this node's workers, before any of them starts
        check_run_memory(config)
    if not config.parallel.is_distributed or launched_by_msrun():
        ms.set_device(config.device)
        ms.set_context(mode=ms.GRAPH_MODE)
        return finetune(config)

    # Workers run in the output directory (MindSpore writes compile files into the working directory).
    paths = ["model", "data", "output", "tokenizer", "cache_dir", "timing_file"]
    if config.resume not in ("auto", "never"):
        paths.append("resume")
    config = dataclasses.replace(
        config, **{k: os.path.abspath(getattr(config, k)) for k in paths if getattr(config, k)}
    )
    os.makedirs(config.output, exist_ok=True)
    prepare_data(config)  # once, here, so the workers find the cache instead of racing to build it
    config_path = os.path.join(config.output, CONFIG_FILE)
    atomic_write_text(config_path, config.to_json() + "\n")
    log_dir = os.path.join(config.output, "msrun_log")
    cmd = msrun_command(config.parallel, ["finetune", "--config", config_path], log_dir)
    proc = subprocess.run(
        cmd, cwd=config.output, env=launch_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if proc.returncode != 0:
        logs = "\n".join(
            f"--- {p}\n{tail_lines(p, 15)}" for p in sorted(glob.glob(os.path.join(log_dir, "worker_*.log")))
        )
        raise LaunchError(f"msrun exited with {proc.returncode}: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{logs}")
    metrics_path = os.path.join(config.output, METRICS_FILE)
    if config.parallel.node_rank != 0:
        return FinetuneResult(config.output, 0, float("nan"), {}, None, "")
    with open(metrics_path, encoding="utf-8") as f:
        metrics = json.load(f)
    weights = os.path.join(config.output, "adapter" if config.lora else "model")
    last = list_checkpoints(rank_dir(config.output, 0))
    return FinetuneResult(
        config.output, metrics["steps"], metrics["final_loss"], metrics, weights, last[-1][1] if last else ""
    )
