"""Stage `rank_table`: the parallel plan (world size; each server's workers and node_rank) and, for Ascend
servers, the HCCL rank table."""

from __future__ import annotations

import logging
import os

from glm3.io import atomic_directory
from glm3.pipeline.layout import Layout
from glm3.pipeline.outputs import write_json
from glm3.pipeline.plan import PLAN_FILE, RANK_TABLE_FILE, parallel_fields

log = logging.getLogger("glm3.pipeline")


def run(params: dict, layout: Layout) -> dict:
    from glm3.train import rank_table as rt
    from glm3.train.parallel import ParallelConfig

    p = params["parallel"]
    parallel = ParallelConfig(**parallel_fields(p))
    parallel.validate(p["device"])  # e.g. model parallelism on CPU fails here, before any training
    servers = p.get("servers") or []
    table = rt.build_cluster_table(servers) if servers else None
    plan = {
        "device": p["device"],
        "world_size": parallel.world_size,
        "data_parallel": parallel.data_parallel,
        "model_parallel": parallel.model_parallel,
        "pipeline_stage": parallel.pipeline_stage,
        "rank_table": RANK_TABLE_FILE if table else None,
        "nodes": rt.launch_nodes(parallel.world_size, table),
    }
    with atomic_directory(layout.outputs["rank_table"], overwrite=True) as tmp:
        if table:
            rt.save_rank_table(table, os.path.join(tmp, RANK_TABLE_FILE))
        write_json(os.path.join(tmp, PLAN_FILE), plan)
    log.info(
        "rank_table: world size %d over %d node(s)%s",
        plan["world_size"],
        len(plan["nodes"]),
        ", HCCL rank table written" if table else "",
    )
    return {"world_size": plan["world_size"], "nodes": len(plan["nodes"])}
