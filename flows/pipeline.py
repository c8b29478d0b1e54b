"""Prefect 3 flow `glm3`: the pipeline's stages as tasks calling the same functions as the DVC stages.

Deployments (served by `glm3 prefect up`): `glm3/pipeline` runs every stage; `glm3/finetune` starts from
the converted model in models/ms (rank_table, finetune, merge, export, evaluate, adgen_eval). Parameters
override params.yaml. Each run writes to models/prefect/<stage>-<key> (see glm3.pipeline.layout), so a
task whose params, inputs and code are unchanged is a cache hit and is not run again.
"""

from __future__ import annotations

import logging
import os

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from glm3.pipeline import Layout, load_params
from glm3.pipeline.flow_support import RUNS, metrics_markdown, overrides_from, run_stages, stage_cache_key
from glm3.pipeline.params import PARAMS_FILE
from glm3.pipeline.stages import ORDER, stage_function

# Options a stage's task needs beyond the shared cache: the download talks to the Hub, which fails now and then.
TASK_OPTIONS = {"download": {"retries": 3, "retry_delay_seconds": [10, 60, 300]}}


def stage_task(name: str):
    """The Prefect task of stage `name`: the stage function, its result cached by the stage's key."""

    def run(params: dict, layout: Layout) -> dict:
        return stage_function(name)(params, layout)

    run.__name__ = run.__qualname__ = f"stage_{name}"  # distinct task keys, one per stage
    return task(run, name=name, cache_key_fn=stage_cache_key, persist_result=True, **TASK_OPTIONS.get(name, {}))


TASKS = {name: stage_task(name) for name in ORDER}


@flow(name="glm3", log_prints=True)
def glm3(
    run: str = "pipeline",
    lr: float | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    seq_length: int | None = None,
    lora: bool | None = None,
    overrides: dict | None = None,
    project: str | None = None,
) -> dict:
    """run: "pipeline" (every stage) or "finetune" (from models/ms, made first if missing). lr, steps, batch_size,
    seq_length and lora override params.yaml's finetune section; `overrides` sets any other
    ({"export.paged": true})."""
    logger = get_run_logger()
    logging.getLogger("glm3").setLevel(logging.INFO)  # the library's stage logs reach the UI (EXTRA_LOGGERS)
    if run not in RUNS:
        raise ValueError(f"run must be one of {', '.join(RUNS)}, got {run!r}")
    root = os.path.abspath(project or os.getcwd())
    params = load_params(
        os.path.join(root, PARAMS_FILE),
        overrides_from(overrides, lr=lr, steps=steps, batch_size=batch_size, seq_length=seq_length, lora=lora),
    )
    stages, why = run_stages(run, root)
    if why:
        logger.info(why)
    layout = Layout.keyed(root, params, stages)
    results = {}
    for name in stages:
        logger.info("stage %s -> %s", name, os.path.relpath(layout.outputs[name], root))
        stage_task = TASKS[name]
        if not os.path.isdir(layout.outputs[name]):  # nothing on disk to reuse: run it and record it anew
            stage_task = stage_task.with_options(refresh_cache=True)
        results[name] = stage_task(params, layout)
    create_markdown_artifact(
        key="glm3-metrics",
        markdown=metrics_markdown(run, results, layout),
        description=f"glm3 {run}: metrics and outputs",
    )
    return {"outputs": {name: layout.outputs[name] for name in stages}, "metrics": results}
