"""Stage `rank_table`: the parallel plan (world size; each server's workers and node_rank) and, for Ascend
servers, the HCCL rank table."""
from __future__ import annotations

import logging
import os

from glm3.io import atomic_directory
from glm3.pipeline.layout import Layout
from glm3.pipeline.outputs import write_json
from glm3.pipeline.params import ParamsError
from glm3.pipeline.plan import PLAN_FILE, RANK_TABLE_FILE, parallel_fields

log = logging.getLogger("glm3.pipeline")


def run(params: dict, layout: Layout) -> dict:
    """The parallel plan (world size; each server's workers and node_rank) and, for Ascend servers, the HCCL
    rank table."""
    from glm3 import rank_table as rt
    from glm3.parallel import ParallelConfig

    p = params["parallel"]
    parallel = ParallelConfig(**parallel_fields(p))
    parallel.validate(p["device"])  # e.g. model parallelism on CPU fails here, before any training
    servers = p.get("servers") or []
    plan = {"device": p["device"], "world_size": parallel.world_size, "data_parallel": parallel.data_parallel,
            "model_parallel": parallel.model_parallel, "pipeline_stage": parallel.pipeline_stage,
            "rank_table": None, "nodes": [{"ip": "127.0.0.1", "local_workers": parallel.world_size}]}
    with atomic_directory(layout.outputs["rank_table"], overwrite=True) as tmp:
        if servers:
            tables = []
            for server in servers:  # their keys are checked with params.yaml (glm3.pipeline.params)
                tables.append(rt.build_rank_table(server["ip"], server.get("devices", "[0,8)"),
                                                  device_ips=server.get("device_ips"),
                                                  hccn_conf=server.get("hccn_conf")))
            table = rt.merge_rank_tables(tables)
            nodes = [{"ip": s["server_id"], "local_workers": len(s["device"])} for s in table["server_list"]]
            devices = sum(n["local_workers"] for n in nodes)
            if devices != parallel.world_size:
                raise ParamsError(f"the servers have {devices} devices but data_parallel*model_parallel*"
                                  f"pipeline_stage is {parallel.world_size}")
            rt.save_rank_table(table, os.path.join(tmp, RANK_TABLE_FILE))
            plan.update(rank_table=RANK_TABLE_FILE, nodes=nodes)
        for rank, node in enumerate(plan["nodes"]):
            node["node_rank"] = rank
        write_json(os.path.join(tmp, PLAN_FILE), plan)
    log.info("rank_table: world size %d over %d node(s)%s", plan["world_size"], len(plan["nodes"]),
             ", HCCL rank table written" if servers else "")
    return {"world_size": plan["world_size"], "nodes": len(plan["nodes"])}
