"""Run one stage in the DVC layout: what `python -m stages.<name>` and `glm3 stage <name>` do."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from glm3.pipeline.layout import Layout
from glm3.pipeline.params import PARAMS_FILE, load_params
from glm3.pipeline.stages import STAGES


def run_stage(name: str, root: str | os.PathLike = ".", overrides: dict | None = None) -> int:
    """Run stage `name` of the project at `root`; 0 on success, 2 on bad input, 130 when interrupted."""
    from glm3.pipeline.stages import stage_function

    if name not in STAGES:
        print(f"unknown stage {name!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    start = time.monotonic()
    try:
        params = load_params(os.path.join(root, PARAMS_FILE), overrides)
        summary = stage_function(name)(params, Layout.dvc(root))
    except (OSError, ValueError) as exc:  # bad params or input; nothing half-written is left
        print(f"stage {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps({name: summary}, ensure_ascii=False, default=str))
    record_stage_stats(name, time.monotonic() - start)
    return 0


def record_stage_stats(name: str, seconds: float) -> None:
    """With GLM3_STAGE_STATS=FILE, append this stage's wall time and peak RSS (this process's own, from the
    kernel: VmHWM; and the largest of its child processes, e.g. msrun workers) to FILE as a JSON line."""
    path = os.environ.get("GLM3_STAGE_STATS")
    if not path:
        return
    import resource

    from glm3.memory import peak_rss_bytes

    hwm = peak_rss_bytes()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    with open(path, "a", encoding="utf-8") as f:
        f.write(
            json.dumps(
                {
                    "stage": name,
                    "seconds": round(seconds, 2),
                    "peak_rss_bytes": hwm,
                    "children_peak_rss_bytes": children,
                }
            )
            + "\n"
        )
