"""The OpenAI-compatible HTTP server, built by a factory around one `InferenceEngine` (no module-level state).

Routes: `POST /v1/chat/completions` (JSON or server-sent events), `GET /v1/models`, `GET /health`, and the web page at
`/`. Every failure a client can cause is a 4xx with an OpenAI-style JSON error body; anything else is a 500 with a
generic message (the traceback goes to the server log, never to the client).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from evev2.infer.engine import GenerationResult, InferenceEngine
from evev2.infer.errors import InvalidRequestError
from evev2.serve.batching import QueueFullError, ServingQueue, Ticket
from evev2.serve.schemas import ChatCompletionRequest, to_generation_request
from evev2.serve.security import ApiKeyMiddleware, BodySizeLimitMiddleware, error_response

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    api_key: str | None = None
    max_waiting: int = 64
    default_max_tokens: int = 256
    max_body_bytes: int = 64 * 2**20


class _CancellingStream(StreamingResponse):
    """A streaming response that runs `on_close` however the stream ends: finished, failed, or client gone.

    Starlette cancels `stream_response` when the client disconnects; the `finally` frees the request's batch row.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def stream_response(self, send) -> None:  # noqa: ANN001 (starlette's Send)
        try:
            await super().stream_response(send)
        finally:
            self.on_close()


def create_app(engine: InferenceEngine, settings: ServeSettings) -> FastAPI:
    requests = ServingQueue(engine, settings.max_waiting)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        requests.start()
        try:
            yield
        finally:
            requests.stop()

    app = FastAPI(title="evev2", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.requests = requests
    app.state.settings = settings
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)  # added last = runs first
    _add_error_handlers(app)
    page = resources.files("evev2.serve").joinpath("index.html").read_text(encoding="utf-8")
    created = int(time.time())

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, **asdict(engine.stats)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "evev2"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):  # noqa: ANN202 (JSON or a stream)
        if body.model is not None and body.model != settings.model_name:
            return error_response(404, f"model {body.model!r} does not exist; this server serves "
                                       f"{settings.model_name!r}", "invalid_request_error", code="model_not_found",
                                  param="model")
        prompt = await run_in_threadpool(engine.prepare, to_generation_request(body, settings.default_max_tokens))
        reply = _Reply(settings.model_name)
        if not body.stream:
            ticket = requests.submit(prompt)
            try:
                result = await asyncio.wrap_future(ticket.future)
            except asyncio.CancelledError:
                ticket.cancel()
                raise
            return reply.completion(result)
        events: asyncio.Queue[str | None] = asyncio.Queue()
        post = _poster(asyncio.get_running_loop(), events)
        ticket = requests.submit(prompt, on_delta=post)
        ticket.future.add_done_callback(lambda _: post(None))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _CancellingStream(_sse(reply, ticket, events, include_usage), on_close=ticket.cancel)

    return app


def _poster(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[str | None], None]:
    """Hand an item from the batcher thread to the event loop; a loop that is gone (server stopping) drops it."""

    def post(item: str | None) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:
            pass

    return post


class _Reply:
    """Builds the OpenAI response objects of one completion."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())

    def completion(self, result: GenerationResult) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}],
                "usage": _usage(result)}

    def chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def _usage(result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(reply: _Reply, ticket: Ticket, events: asyncio.Queue, include_usage: bool) -> AsyncIterator[str]:
    yield _event(reply.chunk({"role": "assistant", "content": ""}))
    while (delta := await events.get()) is not None:
        yield _event(reply.chunk({"content": delta}))
    if ticket.future.cancelled():
        return
    if ticket.future.exception() is not None:
        # Headers are sent already, so the failure is reported in-band, without internals.
        yield _event({"error": {"message": "generation failed", "type": "server_error", "param": None,
                                "code": None}})
        return
    result: GenerationResult = ticket.future.result()
    yield _event(reply.chunk({}, result.finish_reason))
    if include_usage:
        yield _event({**reply.chunk({}), "choices": [], "usage": _usage(result)})
    yield "data: [DONE]\n\n"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
            if error.get("type") == "json_invalid":
                problems.append(f"malformed JSON: {error.get('ctx', {}).get('error', error.get('msg'))}")
            else:
                problems.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
        first = exc.errors()[0] if exc.errors() else {}
        param = None if first.get("type") == "json_invalid" else \
            ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_response(400, "; ".join(problems[:5]), "invalid_request_error", code="invalid_value",
                              param=param)

    @app.exception_handler(InvalidRequestError)
    async def invalid_request(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(exc.status, str(exc), "invalid_request_error", code=exc.code, param=exc.param)

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, exc: QueueFullError) -> JSONResponse:
        return error_response(503, str(exc), "server_busy", code="queue_full")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500
                              else "server_error")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal server error", "server_error")
