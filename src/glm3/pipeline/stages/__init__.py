"""The pipeline's stages, one module each: `stage_function(name)(params, layout) -> summary dict`.

DVC (`python -m stages.<name>`) and the Prefect flow call these same functions; only the Layout differs.
Each stage writes its output directory atomically (complete or absent, whatever fails or is killed) and
then its small metrics files; the summary it returns is what it wrote into metrics. One module per stage,
so that each DVC stage depends on its own code only (dvc.yaml lists what each module imports).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage, all that is declared about it (dvc.yaml, the layouts, params.yaml's checks and the Prefect
    flow are made from this table). sections: the params.yaml sections it reads; upstream: the stages whose
    outputs it reads; output: its output directory in the DVC layout; data_keys: params keys that are data
    paths (its inputs); keys: the settings of its own section, when no settings dataclass states them (see
    glm3.pipeline.params.known_keys); outs, metrics, plots: its files under metrics/ (with a comment)."""

    sections: tuple[str, ...]
    upstream: tuple[str, ...]
    output: str
    data_keys: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    outs: tuple[tuple[str, str], ...] = ()
    metrics: tuple[str, ...] = ()
    plots: tuple[tuple[str, str], ...] = ()


STAGES: dict[str, Stage] = {
    "download": Stage(
        ("download",),
        (),
        "models/hf",
        keys=("source", "synthetic_preset", "seed", "repo", "revision", "prefer", "timeout"),
    ),
    "convert": Stage(("convert",), ("download",), "models/ms", keys=("dtype", "shard_size")),
    "rank_table": Stage(("parallel",), (), "models/rank_table"),
    "finetune": Stage(
        ("finetune", "parallel"),
        ("convert", "rank_table"),
        "models/finetune",
        data_keys=("finetune.data",),
        outs=(("metrics/train_log.tsv", "the loss per step, the data behind loss.png"),),
        metrics=("metrics/finetune.json",),
        plots=(("metrics/loss.png", "images, so `dvc plots show` works offline (Vega-Lite needs a CDN)"),),
    ),
    "merge": Stage(
        ("merge", "parallel"), ("finetune", "convert"), "models/merged", keys=("step", "dtype", "shard_size")
    ),
    "export": Stage(("export",), ("merge",), "models/export"),
    "evaluate": Stage(
        ("evaluate",),
        ("export",),
        "models/ceval",
        data_keys=("evaluate.data",),
        keys=("data", "split", "shots", "subjects", "batch_size"),
        outs=(("metrics/ceval_categories.json", ""),),
        metrics=("metrics/ceval.json",),
        plots=(("metrics/ceval_categories.png", ""),),
    ),
    "adgen_eval": Stage(
        ("adgen_eval",),
        ("merge",),
        "models/adgen_eval",
        data_keys=("adgen_eval.data",),
        keys=("data", "max_source_length", "max_new_tokens", "batch_size", "limit"),
        metrics=("metrics/adgen.json",),
    ),
}
ORDER = tuple(STAGES)
SECTIONS = tuple(dict.fromkeys(section for stage in STAGES.values() for section in stage.sections))


def stage_module(name: str) -> str:
    """The module that implements stage `name`."""
    if name not in ORDER:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(ORDER)}")
    return f"glm3.pipeline.stages.{name}"


def stage_function(name: str) -> Callable[[dict, object], dict]:
    """The function that runs stage `name` (imported on first use: a stage pays only for its own imports)."""
    return importlib.import_module(stage_module(name)).run


__all__ = ["ORDER", "SECTIONS", "STAGES", "Stage", "stage_function", "stage_module"]
