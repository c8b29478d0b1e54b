"""`glm3` export, infer: MindIR graphs and running them."""

from __future__ import annotations

import dataclasses
import json
import sys

from glm3.cli import common
from glm3.deploy.settings import ExportSettings


def cmd_export(args) -> int:
    from glm3.deploy.export import export_model

    if args.dynamic_batch and args.batch_size is not None:
        raise ValueError("--batch-size and --dynamic-batch exclude each other")
    settings = common.settings_from_args(ExportSettings, args, args.export_flags)
    if args.dynamic_batch:
        settings = dataclasses.replace(settings, batch_size=None)
    common.setup_mindspore("graph")
    dst = export_model(args.model, args.dst, settings, overwrite=args.overwrite)
    batch = settings.batch_size
    print(
        f"exported prefill and decode graphs ({'dynamic' if batch is None else batch} batch, prompt "
        f"{settings.prompt_length}, cache {settings.seq_length or 'model seq_length'}) to {dst}"
    )
    return 0


def cmd_infer(args) -> int:
    from glm3.deploy.infer import PROMPT_MARKER, MindIRRunner
    from glm3.modeling.tokenizer import load_tokenizer

    common.setup_mindspore("graph")
    runner, tok = MindIRRunner(args.model), load_tokenizer(args.model)
    options = common.generation_kwargs(args)

    def answer(texts):
        outputs = runner.generate([common.prompt_ids(tok, t, args.chat) for t in texts], **options)
        return [tok.decode([t for t in out if t not in runner.config.stop_token_ids]) for out in outputs]

    if args.prompt:
        for text, reply in zip(args.prompt, answer(args.prompt)):
            print(json.dumps({"prompt": text, "text": reply}, ensure_ascii=False) if args.json else reply)
        return 0
    while True:  # interactive, like MindFormers' inference tool
        print(PROMPT_MARKER, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "exit":
            return 0
        if line.strip():
            print(answer([line.rstrip("\n")])[0], flush=True)


def register(sub) -> None:
    """export, infer: MindIR graphs and running them."""
    p = sub.add_parser(
        "export",
        help="export a model to MindIR: a prefill and a one-token decode graph",
        description="The KV cache is a graph input/output (see glm3.deploy.export). Prompts are left-padded "
        "to --prompt-length; the cache holds --seq-length positions.",
    )
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--dst", required=True, help="output directory")
    export_flags = common.add_settings_flags(p, ExportSettings)
    p.add_argument("--dynamic-batch", action="store_true", help="a dynamic batch dimension instead of --batch-size")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_export, export_flags=export_flags)

    p = sub.add_parser(
        "infer",
        help="generate with an exported model (MindIR), interactively or for --prompt",
        description="Without --prompt: prints 'Please enter your predict data:', answers each line, "
        "and stops at 'exit' or end of input.",
    )
    p.add_argument("--model", required=True, help="export directory (glm3 export)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat: generated in batches of the export's size)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat turn")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    common.add_generation_args(p, sample_default=False)
    p.set_defaults(func=cmd_infer)
