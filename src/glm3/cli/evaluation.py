"""`glm3` eval ceval, eval adgen: benchmarks."""

from __future__ import annotations

import argparse
import os

from glm3.cli import common


def cmd_eval_ceval(args) -> int:
    from glm3.deploy.export import EXPORT_CONFIG
    from glm3.eval.ceval import eager_logits, evaluate_ceval

    if os.path.isfile(os.path.join(args.model, EXPORT_CONFIG)):  # an exported model: score with its prefill graph
        from glm3.deploy.infer import MindIRRunner
        from glm3.modeling.tokenizer import load_tokenizer

        common.setup_mindspore("graph")
        source, tok = MindIRRunner(args.model).last_logits, load_tokenizer(args.model)
    else:
        model, tok = common.load_with_adapter(args)
        source = eager_logits(model)
    subjects = args.subjects.split(",") if args.subjects else None
    metrics = evaluate_ceval(
        source,
        tok,
        args.data,
        split=args.split,
        shots=args.shots,
        subjects=subjects,
        batch_size=args.batch_size,
        predictions_path=args.predictions,
        progress=not args.quiet,
    )
    return common.report_metrics(metrics, args.out)


def cmd_eval_adgen(args) -> int:
    from glm3.eval import evaluate_adgen

    model, tok = common.load_with_adapter(args)
    metrics = evaluate_adgen(
        model,
        tok,
        args.data,
        max_source_length=args.max_source_length,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        limit=args.limit,
        style=args.preprocess,
        predictions_path=args.predictions,
        progress=not args.quiet,
    )
    return common.report_metrics(metrics, args.out)


def _add_eval_args(p: argparse.ArgumentParser, data_help: str, predictions_help: str) -> None:
    """What every `glm3 eval` benchmark takes: the model (plus an optional adapter), data and outputs."""
    common.add_model_args(p)
    p.add_argument("--adapter", help="LoRA adapter directory to apply to the model")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--batch-size", type=int, default=8, help="prompts scored or generated together (default 8)")
    p.add_argument("--out", help="metrics JSON file")
    p.add_argument("--predictions", help=predictions_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub) -> None:
    """eval ceval, eval adgen."""
    p = sub.add_parser(
        "eval",
        help="evaluate a model: `glm3 eval ceval` (C-Eval accuracy), `glm3 eval adgen` (BLEU-4, ROUGE on characters)",
    )
    eval_sub = p.add_subparsers(dest="benchmark", required=True, metavar="<benchmark>", help="which benchmark")
    p = eval_sub.add_parser(
        "ceval",
        help="C-Eval multiple choice: accuracy per subject, category and on average",
        description="Reads the official layout DATA/{dev,val,test}/<subject>_<split>.csv; prompts "
        "in ChatGLM3 chat format, zero- or few-shot (shots from dev); the prediction is the "
        "answer letter with the largest logit. The test split gives predictions only. --model "
        "is a model directory or an export directory (glm3 export: scored with its MindIR "
        "prefill graph).",
    )
    _add_eval_args(
        p, "C-Eval root (with dev/, val/, test/)", "predictions JSON ({subject: {id: letter}}, the submission format)"
    )
    p.add_argument(
        "--split", default="val", choices=["dev", "val", "test"], help="which split to score (test: predictions only)"
    )
    p.add_argument("--shots", type=int, default=0, help="solved dev questions in each prompt (0..5)")
    p.add_argument("--subjects", help="comma-separated subjects (default: every subject in the split)")
    p.set_defaults(func=cmd_eval_ceval)

    p = eval_sub.add_parser("adgen", help="generate for ADGEN records and score BLEU-4 and ROUGE-1/2/L")
    _add_eval_args(p, "ADGEN eval file", "JSON-lines file of predictions and references")
    p.add_argument("--max-source-length", type=int, default=64, help="prompt tokens kept at most")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per record at most")
    p.add_argument("--limit", type=int, help="score only the first N records")
    p.add_argument(
        "--preprocess",
        default="mindformers_v3",
        choices=["mindformers_v3", "chat"],
        help="prompt format: MindFormers' ADGEN format (default) or a chat turn",
    )
    p.set_defaults(func=cmd_eval_adgen)
