"""C-Eval: the reader, the prompt, the scorer with stand-in logits sources, and a tiny real model against a
brute-force recomputation of its answers."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from mindspore import Tensor

from conftest import REPO
from glm3.eval.ceval import (
    CATEGORIES,
    SUBJECTS,
    CevalError,
    build_prompt,
    eager_logits,
    evaluate_ceval,
    letter_token_ids,
    prompt_ids,
    read_split,
)

CEVAL = os.path.join(REPO, "data", "ceval_sample")
SAMPLE_SUBJECTS = ["civil_servant", "high_school_geography", "high_school_history", "high_school_physics"]


def answers(split="val"):
    """{subject: [answer letters]} read straight from the CSV files."""
    out = {}
    for subject in SAMPLE_SUBJECTS:
        with open(os.path.join(CEVAL, split, f"{subject}_{split}.csv"), encoding="utf-8") as f:
            out[subject] = [row["answer"] for row in csv.DictReader(f)]
    return out


def test_subject_map_has_52_subjects_in_four_categories():
    counts = {c: sum(1 for _, _, cat in SUBJECTS.values() if cat == c) for c in CATEGORIES}
    assert len(SUBJECTS) == 52 and counts == {"STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}


def test_reader_and_prompt():
    q = read_split(CEVAL, "civil_servant", "val")[0]
    assert (q.id, q.question, q.choices, q.answer) == ("0", "3、6、9、12，下一个数是", ("13", "14", "15", "16"), "C")
    assert all(t.answer is None for t in read_split(CEVAL, "civil_servant", "test"))
    shots = read_split(CEVAL, "civil_servant", "dev")[:1]
    assert build_prompt("civil_servant", q, shots) == (
        "以下是中国关于公务员考试的单项选择题，请选出其中的正确答案。\n\n"
        "我国的根本大法是\nA. 刑法\nB. 民法典\nC. 宪法\nD. 行政法\n答案：C\n\n"
        "3、6、9、12，下一个数是\nA. 13\nB. 14\nC. 15\nD. 16"
    )


def official_ids(tokenizer, text: str) -> list[int]:
    """C-Eval's zero/few-shot prompt as a ChatGLM3 chat turn, spelled out token by token from the format: [gMASK]
    sop, the user turn (<|user|>, empty metadata's "\n", the prompt), then <|assistant|> and the answer cue
    "\n答案：" after which the model writes the letter (MindFormers' C-Eval prompt ends with "答案：")."""
    command = tokenizer.get_command
    user_turn = [command("<|user|>"), *tokenizer.encode("\n"), *tokenizer.encode(text)]
    return [command("[gMASK]"), command("sop"), *user_turn, command("<|assistant|>"), *tokenizer.encode("\n答案：")]


def test_the_prompt_is_c_evals_format_as_a_chatglm3_turn(tokenizer):
    q = read_split(CEVAL, "civil_servant", "val")[0]
    shots = read_split(CEVAL, "civil_servant", "dev")[:1]
    text = (
        "以下是中国关于公务员考试的单项选择题，请选出其中的正确答案。\n\n"
        "我国的根本大法是\nA. 刑法\nB. 民法典\nC. 宪法\nD. 行政法\n答案：C\n\n"
        "3、6、9、12，下一个数是\nA. 13\nB. 14\nC. 15\nD. 16"
    )
    ids = prompt_ids(tokenizer, build_prompt("civil_servant", q, shots))
    assert ids == official_ids(tokenizer, text)
    assert tokenizer.decode(ids[-len(tokenizer.encode("\n答案：")) :]).endswith("答案：")


def test_reader_errors(tmp_path):
    root = tmp_path / "ceval"
    shutil.copytree(CEVAL, root)
    path = root / "val" / "civil_servant_val.csv"
    path.write_text(path.read_text(encoding="utf-8").replace(",C\n", ",E\n", 1), encoding="utf-8")
    with pytest.raises(CevalError, match=r"civil_servant_val.csv:2: answer 'E'"):
        read_split(root, "civil_servant", "val")
    path.write_text("id,question,A,B\n0,q,a,b\n", encoding="utf-8")
    with pytest.raises(CevalError, match=r"missing column\(s\) \['C', 'D', 'answer'\]"):
        read_split(root, "civil_servant", "val")
    with pytest.raises(CevalError, match="unknown C-Eval subject"):
        read_split(root, "cooking", "val")
    (root / "val" / "cooking_val.csv").write_text("id,question,A,B,C,D,answer\n", encoding="utf-8")
    with pytest.raises(CevalError, match="unknown subjects"):
        evaluate_ceval(lambda b: None, None, root, "val")


def _decode_source(tokenizer, choose, vocab=2048):
    """A stand-in for the model: decodes each prompt and puts the largest logit on the letter `choose` picks."""
    letters = letter_token_ids(tokenizer)
    by_question = {q.question: (s, q) for s in SAMPLE_SUBJECTS for q in read_split(CEVAL, s, "val")}

    def source(batch):
        out = np.zeros((len(batch), vocab), np.float32)
        out[:, 7] = 50.0  # a non-letter token with the largest logit overall must not matter
        for row, ids in enumerate(batch):
            text = tokenizer.decode(ids)
            last_question = text.rsplit("\n\n", 1)[-1].split("\nA. ")[0]
            _, q = by_question[last_question]
            out[row, letters["ABCD".index(choose(q))]] = 10.0
        return out

    return source


def test_planted_answers_score_100_and_always_a_scores_the_share_of_a(tokenizer):
    perfect = evaluate_ceval(
        _decode_source(tokenizer, lambda q: q.answer), tokenizer, CEVAL, "val", shots=5, batch_size=3, progress=False
    )
    assert perfect["average"] == 100.0 and perfect["questions"] == 16
    assert all(v == 100.0 for v in perfect["categories"].values())
    always_a = evaluate_ceval(
        _decode_source(tokenizer, lambda q: "A"), tokenizer, CEVAL, "val", shots=0, batch_size=4, progress=False
    )
    truth = answers()
    for subject, letters in truth.items():
        assert always_a["subjects"][subject]["accuracy"] == pytest.approx(100.0 * letters.count("A") / len(letters))
    all_letters = [x for letters in truth.values() for x in letters]
    assert always_a["overall"] == pytest.approx(100.0 * all_letters.count("A") / len(all_letters))
    by_category = {SUBJECTS[s][2]: 100.0 * v.count("A") / len(v) for s, v in truth.items()}
    assert always_a["categories"] == pytest.approx(by_category)


def test_tiny_model_accuracy_equals_a_brute_force_recomputation(tiny_model, tokenizer, tmp_path):
    metrics = evaluate_ceval(
        eager_logits(tiny_model),
        tokenizer,
        CEVAL,
        "val",
        shots=1,
        batch_size=5,
        predictions_path=tmp_path / "pred.json",
        progress=False,
    )
    letters = letter_token_ids(tokenizer)
    hits, total = {}, 0
    for subject in SAMPLE_SUBJECTS:  # one question at a time, no padding, full forward
        shots = read_split(CEVAL, subject, "dev")[:1]
        for q in read_split(CEVAL, subject, "val"):
            ids = np.array([official_ids(tokenizer, build_prompt(subject, q, shots))], np.int32)
            logits = tiny_model(Tensor(ids)).asnumpy()[0, -1]
            hits.setdefault(subject, []).append("ABCD"[int(np.argmax(logits[letters]))] == q.answer)
            total += 1
    for subject, h in hits.items():
        assert metrics["subjects"][subject]["accuracy"] == pytest.approx(100.0 * sum(h) / len(h))
    assert metrics["average"] == pytest.approx(np.mean([100.0 * sum(h) / len(h) for h in hits.values()]))
    predictions = json.loads((tmp_path / "pred.json").read_text(encoding="utf-8"))
    assert sorted(predictions) == SAMPLE_SUBJECTS and sum(len(v) for v in predictions.values()) == total


def test_cli_eval_ceval_test_split_writes_submission(tiny_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "glm3.cli",
            "eval",
            "ceval",
            "--model",
            tiny_dir,
            "--data",
            CEVAL,
            "--split",
            "test",
            "--predictions",
            str(tmp_path / "sub.json"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    submission = json.loads((tmp_path / "sub.json").read_text(encoding="utf-8"))
    assert {s: sorted(v) for s, v in submission.items()} == {s: ["0", "1", "2"] for s in SAMPLE_SUBJECTS}
    assert all(letter in "ABCD" for v in submission.values() for letter in v.values())


def test_exported_model_scores_like_the_eager_model(tiny_dir, tiny_model, tokenizer, tmp_path):
    from glm3.deploy.export import export_model
    from glm3.deploy.infer import MindIRRunner

    exported = MindIRRunner(export_model(tiny_dir, tmp_path / "exp", batch_size=4, prompt_length=224, seq_length=256))
    eager = evaluate_ceval(eager_logits(tiny_model), tokenizer, CEVAL, "val", shots=1, batch_size=4, progress=False)
    mindir = evaluate_ceval(exported.last_logits, tokenizer, CEVAL, "val", shots=1, batch_size=3, progress=False)
    assert mindir["subjects"] == eager["subjects"] and mindir["average"] == eager["average"]
