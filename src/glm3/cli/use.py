"""`glm3` chat, generate, score: use a model directory."""

from __future__ import annotations

import json
import sys

from glm3.cli import common


def cmd_chat(args) -> int:
    import glm3

    model, tok = common.load_model_and_tokenizer(args)
    history: list = []
    if args.system or args.tools:
        system = {
            "role": "system",
            "content": args.system
            or "Answer the following questions as best as you can. You have access to the following tools:",
        }
        if args.tools:
            with open(args.tools, encoding="utf-8") as f:
                system["tools"] = json.load(f)
        history.append(system)
    base_history = list(history)
    interactive = sys.stdin.isatty()
    if interactive:
        print("ChatGLM3 (MindSpore). Type your message; 'clear' starts over, 'exit' quits.")
    gen = common.generation_kwargs(args)
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
            role, query = "observation", query[len("/observation ") :]
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


def cmd_generate(args) -> int:
    from glm3.runtime.generation import generate

    model, tok = common.load_model_and_tokenizer(args)
    batch = tok.pad([common.prompt_ids(tok, p, args.chat) for p in args.prompt])
    stops = list(tok.stop_token_ids)
    out = generate(
        model,
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        eos_token_id=stops,
        pad_token_id=tok.pad_id,
        **common.generation_kwargs(args),
    )
    width = batch["input_ids"].shape[1]
    for prompt, row in zip(args.prompt, out):
        new = [int(t) for t in row[width:]]
        cut = next((i for i, t in enumerate(new) if t in stops), len(new))
        text = tok.decode(new[:cut])
        if args.json:
            print(json.dumps({"prompt": prompt, "text": text, "ids": new[: cut + 1]}, ensure_ascii=False))
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
    common.setup_mindspore(args.mode)
    model = glm3.load_model(args.model, dtype=args.dtype, kernels_backend=args.kernels)
    if (ids < 0).any() or (ids >= model.config.padded_vocab_size).any():
        raise SystemExit(f"error: ids must be in [0, {model.config.padded_vocab_size})")
    logits = model(ms.Tensor(ids.astype(np.int32))).asnumpy()
    with atomic_file(args.out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, input_ids=ids, logits=logits)
    print(f"wrote logits {logits.shape} to {args.out}")
    return 0


def register(sub) -> None:
    """chat, generate, score: use a model directory."""
    p = sub.add_parser(
        "chat",
        help="interactive streaming chat (reads stdin when it is not a terminal)",
        description="Chat with a model. Type 'clear' to start over, 'exit' to quit. A line "
        "'/observation TEXT' sends a tool result. When stdin is not a terminal, each line is a query.",
    )
    common.add_model_args(p)
    common.add_generation_args(p, sample_default=True)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--tools", help="JSON file with a list of tool descriptions for the system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="generate continuations for one or more prompts (one batch)")
    common.add_model_args(p)
    common.add_generation_args(p, sample_default=False)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat turn")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("score", help="write the logits of given token ids to an .npz (for verification)")
    common.add_model_args(p)
    p.add_argument("--ids", required=True, help="JSON ([..] or [[..],..]) or .npy file of token ids")
    p.add_argument("--out", required=True, help="output .npz with input_ids and logits [batch, seq, vocab]")
    p.set_defaults(func=cmd_score)
