"""Evaluation: C-Eval multiple choice, and generation quality on ADGEN (BLEU-4, ROUGE on characters)."""

from glm3.eval.adgen import adgen_scores, evaluate_adgen
from glm3.eval.ceval import eager_logits, evaluate_ceval

__all__ = ["adgen_scores", "eager_logits", "evaluate_adgen", "evaluate_ceval"]
