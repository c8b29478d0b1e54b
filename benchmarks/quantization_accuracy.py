"""Accuracy of weight-only quantization, measured: a model (default: the pipeline's fine-tuned, merged model,
`make run`) against its 8- and 4-bit quantizations (`glm3 quantize`, groups of 32):

- logits: the largest absolute error and the RMS error relative to the logits' RMS, over ADGEN prompts;
- greedy agreement: the share of 256 greedy tokens equal to the float model's, and the first position that
  differs, per prompt;
- C-Eval: the share of questions whose predicted letter is the float model's, and both accuracies;
- ADGEN: BLEU-4 and ROUGE-1/2/L of greedy generations, float and quantized.

    .venv/bin/python benchmarks/quantization_accuracy.py [--model models/merged]
        [--adgen ../shared/data/AdvertiseGen/dev.json] [--limit 64] [--ceval data/ceval_sample]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prompts(tokenizer, path: str, count: int, max_tokens: int = 64) -> list[list[int]]:
    """Chat prompts of the first `count` ADGEN records (their `content`), as token ids."""
    from glm3.data import load_adgen

    records, _ = load_adgen(path)
    out = []
    for record in records[:count]:
        ids = tokenizer.build_chat_input(record["content"][:max_tokens])["input_ids"][0]
        out.append([int(t) for t in ids][-max_tokens:])
    return out


def measure(model_dir: str, tokenizer, args, work: str) -> dict:
    import mindspore as ms

    import glm3
    from glm3.eval import evaluate_adgen
    from glm3.eval.ceval import eager_logits, evaluate_ceval

    model = glm3.load_model(model_dir)
    ids = prompts(tokenizer, args.adgen, args.prompts)
    logits = [model(ms.Tensor(np.array([p], np.int32))).asnumpy()[0] for p in ids]
    greedy = [glm3.generate(model, np.array([p]), max_new_tokens=args.greedy_tokens, eos_token_id=[])[0, len(p) :]
              for p in ids]  # fmt: skip
    ceval_predictions = os.path.join(work, "ceval.json")
    ceval = evaluate_ceval(
        eager_logits(model), tokenizer, args.ceval, predictions_path=ceval_predictions, progress=False
    )
    with open(ceval_predictions, encoding="utf-8") as f:
        predicted = json.load(f)
    adgen = evaluate_adgen(
        model, tokenizer, args.adgen, max_source_length=64, max_new_tokens=64, limit=args.limit, progress=False
    )
    return {
        "logits": logits,
        "greedy": greedy,
        "ceval": ceval["average"],
        "ceval_predictions": predicted,
        "adgen": {k: v for k, v in adgen.items() if k.startswith(("bleu", "rouge"))},
    }


def compare(base: dict, quantized: dict) -> dict:
    errors = [np.abs(q - b).max() for b, q in zip(base["logits"], quantized["logits"])]
    rel = [np.sqrt(np.mean((q - b) ** 2)) / np.sqrt(np.mean(b**2)) for b, q in zip(base["logits"], quantized["logits"])]
    same = [float(np.mean(b == q)) for b, q in zip(base["greedy"], quantized["greedy"])]
    first = [int(np.argmax(b != q)) if (b != q).any() else len(b) for b, q in zip(base["greedy"], quantized["greedy"])]
    letters = [
        (letter, quantized["ceval_predictions"][subject][qid])
        for subject, answers in base["ceval_predictions"].items()
        for qid, letter in answers.items()
    ]
    return {
        "logits_max_abs_error": float(max(errors)),
        "logits_relative_rms_error": float(np.mean(rel)),
        "greedy_token_agreement": float(np.mean(same)),
        "greedy_first_difference": first,
        "ceval_prediction_agreement": float(np.mean([a == b for a, b in letters])),
        "ceval_questions": len(letters),
        "ceval_average": quantized["ceval"],
        "adgen": quantized["adgen"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.path.join(REPO, "models", "merged"), help="float model directory")
    parser.add_argument(
        "--adgen",
        default=os.environ.get(
            "GLM3_ADGEN_DEV", os.path.join(REPO, "..", "shared", "data", "AdvertiseGen", "dev.json")
        ),
        help="ADGEN records (GLM3_ADGEN_DEV)",
    )
    parser.add_argument("--limit", type=int, default=64, help="ADGEN records scored")
    parser.add_argument("--prompts", type=int, default=8, help="prompts for the logits and greedy comparisons")
    parser.add_argument("--greedy-tokens", type=int, default=256, help="greedy tokens compared per prompt")
    parser.add_argument("--ceval", default=os.path.join(REPO, "data", "ceval_sample"), help="C-Eval root")
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4], choices=[8, 4])
    args = parser.parse_args()
    import mindspore as ms

    import glm3

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    tokenizer = glm3.load_tokenizer(args.model)
    with tempfile.TemporaryDirectory() as work:
        base = measure(args.model, tokenizer, args, work)
        report = {
            "model": os.path.abspath(args.model),
            "float": {"ceval_average": base["ceval"], "adgen": base["adgen"]},
        }
        for bits in args.bits:
            dst = os.path.join(work, f"q{bits}")
            glm3.quantize_model(args.model, dst, bits, progress=False)
            report[f"q{bits}"] = compare(base, measure(dst, tokenizer, args, work))
    print(json.dumps({"benchmark": "quantization_accuracy", **report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
