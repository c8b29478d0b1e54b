"""Settings dataclasses' fields, each with a one-line description: one source for a setting's default, its
command-line flag and help (glm3.cli.common.add_settings_flags), params.yaml's valid keys and the docs."""

from __future__ import annotations

import dataclasses


def setting(default=dataclasses.MISSING, help: str = "", factory=dataclasses.MISSING, **extra):  # noqa: A002
    """A settings field and its one-line description. extra: "choices", "cli" (False: no flag of its own)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help, **extra})
