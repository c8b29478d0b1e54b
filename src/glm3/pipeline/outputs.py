"""How stages write their small files: JSON metrics and summaries, atomically."""

from __future__ import annotations

import json

from glm3.io import atomic_write_text


def write_json(path: str, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
