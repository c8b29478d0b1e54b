"""The pipeline's stages, one module each: `stage_function(name)(params, layout) -> summary dict`.

DVC (`python -m stages.<name>`) and the Prefect flow call these same functions; only the Layout differs.
Each stage writes its output directory atomically (complete or absent, whatever fails or is killed) and
then its small metrics files; the summary it returns is what it wrote into metrics. One module per stage,
so that each DVC stage depends on its own code only (dvc.yaml lists what each module imports).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

# stage -> (params sections it reads, upstream stages whose outputs it reads, params keys that are data paths)
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "download": (("download",), (), ()),
    "convert": (("convert",), ("download",), ()),
    "rank_table": (("parallel",), (), ()),
    "finetune": (("finetune", "parallel"), ("convert", "rank_table"), ("finetune.data",)),
    "merge": (("merge", "parallel"), ("finetune", "convert"), ()),
    "export": (("export",), ("merge",), ()),
    "evaluate": (("evaluate",), ("export",), ("evaluate.data",)),
    "adgen_eval": (("adgen_eval",), ("merge",), ("adgen_eval.data",)),
}
ORDER = tuple(STAGES)


def stage_module(name: str) -> str:
    """The module that implements stage `name`."""
    if name not in ORDER:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(ORDER)}")
    return f"glm3.pipeline.stages.{name}"


def stage_function(name: str) -> Callable[[dict, object], dict]:
    """The function that runs stage `name` (imported on first use: a stage pays only for its own imports)."""
    return importlib.import_module(stage_module(name)).run


__all__ = ["ORDER", "STAGES", "stage_function", "stage_module"]
