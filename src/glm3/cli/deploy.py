"""`glm3` export, infer: MindIR graphs and running them."""

from __future__ import annotations

import json
import sys

from glm3.cli import common
from glm3.runtime.block_manager import DEFAULT_BLOCK_SIZE, DEFAULT_NUM_BLOCKS


def cmd_export(args) -> int:
    from glm3.deploy.export import export_model

    common.setup_mindspore("graph")
    batch = None if args.dynamic_batch else args.batch_size
    dst = export_model(
        args.model,
        args.dst,
        batch_size=batch,
        prompt_length=args.prompt_length,
        seq_length=args.seq_length,
        paged=args.paged,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        fused_paged_attention=args.fused_paged_attention,
        overwrite=args.overwrite,
        weights=args.weights,
        dtype=args.dtype,
    )
    print(
        f"exported prefill and decode graphs ({'dynamic' if batch is None else batch} batch, prompt "
        f"{args.prompt_length}, cache {args.seq_length or 'model seq_length'}) to {dst}"
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
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=int, default=1, help="static batch size (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="a dynamic batch dimension instead")
    p.add_argument("--prompt-length", type=int, default=64, help="prefill width: the longest prompt the export takes")
    p.add_argument("--seq-length", type=int, help="KV cache length (default: the model's seq_length)")
    p.add_argument("--paged", action="store_true", help="a paged (block-table) KV cache instead of a static one")
    p.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="paged: tokens per cache block (default %(default)s)"
    )
    p.add_argument(
        "--num-blocks",
        type=int,
        default=DEFAULT_NUM_BLOCKS,
        help="paged: cache blocks shared by the batch (default %(default)s)",
    )
    p.add_argument(
        "--fused-paged-attention",
        action="store_true",
        help="paged: use MindSpore's PagedAttention operator (float16; runs in MindSpore Lite on "
        "Ascend, not in MindSpore)",
    )
    p.add_argument(
        "--weights",
        default="inputs",
        choices=["inputs", "embedded"],
        help="inputs (default): the graphs take the weights as inputs and the weights are stored once "
        "beside them (hard-linked from MODEL when possible); embedded: MindSpore's self-contained "
        "graphs, each with its own copy (for MindSpore Lite)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weight dtype of the export; auto (default): the model's own",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_export)

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
