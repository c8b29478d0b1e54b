"""Stage `convert`: HuggingFace/PyTorch weights -> MindSpore checkpoint shards, in `convert.dtype` (the storage
dtype every later stage keeps), streaming and checked tensor by tensor."""

from __future__ import annotations

import logging

from glm3.pipeline.layout import Layout

log = logging.getLogger("glm3.pipeline")


def run(params: dict, layout: Layout) -> dict:
    from glm3.weights.convert import convert_checkpoint

    p = params["convert"]
    summary = convert_checkpoint(
        layout.outputs["download"],
        layout.outputs["convert"],
        dtype=p["dtype"],
        shard_size=p["shard_size"],
        overwrite=True,
        progress=True,
    )
    log.info("convert: %s", summary.describe())
    return {"tensors": summary.tensors, "dtype": summary.dtype, "files": len(summary.files)}
