"""Request guards that must run before FastAPI reads the body: the API key, and a cap on the body size.

Both are plain ASGI middleware. As FastAPI dependencies they would run only after the JSON body is parsed, so an
unauthenticated client could still make the server read and parse an arbitrarily large body.
"""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def error_response(status: int, message: str, error_type: str, code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    """The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""
    return JSONResponse({"error": {"message": message, "type": error_type, "param": param, "code": code}},
                        status_code=status)


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on every `/v1/` route (the page and /health stay open)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                          "authentication_error", code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Answers 413 for bodies over `max_bytes`: at once when Content-Length says so, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # raised inside the app, so its HTTPException handler answers
                    raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, counted_receive, send)

    def _too_large(self) -> JSONResponse:
        return error_response(413, f"request body over {self.max_bytes} bytes", "invalid_request_error",
                              code="request_too_large")
