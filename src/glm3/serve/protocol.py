"""The OpenAI chat and completions API as this server reads it: request schemas (pydantic), their mapping onto
ChatGLM3's conversation format, and the error shape.

Messages map onto ChatGLM3's roles: system (and developer) -> <|system|>, user -> <|user|>, assistant ->
<|assistant|> (a tool call it made is replayed as the code block ChatGLM3 writes, glm3.dialog.tool_call), tool (and
the older function role) -> <|observation|>. Tools go into the system message as ChatGLM3 expects them (a
system message is added when the request has none). The last message is the turn the model answers: from the
user or a tool.

Settings the request leaves out take the chat defaults of `glm3 chat` (glm3.dialog.conversation.DEFAULT_GENERATION:
temperature 0.8, top_p 0.8, as ChatGLM3 is meant to be sampled); temperature 0 is greedy decoding. Fields of the
OpenAI API that this server cannot honour are refused (n > 1, logprobs, penalties, JSON response formats,
forced tool choice) rather than silently ignored; fields it has no use for (user, metadata, ...) are ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from glm3.dialog.conversation import DEFAULT_GENERATION
from glm3.dialog.tool_call import ToolCallError, format_tool_call
from glm3.runtime.sampling import SamplingParams

# ChatGLM3 was trained with this system prompt before its tool list (its documented tool-use format).
TOOLS_SYSTEM_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
MAX_STOPS = 4
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "observation",
    "function": "observation",
}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):  # noqa: A002
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class FunctionCall(_Lenient):
    name: str = Field(min_length=1, max_length=256)
    arguments: str


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionSpec(_Lenient):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionSpec


class StreamOptions(_Lenient):
    include_usage: bool = False


class SamplingFields(_Lenient):
    """What chat and completion requests share."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # beyond OpenAI's API, as vLLM takes it
    repetition_penalty: float | None = Field(None, gt=0)  # idem
    ignore_eos: bool = False  # idem: generate max_tokens, past the model's stop tokens
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    logprobs: bool | int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    def unsupported(self) -> str | None:
        if (self.n or 1) != 1:
            return "n must be 1: one choice per request (send several requests for more)"
        if self.logprobs:
            return "logprobs are not supported"
        if self.frequency_penalty or self.presence_penalty:
            return "frequency_penalty and presence_penalty are not supported (repetition_penalty is)"
        return None

    def sampling(self) -> SamplingParams:
        temperature = DEFAULT_GENERATION["temperature"] if self.temperature is None else self.temperature
        top_p = DEFAULT_GENERATION["top_p"] if self.top_p is None else self.top_p
        return SamplingParams(
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_k=self.top_k or 0,
            top_p=top_p,
            repetition_penalty=self.repetition_penalty or 1.0,
            seed=self.seed,
        )

    def token_budget(self) -> int | None:
        """max_tokens; None: all the context leaves."""
        return self.max_tokens

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > 256 for s in stops):
            raise APIError(
                400, f"stop takes up to {MAX_STOPS} non-empty strings of at most 256 characters", param="stop"
            )
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: str | dict | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict | None = None

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unsupported(self) -> str | None:
        if self.tool_choice not in (None, "auto", "none"):
            return "tool_choice must be 'auto' or 'none': ChatGLM3 decides itself whether to call a tool"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format must be text"
        return super().unsupported()


class CompletionRequest(SamplingFields):
    """prompt: a text (after [gMASK] sop, as the model's prompts begin) or token ids taken as they are."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    echo: bool = False
    suffix: str | None = None
    return_token_ids: bool = False  # beyond OpenAI's API, as vLLM has it: each choice (chunk) carries its tokens

    def unsupported(self) -> str | None:
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], (str, list)) and len(self.prompt) != 1:
            return "prompt must be one text or one list of token ids"
        if self.echo or self.suffix:
            return "echo and suffix are not supported"
        return super().unsupported()

    def token_budget(self) -> int | None:
        return self.max_tokens or 16  # OpenAI's default for completions

    def prompt_ids(self, tokenizer) -> list[int]:
        prompt = (
            self.prompt[0] if isinstance(self.prompt, list) and isinstance(self.prompt[0], (str, list)) else self.prompt
        )
        if isinstance(prompt, list):
            return list(prompt)
        return [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop"), *tokenizer.encode(prompt)]


def parse(model_class: type[SamplingFields], body: Any) -> SamplingFields:
    """The request, or APIError(400) saying which field is wrong and why."""
    try:
        request = model_class.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise APIError(400, f"{where}: {first['msg']}{more}", param=where) from None
    problem = request.unsupported()
    if problem:
        raise APIError(400, problem)
    return request


def conversation(request: ChatCompletionRequest) -> tuple[list[dict], str, str]:
    """(ChatGLM3 history, the query, its role) of a chat request."""
    tools = [t.function.model_dump(exclude_none=True) for t in request.tools or []]
    if request.tool_choice == "none":
        tools = []
    history: list[dict] = []
    for index, message in enumerate(request.messages):
        role = ROLES[message.role]
        if role == "assistant" and message.tool_calls:
            if message.text().strip():
                history.append({"role": "assistant", "metadata": "", "content": message.text()})
            for call in message.tool_calls:
                history.append(
                    {"role": "assistant", "metadata": call.function.name, "content": _call_text(call, index)}
                )
        elif role == "assistant":
            history.append({"role": "assistant", "metadata": "", "content": message.text()})
        else:
            history.append({"role": role, "content": message.text()})
    if tools:
        system = next((item for item in history if item["role"] == "system"), None)
        if system is None:
            history.insert(0, {"role": "system", "content": TOOLS_SYSTEM_PROMPT, "tools": tools})
        else:
            system["tools"] = tools
    last = history.pop()
    if last["role"] not in ("user", "observation"):
        raise APIError(
            400, "the last message must be from the user or a tool (it is the turn the model answers)", param="messages"
        )
    return history, last["content"], last["role"]


def _call_text(call: ToolCall, index: int) -> str:
    where = f"messages.{index}.tool_calls"
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"{where}: arguments are not JSON ({exc})", param=where) from None
    if not isinstance(arguments, dict):
        raise APIError(400, f"{where}: arguments must be a JSON object", param=where)
    try:
        return format_tool_call(arguments)
    except (ToolCallError, RecursionError) as exc:
        raise APIError(400, f"{where}: {exc}", param=where) from None
