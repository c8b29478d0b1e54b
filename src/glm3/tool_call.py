"""Parse a ChatGLM3 tool call without executing anything.

The model writes a call as a code block whose body is `tool_call(name=value, ...)`. The reference
implementation runs that text through Python's eval(); here it is parsed with `ast` and accepted only
when it is a single call of `tool_call` with keyword arguments whose values are literals (strings,
numbers, booleans, None, and lists/tuples/dicts/sets of those). Anything else raises ToolCallError.
"""
from __future__ import annotations

import ast
from typing import Any

MAX_CALL_CHARS = 100_000


class ToolCallError(ValueError):
    pass


def strip_code_block(text: str) -> str:
    """The body of a ```...``` block (first and last line removed), or the text itself when not fenced."""
    lines = text.strip().split("\n")
    if len(lines) >= 2 and lines[0].lstrip().startswith("```") and lines[-1].strip() == "```":
        return "\n".join(lines[1:-1])
    return text.strip()


def parse_tool_call(text: str) -> dict[str, Any]:
    """Keyword arguments of a `tool_call(...)` expression, as Python literals."""
    body = strip_code_block(text)
    if len(body) > MAX_CALL_CHARS:
        raise ToolCallError(f"tool call is too long ({len(body)} characters)")
    try:
        tree = ast.parse(body, mode="eval")
    except SyntaxError as exc:
        raise ToolCallError(f"not a Python expression: {exc.msg}") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.func.id != "tool_call":
        raise ToolCallError("expected a single call of tool_call(...)")
    if call.args:
        raise ToolCallError("tool_call takes keyword arguments only")
    params: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise ToolCallError("**kwargs expansion is not allowed in a tool call")
        try:
            params[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ToolCallError(f"argument {keyword.arg!r} is not a literal value") from None
    return params
