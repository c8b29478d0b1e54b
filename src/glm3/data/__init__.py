"""Fine-tuning data: ADGEN records and their exact tokenization for training and evaluation."""

from glm3.data.adgen import AdgenError, LoadReport, load_adgen
from glm3.data.preprocess import (
    PREPROCESSORS,
    EvalExample,
    PreprocessError,
    TrainExample,
    preprocess_eval,
    preprocess_train,
)

__all__ = [
    "AdgenError",
    "EvalExample",
    "LoadReport",
    "PREPROCESSORS",
    "PreprocessError",
    "TrainExample",
    "load_adgen",
    "preprocess_eval",
    "preprocess_train",
]
