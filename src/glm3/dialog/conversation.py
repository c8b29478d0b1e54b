"""chat / stream_chat: ChatGLM3's conversation protocol on top of generation.

A turn: build_chat_input(query, history, role) -> generate until eos, <|user|> or <|observation|> ->
parse the reply. The reply may hold several assistant segments separated by <|assistant|>; each
segment's first line is its metadata. Empty metadata: plain text. Metadata with tools declared in the
system message: a tool call, returned as {"name": metadata, "parameters": {...}} (parsed without
executing anything); a call that is not a plain literal call is returned as text starting with
INVALID_TOOL_CALL_MARKER. Metadata without tools: {"name": metadata, "content": text}.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np

from glm3.dialog.tool_call import ToolCallError, parse_tool_call
from glm3.modeling.tokenizer import ChatGLM3Tokenizer

INVALID_TOOL_CALL_MARKER = "[invalid tool call]"
DEFAULT_GENERATION = {"max_new_tokens": 512, "do_sample": True, "top_p": 0.8, "temperature": 0.8}


def process_response(output: str, history: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """Turn the decoded reply into (response, history with the assistant segments appended)."""
    history = copy.deepcopy(history)
    has_tools = bool(history) and history[0].get("role") == "system" and "tools" in history[0]
    content: Any = ""
    for segment in output.split("<|assistant|>"):
        if "\n" in segment:
            metadata, text = segment.split("\n", 1)
        else:  # no metadata line (e.g. a truncated reply): plain text
            metadata, text = "", segment
        if not metadata.strip():
            text = text.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": text})
            content = text
            continue
        history.append({"role": "assistant", "metadata": metadata, "content": text})
        name = metadata.strip()
        if has_tools:
            try:
                content = {"name": name, "parameters": parse_tool_call(text)}
            except ToolCallError as exc:
                content = f"{INVALID_TOOL_CALL_MARKER} {name}: {exc}\n{text}"
        else:
            content = {"name": name, "content": text}
    return content, history


def _generation_kwargs(gen: dict[str, Any], tokenizer: ChatGLM3Tokenizer) -> dict[str, Any]:
    kwargs = {**DEFAULT_GENERATION, **gen}
    if kwargs.get("eos_token_id") is None:
        kwargs["eos_token_id"] = list(tokenizer.stop_token_ids)
    return kwargs


def _reply_ids(tokens: list[int], stops: set[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in stops else tokens


def stream_chat(
    model,
    tokenizer: ChatGLM3Tokenizer,
    query: str,
    history: list[dict[str, Any]] | None = None,
    role: str = "user",
    **gen,
) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    """Yield (partial response text, history) as tokens arrive, then the final (response, history)."""
    history = list(history or [])
    inputs = tokenizer.build_chat_input(query, history, role)
    kwargs = _generation_kwargs(gen, tokenizer)
    eos = kwargs["eos_token_id"]
    stops = {int(eos)} if isinstance(eos, (int, np.integer)) else {int(t) for t in eos}
    new_history = history + [{"role": role, "content": query}]
    tokens: list[int] = []
    shown = ""
    from glm3.runtime.generation import iter_generate  # imports MindSpore: only when generating

    for step in iter_generate(model, inputs["input_ids"], **kwargs):
        tokens.append(int(step[0]))
        text = tokenizer.decode(_reply_ids(tokens, stops))
        # Hold back text that ends inside a multi-byte character until it is complete.
        if text and not text.endswith("\ufffd") and text != shown:
            shown = text
            yield text, new_history
    yield process_response(tokenizer.decode(_reply_ids(tokens, stops)), new_history)


def chat(
    model,
    tokenizer: ChatGLM3Tokenizer,
    query: str,
    history: list[dict[str, Any]] | None = None,
    role: str = "user",
    **gen,
) -> tuple[Any, list[dict[str, Any]]]:
    """One conversation turn: (response, updated history). gen: generation settings (see generate)."""
    *_, last = stream_chat(model, tokenizer, query, history, role, **gen)  # the final (response, history)
    return last
