"""`glm3` merge, split, strategy: per-rank checkpoints and strategy files."""

from __future__ import annotations

from glm3.dtypes import DTYPE_CHOICES


def cmd_merge(args) -> int:
    from glm3.train.merge import merge_adapter, merge_run

    if bool(args.run) == bool(args.adapter):
        raise ValueError("merge needs exactly one of --run (per-rank checkpoints) and --adapter (a LoRA adapter)")
    if args.adapter:
        summary = merge_adapter(
            args.base, args.adapter, args.dst, overwrite=args.overwrite, dtype=args.dtype, shard_size=args.shard_size
        )
    else:
        summary = merge_run(
            args.run,
            args.dst,
            args.base,
            strategy=args.strategy,
            step=args.step,
            overwrite=args.overwrite,
            dtype=args.dtype,
            shard_size=args.shard_size,
        )
    print(summary.describe())
    return 0


def cmd_split(args) -> int:
    from glm3.train.merge import split_model

    files = split_model(args.model, args.strategy, args.dst, overwrite=args.overwrite)
    print(f"wrote {len(files)} rank checkpoint(s) under {args.dst}")
    return 0


def cmd_strategy(args) -> int:
    from glm3.modeling.config import GLM3Config
    from glm3.train.strategy import write_pipeline_strategies, write_tensor_parallel_strategy

    config = GLM3Config.from_hf(args.model)
    layout = f"{args.data_parallel}x{args.model_parallel} (dp x mp)"
    if args.pipeline_stage > 1:
        files = write_pipeline_strategies(
            args.out, config, args.pipeline_stage, args.model_parallel, args.data_parallel
        )
        print(f"wrote {len(files)} pipeline-stage strategy files, {layout} each, to {args.out}")
    else:
        write_tensor_parallel_strategy(args.out, config, args.model_parallel, args.data_parallel)
        print(f"wrote the {layout} tensor-parallel strategy to {args.out}")
    return 0


def register(sub) -> None:
    """merge, split, strategy: per-rank checkpoints and strategy files."""
    p = sub.add_parser(
        "merge",
        help="merge a run's per-rank checkpoints (or a LoRA adapter) into a model directory",
        description="--run RUN: the newest step all ranks have (or --step). Without --strategy the "
        "ranks must be identical (data parallel) and rank 0 is taken; with --strategy FILE|DIR "
        "(strategy files of a sharded Ascend run) MindSpore's transform_checkpoints merges the "
        "shards. A LoRA run's adapters are folded into --base. --adapter DIR folds a saved adapter "
        "into --base. The output is a plain model directory with --base's config and tokenizer.",
    )
    p.add_argument("--base", required=True, help="the model the run started from (config, tokenizer, LoRA base)")
    p.add_argument("--dst", required=True, help="output model directory")
    p.add_argument("--run", help="run directory, its checkpoint/ directory, or a directory of rank_N/ folders")
    p.add_argument("--adapter", help="LoRA adapter directory")
    p.add_argument("--strategy", help="strategy file, or directory of per-stage strategy files, of a sharded run")
    p.add_argument("--step", type=int, help="checkpoint step to merge (default: newest common step)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="storage dtype of the merged model; auto (default): the base's, whatever the run trained in",
    )
    p.add_argument("--shard-size", default="2GB", help="max bytes per weight file, e.g. 2GB; 0: one file")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("split", help="split a model directory into per-rank checkpoints for a strategy file")
    p.add_argument("--model", required=True, help="model directory to split")
    p.add_argument("--strategy", required=True, help="strategy file of the target layout")
    p.add_argument("--dst", required=True, help="output directory (rank_N/model.ckpt)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("strategy", help="write the strategy file(s) of a dp x mp (x pipeline) layout of a model")
    p.add_argument("--model", required=True, help="model directory (its config.json)")
    p.add_argument("--model-parallel", type=int, required=True, help="tensor-parallel ranks")
    p.add_argument("--data-parallel", type=int, default=1, help="data-parallel replicas (default 1)")
    p.add_argument("--pipeline-stage", type=int, default=1, help="> 1: one file per stage in the --out directory")
    p.add_argument("--out", required=True, help="strategy file (or directory, with --pipeline-stage > 1)")
    p.set_defaults(func=cmd_strategy)
