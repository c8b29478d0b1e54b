"""Evaluation: generation quality on ADGEN (BLEU-4, ROUGE on characters)."""
from glm3.eval.adgen import adgen_scores, evaluate_adgen

__all__ = ["adgen_scores", "evaluate_adgen"]
