"""Parallel training: the parallel config, the msrun command, process-group setup and shard() strategies.

On CPU MindSpore runs DATA_PARALLEL only (N msrun workers, gradients all-reduced). On Ascend the same
config switches to SEMI_AUTO_PARALLEL: tensor parallel via `shard()` strategies on the model's matmuls
(Megatron layout: qkv and dense_h_to_4h split on the output dimension, dense and dense_4h_to_h on the
input dimension, embedding and output layer on the vocabulary), pipeline stages over the layers,
optimizer sharding and recomputation, with per-rank strategy files in `<output>/strategy/`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the plan (rank_table stage) needs no model code, nor MindSpore
    from glm3.modeling.model import GLM3ForCausalLM

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "launch", "msrun_worker.py")


class ParallelConfigError(ValueError):
    pass


@dataclasses.dataclass
class ParallelConfig:
    """How the job is split. workers = data_parallel * model_parallel * pipeline_stage ranks in all."""

    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    micro_batch_num: int = 1
    optimizer_shard: bool = False
    recompute: bool = False
    # msrun (multi-node: worker_num in all, local_worker_num on this node, node_rank of this node)
    worker_num: int | None = None
    local_worker_num: int | None = None
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 8118
    rank_table_file: str | None = None
    cluster_time_out: int = 600

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def needs_auto_parallel(self) -> bool:
        return self.model_parallel > 1 or self.pipeline_stage > 1 or self.optimizer_shard

    def validate(self, device: str, num_layers: int | None = None) -> None:
        for name in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num"):
            if getattr(self, name) < 1:
                raise ParallelConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if device.upper() == "CPU" and self.needs_auto_parallel:
            raise ParallelConfigError(
                f"model_parallel={self.model_parallel}, pipeline_stage={self.pipeline_stage}, optimizer_shard="
                f"{self.optimizer_shard}: model/pipeline parallelism and optimizer sharding need Ascend or GPU "
                "(MindSpore's semi-auto parallel has no CPU backend); on CPU use data_parallel only"
            )
        if self.pipeline_stage > 1 and self.micro_batch_num < self.pipeline_stage:
            raise ParallelConfigError(
                f"micro_batch_num ({self.micro_batch_num}) must be >= pipeline_stage ({self.pipeline_stage})"
            )
        if num_layers is not None and num_layers % self.pipeline_stage:
            raise ParallelConfigError(f"{num_layers} layers do not split evenly into {self.pipeline_stage} stages")
        total = self.worker_num or self.world_size
        if total != self.world_size:
            raise ParallelConfigError(
                f"worker_num {total} != data_parallel*model_parallel*pipeline_stage = {self.world_size}"
            )
        local = self.local_worker_num or total
        if local > total or total % local:
            raise ParallelConfigError(f"local_worker_num {local} must divide worker_num {total}")


def msrun_command(
    parallel: ParallelConfig, script_args: list[str], log_dir: str, python_bin_dir: str | None = None
) -> list[str]:
    """The msrun command line that starts this node's workers, each running `glm3 <script_args>`."""
    total = parallel.worker_num or parallel.world_size
    local = parallel.local_worker_num or total
    msrun = shutil.which("msrun", path=python_bin_dir or os.path.dirname(sys.executable)) or "msrun"
    cmd = [
        msrun,
        f"--worker_num={total}",
        f"--local_worker_num={local}",
        f"--master_addr={parallel.master_addr}",
        f"--master_port={parallel.master_port}",
        f"--log_dir={log_dir}",
        "--join=True",
        f"--cluster_time_out={parallel.cluster_time_out}",
    ]
    if total != local:
        cmd.append(f"--node_rank={parallel.node_rank}")
    if parallel.rank_table_file:
        cmd.append(f"--rank_table_file={parallel.rank_table_file}")
    return cmd + [WORKER_SCRIPT, *script_args]


def launch_environment() -> dict[str, str]:
    """Environment for msrun: this interpreter's bin first on PATH (msrun starts workers with `python`)."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("GLOG_v", "3")
    return env


def launched_by_msrun() -> bool:
    """True in the processes msrun starts: the workers and the scheduler (which runs the same script)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def init_parallel(parallel: ParallelConfig, strategy_dir: str | None = None) -> tuple[int, int]:
    """Join the process group started by msrun and set the parallel mode. Returns (rank, group size)."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    if not launched_by_msrun():
        if parallel.is_distributed:
            raise ParallelConfigError(
                f"this job needs {parallel.world_size} workers: launch it through msrun "
                "(glm3 finetune does this itself when parallel.data_parallel > 1)"
            )
        return 0, 1
    init()
    rank, size = get_rank(), get_group_size()
    local = parallel.local_worker_num or size
    if ms.get_context("device_target") == "CPU" and local > 1:
        # Workers on one host share its cores: give each its share instead of every worker a pool of all.
        ms.set_context(runtime_num_threads=max(1, (os.cpu_count() or 1) // local))
    if size != parallel.world_size:
        raise ParallelConfigError(f"msrun started {size} workers but the parallel config needs {parallel.world_size}")
    ms.reset_auto_parallel_context()
    if parallel.needs_auto_parallel:
        kwargs = {}
        if strategy_dir:
            os.makedirs(strategy_dir, exist_ok=True)
            kwargs["strategy_ckpt_save_file"] = os.path.join(strategy_dir, f"ckpt_strategy_rank_{rank}.ckpt")
        ms.set_auto_parallel_context(
            parallel_mode=ms.ParallelMode.SEMI_AUTO_PARALLEL,
            device_num=size,
            pipeline_stages=parallel.pipeline_stage,
            enable_parallel_optimizer=parallel.optimizer_shard,
            gradients_mean=True,
            full_batch=True,
            **kwargs,
        )
    else:
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, device_num=size, gradients_mean=True)
    return rank, size


# Which dimension of each Linear's [out, in] weight is split across the model-parallel ranks.
COLUMN_PARALLEL = ("query_key_value", "dense_h_to_4h", "output_layer")
ROW_PARALLEL = ("dense", "dense_4h_to_h")


def apply_shard_strategies(model: GLM3ForCausalLM, parallel: ParallelConfig) -> dict[str, tuple]:
    """Set shard() strategies on every matmul (and the embedding gather), stage ids on the layers, and
    recomputation. Returns {cell name: strategy} for inspection. Only meaningful under SEMI_AUTO_PARALLEL."""
    from glm3.modeling.linear import Linear

    dp, mp = parallel.data_parallel, parallel.model_parallel
    applied = {}
    for name, cell in model.cells_and_names():
        if not isinstance(cell, Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in COLUMN_PARALLEL:
            strategy = ((dp, 1), (mp, 1))  # x [b*s, in] rows by dp; W [out, in] rows (outputs) by mp
        elif leaf in ROW_PARALLEL:
            strategy = ((dp, mp), (1, mp))  # inputs split by mp; partial sums all-reduced by MindSpore
        else:
            continue
        cell.method.matmul.shard(strategy)  # the product (quantized models do not train)
        cell.matmul.shard(strategy)  # LoRA's low-rank products
        applied[name] = strategy
    model.transformer.embedding.gather.shard(((mp, 1), (dp, 1)))  # vocab-parallel embedding table
    applied["transformer.embedding"] = ((mp, 1), (dp, 1))
    layers = model.transformer.encoder.layers
    per_stage = len(layers) // parallel.pipeline_stage
    for i, layer in enumerate(layers):
        layer.pipeline_stage = i // per_stage
        if parallel.recompute:
            layer.recompute()
    model.transformer.embedding.pipeline_stage = 0
    model.transformer.output_layer.pipeline_stage = parallel.pipeline_stage - 1
    return applied
