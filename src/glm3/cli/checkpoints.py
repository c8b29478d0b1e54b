"""`glm3` download, convert, quantize, train-tokenizer: get, convert and quantize checkpoints."""

from __future__ import annotations

import argparse
import json

from glm3.dtypes import DTYPE_CHOICES


def cmd_download(args) -> int:
    if args.synthetic:
        from glm3.weights.synthetic import write_synthetic_checkpoint

        path = write_synthetic_checkpoint(
            args.dst,
            args.synthetic,
            seed=args.seed,
            fmt=args.format,
            dtype=args.dtype,
            num_shards=args.shards,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
        print(f"wrote random-weight {args.synthetic} checkpoint (HuggingFace layout, {args.format}) to {path}")
        return 0
    from glm3.weights.download import download_from_hub

    summary = download_from_hub(
        args.dst,
        repo_id=args.repo,
        revision=args.revision,
        cache_dir=args.cache_dir,
        prefer=args.prefer,
        overwrite=args.overwrite,
        progress=not args.quiet,
        timeout=args.timeout,
    )
    print(summary.describe())
    return 0


def _report(summary, json_path: str | None) -> int:
    """Print a summary (convert, quantize) and, with --summary, write it as JSON too."""
    print(summary.describe())
    if json_path:
        from glm3.io import atomic_write_text

        atomic_write_text(json_path, json.dumps(summary.to_dict(), indent=2) + "\n")
    return 0


def cmd_quantize(args) -> int:
    from glm3.weights.quantize import quantize_model

    summary = quantize_model(
        args.src,
        args.dst,
        args.bits,
        args.group_size,
        output_layer=args.output_layer,
        embedding=args.embedding,
        dtype=args.dtype,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    return _report(summary, args.summary)


def cmd_convert(args) -> int:
    from glm3.weights.convert import convert_checkpoint

    summary = convert_checkpoint(
        args.src,
        args.dst,
        to=args.to,
        dtype=args.dtype,
        fmt=args.format,
        shard_size=args.shard_size,
        config=args.config,
        tokenizer=args.tokenizer,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    return _report(summary, args.summary)


def cmd_train_tokenizer(args) -> int:
    import glm3

    path = glm3.train_sentencepiece(args.input, args.output, vocab_size=args.vocab_size)
    tok = glm3.ChatGLM3Tokenizer(path)
    print(f"wrote {path}: {tok.n_words} pieces + {tok.vocab_size - tok.n_words} special tokens")
    return 0


def _add_output_flags(p) -> None:
    """The flags of a command that writes a model directory (convert, quantize)."""
    p.add_argument("--shard-size", default="2GB", help="max bytes per output file, e.g. 2GB, 500MiB; 0: one file")
    p.add_argument("--summary", help="also write the summary as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub) -> None:
    """download, convert, train-tokenizer: get and convert checkpoints."""
    p = sub.add_parser(
        "download",
        help="download ChatGLM3 from the HuggingFace Hub, or write a synthetic stand-in",
        description="Hub: fetch config, tokenizer and one weight format of REPO at REVISION (resolved "
        "to a commit, recorded in DST/source.json), verify every weight file's sha256 against the "
        "Hub, publish into DST atomically. Resumable (HuggingFace cache); honours HF_ENDPOINT, "
        "HF_TOKEN, HF_HOME and HF_HUB_OFFLINE. --synthetic PRESET instead writes a seeded random-"
        "weight checkpoint in the release's exact layout, offline.",
    )
    p.add_argument("--dst", required=True, help="output model directory")
    p.add_argument(
        "--synthetic",
        metavar="PRESET",
        help="write a random-weight checkpoint of this preset "
        "(tiny, bench, glm3_6b, glm3_6b_32k) instead of downloading",
    )
    p.add_argument("--repo", default="THUDM/chatglm3-6b", help="Hub repo id (default THUDM/chatglm3-6b)")
    p.add_argument("--revision", default="main", help="branch, tag or commit; pin a commit for reproducibility")
    p.add_argument("--cache-dir", help="HuggingFace cache directory (default: HF_HUB_CACHE)")
    p.add_argument(
        "--prefer",
        default="safetensors",
        choices=["safetensors", "bin"],
        help="weight format to fetch when the repo has both",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the Hub before giving up")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "bin"], help="synthetic: weight files")
    p.add_argument("--shards", type=int, default=None, help="synthetic: number of weight shards (6B: 7, else 2)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16"],
        help="synthetic: weight dtype (6B: float16, else float32)",
    )
    p.add_argument("--seed", type=int, default=0, help="synthetic: random seed (same seed, same files)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser(
        "convert",
        help="convert a checkpoint: HuggingFace/MindFormers -> MindSpore, or back to HF",
        description="Streams one tensor at a time (memory: one source shard), checks every tensor "
        "against the config, writes shards + index + config.json + tokenizer into DST atomically. "
        "SRC is a model directory (HF .bin/safetensors, ours) or a MindFormers .ckpt file.",
    )
    p.add_argument("--src", required=True, help="source model directory or MindFormers .ckpt file")
    p.add_argument("--dst", required=True, help="output model directory")
    p.add_argument(
        "--to",
        default="mindspore",
        choices=["mindspore", "hf"],
        help="mindspore (default) or hf: HuggingFace safetensors for PyTorch tooling",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="output dtype (auto: the config's torch_dtype)",
    )
    p.add_argument(
        "--format",
        default="ckpt",
        choices=["ckpt", "safetensors"],
        help="MindSpore output file format (--to hf always writes safetensors)",
    )
    p.add_argument("--config", help="preset or config.json, when SRC has none (MindFormers' glm3_6b.ckpt)")
    p.add_argument("--tokenizer", help="directory with tokenizer.model, when SRC has none")
    _add_output_flags(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "quantize",
        help="weight-only int8/int4 quantization of a model (per group, symmetric, float16 scales)",
        description="Streams one tensor at a time: every linear weight (and the output layer unless "
        "--no-output-layer; the embedding with --embedding) becomes int8 or packed int4 data with one float16 "
        "scale per group of input channels; DST is our MindSpore layout with config.json's glm3_quantization "
        "(format version 1). load, generate, chat, export, infer, eval and serve take DST as any model.",
    )
    p.add_argument("--src", required=True, help="float model directory (any layout glm3 reads)")
    p.add_argument("--dst", required=True, help="output model directory")
    p.add_argument("--bits", type=int, required=True, choices=[8, 4], help="bits per weight: 8 or 4")
    p.add_argument("--group-size", type=int, default=32, help="input channels per scale, a multiple of 32 (default 32)")
    p.add_argument(
        "--output-layer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="quantize the output layer too (default: yes; it is the largest weight read per token)",
    )
    p.add_argument(
        "--embedding",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="quantize the embedding table too (default: no; one row of it is read per token)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="dtype of the weights left in floating point (auto: the source's)",
    )
    _add_output_flags(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("train-tokenizer", help="train a ChatGLM3-style SentencePiece model from text files")
    p.add_argument("--input", nargs="+", required=True, help="UTF-8 text files to train on (one sentence per line)")
    p.add_argument("--output", required=True, help="the tokenizer.model file to write")
    p.add_argument("--vocab-size", type=int, default=1500, help="vocabulary size at most (a small text gives fewer)")
    p.set_defaults(func=cmd_train_tokenizer)
