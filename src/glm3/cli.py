"""`glm3 <command>`: the command line over the glm3 library."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _setup_mindspore(mode: str) -> None:
    from glm3.loading import setup_mindspore

    setup_mindspore(mode)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (ours or HuggingFace layout)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weight storage dtype; auto (default): the checkpoint's own. Compute is float32 on CPU, "
                   "half-precision weights converted per layer on the fly")
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"], help="MindSpore execution mode")
    p.add_argument("--kernels", default="auto", choices=["auto", "plain", "cpu", "ascend"],
                   help="kernel backend (see glm3.kernels)")


def _add_generation_args(p: argparse.ArgumentParser, sample_default: bool) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--sample", dest="do_sample", action="store_true", default=sample_default,
                       help="sample (default for chat: top_p 0.8, temperature 0.8)")
    group.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8 if sample_default else 1.0)
    p.add_argument("--top-p", type=float, default=0.8 if sample_default else 1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed, same output)")


def _gen_kwargs(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "repetition_penalty": args.repetition_penalty,
            "seed": args.seed}


def _load(args):
    import glm3

    _setup_mindspore(args.mode)
    model = glm3.load_model(args.model, dtype=args.dtype, kernels_backend=args.kernels)
    return model, glm3.load_tokenizer(args.model)


def cmd_chat(args) -> int:
    import glm3

    model, tok = _load(args)
    history: list = []
    if args.system or args.tools:
        system = {"role": "system", "content": args.system or "Answer the following questions as best as you can. "
                  "You have access to the following tools:"}
        if args.tools:
            with open(args.tools, encoding="utf-8") as f:
                system["tools"] = json.load(f)
        history.append(system)
    base_history = list(history)
    interactive = sys.stdin.isatty()
    if interactive:
        print("ChatGLM3 (MindSpore). Type your message; 'clear' starts over, 'exit' quits.")
    gen = _gen_kwargs(args)
    while True:
        if interactive:
            try:
                query = input("\n用户: ")
            except EOFError:
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
            query = line.rstrip("\n")
        query = query.strip()
        if not query:
            continue
        if query == "exit":
            break
        if query == "clear":
            history = list(base_history)
            print("(history cleared)")
            continue
        role = "user"
        if query.startswith("/observation "):
            role, query = "observation", query[len("/observation "):]
        if not interactive:
            print(f"用户: {query}")
        print("ChatGLM: ", end="", flush=True)
        printed = 0
        response = ""
        for response, updated in glm3.stream_chat(model, tok, query, history, role=role, **gen):  # noqa: B007
            if isinstance(response, str) and response.startswith(response[:printed]) and len(response) > printed:
                print(response[printed:], end="", flush=True)
                printed = len(response)
        history = updated  # the turn, the reply and any tool call, for the next query
        if not isinstance(response, str):
            print("\n" + json.dumps(response, ensure_ascii=False), end="")
        print(flush=True)
    return 0


def _prompt_ids(tok, text: str, chat: bool) -> list[int]:
    """A user chat turn awaiting the assistant, or plain text after the [gMASK] sop prefix."""
    if chat:
        return tok.build_chat_input(text)["input_ids"][0]
    return [tok.get_command("[gMASK]"), tok.get_command("sop")] + tok.encode(text)


def cmd_generate(args) -> int:
    from glm3.generation import generate

    model, tok = _load(args)
    batch = tok.pad([_prompt_ids(tok, p, args.chat) for p in args.prompt])
    stops = list(tok.stop_token_ids)
    out = generate(model, batch["input_ids"], attention_mask=batch["attention_mask"], eos_token_id=stops,
                         pad_token_id=tok.pad_id, **_gen_kwargs(args))
    width = batch["input_ids"].shape[1]
    for prompt, row in zip(args.prompt, out):
        new = [int(t) for t in row[width:]]
        cut = next((i for i, t in enumerate(new) if t in stops), len(new))
        text = tok.decode(new[:cut])
        if args.json:
            print(json.dumps({"prompt": prompt, "text": text, "ids": new[:cut + 1]}, ensure_ascii=False))
        else:
            print(text)
    return 0


def _read_ids(path: str):
    import numpy as np

    if path.endswith(".npy"):
        ids = np.load(path, allow_pickle=False)
    else:
        with open(path, encoding="utf-8") as f:
            ids = np.asarray(json.load(f))
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise SystemExit(f"error: {path} must hold integer token ids, [seq] or [batch, seq]")
    return ids


def cmd_score(args) -> int:
    import mindspore as ms
    import numpy as np

    import glm3
    from glm3.io import atomic_file

    ids = _read_ids(args.ids)
    _setup_mindspore(args.mode)
    model = glm3.load_model(args.model, dtype=args.dtype, kernels_backend=args.kernels)
    if (ids < 0).any() or (ids >= model.config.padded_vocab_size).any():
        raise SystemExit(f"error: ids must be in [0, {model.config.padded_vocab_size})")
    logits = model(ms.Tensor(ids.astype(np.int32))).asnumpy()
    with atomic_file(args.out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, input_ids=ids, logits=logits)
    print(f"wrote logits {logits.shape} to {args.out}")
    return 0


def cmd_download(args) -> int:
    if args.synthetic:
        from glm3.synthetic import write_synthetic_checkpoint

        path = write_synthetic_checkpoint(args.dst, args.synthetic, seed=args.seed, fmt=args.format,
                                          dtype=args.dtype, num_shards=args.shards, overwrite=args.overwrite,
                                          progress=not args.quiet)
        print(f"wrote random-weight {args.synthetic} checkpoint (HuggingFace layout, {args.format}) to {path}")
        return 0
    from glm3.download import download_from_hub

    summary = download_from_hub(args.dst, repo_id=args.repo, revision=args.revision, cache_dir=args.cache_dir,
                                prefer=args.prefer, overwrite=args.overwrite, progress=not args.quiet,
                                timeout=args.timeout)
    print(summary.describe())
    return 0


def cmd_convert(args) -> int:
    from glm3.convert import convert_checkpoint

    summary = convert_checkpoint(args.src, args.dst, to=args.to, dtype=args.dtype, fmt=args.format,
                                 shard_size=args.shard_size, config=args.config, tokenizer=args.tokenizer,
                                 overwrite=args.overwrite, progress=not args.quiet)
    print(summary.describe())
    if args.summary:
        from glm3.io import atomic_write_text

        atomic_write_text(args.summary, json.dumps(summary.to_dict(), indent=2) + "\n")
    return 0


def cmd_train_tokenizer(args) -> int:
    import glm3

    path = glm3.train_sentencepiece(args.input, args.output, vocab_size=args.vocab_size)
    tok = glm3.ChatGLM3Tokenizer(path)
    print(f"wrote {path}: {tok.n_words} pieces + {tok.vocab_size - tok.n_words} special tokens")
    return 0


# Flags of `glm3 finetune` that map one-to-one onto FinetuneConfig fields.
_FINETUNE_FLAGS = ("model", "data", "output", "tokenizer", "cache_dir", "seq_length", "max_source_length",
                   "max_target_length", "preprocess", "batch_size", "grad_accumulation", "steps", "epochs", "lr",
                   "min_lr", "warmup_steps", "lr_schedule", "weight_decay", "max_grad_norm", "seed", "dtype",
                   "compute_dtype", "save_every", "keep_checkpoints", "resume", "device", "timing_file")


def finetune_config_from_args(args):
    """FinetuneConfig from --config (JSON/YAML) with command-line flags on top."""
    import yaml

    from glm3.train import FinetuneConfig

    values: dict = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            values = (json.load(f) if args.config.endswith(".json") else yaml.safe_load(f)) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{args.config} must hold a mapping of finetune settings")
    for name in _FINETUNE_FLAGS:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.skip_bad_lines:
        values["skip_bad_lines"] = True
    lora_flags = {key: getattr(args, flag) for flag, key in (("lora_rank", "rank"), ("lora_alpha", "alpha"),
                                                             ("lora_dropout", "dropout"))
                  if getattr(args, flag) is not None}
    if args.lora_targets:
        lora_flags["targets"] = args.lora_targets.split(",")
    if args.lora is False:
        values["lora"] = None
    elif args.lora or values.get("lora") is not None or lora_flags:
        values["lora"] = {**(values.get("lora") or {}), **lora_flags}
    parallel = dict(values.get("parallel") or {})
    for flag, key in (("workers", "data_parallel"), ("model_parallel", "model_parallel"),
                      ("pipeline_stage", "pipeline_stage"), ("master_port", "master_port")):
        if getattr(args, flag) is not None:
            parallel[key] = getattr(args, flag)
    values["parallel"] = parallel
    if args.quiet:
        values["progress"] = False
    missing = [k for k in ("model", "data", "output") if not values.get(k)]
    if missing:
        raise ValueError(f"finetune needs {', '.join('--' + m for m in missing)} (or a --config that sets them)")
    return FinetuneConfig.from_dict(values)


def cmd_finetune(args) -> int:
    config = finetune_config_from_args(args)
    config.validate()  # bad settings fail in milliseconds, before MindSpore is imported

    from glm3.train.launch import run_finetune
    from glm3.train.trainer import TrainingInterrupted

    try:
        result = run_finetune(config)
    except TrainingInterrupted as exc:
        from glm3.train.signals import ignore_further_stops

        ignore_further_stops()
        print(f"glm3 finetune: {exc}; run the same command again to resume", file=sys.stderr)
        return 128 + exc.signum if exc.signum else 1
    if result.metrics:
        print(json.dumps(result.metrics, indent=2))
    print(f"weights: {result.weights}; checkpoint: {result.checkpoint}")
    return 0


def cmd_rank_table(args) -> int:
    from glm3 import rank_table as rt

    if args.action == "merge":
        if len(args.tables) < 1:
            raise ValueError("rank-table merge needs one or more rank table files")
        table = rt.merge_rank_tables([rt.load_rank_table(p) for p in args.tables])
    else:
        if args.tables:
            raise ValueError(f"unexpected arguments {args.tables}; did you mean `glm3 rank-table merge`?")
        if not args.server_ip:
            raise ValueError("rank-table needs --server-ip")
        ips = args.device_ips.split(",") if args.device_ips else None
        table = rt.build_rank_table(args.server_ip, args.devices, device_ips=ips,
                                    hccn_conf=None if ips else args.hccn_conf)
    rt.save_rank_table(table, args.out)
    ranks = sum(len(s["device"]) for s in table["server_list"])
    print(f"wrote {args.out}: {table['server_count']} server(s), {ranks} rank(s)")
    return 0


def _load_with_adapter(args):
    """The model (with --adapter applied, if given) and its tokenizer."""
    model, tok = _load(args)
    if args.adapter:
        from glm3.lora import load_adapter

        load_adapter(model, args.adapter)
    return model, tok


def _report_metrics(metrics: dict, out: str | None) -> int:
    from glm3.io import atomic_write_text

    text = json.dumps(metrics, indent=2, ensure_ascii=False)
    if out:
        atomic_write_text(out, text + "\n")
    print(text)
    return 0


def cmd_eval_ceval(args) -> int:
    from glm3.eval.ceval import eager_logits, evaluate_ceval
    from glm3.export import EXPORT_CONFIG

    if os.path.isfile(os.path.join(args.model, EXPORT_CONFIG)):  # an exported model: score with its prefill graph
        from glm3.infer import MindIRRunner
        from glm3.tokenizer import load_tokenizer

        _setup_mindspore("graph")
        source, tok = MindIRRunner(args.model).last_logits, load_tokenizer(args.model)
    else:
        model, tok = _load_with_adapter(args)
        source = eager_logits(model)
    subjects = args.subjects.split(",") if args.subjects else None
    metrics = evaluate_ceval(source, tok, args.data, split=args.split, shots=args.shots,
                             subjects=subjects, batch_size=args.batch_size, predictions_path=args.predictions,
                             progress=not args.quiet)
    return _report_metrics(metrics, args.out)


def cmd_eval_adgen(args) -> int:
    from glm3.eval import evaluate_adgen

    model, tok = _load_with_adapter(args)
    metrics = evaluate_adgen(model, tok, args.data, max_source_length=args.max_source_length,
                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit,
                             style=args.preprocess, predictions_path=args.predictions, progress=not args.quiet)
    return _report_metrics(metrics, args.out)


def cmd_merge(args) -> int:
    from glm3.merge import merge_adapter, merge_run

    if bool(args.run) == bool(args.adapter):
        raise ValueError("merge needs exactly one of --run (per-rank checkpoints) and --adapter (a LoRA adapter)")
    if args.adapter:
        summary = merge_adapter(args.base, args.adapter, args.dst, overwrite=args.overwrite, dtype=args.dtype,
                                shard_size=args.shard_size)
    else:
        summary = merge_run(args.run, args.dst, args.base, strategy=args.strategy, step=args.step,
                            overwrite=args.overwrite, dtype=args.dtype, shard_size=args.shard_size)
    print(summary.describe())
    return 0


def cmd_split(args) -> int:
    from glm3.merge import split_model

    files = split_model(args.model, args.strategy, args.dst, overwrite=args.overwrite)
    print(f"wrote {len(files)} rank checkpoint(s) under {args.dst}")
    return 0


def cmd_strategy(args) -> int:
    from glm3.config import GLM3Config
    from glm3.strategy import write_pipeline_strategies, write_tensor_parallel_strategy

    config = GLM3Config.from_hf(args.model)
    layout = f"{args.data_parallel}x{args.model_parallel} (dp x mp)"
    if args.pipeline_stage > 1:
        files = write_pipeline_strategies(args.out, config, args.pipeline_stage, args.model_parallel,
                                          args.data_parallel)
        print(f"wrote {len(files)} pipeline-stage strategy files, {layout} each, to {args.out}")
    else:
        write_tensor_parallel_strategy(args.out, config, args.model_parallel, args.data_parallel)
        print(f"wrote the {layout} tensor-parallel strategy to {args.out}")
    return 0


def cmd_export(args) -> int:
    from glm3.export import export_model

    _setup_mindspore("graph")
    batch = None if args.dynamic_batch else args.batch_size
    dst = export_model(args.model, args.dst, batch_size=batch, prompt_length=args.prompt_length,
                       seq_length=args.seq_length, paged=args.paged, block_size=args.block_size,
                       num_blocks=args.num_blocks, fused_paged_attention=args.fused_paged_attention,
                       overwrite=args.overwrite, weights=args.weights, dtype=args.dtype)
    print(f"exported prefill and decode graphs ({'dynamic' if batch is None else batch} batch, prompt "
          f"{args.prompt_length}, cache {args.seq_length or 'model seq_length'}) to {dst}")
    return 0


def cmd_infer(args) -> int:
    from glm3.infer import PROMPT_MARKER, MindIRRunner
    from glm3.tokenizer import load_tokenizer

    _setup_mindspore("graph")
    runner, tok = MindIRRunner(args.model), load_tokenizer(args.model)
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "temperature": args.temperature,
               "top_p": args.top_p, "top_k": args.top_k, "repetition_penalty": args.repetition_penalty,
               "seed": args.seed}

    def answer(texts):
        outputs = runner.generate([_prompt_ids(tok, t, args.chat) for t in texts], **options)
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


def _add_use_commands(sub) -> None:
    """chat, generate, score: use a model directory."""
    p = sub.add_parser("chat", help="interactive streaming chat (reads stdin when it is not a terminal)",
                       description="Chat with a model. Type 'clear' to start over, 'exit' to quit. A line "
                       "'/observation TEXT' sends a tool result. When stdin is not a terminal, each line is a query.")
    _add_model_args(p)
    _add_generation_args(p, sample_default=True)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--tools", help="JSON file with a list of tool descriptions for the system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="generate continuations for one or more prompts (one batch)")
    _add_model_args(p)
    _add_generation_args(p, sample_default=False)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat turn")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("score", help="write the logits of given token ids to an .npz (for verification)")
    _add_model_args(p)
    p.add_argument("--ids", required=True, help="JSON ([..] or [[..],..]) or .npy file of token ids")
    p.add_argument("--out", required=True, help="output .npz with input_ids and logits [batch, seq, vocab]")
    p.set_defaults(func=cmd_score)


def _add_checkpoint_commands(sub) -> None:
    """download, convert, train-tokenizer: get and convert checkpoints."""
    p = sub.add_parser("download", help="download ChatGLM3 from the HuggingFace Hub, or write a synthetic stand-in",
                       description="Hub: fetch config, tokenizer and one weight format of REPO at REVISION (resolved "
                       "to a commit, recorded in DST/source.json), verify every weight file's sha256 against the "
                       "Hub, publish into DST atomically. Resumable (HuggingFace cache); honours HF_ENDPOINT, "
                       "HF_TOKEN, HF_HOME and HF_HUB_OFFLINE. --synthetic PRESET instead writes a seeded random-"
                       "weight checkpoint in the release's exact layout, offline.")
    p.add_argument("--dst", required=True, help="output model directory")
    p.add_argument("--synthetic", metavar="PRESET", help="write a random-weight checkpoint of this preset "
                   "(tiny, bench, glm3_6b, glm3_6b_32k) instead of downloading")
    p.add_argument("--repo", default="THUDM/chatglm3-6b", help="Hub repo id (default THUDM/chatglm3-6b)")
    p.add_argument("--revision", default="main", help="branch, tag or commit; pin a commit for reproducibility")
    p.add_argument("--cache-dir", help="HuggingFace cache directory (default: HF_HUB_CACHE)")
    p.add_argument("--prefer", default="safetensors", choices=["safetensors", "bin"],
                   help="weight format to fetch when the repo has both")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the Hub before giving up")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "bin"], help="synthetic: weight files")
    p.add_argument("--shards", type=int, default=None, help="synthetic: number of weight shards (6B: 7, else 2)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16"],
                   help="synthetic: weight dtype (6B: float16, else float32)")
    p.add_argument("--seed", type=int, default=0, help="synthetic: random seed (same seed, same files)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("convert", help="convert a checkpoint: HuggingFace/MindFormers -> MindSpore, or back to HF",
                       description="Streams one tensor at a time (memory: one source shard), checks every tensor "
                       "against the config, writes shards + index + config.json + tokenizer into DST atomically. "
                       "SRC is a model directory (HF .bin/safetensors, ours) or a MindFormers .ckpt file.")
    p.add_argument("--src", required=True, help="source model directory or MindFormers .ckpt file")
    p.add_argument("--dst", required=True, help="output model directory")
    p.add_argument("--to", default="mindspore", choices=["mindspore", "hf"],
                   help="mindspore (default) or hf: HuggingFace safetensors for PyTorch tooling")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="output dtype (auto: the config's torch_dtype)")
    p.add_argument("--format", default="ckpt", choices=["ckpt", "safetensors"],
                   help="MindSpore output file format (--to hf always writes safetensors)")
    p.add_argument("--shard-size", default="2GB", help="max bytes per output file, e.g. 2GB, 500MiB; 0: one file")
    p.add_argument("--config", help="preset or config.json, when SRC has none (MindFormers' glm3_6b.ckpt)")
    p.add_argument("--tokenizer", help="directory with tokenizer.model, when SRC has none")
    p.add_argument("--summary", help="also write the summary as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train-tokenizer", help="train a ChatGLM3-style SentencePiece model from text files")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--vocab-size", type=int, default=1500)
    p.set_defaults(func=cmd_train_tokenizer)


def _add_training_commands(sub) -> None:
    """finetune, rank-table: train, on one host or a cluster."""
    p = sub.add_parser("finetune", help="fine-tune a model on ADGEN data (full or LoRA; msrun for several workers)",
                       description="Tokenizes the data once into a MindRecord cache, trains with AdamW (warmup + "
                       "cosine/linear decay, gradient accumulation, global-norm clipping), logs every step to "
                       "OUTPUT/train_log.tsv, writes OUTPUT/metrics.json and OUTPUT/model (full) or OUTPUT/adapter "
                       "(LoRA). Checkpoints go to OUTPUT/checkpoint/rank_N; running the same command again resumes "
                       "from the newest one, exactly. Ctrl-C/SIGTERM save a checkpoint first. With --workers N > 1 "
                       "the command starts N msrun data-parallel workers.")
    p.add_argument("--config", help="JSON or YAML file of finetune settings (FinetuneConfig fields); flags override")
    p.add_argument("--model", help="base model directory")
    p.add_argument("--data", help="ADGEN training file (JSON lines or a JSON array)")
    p.add_argument("--output", help="run directory")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--cache-dir", help="MindRecord cache directory (default OUTPUT/data_cache)")
    for flag, kind in (("seq-length", int), ("max-source-length", int), ("max-target-length", int),
                       ("batch-size", int), ("grad-accumulation", int), ("steps", int), ("epochs", float),
                       ("lr", float), ("min-lr", float), ("warmup-steps", int), ("weight-decay", float),
                       ("max-grad-norm", float), ("seed", int), ("save-every", int), ("keep-checkpoints", int)):
        p.add_argument(f"--{flag}", type=kind)
    p.add_argument("--preprocess", choices=["mindformers_v3", "chat"])
    p.add_argument("--lr-schedule", choices=["cosine", "linear", "constant"])
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"],
                   help="storage of the weights while training; auto (default): LoRA keeps the frozen base in the "
                   "checkpoint's dtype, full fine-tuning trains float32 master weights; model/ is written in the "
                   "checkpoint's dtype")
    p.add_argument("--compute-dtype", choices=["float32", "float16", "bfloat16"],
                   help="matmul precision (default float32; float16/bfloat16 with loss scaling on Ascend)")
    p.add_argument("--resume", help="'auto' (default: newest checkpoint in OUTPUT), 'never', or a checkpoint dir")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) malformed data lines")
    p.add_argument("--timing-file", help="where the per-step seconds and tokens/s go (default OUTPUT/timing.json; "
                   "kept out of the run's results, which are the same for the same inputs)")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--lora", dest="lora", action="store_true", default=None, help="train LoRA adapters only")
    lora.add_argument("--full", dest="lora", action="store_false", help="train all parameters")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-targets", help="comma-separated among query_key_value,dense,dense_h_to_4h,dense_4h_to_h")
    p.add_argument("--workers", type=int, help="data-parallel workers (msrun)")
    p.add_argument("--model-parallel", type=int, help="tensor-parallel ranks (Ascend/GPU only)")
    p.add_argument("--pipeline-stage", type=int, help="pipeline stages (Ascend/GPU only)")
    p.add_argument("--master-port", type=int, help="msrun scheduler port")
    p.add_argument("--device", help="CPU (default), Ascend or GPU")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("rank-table", help="build an HCCL rank table for one server, or merge several",
                       description="glm3 rank-table --server-ip IP [--devices '[0,8)'] (--hccn-conf FILE | "
                       "--device-ips IP,IP,...) --out FILE builds one server's table; glm3 rank-table merge A.json "
                       "B.json ... --out FILE joins per-server tables, numbering ranks in server order.")
    p.add_argument("action", nargs="?", choices=["build", "merge"], default="build")
    p.add_argument("tables", nargs="*", help="merge: per-server rank table files, in server order")
    p.add_argument("--server-ip", help="this server's IP (server_id)")
    p.add_argument("--devices", default="[0,8)",
                   help="the server's device ids, [first,end): the end is excluded whichever bracket closes it, as "
                   "MindFormers' hccl_tools.py reads it, so '[0,8]' and '[0,8)' are devices 0-7; within one "
                   "4-device group ([0,4), [4,8) or part of one) or all 8 (default: [0,8))")
    p.add_argument("--hccn-conf", default="/etc/hccn.conf", help="file with address_N=IP lines (default %(default)s)")
    p.add_argument("--device-ips", help="comma-separated device IPs in device order, instead of --hccn-conf")
    p.add_argument("--out", required=True, help="output JSON file")
    p.set_defaults(func=cmd_rank_table)


def _add_distributed_checkpoint_commands(sub) -> None:
    """merge, split, strategy: per-rank checkpoints and strategy files."""
    p = sub.add_parser("merge", help="merge a run's per-rank checkpoints (or a LoRA adapter) into a model directory",
                       description="--run RUN: the newest step all ranks have (or --step). Without --strategy the "
                       "ranks must be identical (data parallel) and rank 0 is taken; with --strategy FILE|DIR "
                       "(strategy files of a sharded Ascend run) MindSpore's transform_checkpoints merges the "
                       "shards. A LoRA run's adapters are folded into --base. --adapter DIR folds a saved adapter "
                       "into --base. The output is a plain model directory with --base's config and tokenizer.")
    p.add_argument("--base", required=True, help="the model the run started from (config, tokenizer, LoRA base)")
    p.add_argument("--dst", required=True, help="output model directory")
    p.add_argument("--run", help="run directory, its checkpoint/ directory, or a directory of rank_N/ folders")
    p.add_argument("--adapter", help="LoRA adapter directory")
    p.add_argument("--strategy", help="strategy file, or directory of per-stage strategy files, of a sharded run")
    p.add_argument("--step", type=int, help="checkpoint step to merge (default: newest common step)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="storage dtype of the merged model; auto (default): the base's, whatever the run trained in")
    p.add_argument("--shard-size", default="2GB", help="max bytes per weight file, e.g. 2GB; 0: one file")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("split", help="split a model directory into per-rank checkpoints for a strategy file")
    p.add_argument("--model", required=True)
    p.add_argument("--strategy", required=True, help="strategy file of the target layout")
    p.add_argument("--dst", required=True, help="output directory (rank_N/model.ckpt)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("strategy", help="write the strategy file(s) of a dp x mp (x pipeline) layout of a model")
    p.add_argument("--model", required=True, help="model directory (its config.json)")
    p.add_argument("--model-parallel", type=int, required=True)
    p.add_argument("--data-parallel", type=int, default=1)
    p.add_argument("--pipeline-stage", type=int, default=1, help="> 1: one file per stage in the --out directory")
    p.add_argument("--out", required=True, help="strategy file (or directory, with --pipeline-stage > 1)")
    p.set_defaults(func=cmd_strategy)


def _add_deploy_commands(sub) -> None:
    """export, infer: MindIR graphs and running them."""
    p = sub.add_parser("export", help="export a model to MindIR: a prefill and a one-token decode graph",
                       description="The KV cache is a graph input/output (see glm3.export). Prompts are left-padded "
                       "to --prompt-length; the cache holds --seq-length positions.")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--dst", required=True, help="output directory")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=int, default=1, help="static batch size (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="a dynamic batch dimension instead")
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--seq-length", type=int, help="KV cache length (default: the model's seq_length)")
    p.add_argument("--paged", action="store_true", help="a paged (block-table) KV cache instead of a static one")
    p.add_argument("--block-size", type=int, default=16, help="paged: tokens per cache block")
    p.add_argument("--num-blocks", type=int, default=224, help="paged: cache blocks shared by the batch")
    p.add_argument("--fused-paged-attention", action="store_true",
                   help="paged: use MindSpore's PagedAttention operator (float16; runs in MindSpore Lite on "
                   "Ascend, not in MindSpore)")
    p.add_argument("--weights", default="inputs", choices=["inputs", "embedded"],
                   help="inputs (default): the graphs take the weights as inputs and the weights are stored once "
                   "beside them (hard-linked from MODEL when possible); embedded: MindSpore's self-contained "
                   "graphs, each with its own copy (for MindSpore Lite)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weight dtype of the export; auto (default): the model's own")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("infer", help="generate with an exported model (MindIR), interactively or for --prompt",
                       description="Without --prompt: prints 'Please enter your predict data:', answers each line, "
                       "and stops at 'exit' or end of input.")
    p.add_argument("--model", required=True, help="export directory (glm3 export)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat: generated in batches of the export's size)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat turn")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    _add_generation_args(p, sample_default=False)
    p.set_defaults(func=cmd_infer)


def _add_eval_args(p: argparse.ArgumentParser, data_help: str, predictions_help: str) -> None:
    """What every `glm3 eval` benchmark takes: the model (plus an optional adapter), data and outputs."""
    _add_model_args(p)
    p.add_argument("--adapter", help="LoRA adapter directory to apply to the model")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", help="metrics JSON file")
    p.add_argument("--predictions", help=predictions_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_eval_commands(sub) -> None:
    """eval ceval, eval adgen."""
    p = sub.add_parser("eval", help="evaluate a model: `glm3 eval ceval` (C-Eval accuracy), `glm3 eval adgen` "
                       "(BLEU-4, ROUGE on characters)")
    eval_sub = p.add_subparsers(dest="benchmark", required=True, metavar="<benchmark>")
    p = eval_sub.add_parser("ceval", help="C-Eval multiple choice: accuracy per subject, category and on average",
                            description="Reads the official layout DATA/{dev,val,test}/<subject>_<split>.csv; prompts "
                            "in ChatGLM3 chat format, zero- or few-shot (shots from dev); the prediction is the "
                            "answer letter with the largest logit. The test split gives predictions only. --model "
                            "is a model directory or an export directory (glm3 export: scored with its MindIR "
                            "prefill graph).")
    _add_eval_args(p, "C-Eval root (with dev/, val/, test/)",
                   "predictions JSON ({subject: {id: letter}}, the submission format)")
    p.add_argument("--split", default="val", choices=["dev", "val", "test"])
    p.add_argument("--shots", type=int, default=0, help="solved dev questions in each prompt (0..5)")
    p.add_argument("--subjects", help="comma-separated subjects (default: every subject in the split)")
    p.set_defaults(func=cmd_eval_ceval)

    p = eval_sub.add_parser("adgen", help="generate for ADGEN records and score BLEU-4 and ROUGE-1/2/L")
    _add_eval_args(p, "ADGEN eval file", "JSON-lines file of predictions and references")
    p.add_argument("--max-source-length", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--limit", type=int, help="score only the first N records")
    p.add_argument("--preprocess", default="mindformers_v3", choices=["mindformers_v3", "chat"])
    p.set_defaults(func=cmd_eval_adgen)


def cmd_stage(args) -> int:
    import yaml

    from glm3.pipeline.run import run_stage

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"-S takes key=value (e.g. finetune.lr=1e-3), got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return run_stage(args.name, args.project, overrides)


def cmd_prefect_up(args) -> int:
    from glm3.pipeline.prefect_server import prefect_up

    return prefect_up(args.project, args.port)


def _add_pipeline_commands(sub) -> None:
    """stage, prefect up: the DVC/Prefect pipeline of a project directory."""
    from glm3.pipeline.stages import ORDER

    p = sub.add_parser("stage", help="run one pipeline stage as `dvc repro` would (params.yaml, models/, metrics/)",
                       description="Runs glm3.pipeline.stages.NAME in the project's DVC layout; `dvc repro` runs the "
                       "same through `python -m stages.NAME`. -S overrides params.yaml for this run only.")
    p.add_argument("name", choices=ORDER, help="the stage")
    p.add_argument("--project", default=".", help="project directory with params.yaml (default: .)")
    p.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="override a parameter, e.g. "
                   "finetune.lr=1e-3 (the value is read as YAML)")
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("prefect", help="`glm3 prefect up`: a local Prefect server serving the glm3 deployments")
    prefect_sub = p.add_subparsers(dest="action", required=True, metavar="<action>")
    p = prefect_sub.add_parser("up", help="start a local Prefect server (SQLite, 127.0.0.1) and serve "
                               "glm3/pipeline and glm3/finetune until Ctrl-C",
                               description="Prints the API URL (http://127.0.0.1:PORT/api) on a line of its own; "
                               "then `PREFECT_API_URL=<url> prefect deployment run glm3/finetune --param lr=1e-3` "
                               "runs a fine-tune. Prefect's state is kept in PREFECT_HOME (default "
                               "<project>/.prefect).")
    p.add_argument("--project", default=".", help="project directory with flows/ and params.yaml (default: .)")
    p.add_argument("--port", type=int, default=4200, help="API/UI port on 127.0.0.1 (default 4200)")
    p.set_defaults(func=cmd_prefect_up)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm3", description="ChatGLM3 on MindSpore: download and convert "
                                     "checkpoints; chat, generate, score; fine-tune (full, LoRA, msrun), build rank "
                                     "tables, merge and split distributed checkpoints; export to MindIR and run it; "
                                     "evaluate on C-Eval and ADGEN; run pipeline stages and the Prefect server.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    _add_use_commands(sub)
    _add_checkpoint_commands(sub)
    _add_training_commands(sub)
    _add_distributed_checkpoint_commands(sub)
    _add_deploy_commands(sub)
    _add_eval_commands(sub)
    _add_pipeline_commands(sub)
    return parser


def _log_to_stderr() -> None:
    """The library's own log lines (memory estimates, what the trainer chose) on stderr, once."""
    import logging

    logger = logging.getLogger("glm3")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("glm3: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from glm3.download import DownloadError

    _log_to_stderr()
    try:
        return args.func(args)
    # Input errors (CheckpointError, ConfigError, ...) are ValueErrors; a failed msrun launch is an OSError.
    except (DownloadError, OSError, ValueError) as exc:
        print(f"glm3 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
