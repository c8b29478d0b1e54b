"""Training speed, kept apart from the run's results.

Wall-clock figures differ on every run, so they live in a file of their own (FinetuneConfig.timing_file: by
default <output>/timing.json; the pipeline puts it beside the stage's output), never in train_log.tsv,
metrics.json or a checkpoint. A re-run with the same inputs then writes bit-identical results, and DVC's
output hashes and run cache hold.
"""

from __future__ import annotations

import json
import os

from glm3.io import atomic_write_text


class RunTiming:
    """Seconds and tokens of every optimizer step, across resumes (the file is read back on resume).

    A process's first step includes graph compilation: it is recorded but left out of the speeds.
    `tokens` counts every position of the batches (padding included); `real_tokens` only non-padding ones.
    """

    def __init__(self, path: str | None, start_step: int):
        self.path = path
        self.steps: list[dict] = []
        if path and start_step > 0 and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    previous = json.load(f).get("steps", [])
                self.steps = [s for s in previous if isinstance(s, dict) and s.get("step", 0) <= start_step]
            except (OSError, ValueError):
                self.steps = []  # timing is informative only: a damaged file starts afresh

    def record(self, step: int, seconds: float, tokens: int, real_tokens: int, compiled: bool) -> None:
        self.steps.append(
            {
                "step": step,
                "seconds": round(seconds, 6),
                "tokens": tokens,
                "real_tokens": real_tokens,
                "includes_compilation": compiled,
            }
        )

    def summary(self) -> dict:
        timed = [s for s in self.steps if not s["includes_compilation"]]
        seconds = sum(s["seconds"] for s in timed)
        return {
            "steps": len(self.steps),
            "timed_steps": len(timed),
            "train_seconds": round(seconds, 3),
            "step_seconds": round(seconds / len(timed), 4) if timed else None,
            "tokens_per_second": round(sum(s["tokens"] for s in timed) / seconds, 2) if timed else None,
            "real_tokens_per_second": round(sum(s["real_tokens"] for s in timed) / seconds, 2) if timed else None,
        }

    def write(self) -> None:
        if self.path:
            atomic_write_text(self.path, json.dumps({**self.summary(), "steps": self.steps}, indent=1) + "\n")
