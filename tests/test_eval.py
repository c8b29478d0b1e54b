"""ADGEN evaluation: the character-level BLEU-4/ROUGE scorer on hand-worked cases, and a run on a tiny model."""

import json
import subprocess
import sys

import pytest

from conftest import SAMPLE
from glm3.eval import adgen_scores, evaluate_adgen


def test_scores_on_hand_worked_cases():
    assert adgen_scores(["黑色长裙"], ["黑色长裙"]) == {
        "bleu-4": 100.0,
        "rouge-1": 100.0,
        "rouge-2": 100.0,
        "rouge-l": 100.0,
    }
    # "ABCD" against "ABCE": 3 of 4 characters, 2 of 3 bigrams, longest common subsequence 3.
    # BLEU-4: n-gram precisions 3/4, 2/3, 1/2 and 0/1; smoothing method 3 turns the 0/1 into 1/2;
    # equal lengths, so no brevity penalty: (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = 0.125 ** 0.25 = 0.594604.
    s = adgen_scores(["A B C D"], ["ABCE"])  # spaces do not count
    assert s["rouge-1"] == pytest.approx(75.0, abs=1e-3)
    assert s["rouge-2"] == pytest.approx(66.6667, abs=1e-3)
    assert s["rouge-l"] == pytest.approx(75.0, abs=1e-3)
    assert s["bleu-4"] == pytest.approx(59.4604, abs=1e-3)
    # Means over examples; an empty generation scores zero.
    both = adgen_scores(["黑色长裙", ""], ["黑色长裙", "白色"])
    assert both == {"bleu-4": 50.0, "rouge-1": 50.0, "rouge-2": 50.0, "rouge-l": 50.0}
    with pytest.raises(ValueError, match="2 predictions for 1"):
        adgen_scores(["a", "b"], ["a"])


def test_evaluate_on_a_tiny_model_writes_predictions(tiny_model, tokenizer, tmp_path):
    metrics = evaluate_adgen(
        tiny_model,
        tokenizer,
        SAMPLE,
        max_source_length=32,
        max_new_tokens=8,
        batch_size=3,
        limit=5,
        predictions_path=tmp_path / "pred.jsonl",
        progress=False,
    )
    assert metrics["examples"] == 5 and set(metrics) >= {"bleu-4", "rouge-1", "rouge-2", "rouge-l"}
    assert all(0.0 <= metrics[k] <= 100.0 for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"))
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text(encoding="utf-8").splitlines()]
    references = [json.loads(line)["summary"] for line in open(SAMPLE, encoding="utf-8").read().splitlines()[:5]]
    assert [r["reference"] for r in rows] == references
    # The scores are those of the predictions it wrote.
    again = adgen_scores([r["prediction"] for r in rows], references)
    assert all(metrics[k] == again[k] for k in again)


def test_cli_eval_adgen(tiny_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "glm3.cli",
            "eval",
            "adgen",
            "--model",
            tiny_dir,
            "--data",
            SAMPLE,
            "--limit",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path / "m.json"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "m.json").read_text())["examples"] == 2
