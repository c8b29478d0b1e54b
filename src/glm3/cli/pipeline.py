"""`glm3` stage, prefect up: the DVC/Prefect pipeline of a project directory."""

from __future__ import annotations


def cmd_stage(args) -> int:
    import yaml

    from glm3.pipeline.run import run_stage

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"-S takes key=value (e.g. finetune.lr=1e-3), got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return run_stage(args.name, args.project, overrides)


def cmd_prefect_up(args) -> int:
    from glm3.pipeline.prefect_server import prefect_up

    return prefect_up(args.project, args.port)


def register(sub) -> None:
    """stage, prefect up: the DVC/Prefect pipeline of a project directory."""
    from glm3.pipeline.stages import ORDER

    p = sub.add_parser(
        "stage",
        help="run one pipeline stage as `dvc repro` would (params.yaml, models/, metrics/)",
        description="Runs glm3.pipeline.stages.NAME in the project's DVC layout; `dvc repro` runs the "
        "same through `python -m stages.NAME`. -S overrides params.yaml for this run only.",
    )
    p.add_argument("name", choices=ORDER, help="the stage")
    p.add_argument("--project", default=".", help="project directory with params.yaml (default: .)")
    p.add_argument(
        "-S",
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a parameter, e.g. finetune.lr=1e-3 (the value is read as YAML)",
    )
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("prefect", help="`glm3 prefect up`: a local Prefect server serving the glm3 deployments")
    prefect_sub = p.add_subparsers(dest="action", required=True, metavar="<action>", help="what to do")
    p = prefect_sub.add_parser(
        "up",
        help="start a local Prefect server (SQLite, 127.0.0.1) and serve glm3/pipeline and glm3/finetune until Ctrl-C",
        description="Prints the API URL (http://127.0.0.1:PORT/api) on a line of its own; "
        "then `PREFECT_API_URL=<url> prefect deployment run glm3/finetune --param lr=1e-3` "
        "runs a fine-tune. Prefect's state is kept in PREFECT_HOME (default "
        "<project>/.prefect).",
    )
    p.add_argument("--project", default=".", help="project directory with flows/ and params.yaml (default: .)")
    p.add_argument("--port", type=int, default=4200, help="API/UI port on 127.0.0.1 (default 4200)")
    p.set_defaults(func=cmd_prefect_up)
