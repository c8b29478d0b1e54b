"""Learning-rate schedules, computed once as a per-step array (the optimizer indexes it by its global step)."""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("cosine", "linear", "constant")


def lr_schedule(
    lr: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine", min_lr: float = 0.0
) -> np.ndarray:
    """float32 [total_steps]: linear warmup from lr/warmup to lr, then decay towards min_lr (reached after the end).

    Step i (0-based) uses entry i. With warmup w, step i < w has lr·(i+1)/w, so no step trains at lr 0.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, {total_steps}], got {warmup_steps}")
    if lr <= 0 or min_lr < 0 or min_lr > lr:
        raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={lr}, min_lr={min_lr}")
    out = np.empty(total_steps, np.float64)
    decay_steps = total_steps - warmup_steps
    for i in range(total_steps):
        if i < warmup_steps:
            out[i] = lr * (i + 1) / warmup_steps
            continue
        progress = (i - warmup_steps) / decay_steps  # reaches min_lr just after the last step
        if kind == "cosine":
            out[i] = min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        elif kind == "linear":
            out[i] = lr + (min_lr - lr) * progress
        else:
            out[i] = lr
    return out.astype(np.float32)
