"""Training checkpoints: `<output>/checkpoint/rank_N/step_00000010/{state.ckpt, trainer_state.json}`.

state.ckpt holds the trainable parameters and the optimizer state (moments, global step, loss scale);
trainer_state.json the step, the data position, the RNG states and the run's fingerprint. A checkpoint
directory appears complete or not at all, and only the newest `keep` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import mindspore as ms

from glm3.io import atomic_directory

STATE_FILE = "state.ckpt"
META_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class ResumeError(ValueError):
    pass


def rank_dir(output: str | os.PathLike, rank: int) -> str:
    return os.path.join(os.fspath(output), "checkpoint", f"rank_{rank}")


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in a rank directory, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for entry in os.listdir(directory):
        match = _STEP_DIR.match(entry)
        path = os.path.join(directory, entry)
        if match and os.path.isfile(os.path.join(path, META_FILE)):
            found.append((int(match[1]), path))
    return sorted(found)


def save_checkpoint(directory: str, step: int, params, meta: dict, keep: int = 2) -> str:
    path = os.path.join(directory, f"step_{step:08d}")
    with atomic_directory(path, overwrite=True) as tmp:
        ms.save_checkpoint([{"name": p.name, "data": p} for p in params], os.path.join(tmp, STATE_FILE))
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump({"step": step, **meta}, f, indent=2)
    if keep > 0:
        for _, old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: str, params) -> dict:
    """Fill `params` from a checkpoint, checking that names, shapes and dtypes all match; return its meta."""
    meta_path, state_path = os.path.join(path, META_FILE), os.path.join(path, STATE_FILE)
    if not (os.path.isfile(meta_path) and os.path.isfile(state_path)):
        raise ResumeError(f"{path} is not a training checkpoint (needs {META_FILE} and {STATE_FILE})")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    saved = ms.load_checkpoint(state_path)
    wanted = {p.name: p for p in params}
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    if missing or extra:
        raise ResumeError(f"checkpoint {path} does not fit this run: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, value in saved.items():
        target = wanted[name]
        if tuple(value.shape) != tuple(target.shape) or value.dtype != target.dtype:
            raise ResumeError(
                f"checkpoint tensor {name} is {value.dtype}{tuple(value.shape)}, the run has "
                f"{target.dtype}{tuple(target.shape)}"
            )
        target.set_data(value)
    return meta
