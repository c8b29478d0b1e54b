"""ADGEN generation metrics: BLEU-4 and ROUGE-1/2/L F1 over characters, as ChatGLM's fine-tuning demos score.

Chinese has no spaces, so a text is scored as its sequence of non-space characters. BLEU-4 is NLTK's
sentence_bleu with smoothing method 3; ROUGE is rouge-chinese (a ROUGE implementation that accepts any
space-separated tokens). Every figure is the mean over examples, times 100.
"""

from __future__ import annotations

import json
import os

import numpy as np

from glm3.io import atomic_write_text
from glm3.runtime.generation import generate

METRIC_NAMES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def _chars(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def adgen_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean BLEU-4 and ROUGE-1/2/L F1 (x100) of predictions against references, on characters."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("nothing to score")
    rouge, smooth = Rouge(), SmoothingFunction().method3
    totals = {name: [] for name in METRIC_NAMES}
    for pred, ref in zip(predictions, references):
        hyp, gold = _chars(pred), _chars(ref)
        if not gold:
            raise ValueError("a reference is empty")
        if hyp:
            scores = rouge.get_scores(" ".join(hyp), " ".join(gold))[0]
            for n in ("1", "2", "l"):
                totals[f"rouge-{n}"].append(scores[f"rouge-{n}"]["f"])
            totals["bleu-4"].append(sentence_bleu([gold], hyp, smoothing_function=smooth))
        else:  # an empty generation scores zero everywhere (ROUGE cannot score an empty text)
            for name in METRIC_NAMES:
                totals[name].append(0.0)
    return {name: round(float(np.mean(values)) * 100, 4) for name, values in totals.items()}


def evaluate_adgen(
    model,
    tokenizer,
    data_path: str | os.PathLike,
    max_source_length: int = 64,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    limit: int | None = None,
    style: str = "mindformers_v3",
    predictions_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Generate (greedy) for every eval record and score the generations against the references."""
    from tqdm import tqdm

    from glm3.data import load_adgen, preprocess_eval

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records, report = load_adgen(data_path)
    examples, skipped = preprocess_eval(records[:limit] if limit else records, tokenizer, max_source_length, style)
    if not examples:
        raise ValueError(f"{data_path}: no usable eval records ({report.describe()})")
    predictions = []
    stops = set(tokenizer.stop_token_ids) | {tokenizer.pad_id}
    for start in tqdm(range(0, len(examples), batch_size), desc="adgen eval", unit="batch", disable=not progress):
        batch = examples[start : start + batch_size]
        out = generate(model, [e.prompt_ids for e in batch], max_new_tokens=max_new_tokens, do_sample=False)
        width = max(len(e.prompt_ids) for e in batch)
        for row in out:
            new = [int(t) for t in row[width:]]
            cut = next((i for i, t in enumerate(new) if t in stops), len(new))
            predictions.append(tokenizer.decode(new[:cut]).strip())
    references = [e.reference for e in examples]
    metrics = {
        **adgen_scores(predictions, references),
        "examples": len(examples),
        "skipped": skipped,
        "max_new_tokens": max_new_tokens,
    }
    if predictions_path is not None:
        lines = [
            json.dumps({"prediction": p, "reference": r}, ensure_ascii=False) for p, r in zip(predictions, references)
        ]
        atomic_write_text(predictions_path, "\n".join(lines) + "\n")
    return metrics
