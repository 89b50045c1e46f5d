"""Errors a caller can fix: the request is refused, nothing was generated, and the message says why.

They are `ValueError`s, so batch callers (eval) can catch them and retry one request at a time; the server maps them
to HTTP 4xx with `status`, `code` and `param` in an OpenAI-style error body.
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine refuses before generating (bad parameter, bad image, too many images, ...)."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ImageInputError(InvalidRequestError):
    """An image that cannot be used: not an image, corrupt, over the byte or pixel limit, or a refused URL."""

    code = "invalid_image"


class ContextLengthError(InvalidRequestError):
    """Prompt tokens (text + image tokens) plus the requested new tokens exceed the model's context window."""

    code = "context_length_exceeded"
