"""What the Prefect flow needs besides the stage functions: which stages a run covers, its parameter
overrides, the task cache key and the metrics artifact. Kept free of Prefect imports (tested directly)."""

from __future__ import annotations

import json
import os

from glm3.pipeline.stages import ORDER

RUNS = {
    "pipeline": ORDER,  # glm3/pipeline: everything
    "finetune": tuple(s for s in ORDER if s not in ("download", "convert")),  # from models/ms
}


def run_stages(run: str, root: str) -> tuple[tuple[str, ...], str | None]:
    """(the stages a run executes, why any were added). glm3/finetune starts from the converted model of the
    DVC layout (models/ms); when that is missing (a fresh clone) it runs download and convert itself first,
    which Prefect's task cache then serves to later runs."""
    from glm3.pipeline.layout import DVC_OUTPUTS

    stages = RUNS[run]
    if run == "finetune" and not os.path.isdir(os.path.join(root, DVC_OUTPUTS["convert"])):
        return ("download", "convert") + stages, (
            f"{DVC_OUTPUTS['convert']} is missing: running download and "
            "convert first (reused from the task cache when they ran before)"
        )
    return stages, None


FINETUNE_OVERRIDES = {
    "lr": "finetune.lr",
    "steps": "finetune.steps",
    "batch_size": "finetune.batch_size",
    "seq_length": "finetune.seq_length",
    "lora": "finetune.lora.enabled",
}


def overrides_from(overrides: dict | None = None, **finetune) -> dict:
    """Dotted params overrides from the flow's named parameters (None: keep params.yaml) and `overrides`."""
    merged = dict(overrides or {})
    for name, value in finetune.items():
        if value is not None:
            merged[FINETUNE_OVERRIDES[name]] = value
    return merged


def stage_cache_key(context, parameters: dict) -> str:
    """The task's output directory is keyed by its params, inputs and code (Layout.keyed): its name is the
    cache key. (The flow refreshes the cache of a task whose directory has gone missing.)"""
    return "glm3-" + os.path.basename(parameters["layout"].outputs[context.task.name])


def metrics_markdown(run: str, results: dict, layout) -> str:
    """The run's metrics and output directories as a markdown document (a Prefect artifact)."""
    lines = [f"# glm3 {run}", "", "| stage | output | metrics |", "| --- | --- | --- |"]
    for stage, summary in results.items():
        flat = ", ".join(f"{k}={_short(v)}" for k, v in (summary or {}).items() if not isinstance(v, (dict, list)))
        lines.append(f"| {stage} | `{os.path.relpath(layout.outputs[stage], layout.root)}` | {flat} |")
    ceval = results.get("evaluate") or {}
    if ceval.get("categories"):
        lines += ["", "## C-Eval accuracy per category", "", "| category | accuracy |", "| --- | --- |"]
        lines += [f"| {c} | {acc} |" for c, acc in ceval["categories"].items()]
    return "\n".join(lines) + "\n"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)
