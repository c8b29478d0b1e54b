"""`glm3 <command>`: the command line over the glm3 library, one module per group of commands.

Each group module registers its commands (their arguments and handlers) with `register(subparsers)`; GROUPS
is the table, in the order `glm3 --help` lists them. Handlers import the library when they run, so
`glm3 --help` and the light commands start without MindSpore.
"""

from __future__ import annotations

import argparse
import sys

from glm3.cli import checkpoints, deploy, evaluation, pipeline, ranks, serving, training, use

GROUPS = (use, checkpoints, training, ranks, deploy, evaluation, serving, pipeline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm3",
        description="ChatGLM3 on MindSpore: download and convert "
        "checkpoints; chat, generate, score; fine-tune (full, LoRA, msrun), build rank "
        "tables, merge and split distributed checkpoints; export to MindIR and run it; "
        "evaluate on C-Eval and ADGEN; serve an OpenAI-compatible API; run pipeline stages and the Prefect server.",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="<command>", help="`glm3 <command> --help` for its flags"
    )
    for group in GROUPS:
        group.register(sub)
    return parser


def _log_to_stderr() -> None:
    """The library's own log lines (memory estimates, what the trainer chose) on stderr, once."""
    import logging

    logger = logging.getLogger("glm3")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("glm3: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from glm3.weights.download import DownloadError

    _log_to_stderr()
    try:
        return args.func(args)
    # Input errors (CheckpointError, ConfigError, ...) are ValueErrors; a failed msrun launch is an OSError.
    except (DownloadError, OSError, ValueError) as exc:
        print(f"glm3 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
