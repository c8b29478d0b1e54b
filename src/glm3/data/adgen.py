"""The ADGEN (AdvertiseGen) format: records {"content": ..., "summary": ...}, as JSON lines or a JSON array."""

from __future__ import annotations

import dataclasses
import json
import os


class AdgenError(ValueError):
    """A data file that cannot be used, with the file and line number of the problem."""


@dataclasses.dataclass
class LoadReport:
    path: str
    records: int = 0
    bad_lines: list[int] = dataclasses.field(default_factory=list)  # skipped with skip_bad_lines
    empty_content: int = 0
    empty_summary: int = 0

    def describe(self) -> str:
        parts = [f"{self.records} records from {self.path}"]
        if self.bad_lines:
            parts.append(f"{len(self.bad_lines)} malformed line(s) skipped (first: line {self.bad_lines[0]})")
        if self.empty_content or self.empty_summary:
            parts.append(f"{self.empty_content} with empty content, {self.empty_summary} with empty summary")
        return "; ".join(parts)


def _check_record(obj, where: str) -> dict[str, str]:
    if not isinstance(obj, dict):
        raise AdgenError(f"{where}: expected a JSON object with 'content' and 'summary', got {type(obj).__name__}")
    for key in ("content", "summary"):
        if key not in obj:
            raise AdgenError(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], str):
            raise AdgenError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
    return {"content": obj["content"], "summary": obj["summary"]}


def load_adgen(path: str | os.PathLike, skip_bad_lines: bool = False) -> tuple[list[dict[str, str]], LoadReport]:
    """Read ADGEN records. A malformed line is an error naming file and line, or skipped and counted.

    Empty fields are counted in the report; the preprocessing step decides what to do with them.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AdgenError(f"data file not found: {path}")
    report = LoadReport(path=path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    records: list[dict[str, str]] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AdgenError(f"{path}:{exc.lineno}: invalid JSON array: {exc.msg}") from exc
        entries = [(f"{path}: item {i}", item) for i, item in enumerate(items)]
    else:
        entries = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                if not skip_bad_lines:
                    raise AdgenError(
                        f"{path}:{lineno}: invalid JSON ({exc.msg}); fix the line, or skip such "
                        "lines: --skip-bad-lines, or finetune.skip_bad_lines: true in params.yaml "
                        "(-S finetune.skip_bad_lines=true)"
                    ) from exc
                report.bad_lines.append(lineno)
    for where, obj in entries:
        try:
            record = _check_record(obj, where)
        except AdgenError:
            if not skip_bad_lines:
                raise
            report.bad_lines.append(int(where.rsplit(":", 1)[1]) if where.rsplit(":", 1)[1].isdigit() else -1)
            continue
        report.empty_content += not record["content"].strip()
        report.empty_summary += not record["summary"].strip()
        records.append(record)
    report.records = len(records)
    return records, report
