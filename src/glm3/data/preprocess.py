"""Tokenizing ADGEN records for training and evaluation, in two exact formats.

`mindformers_v3` (the default; what MindFormers' ADGEN dataset config `version: 3` produces):
    prompt  = [gMASK, sop] + sp(content), cut so the prompt has at most max_source_length ids
    answer  = sp(summary)[:max_target_length]
    input   = prompt + answer + [eos], right-padded with pad (0) to max_source + max_target + 1
    labels  = [pad] * (len(prompt) - 1) + answer + [eos], padded the same way, ALREADY SHIFTED:
              labels[i] is the token that must follow input[i]; pad labels become -100 when
              ignore_pad_token_for_loss (the default).
`chat` (the ChatGLM3 chat template, as THUDM's fine-tuning demo trains):
    prompt  = [gMASK, sop, <|user|>] + sp("\n") + sp(content) + [<|assistant|>]  (content cut to fit)
    answer  = (sp("\n") + sp(summary))[:max_target_length] + [eos]
    labels  are shifted the same way and cover only the answer (what the model generates after
              <|assistant|>); everything else is -100.
Records whose content or summary is blank are skipped and counted. Eval examples keep the prompt ids
and the reference text.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from glm3.modeling.tokenizer import ChatGLM3Tokenizer

IGNORE_INDEX = -100
PREPROCESSORS = ("mindformers_v3", "chat")


class PreprocessError(ValueError):
    pass


@dataclasses.dataclass
class TrainExample:
    input_ids: np.ndarray  # int32 [max_source + max_target + 1]
    labels: np.ndarray  # int32, same length, already shifted


@dataclasses.dataclass
class EvalExample:
    prompt_ids: list[int]
    reference: str


def check_lengths(seq_length: int, max_source_length: int, max_target_length: int) -> int:
    """The padded example length, which seq_length must equal (MindFormers' recipe: 64 + 128 + 1 = 193)."""
    if max_source_length < 3 or max_target_length < 1:
        raise PreprocessError(
            f"max_source_length must be >= 3 and max_target_length >= 1, got "
            f"{max_source_length} and {max_target_length}"
        )
    total = max_source_length + max_target_length + 1
    if seq_length != total:
        raise PreprocessError(
            f"seq_length {seq_length} must equal max_source_length + max_target_length + 1 "
            f"= {max_source_length} + {max_target_length} + 1 = {total}"
        )
    return total


def _prompt(tok: ChatGLM3Tokenizer, content: str, max_source_length: int, style: str) -> list[int]:
    head = [tok.get_command("[gMASK]"), tok.get_command("sop")]
    tail: list[int] = []
    if style == "chat":
        head += [tok.get_command("<|user|>")] + tok.encode("\n")
        tail = [tok.get_command("<|assistant|>")]
    room = max_source_length - len(head) - len(tail)
    if room < 0:
        raise PreprocessError(
            f"max_source_length {max_source_length} cannot hold the {style} prompt's "
            f"{len(head) + len(tail)} fixed tokens"
        )
    return head + tok.encode(content)[:room] + tail


def _answer(tok: ChatGLM3Tokenizer, summary: str, max_target_length: int, style: str) -> list[int]:
    ids = (tok.encode("\n") if style == "chat" else []) + tok.encode(summary)
    return ids[:max_target_length]


def _usable(record: dict[str, str]) -> bool:
    return bool(record["content"].strip()) and bool(record["summary"].strip())


def preprocess_train(
    records: list[dict[str, str]],
    tok: ChatGLM3Tokenizer,
    max_source_length: int = 64,
    max_target_length: int = 128,
    seq_length: int = 193,
    style: str = "mindformers_v3",
    ignore_pad_token_for_loss: bool = True,
) -> tuple[list[TrainExample], int]:
    """(examples, skipped): fixed-length training examples; records with a blank field are skipped."""
    if style not in PREPROCESSORS:
        raise PreprocessError(f"unknown preprocessing {style!r}; choose one of {', '.join(PREPROCESSORS)}")
    total = check_lengths(seq_length, max_source_length, max_target_length)
    pad, eos = tok.pad_id, tok.eos_id
    examples, skipped = [], 0
    for record in records:
        if not _usable(record):
            skipped += 1
            continue
        prompt = _prompt(tok, record["content"], max_source_length, style)
        answer = _answer(tok, record["summary"], max_target_length, style)
        input_ids = prompt + answer + [eos]
        if style == "mindformers_v3":
            labels = [pad] * (len(prompt) - 1) + answer + [eos]
            if ignore_pad_token_for_loss:
                labels = [IGNORE_INDEX if t == pad else t for t in labels]
        else:
            labels = [IGNORE_INDEX] * (len(prompt) - 1) + answer + [eos]
        input_ids += [pad] * (total - len(input_ids))
        labels += [IGNORE_INDEX if (ignore_pad_token_for_loss or style == "chat") else pad] * (total - len(labels))
        examples.append(TrainExample(np.asarray(input_ids, np.int32), np.asarray(labels, np.int32)))
    return examples, skipped


def preprocess_eval(
    records: list[dict[str, str]], tok: ChatGLM3Tokenizer, max_source_length: int = 64, style: str = "mindformers_v3"
) -> tuple[list[EvalExample], int]:
    """(examples, skipped): prompt ids (as the model sees them before answering) and the reference text."""
    if style not in PREPROCESSORS:
        raise PreprocessError(f"unknown preprocessing {style!r}; choose one of {', '.join(PREPROCESSORS)}")
    examples, skipped = [], 0
    for record in records:
        if not _usable(record):
            skipped += 1
            continue
        examples.append(EvalExample(_prompt(tok, record["content"], max_source_length, style), record["summary"]))
    return examples, skipped
