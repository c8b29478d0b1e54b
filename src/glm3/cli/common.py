"""Arguments and helpers the command groups share."""

from __future__ import annotations

import argparse
import dataclasses
import json

from glm3.dtypes import DTYPE_CHOICES


def setup_mindspore(mode: str) -> None:
    from glm3.weights.loading import setup_mindspore

    setup_mindspore(mode)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (ours or HuggingFace layout)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="weight storage dtype; auto (default): the checkpoint's own. Compute is float32 on CPU, "
        "half-precision weights converted per layer on the fly",
    )
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"], help="MindSpore execution mode")
    p.add_argument(
        "--kernels",
        default="auto",
        choices=["auto", "plain", "cpu", "ascend"],
        help="kernel backend (see glm3.kernels)",
    )


def add_generation_args(p: argparse.ArgumentParser, sample_default: bool) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--sample",
        dest="do_sample",
        action="store_true",
        default=sample_default,
        help="sample (default for chat: top_p 0.8, temperature 0.8)",
    )
    group.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.8 if sample_default else 1.0,
        help="sampling: divide the logits by this (> 0; lower is more deterministic)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=0.8 if sample_default else 1.0,
        help="sampling: keep the most likely tokens whose probabilities sum to this (0 < p <= 1; 1: all)",
    )
    p.add_argument("--top-k", type=int, default=0, help="sampling: keep the k most likely tokens only (0: all)")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide the scores of tokens already in the text by this (> 1 discourages repeats; 1: off)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed, same output)")


def generation_kwargs(args) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.do_sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }


def load_model_and_tokenizer(args):
    import glm3

    setup_mindspore(args.mode)
    model = glm3.load_model(args.model, dtype=args.dtype, kernels_backend=args.kernels)
    return model, glm3.load_tokenizer(args.model)


def prompt_ids(tok, text: str, chat: bool) -> list[int]:
    """A user chat turn awaiting the assistant, or plain text after the [gMASK] sop prefix."""
    if chat:
        return tok.build_chat_input(text)["input_ids"][0]
    return [tok.get_command("[gMASK]"), tok.get_command("sop")] + tok.encode(text)


def load_with_adapter(args):
    """The model (with --adapter applied, if given) and its tokenizer."""
    model, tok = load_model_and_tokenizer(args)
    if args.adapter:
        from glm3.train.lora import load_adapter

        load_adapter(model, args.adapter)
    return model, tok


def report_metrics(metrics: dict, out: str | None) -> int:
    from glm3.io import atomic_write_text

    text = json.dumps(metrics, indent=2, ensure_ascii=False)
    if out:
        atomic_write_text(out, text + "\n")
    print(text)
    return 0


_TYPES = {"int": int, "float": float, "str": str}


def _flag_type(annotation: str):
    """int, float, str or bool of a settings field's annotation ("int", "str | None", ...)."""
    base = annotation.replace(" | None", "").strip()
    return bool if base == "bool" else _TYPES.get(base, str)


def add_settings_flags(p: argparse.ArgumentParser, cls, prefix: str = "") -> list[tuple[str, str]]:
    """One flag per field of a settings dataclass (see glm3.settings), its help from the field's description;
    unset flags stay None so --config values and the defaults show through. Returns [(dest, field name)]."""
    added = []
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if not meta.get("cli", True):
            continue
        flag, dest = "--" + (prefix + field.name).replace("_", "-"), prefix + field.name
        default = "" if field.default in (dataclasses.MISSING, None) else f" (default {field.default})"
        kind = _flag_type(field.type)
        if kind is bool:
            p.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=meta["help"] + default
            )
        elif field.name == "targets":  # LoRA's targets: comma-separated
            p.add_argument(
                flag, dest=dest, help=meta["help"] + f" (comma-separated; default {','.join(field.default)})"
            )
        else:
            p.add_argument(flag, dest=dest, type=kind, choices=meta.get("choices"), help=meta["help"] + default)
        added.append((dest, field.name))
    return added


def settings_from_args(cls, args, flags: list[tuple[str, str]]):
    """An instance of settings dataclass `cls`: the flags given (add_settings_flags' list), defaults elsewhere."""
    return cls(**{name: getattr(args, dest) for dest, name in flags if getattr(args, dest) is not None})
