"""Fine-tuning: the trainer, its graph-mode step, learning-rate schedules and resumable checkpoints."""
from glm3.train.checkpoint import ResumeError
from glm3.train.schedule import lr_schedule
from glm3.train.trainer import FinetuneConfig, FinetuneResult, TrainingInterrupted, finetune, prepare_data

__all__ = ["FinetuneConfig", "FinetuneResult", "ResumeError", "TrainingInterrupted", "finetune", "lr_schedule",
           "prepare_data"]
