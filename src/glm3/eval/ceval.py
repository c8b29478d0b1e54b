"""C-Eval: 52 subjects of multiple-choice questions in four categories, scored from the answer-letter logits.

Data layout (the official release): `<root>/{dev,val,test}/<subject>_<split>.csv` with columns
id, question, A, B, C, D, answer[, explanation]; test has no answers. dev holds the few-shot examples.

Prompt (ChatGLM3 chat format): one user turn
    以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\n\n
    [k solved dev questions: question\nA. ..\nB. ..\nC. ..\nD. ..\n答案：X\n\n]
    question\nA. ..\nB. ..\nC. ..\nD. ..
then `<|assistant|>` and "\n答案：" so that the next token is the answer letter. The prediction is the letter
whose token has the largest logit at that position (the other 65k tokens do not compete).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from glm3.io import atomic_write_text

LETTERS = ("A", "B", "C", "D")
SPLITS = ("dev", "val", "test")
CATEGORIES = ("STEM", "Social Science", "Humanities", "Other")

# subject -> (English name, Chinese name, category), the 52 subjects of C-Eval.
SUBJECTS: dict[str, tuple[str, str, str]] = {
    "computer_network": ("Computer Network", "计算机网络", "STEM"),
    "operating_system": ("Operating System", "操作系统", "STEM"),
    "computer_architecture": ("Computer Architecture", "计算机组成", "STEM"),
    "college_programming": ("College Programming", "大学编程", "STEM"),
    "college_physics": ("College Physics", "大学物理", "STEM"),
    "college_chemistry": ("College Chemistry", "大学化学", "STEM"),
    "advanced_mathematics": ("Advanced Mathematics", "高等数学", "STEM"),
    "probability_and_statistics": ("Probability and Statistics", "概率统计", "STEM"),
    "discrete_mathematics": ("Discrete Mathematics", "离散数学", "STEM"),
    "electrical_engineer": ("Electrical Engineer", "注册电气工程师", "STEM"),
    "metrology_engineer": ("Metrology Engineer", "注册计量师", "STEM"),
    "high_school_mathematics": ("High School Mathematics", "高中数学", "STEM"),
    "high_school_physics": ("High School Physics", "高中物理", "STEM"),
    "high_school_chemistry": ("High School Chemistry", "高中化学", "STEM"),
    "high_school_biology": ("High School Biology", "高中生物", "STEM"),
    "middle_school_mathematics": ("Middle School Mathematics", "初中数学", "STEM"),
    "middle_school_biology": ("Middle School Biology", "初中生物", "STEM"),
    "middle_school_physics": ("Middle School Physics", "初中物理", "STEM"),
    "middle_school_chemistry": ("Middle School Chemistry", "初中化学", "STEM"),
    "veterinary_medicine": ("Veterinary Medicine", "兽医学", "STEM"),
    "college_economics": ("College Economics", "大学经济学", "Social Science"),
    "business_administration": ("Business Administration", "工商管理", "Social Science"),
    "marxism": ("Marxism", "马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": ("Mao Zedong Thought", "毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    "education_science": ("Education Science", "教育学", "Social Science"),
    "teacher_qualification": ("Teacher Qualification", "教师资格", "Social Science"),
    "high_school_politics": ("High School Politics", "高中政治", "Social Science"),
    "high_school_geography": ("High School Geography", "高中地理", "Social Science"),
    "middle_school_politics": ("Middle School Politics", "初中政治", "Social Science"),
    "middle_school_geography": ("Middle School Geography", "初中地理", "Social Science"),
    "modern_chinese_history": ("Modern Chinese History", "近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": ("Ideological and Moral Cultivation", "思想道德修养与法律基础", "Humanities"),
    "logic": ("Logic", "逻辑学", "Humanities"),
    "law": ("Law", "法学", "Humanities"),
    "chinese_language_and_literature": ("Chinese Language and Literature", "中国语言文学", "Humanities"),
    "art_studies": ("Art Studies", "艺术学", "Humanities"),
    "professional_tour_guide": ("Professional Tour Guide", "导游资格", "Humanities"),
    "legal_professional": ("Legal Professional", "法律职业资格", "Humanities"),
    "high_school_chinese": ("High School Chinese", "高中语文", "Humanities"),
    "high_school_history": ("High School History", "高中历史", "Humanities"),
    "middle_school_history": ("Middle School History", "初中历史", "Humanities"),
    "civil_servant": ("Civil Servant", "公务员", "Other"),
    "sports_science": ("Sports Science", "体育学", "Other"),
    "plant_protection": ("Plant Protection", "植物保护", "Other"),
    "basic_medicine": ("Basic Medicine", "基础医学", "Other"),
    "clinical_medicine": ("Clinical Medicine", "临床医学", "Other"),
    "urban_and_rural_planner": ("Urban and Rural Planner", "注册城乡规划师", "Other"),
    "accountant": ("Accountant", "注册会计师", "Other"),
    "fire_engineer": ("Fire Engineer", "注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": (
        "Environmental Impact Assessment Engineer",
        "环境影响评价工程师",
        "Other",
    ),
    "tax_accountant": ("Tax Accountant", "税务师", "Other"),
    "physician": ("Physician", "医师资格", "Other"),
}


class CevalError(ValueError):
    pass


@dataclasses.dataclass
class Question:
    id: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str | None  # None in the test split


def read_split(root: str | os.PathLike, subject: str, split: str) -> list[Question]:
    """The questions of one subject and split; a malformed file is an error naming it and the row."""
    if subject not in SUBJECTS:
        raise CevalError(f"unknown C-Eval subject {subject!r}")
    path = os.path.join(os.fspath(root), split, f"{subject}_{split}.csv")
    if not os.path.isfile(path):
        raise CevalError(f"{path} not found (expected the C-Eval layout <root>/{split}/{subject}_{split}.csv)")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        needed = {"id", "question", *LETTERS} | ({"answer"} if split != "test" else set())
        missing = needed - set(reader.fieldnames or [])
        if missing:
            raise CevalError(f"{path}: missing column(s) {sorted(missing)}")
        questions = []
        for row_number, row in enumerate(reader, 2):
            answer = (row.get("answer") or "").strip() or None
            if split != "test" and answer not in LETTERS:
                raise CevalError(f"{path}:{row_number}: answer {answer!r} is not one of A, B, C, D")
            questions.append(Question(row["id"], row["question"], tuple(row[c] for c in LETTERS), answer))
    return questions


def available_subjects(root: str | os.PathLike, split: str) -> list[str]:
    folder = os.path.join(os.fspath(root), split)
    if not os.path.isdir(folder):
        raise CevalError(f"no {split}/ folder in {root}")
    found = sorted(name[: -len(f"_{split}.csv")] for name in os.listdir(folder) if name.endswith(f"_{split}.csv"))
    unknown = [s for s in found if s not in SUBJECTS]
    if unknown:
        raise CevalError(f"{folder}: files for unknown subjects {unknown}")
    return found


def format_question(q: Question, with_answer: bool) -> str:
    text = q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    return text + (f"\n答案：{q.answer}\n\n" if with_answer else "")


def build_prompt(subject: str, question: Question, shots: Sequence[Question] = ()) -> str:
    header = f"以下是中国关于{SUBJECTS[subject][1]}考试的单项选择题，请选出其中的正确答案。\n\n"
    return header + "".join(format_question(s, True) for s in shots) + format_question(question, False)


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Chat-format ids ending where the model writes the answer letter."""
    ids = tokenizer.build_chat_input(text)["input_ids"][0]
    return ids + tokenizer.encode("\n答案：")


def letter_token_ids(tokenizer) -> list[int]:
    """The token of each answer letter as it follows "答案：" (one token each, all different)."""
    prefix = tokenizer.encode("答案：")
    ids = []
    for letter in LETTERS:
        full = tokenizer.encode("答案：" + letter)
        if full[: len(prefix)] != prefix or len(full) != len(prefix) + 1:
            raise CevalError(f"the tokenizer does not encode answer letter {letter!r} as one token after '答案：'")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise CevalError(f"answer letters share tokens: {ids}")
    return ids


LogitsSource = Callable[[list[list[int]]], np.ndarray]  # prompt id lists -> [batch, vocab] last-position logits


def eager_logits(model) -> LogitsSource:
    """Last-position logits of a loaded model for a left-padded batch."""
    from mindspore import Tensor

    from glm3.runtime.generation import as_batch

    def source(batch: list[list[int]]) -> np.ndarray:
        ids, mask = as_batch(batch, None, model.config.pad_token_id)
        logits = model(Tensor(ids.astype(np.int32)), Tensor(mask.astype(np.int32)))
        return logits.asnumpy()[:, -1]

    return source


def evaluate_ceval(
    logits: LogitsSource,
    tokenizer,
    root: str | os.PathLike,
    split: str = "val",
    shots: int = 0,
    subjects: Sequence[str] | None = None,
    batch_size: int = 8,
    predictions_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Accuracy per subject, per category and on average (the mean over subjects, as C-Eval reports it).

    For the test split (no answers) only predictions are produced; write them with `predictions_path`
    ({subject: {id: letter}}, the submission format)."""
    from tqdm import tqdm

    if split not in SPLITS:
        raise CevalError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= shots <= 5:
        raise CevalError(f"shots must be 0..5, got {shots}")
    subjects = list(subjects) if subjects else available_subjects(root, split)
    letters = letter_token_ids(tokenizer)
    work = []  # (subject, question, prompt ids)
    for subject in subjects:
        examples = read_split(root, subject, "dev")[:shots] if shots else []
        if len(examples) < shots:
            raise CevalError(f"{subject}: {shots} shots asked, dev has {len(examples)}")
        for q in read_split(root, subject, split):
            work.append((subject, q, prompt_ids(tokenizer, build_prompt(subject, q, examples))))
    # Similar lengths together: less padding per batch.
    order = sorted(range(len(work)), key=lambda i: len(work[i][2]))
    predicted: dict[int, str] = {}
    for start in tqdm(range(0, len(order), batch_size), desc=f"C-Eval {split}", unit="batch", disable=not progress):
        chunk = order[start : start + batch_size]
        scores = logits([work[i][2] for i in chunk])[:, letters]
        for i, best in zip(chunk, scores.argmax(-1)):
            predicted[i] = LETTERS[int(best)]
    predictions: dict[str, dict[str, str]] = {}
    for i, (subject, q, _) in enumerate(work):
        predictions.setdefault(subject, {})[q.id] = predicted[i]
    if predictions_path is not None:
        atomic_write_text(predictions_path, json.dumps(predictions, ensure_ascii=False, indent=1) + "\n")
    metrics: dict = {"split": split, "shots": shots, "questions": len(work), "subjects": {}}
    if split == "test":
        return metrics
    per_subject: dict[str, list[bool]] = {}
    for i, (subject, q, _) in enumerate(work):
        per_subject.setdefault(subject, []).append(predicted[i] == q.answer)
    for subject, hits in per_subject.items():
        name, _, category = SUBJECTS[subject]
        metrics["subjects"][subject] = {
            "name": name,
            "category": category,
            "questions": len(hits),
            "accuracy": round(100.0 * sum(hits) / len(hits), 4),
        }
    metrics["categories"] = {}
    for category in CATEGORIES:
        accs = [s["accuracy"] for s in metrics["subjects"].values() if s["category"] == category]
        if accs:
            metrics["categories"][category] = round(float(np.mean(accs)), 4)
    metrics["average"] = round(float(np.mean([s["accuracy"] for s in metrics["subjects"].values()])), 4)
    metrics["overall"] = round(100.0 * sum(sum(h) for h in per_subject.values()) / len(work), 4)
    return metrics
