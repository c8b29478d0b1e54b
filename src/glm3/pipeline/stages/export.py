"""Stage `export`: MindIR prefill and decode graphs of the merged model, its weights stored once beside them
in the model's dtype (or embedded in the graphs, `export.weights: embedded`)."""

from __future__ import annotations

import logging

from glm3.pipeline.layout import Layout

log = logging.getLogger("glm3.pipeline")


def run(params: dict, layout: Layout) -> dict:
    from glm3.export import ExportConfig, export_model
    from glm3.loading import setup_mindspore

    p = params["export"]
    setup_mindspore("graph")
    out = export_model(
        layout.outputs["merge"],
        layout.outputs["export"],
        batch_size=p["batch_size"],
        prompt_length=int(p["prompt_length"]),
        seq_length=p["seq_length"],
        paged=bool(p["paged"]),
        block_size=int(p["block_size"]),
        num_blocks=int(p["num_blocks"]),
        fused_paged_attention=bool(p["fused_paged_attention"]),
        overwrite=True,
        weights=p.get("weights", "inputs"),
        dtype=p.get("dtype", "auto"),
    )
    config = ExportConfig.load(out)
    log.info("export: %s", out)
    return {
        "batch_size": config.batch_size,
        "prompt_length": config.prompt_length,
        "seq_length": config.seq_length,
        "paged": config.paged,
        "weights": config.weights,
        "dtype": config.dtype,
    }
