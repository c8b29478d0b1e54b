"""The HTTP API over a BackgroundEngine: OpenAI's chat completions (streamed as server-sent events or not, with
tool calls), completions, the model list, health and the engine's statistics.

Whatever a client sends or the model writes is answered in OpenAI's error shape with the right status, never a
traceback: a body that is not a request -> 400; an unknown model -> 404; a prompt beyond the context -> 400
naming the limit; a full queue -> 429; a missing or wrong API key -> 401; a body over the size limit -> 413.
A client that goes away (mid-stream or while waiting) cancels its sequence, whose blocks are freed at the next
token boundary.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm3.runtime.engine import BackgroundEngine, Event, QueueFull
from glm3.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, conversation, parse
from glm3.serve.reply import ChatReply, TextStream

log = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.25  # how often a waiting request checks that its client is still there


class _Disconnected(Exception):
    pass


def _error(status: int, message: str, type: str = "invalid_request_error", code=None) -> JSONResponse:  # noqa: A002
    return JSONResponse(APIError(status, message, type, code=code).body(), status_code=status)


class BodyLimit:
    """ASGI middleware: a request body beyond `limit` bytes is refused with 413 before it is read whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"0")
        too_large = _error(413, f"the request body is over {self.limit} bytes", code="request_too_large")
        if not declared.isdigit() or int(declared) > self.limit:
            return await too_large(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise APIError(413, f"the request body is over {self.limit} bytes", code="request_too_large")
            return message

        return await self.app(scope, limited_receive, send)


class EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs however the stream ends (finished, client gone, failed)."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            self.on_close()


def _sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class Generation:
    """One request's sequence in the engine (its prompt ids, and settings from the request `body`), its events
    as an asyncio queue."""

    def __init__(self, engine: BackgroundEngine, prompt, body):
        loop = asyncio.get_running_loop()
        self.engine, self.queue = engine, asyncio.Queue()
        try:
            self.seq = engine.add(
                prompt,
                body.sampling(),
                body.token_budget(),
                lambda e: loop.call_soon_threadsafe(self.queue.put_nowait, e),
                body.ignore_eos,
            )
        except QueueFull as exc:
            raise APIError(
                429, f"the server is busy: {exc}; retry later", "rate_limit_error", code="queue_full"
            ) from None
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
        self.prompt_tokens = len(prompt)

    async def next(self, request: Request) -> Event:
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    raise _Disconnected() from None

    def cancel(self) -> None:
        self.engine.abort(self.seq)  # no-op once it finished

    def tokens(self) -> list[int]:
        """The generated tokens, without the stop token that ended them."""
        out = self.seq.output
        return out[:-1] if out and out[-1] in self.seq.stop_ids else list(out)

    def usage(self) -> dict:
        n = len(self.seq.output)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}


def create_app(
    engine: BackgroundEngine, tokenizer, model_name: str, api_key: str | None = None, max_body_bytes: int = 4 << 20
) -> FastAPI:
    """The API app: `engine` serves `model_name`; with `api_key` every /v1 route needs `Authorization: Bearer`."""
    app = FastAPI(title="glm3", description="OpenAI-compatible ChatGLM3 server", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return _error(400, str(exc.errors()[0].get("msg", "invalid request")) if exc.errors() else "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return _error(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        log.exception("unexpected error serving %s", request.url.path, exc_info=exc)
        return _error(500, "internal server error (see the server's log)", "server_error")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return _error(401, "missing or wrong API key (Authorization: Bearer <key>)", code="invalid_api_key")
        return await call_next(request)

    async def read_body(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise APIError(400, f"the body is not JSON: {exc}") from None

    def check_model(name: str | None) -> None:
        if name not in (None, model_name):
            raise APIError(
                404,
                f"the model `{name}` does not exist (this server serves `{model_name}`)",
                param="model",
                code="model_not_found",
            )

    @app.get("/health")
    async def health():
        if not engine.alive:
            return _error(503, "the engine has stopped", "server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "glm3"}
        return {"object": "list", "data": [card]}

    @app.get("/v1/stats")
    async def stats():
        return engine.engine.stats()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = parse(ChatCompletionRequest, await read_body(request))
        check_model(body.model)
        history, query, role = conversation(body)
        try:  # a long prompt takes a while to tokenize: not on the event loop
            prompt = (await asyncio.to_thread(tokenizer.build_chat_input, query, history, role))["input_ids"][0]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        stops = body.stops()
        generation = Generation(engine, prompt, body)
        reply = ChatReply(tokenizer, history, stops)
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish_reason=None) -> dict:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": now,
                "model": model_name,
                "choices": [choice],
            }

        if body.stream:

            def end(message, reason):
                if message.get("tool_calls"):
                    yield chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]})
                yield chunk({}, reason)

            return _event_stream(
                generation,
                reply,
                request,
                first=chunk({"role": "assistant", "content": ""}),
                text=lambda delta, tokens: chunk({"content": delta}),
                end=end,
                usage=chunk({}) if body.include_usage else None,
            )
        outcome = await _collect(generation, reply, request)
        if outcome is None:
            return JSONResponse({}, status_code=499)  # the client is gone
        _, message, reason = outcome
        return {
            "id": ident,
            "object": "chat.completion",
            "created": now,
            "model": model_name,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}],
            "usage": generation.usage(),
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = parse(CompletionRequest, await read_body(request))
        check_model(body.model)
        generation = Generation(engine, await asyncio.to_thread(body.prompt_ids, tokenizer), body)
        stream = TextStream(tokenizer, body.stops())
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def result(text: str, finish_reason=None, tokens=None) -> dict:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            if body.return_token_ids:
                choice["token_ids"] = tokens or []
            return {"id": ident, "object": "text_completion", "created": now, "model": model_name, "choices": [choice]}

        if body.stream:
            return _event_stream(
                generation,
                stream,
                request,
                text=lambda delta, tokens: result(delta, tokens=tokens),
                end=lambda message, reason: [result("", reason)],
                usage=result("") if body.include_usage else None,
                per_token=body.return_token_ids,
            )
        outcome = await _collect(generation, stream, request)
        if outcome is None:
            return JSONResponse({}, status_code=499)  # the client is gone
        text, _, reason = outcome
        return {**result(text, reason, generation.tokens()), "usage": generation.usage()}

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app


def _event_stream(generation, reply, request, *, text, end, usage, first=None, per_token=False) -> EventStream:
    """A streamed response: `first`, then text(delta, tokens) for each piece of text, the chunks of
    end(message, finish reason), the usage chunk (`usage` with the counts, when asked for) and [DONE]; a failure
    of the engine is an error event. The sequence is cancelled however the stream ends."""

    async def events():
        try:
            if first is not None:
                yield _sse(first)
            async for kind, value in _run(generation, reply, request, per_token):
                if kind == "text":
                    yield _sse(text(*value))
                elif kind == "error":
                    yield _sse(APIError(500, value, "server_error").body())
                    return
                else:
                    for item in end(*value):
                        yield _sse(item)
            if usage is not None:
                yield _sse({**usage, "choices": [], "usage": generation.usage()})
            yield _sse("[DONE]")
        except _Disconnected:
            return

    return EventStream(events(), generation.cancel)


async def _collect(generation, reply, request) -> tuple[str, dict | None, str] | None:
    """(text, message, finish reason) of a whole reply, or None when the client went away; a failure of the
    engine is an APIError (500). The sequence is cancelled however it ends."""
    text, message, reason = "", None, None
    try:
        async for kind, value in _run(generation, reply, request):
            if kind == "error":
                raise APIError(500, value, "server_error")
            if kind == "text":
                text += value[0]
            else:
                message, reason = value
    except _Disconnected:
        return None
    finally:
        generation.cancel()
    return text, message, reason


async def _run(generation: Generation, reply: TextStream, request: Request, per_token: bool = False):
    """("text", (delta, tokens)) as the reply grows, then ("end", (message or None, finish reason)), or
    ("error", why). per_token: a "text" item for every token, with its id, even when its text is held back.
    A stop string ends the sequence there (it is cancelled in the engine)."""
    reason = None
    while reason is None:
        event = await generation.next(request)
        if event.finish_reason == "error":
            yield "error", f"generation failed: {event.error}"
            return
        if event.token is not None and event.finish_reason != "stop":
            delta = reply.push(event.token)
            if delta or per_token:
                yield "text", (delta, [event.token])
        if reply.stopped:
            generation.cancel()
            reason = "stop"
        elif event.finish_reason is not None:
            reason = "length" if event.finish_reason == "length" else "stop"
    if isinstance(reply, ChatReply):
        delta, message = reply.finish()
        if delta:
            yield "text", (delta, [])
        yield "end", (message, "tool_calls" if message.get("tool_calls") else reason)
    else:
        delta = reply.finish()
        if delta:
            yield "text", (delta, [])
        yield "end", (None, reason)
