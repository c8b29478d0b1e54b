"""dvc.yaml, made from the stage table (glm3.pipeline.stages.STAGES) and each stage's code
(glm3.pipeline.code_deps): `python -m glm3.pipeline.dvc_yaml` writes it, and a test checks the committed file
equals what this makes, so a stage is declared in one place."""

from __future__ import annotations

import os
import sys

from glm3.io import atomic_write_text
from glm3.pipeline.code_deps import stage_code
from glm3.pipeline.stages import ORDER, STAGES

HEADER = """\
# glm3-pipeline: {chain}.
# Made by `python -m glm3.pipeline.dvc_yaml` from the stage table (glm3.pipeline.stages.STAGES): edit that,
# not this file. Each stage is `python -m stages.<name>`, a thin call into glm3.pipeline.stages.<name> (the
# Prefect flow calls the same functions). Params come from params.yaml, one section per stage; `${{...}}`
# reads it too. A stage's code deps are exactly the files its code runs (glm3.pipeline.code_deps), so editing
# one stage re-runs it and what follows only.
stages:
"""


def _uncached(path: str, comment: str) -> list[str]:
    return [f"      - {path}:" + (f"   # {comment}" if comment else ""), "          cache: false"]


def render(root: str | os.PathLike = ".") -> str:
    """The text of dvc.yaml for the project at `root`."""
    chain = " -> ".join(ORDER[:-2]) + ", " + ", ".join(ORDER[-2:])
    lines = [HEADER.format(chain=chain).rstrip("\n")]
    for name in ORDER:
        stage = STAGES[name]
        deps = stage_code(name, root) + [STAGES[u].output for u in stage.upstream]
        deps += ["${" + key + "}" for key in stage.data_keys]
        lines += [f"  {name}:", f"    cmd: python -m stages.{name}", "    deps:"]
        lines += [f"      - {dep}" for dep in deps]
        lines += ["    params:"] + [f"      - {section}" for section in stage.sections]
        lines += ["    outs:", f"      - {stage.output}"]
        for path, comment in stage.outs:
            lines += _uncached(path, comment)
        if stage.metrics:
            lines += ["    metrics:"] + [line for path in stage.metrics for line in _uncached(path, "")]
        if stage.plots:
            lines += ["    plots:"] + [line for path, comment in stage.plots for line in _uncached(path, comment)]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "."
    atomic_write_text(os.path.join(root, "dvc.yaml"), render(root))
    print(f"wrote {os.path.join(root, 'dvc.yaml')}")
