"""Stage `merge`: the run's per-rank checkpoints (or LoRA adapters, folded into the base tensor by tensor) into
one sharded model directory in the base's dtype (or `merge.dtype`); by strategy files when the run was model-
or pipeline-parallel."""

from __future__ import annotations

import logging
import os

from glm3.pipeline.layout import Layout

log = logging.getLogger("glm3.pipeline")


def run(params: dict, layout: Layout) -> dict:
    from glm3.train.merge import merge_run

    run_dir, p = layout.outputs["finetune"], params["merge"]
    strategy = os.path.join(run_dir, "strategy")
    needs_strategy = params["parallel"]["model_parallel"] > 1 or params["parallel"]["pipeline_stage"] > 1
    summary = merge_run(
        run_dir,
        layout.outputs["merge"],
        layout.outputs["convert"],
        strategy=strategy if needs_strategy else None,
        step=p.get("step"),
        overwrite=True,
        dtype=p.get("dtype", "auto"),
        shard_size=p.get("shard_size", "2GB"),
    )
    log.info("merge: %s", summary.describe())
    return {"ranks": summary.ranks, "step": summary.step, "method": summary.method, "tensors": summary.tensors}
