"""The OpenAI chat-completions wire format (the subset we serve), validated by pydantic.

Types are strict (a string where a number belongs is a 400, not a silent coercion); unknown OpenAI fields are
ignored so that stock clients work. `to_generation_request` turns a validated request into the engine's form:
`image_url` parts become `image` slots and their URLs the request's images, in order.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from evev2.infer.engine import GenerationRequest
from evev2.infer.errors import InvalidRequestError


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name for max_tokens
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's default
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)


def to_generation_request(body: ChatCompletionRequest, default_max_tokens: int) -> GenerationRequest:
    """Pull image URLs out of the messages (they become the request's images) and map the sampling fields."""
    images: list[str] = []
    messages = []
    for message in body.messages:
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        parts = []
        for part in message.content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
                continue
            url = part.image_url.url
            if not url.startswith("data:") and not url.lower().startswith(("http://", "https://")):
                # Never read server-side paths named by a client.
                raise InvalidRequestError("image_url.url must be a data:image/...;base64, URL (or http(s) when the "
                                          "server enables remote images)", param="messages")
            images.append(url)
            parts.append({"type": "image"})
        messages.append({"role": message.role, "content": parts})
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens
    return GenerationRequest(messages=messages, images=images, max_new_tokens=max_tokens,
                             temperature=body.temperature, top_p=body.top_p, stop=stop)
