"""params.yaml: read, override (`finetune.lr=1e-3`), and check: every stage's section is there and holds only
settings its stage knows (a typo is an error that names the valid keys, never silently ignored).

Checked in milliseconds, before any stage imports MindSpore or writes anything.
"""

from __future__ import annotations

import copy
import dataclasses
import os

from glm3.pipeline.stages import SECTIONS

PARAMS_FILE = "params.yaml"
# FinetuneConfig fields the finetune stage fills in itself (paths of the layout, the parallel section, ...).
_STAGE_SET = (
    "model",
    "output",
    "tokenizer",
    "cache_dir",
    "resume",
    "device",
    "parallel",
    "progress",
    "stop_after",
    "timing_file",
)
SERVER_KEYS = ("ip", "devices", "hccn_conf", "device_ips")
# The parallel section's settings of glm3.train.parallel.ParallelConfig (device and servers aside).
PARALLEL_KEYS = (
    "data_parallel",
    "model_parallel",
    "pipeline_stage",
    "micro_batch_num",
    "optimizer_shard",
    "recompute",
    "master_port",
    "node_rank",
)


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
    check_params(params, path)
    params = apply_overrides(params, overrides or {})
    check_params(params, "the overridden params")
    return params


def known_keys() -> dict[str, set[str]]:
    """{section (or "finetune.lora"): the settings it may hold}."""
    from glm3.deploy.settings import ExportSettings
    from glm3.pipeline.stages import STAGES
    from glm3.train.settings import FinetuneConfig, LoraConfig

    # A stage's own section: the keys the stage table lists, or a settings dataclass's fields.
    keys = {stage.sections[0]: set(stage.keys) for stage in STAGES.values() if stage.keys}
    # The export stage quantizes first when asked, then exports with the ExportSettings.
    keys["export"] = set(ExportSettings.names()) | {"quantize_bits", "quantize_group_size"}
    keys["parallel"] = set(PARALLEL_KEYS) | {"device", "servers"}
    keys["finetune"] = {f.name for f in dataclasses.fields(FinetuneConfig)} - set(_STAGE_SET) | {"lora"}
    keys["finetune.lora"] = {"enabled"} | {f.name for f in dataclasses.fields(LoraConfig)}
    return keys


def check_params(params: dict, where: str) -> None:
    """Every section present, and no section (nor finetune.lora, nor a server entry) holding an unknown key."""
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{where}: unknown section(s) {', '.join(unknown)}; the sections are {', '.join(SECTIONS)}")
    missing = [s for s in SECTIONS if not isinstance(params.get(s), dict)]
    if missing:
        raise ParamsError(f"{where} lacks the section(s) {', '.join(missing)}")
    keys = known_keys()
    lora = params["finetune"].get("lora")
    if lora is not None and not isinstance(lora, dict):
        raise ParamsError(f"{where}: finetune.lora must be a mapping (enabled, rank, alpha, dropout, targets)")
    for section, values in [(s, params[s]) for s in SECTIONS] + [("finetune.lora", lora or {})]:
        unknown = sorted(set(values) - keys[section])
        if unknown:
            raise ParamsError(
                f"{where}: unknown setting(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                f"{section} takes {', '.join(sorted(keys[section]))}"
            )
    servers = params["parallel"].get("servers") or []
    if not isinstance(servers, list):
        raise ParamsError(f"{where}: parallel.servers must be a list of servers")
    for i, server in enumerate(servers):
        if not isinstance(server, dict) or "ip" not in server or set(server) - set(SERVER_KEYS):
            raise ParamsError(
                f"{where}: parallel.servers[{i}] must hold ip and devices plus hccn_conf or "
                f"device_ips (and nothing else), got {server!r}"
            )


def apply_overrides(params: dict, overrides: dict) -> dict:
    """A copy of `params` with each dotted key set. A key must name a setting its section knows (it need not
    be in the file yet: `finetune.skip_bad_lines=true` sets a setting params.yaml leaves at its default)."""
    params = copy.deepcopy(params)
    keys = known_keys()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        section = ".".join(parents)
        if section not in keys:
            raise ParamsError(
                f"unknown parameter {dotted!r}: there is no section {section or leaf!r}; the "
                f"sections are {', '.join(SECTIONS)}"
            )
        if leaf not in keys[section]:
            raise ParamsError(f"unknown parameter {dotted!r}; {section} takes {', '.join(sorted(keys[section]))}")
        node = params
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return params


def project_path(root: str | os.PathLike, path: str) -> str:
    """`path` from params.yaml, relative to the project root unless absolute."""
    return os.path.normpath(os.path.join(os.fspath(root), os.path.expanduser(path)))
