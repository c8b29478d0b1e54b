"""The parallel plan the rank_table stage writes and the finetune stage launches from."""

from __future__ import annotations

import json
import os

from glm3.pipeline.params import PARALLEL_KEYS, ParamsError

PLAN_FILE = "plan.json"  # rank_table's output: the resolved parallel layout and its nodes
RANK_TABLE_FILE = "hccl.json"


def parallel_fields(p: dict) -> dict:
    """The ParallelConfig fields of params.parallel."""
    return {k: p[k] for k in PARALLEL_KEYS if k in p}


def parallel_config(params: dict, plan_dir: str):
    """ParallelConfig from params.parallel and the rank_table stage's plan (multi-node msrun flags)."""
    from glm3.train.parallel import ParallelConfig

    with open(os.path.join(plan_dir, PLAN_FILE), encoding="utf-8") as f:
        plan = json.load(f)
    fields = parallel_fields(params["parallel"])
    node_rank = int(fields.get("node_rank", 0))
    if not 0 <= node_rank < len(plan["nodes"]):
        raise ParamsError(f"parallel.node_rank {node_rank} is not one of the plan's {len(plan['nodes'])} node(s)")
    if plan["rank_table"]:
        fields.update(
            worker_num=plan["world_size"],
            local_worker_num=plan["nodes"][node_rank]["local_workers"],
            master_addr=plan["nodes"][0]["ip"],
            rank_table_file=os.path.join(plan_dir, plan["rank_table"]),
        )
    return ParallelConfig(**fields)
