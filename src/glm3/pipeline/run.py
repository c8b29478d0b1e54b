"""Run one stage in the DVC layout: what `python -m stages.<name>` and `glm3 stage <name>` do."""
from __future__ import annotations

import json
import logging
import os
import sys

from glm3.pipeline.layout import STAGES, Layout
from glm3.pipeline.params import PARAMS_FILE, load_params


def run_stage(name: str, root: str | os.PathLike = ".", overrides: dict | None = None) -> int:
    """Run stage `name` of the project at `root`; 0 on success, 2 on bad input, 130 when interrupted."""
    from glm3.download import DownloadError
    from glm3.pipeline.stages import STAGE_FUNCTIONS

    if name not in STAGES:
        print(f"unknown stage {name!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        params = load_params(os.path.join(root, PARAMS_FILE), overrides)
        summary = STAGE_FUNCTIONS[name](params, Layout.dvc(root))
    except (DownloadError, OSError, ValueError) as exc:  # bad params or input; nothing half-written is left
        print(f"stage {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps({name: summary}, ensure_ascii=False, default=str))
    return 0
