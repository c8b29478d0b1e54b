"""Fine-tuning: settings, the trainer, its graph-mode step, learning-rate schedules and resumable checkpoints.

Names are imported on first use: `glm3.train.settings` (what params.yaml and the CLI check) must not pay for
MindSpore, which the trainer imports.
"""

from glm3.lazy import lazy_attributes

_EXPORTS = {
    "FinetuneConfig": "glm3.train.settings",
    "LoraConfig": "glm3.train.settings",
    "ResumeError": "glm3.train.checkpoint",
    "lr_schedule": "glm3.train.schedule",
    "FinetuneResult": "glm3.train.trainer",
    "TrainingInterrupted": "glm3.train.trainer",
    "finetune": "glm3.train.trainer",
    "prepare_data": "glm3.train.trainer",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS)
