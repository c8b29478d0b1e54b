"""Parse a ChatGLM3 tool call without executing anything.

The model writes a call as a code block whose body is `tool_call(name=value, ...)`. The reference
implementation runs that text through Python's eval(); here it is accepted only when it is a single call of
`tool_call` with keyword arguments whose values are what JSON can carry: strings, numbers (finite), True,
False, None, lists (a tuple becomes a list) and dicts with string keys, nested at most MAX_DEPTH deep;
integers within 64 bits.
Sets, bytes, complex numbers, expressions (`1+1`, `-(-1)`), repeated argument names or dict keys, and anything
longer than MAX_CALL_CHARS raise ToolCallError, so a caller can always print the result as JSON.

Why a token scan before `ast`: Python's parser recurses once per operator, so `tool_call(a=1+1+...)` with a
few thousand terms, or thousands of unary minus signs, overflows the stack (RecursionError) or the parser's
memory (MemoryError) before any check on the tree could run. The scan (Python's own tokenizer, which does not
recurse) admits only the tokens of literal calls and bounds the bracket depth, so what reaches `ast.parse` is
shallow.
"""

from __future__ import annotations

import ast
import io
import json
import keyword as _keyword
import math
import tokenize
from typing import Any

MAX_CALL_CHARS = 100_000
MAX_DEPTH = 32  # brackets inside tool_call(...): dicts in lists in dicts...
_OPENERS, _CLOSERS = "([{", ")]}"
_PUNCTUATION = set(_OPENERS + _CLOSERS) | {",", ":", "="}
_NAMES = {"tool_call", "True", "False", "None"}


class ToolCallError(ValueError):
    pass


def strip_code_block(text: str) -> str:
    """The body of a ```...``` block (first and last line removed), or the text itself when not fenced."""
    lines = text.strip().split("\n")
    if len(lines) >= 2 and lines[0].lstrip().startswith("```") and lines[-1].strip() == "```":
        return "\n".join(lines[1:-1])
    return text.strip()


def _scan(body: str) -> None:
    """Refuse, without parsing, any token a literal call cannot hold, brackets nested deeper than MAX_DEPTH,
    and a minus sign anywhere but directly before a number."""
    depth, previous = 0, None
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(body).readline))
    except (tokenize.TokenError, SyntaxError) as exc:  # unterminated string or bracket, bad indentation
        raise ToolCallError(f"not a Python expression: {exc.args[0] if exc.args else exc}") from None
    for i, tok in enumerate(tokens):
        kind, text = tok.type, tok.string
        if kind in (
            tokenize.NL,
            tokenize.NEWLINE,
            tokenize.COMMENT,
            tokenize.ENDMARKER,
            tokenize.INDENT,
            tokenize.DEDENT,
        ):
            continue
        if kind == tokenize.OP:
            if text in _OPENERS:
                depth += 1
                if depth > MAX_DEPTH + 1:  # + the call's own parenthesis
                    raise ToolCallError(f"tool call nested deeper than {MAX_DEPTH} levels")
            elif text in _CLOSERS:
                depth -= 1
            elif text == "-":
                j = i + 1
                while tokens[j].type in (tokenize.NL, tokenize.COMMENT):  # ENDMARKER always ends the list
                    j += 1
                if tokens[j].type != tokenize.NUMBER or (
                    previous is not None and previous.string not in ("(", "[", "{", ",", ":", "=")
                ):
                    raise ToolCallError("tool call arguments must be literal values, not expressions")
            elif text not in _PUNCTUATION:
                raise ToolCallError(f"tool call arguments must be literal values; {text!r} is an operator")
        elif kind == tokenize.NAME:
            if text not in _NAMES and not (
                previous is not None and previous.string in ("(", ",") and tokens[i + 1].string == "="
            ):
                raise ToolCallError(f"tool call arguments must be literal values; {text!r} is a name")
        elif kind not in (tokenize.STRING, tokenize.NUMBER):
            raise ToolCallError(f"unexpected {tokenize.tok_name[kind]} token {text!r} in a tool call")
        previous = tok


def _value(node: ast.AST, where: str) -> Any:
    """The JSON-compatible value of a literal node (the scan has bounded its depth)."""
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return value
        if isinstance(value, int):
            if not -(2**63) <= value < 2**64:  # what JSON readers (and json.dumps) handle
                raise ToolCallError(f"{where}: integer out of the 64-bit range")
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ToolCallError(f"{where}: {value} is not a finite number")
            return value
        raise ToolCallError(f"{where}: {type(value).__name__} values are not allowed (JSON has no such type)")
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) in (int, float)
    ):
        return -_value(node.operand, where)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(item, where) for item in node.elts]
    if isinstance(node, ast.Dict):
        out: dict[str, Any] = {}
        for key, item in zip(node.keys, node.values):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                raise ToolCallError(f"{where}: dict keys must be strings")
            if key.value in out:
                raise ToolCallError(f"{where}: dict key {key.value!r} appears twice")
            out[key.value] = _value(item, where)
        return out
    if isinstance(node, ast.Set):
        raise ToolCallError(f"{where}: sets are not allowed (JSON has none); write a list")
    raise ToolCallError(f"{where} is not a literal value")


def parse_tool_call(text: str) -> dict[str, Any]:
    """Keyword arguments of a `tool_call(...)` expression, as JSON-compatible values (see the module)."""
    body = strip_code_block(text)
    if len(body) > MAX_CALL_CHARS:
        raise ToolCallError(f"tool call is too long ({len(body)} characters; at most {MAX_CALL_CHARS})")
    _scan(body)
    try:
        tree = ast.parse(body, mode="eval")
    except SyntaxError as exc:
        raise ToolCallError(f"not a Python expression: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # e.g. an integer of more than 4300 digits
        raise ToolCallError(f"not a parsable tool call: {exc}") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.func.id != "tool_call":
        raise ToolCallError("expected a single call of tool_call(...)")
    if call.args:
        raise ToolCallError("tool_call takes keyword arguments only")
    params: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise ToolCallError("**kwargs expansion is not allowed in a tool call")
        if keyword.arg in params:
            raise ToolCallError(f"argument {keyword.arg!r} is given twice")
        params[keyword.arg] = _value(keyword.value, f"argument {keyword.arg!r}")
    return params


def _literal(value: Any, depth: int = 0) -> str:
    if depth > MAX_DEPTH:
        raise ToolCallError(f"tool call arguments nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is also a Python string literal
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise ToolCallError("integer out of the 64-bit range")
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolCallError(f"{value} is not a finite number")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(item, depth + 1) for item in value) + "]"
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise ToolCallError("dict keys must be strings")
        return (
            "{"
            + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_literal(v, depth + 1)}" for k, v in value.items())
            + "}"
        )
    raise ToolCallError(f"{type(value).__name__} values cannot be tool call arguments")


def format_tool_call(params: dict[str, Any]) -> str:
    """The code block ChatGLM3 writes for a call with these (JSON) arguments, which parse_tool_call reads back
    as `params`: how an earlier call is replayed in a conversation's history."""
    for name in params:
        if not (isinstance(name, str) and name.isidentifier()) or _keyword.iskeyword(name):
            raise ToolCallError(f"{name!r} cannot be a tool call argument name")
    args = ", ".join(f"{name}={_literal(value)}" for name, value in params.items())
    return f"```python\ntool_call({args})\n```"
