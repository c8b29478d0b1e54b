"""Stage `export`: MindIR prefill and decode graphs of the merged model, its weights stored once beside them
in the model's dtype (or embedded in the graphs, `export.weights: embedded`); with `export.quantize_bits`
the merged model is quantized first (glm3.weights.quantize) and the export holds its int8 / int4 weights."""

from __future__ import annotations

import logging
import os
import tempfile

from glm3.pipeline.layout import Layout

log = logging.getLogger("glm3.pipeline")


def run(params: dict, layout: Layout) -> dict:
    from glm3.weights.loading import setup_mindspore

    p = params["export"]
    setup_mindspore("graph")
    bits = p.get("quantize_bits")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(layout.outputs["export"]))) as tmp:
        source = layout.outputs["merge"]
        if bits:
            from glm3.weights.quantize import quantize_model

            source = os.path.join(tmp, "quantized")
            summary = quantize_model(
                layout.outputs["merge"], source, int(bits), int(p.get("quantize_group_size") or 32), progress=False
            )
            log.info("export: %s", summary.describe())
        return _export(source, layout, p)


def _export(source: str, layout: Layout, p: dict) -> dict:
    from glm3.deploy.export import ExportConfig, export_model
    from glm3.deploy.settings import ExportSettings

    settings = ExportSettings(**{name: p[name] for name in ExportSettings.names() if name in p})
    out = export_model(source, layout.outputs["export"], settings, overwrite=True)
    config = ExportConfig.load(out)
    log.info("export: %s", out)
    return {
        "batch_size": config.batch_size,
        "prompt_length": config.prompt_length,
        "seq_length": config.seq_length,
        "paged": config.paged,
        "weights": config.weights,
        "dtype": config.dtype,
        "quantize_bits": p.get("quantize_bits"),
    }
