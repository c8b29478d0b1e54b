"""params.yaml: read, override (`finetune.lr=1e-3`), and check that every stage's section is there."""
from __future__ import annotations

import copy
import os

PARAMS_FILE = "params.yaml"
SECTIONS = ("download", "convert", "parallel", "finetune", "merge", "export", "evaluate", "adgen_eval")


class ParamsError(ValueError):
    pass


class StageInputError(ValueError):
    """A stage's input cannot be had or used (e.g. the Hub refused a download): reported, not a traceback."""


def load_params(path: str | os.PathLike = PARAMS_FILE, overrides: dict | None = None) -> dict:
    """The params of `path` with `overrides` ({"finetune.lr": 1e-3, "export.batch_size": None, ...}) applied."""
    import yaml  # here, not at module level: `glm3 <command>` imports this package to build its parser

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            params = yaml.safe_load(f)
    except FileNotFoundError:
        raise ParamsError(f"{path} does not exist (run from the project directory)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise ParamsError(f"{path} must hold a mapping of stage sections")
    missing = [s for s in SECTIONS if not isinstance(params.get(s), dict)]
    if missing:
        raise ParamsError(f"{path} lacks the section(s) {', '.join(missing)}")
    return apply_overrides(params, overrides or {})


def apply_overrides(params: dict, overrides: dict) -> dict:
    """A copy of `params` with each dotted key set; a key must name an existing setting (typos fail loudly)."""
    params = copy.deepcopy(params)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = params
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise ParamsError(f"unknown parameter {dotted!r}: there is no section {part!r}")
        if leaf not in node:
            raise ParamsError(f"unknown parameter {dotted!r}; {'.'.join(parents) or 'the top level'} has "
                              f"{', '.join(sorted(node))}")
        node[leaf] = value
    return params


def project_path(root: str | os.PathLike, path: str) -> str:
    """`path` from params.yaml, relative to the project root unless absolute."""
    return os.path.normpath(os.path.join(os.fspath(root), os.path.expanduser(path)))
