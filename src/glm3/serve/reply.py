"""Generated tokens as text to stream: what is safe to send so far, where a stop string ends the text, and at the
end ChatGLM3's reply as an OpenAI message (text, or tool calls).

Text is held back while it could still change or be cut: an incomplete UTF-8 character (decoded as U+FFFD), the
start of a stop string or of a new reply segment, and whitespace at either end of a chat reply (which the
message drops). So the streamed deltas always add up to exactly the text of the non-streamed answer.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from glm3.dialog.conversation import process_response

SEGMENT = "<|assistant|>"  # separates the segments of one reply (text, then a tool call, ...)


def _partial_suffix(text: str, marks: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins one of `marks` without completing it."""
    longest = 0
    for mark in marks:
        for size in range(min(len(mark) - 1, len(text)), longest, -1):
            if mark.startswith(text[-size:]):
                longest = size
                break
    return longest


class TextStream:
    """Tokens in, text deltas out, cut at the first stop string (`stopped` then says so)."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def text(self) -> str:
        """All the text so far, cut before the first stop string."""
        text = self.tokenizer.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        return text

    def safe(self, text: str, final: bool) -> str:
        if final:
            return text
        keep = len(text) - len(text.rstrip("\ufffd"))
        keep = max(keep, _partial_suffix(text, self.stops))
        return text[: len(text) - keep]

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.text()
        return self._delta(self.safe(text, final=self.stopped))

    def finish(self) -> str:
        return self._delta(self.text())

    def _delta(self, safe: str) -> str:
        if not safe.startswith(self.sent) or len(safe) <= len(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent) :], safe
        return delta


class ChatReply(TextStream):
    """An assistant reply: segments of "metadata\ncontent" separated by <|assistant|>. The first segment's
    content streams when its metadata is empty (plain text). At the end every segment is read by
    glm3.dialog.conversation.process_response with the request's history (whose system message carries the tools):
    plain segments are the message's text, tool calls its tool_calls (a malformed call stays text, marked)."""

    def __init__(self, tokenizer, history: list[dict], stops: Sequence[str] = ()):
        super().__init__(tokenizer, stops)
        self.history = history

    def _streamable(self, text: str) -> str:
        newline = text.find("\n")
        if newline < 0 or text[:newline].strip():
            return ""  # the metadata line is not complete yet, or names a tool: nothing streams
        content = text[newline + 1 :]
        ended = self.stopped
        if SEGMENT in content:
            content, ended = content[: content.find(SEGMENT)], True
        content = content.lstrip()
        if ended:
            return content.rstrip()
        keep = max(len(content) - len(content.rstrip()), _partial_suffix(content, [SEGMENT]))
        return self.safe(content[: len(content) - keep], final=False)

    def push(self, token: int) -> str:
        self.tokens.append(token)
        return self._delta(self._streamable(self.text()))

    def message(self) -> dict[str, Any]:
        """{"role": "assistant", "content": text or None, "tool_calls": [...] (only when there are calls)}."""
        texts, calls = [], []
        for segment in self.text().split(SEGMENT):
            response, _ = process_response(segment, self.history)
            if isinstance(response, dict) and "parameters" in response:
                arguments = json.dumps(response["parameters"], ensure_ascii=False)
                calls.append(
                    {
                        "id": f"call_{uuid.uuid4().hex[:24]}",
                        "type": "function",
                        "function": {"name": response["name"], "arguments": arguments},
                    }
                )
            else:
                text = (response["content"] if isinstance(response, dict) else response).strip()
                if text:
                    texts.append(text)
        message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) or (None if calls else "")}
        if calls:
            message["tool_calls"] = calls
        return message

    def finish(self) -> tuple[str, dict[str, Any]]:
        """(the text not streamed yet, the whole message)."""
        message = self.message()
        content = message["content"] or ""
        return (self._delta(content) if content.startswith(self.sent) else ""), message
