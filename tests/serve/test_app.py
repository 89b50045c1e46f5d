"""The HTTP API in-process (TestClient): every client error is a 4xx JSON body, the key is enforced, SSE == JSON."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from evev2.infer import InferenceEngine
from evev2.infer.images import ImageLimits
from evev2.serve import ServeSettings, create_app
from tests.serve.conftest import chat_body, png_bytes, to_data_url

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BYTES = 30_000
MAX_PIXELS = 5_000


@pytest.fixture(scope="module")
def client(tiny_chat_engine):
    """Small limits: 2 images, 5000 pixels and 30 kB per image, 200 kB per request body."""
    engine = InferenceEngine(tiny_chat_engine.model, tiny_chat_engine.processor,
                             ImageLimits(max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES), max_images=2)
    settings = ServeSettings(model_name="tiny-eve", api_key=KEY, default_max_tokens=5, max_body_bytes=200_000)
    with TestClient(create_app(engine, settings), raise_server_exceptions=False) as test_client:
        yield test_client


def post(client, body, headers=AUTH):
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post("/v1/chat/completions", content=raw, headers={**headers, "Content-Type": "application/json"})


def sse_events(text: str) -> list:
    events = [block.removeprefix("data: ") for block in text.split("\n\n") if block.strip()]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_page_health_and_models(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text and "getReader" in page.text
    assert "src=\"http" not in page.text and "href=\"http" not in page.text  # self-contained: no CDN
    assert client.get("/health").json()["status"] == "ok"  # open, for load balancers
    models = client.get("/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["tiny-eve"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_api_key_is_required_before_anything_else(client, headers):
    for response in (client.get("/v1/models", headers=headers), post(client, b"{not json", headers),
                     post(client, chat_body("hi"), headers)):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


def test_completion_shape_usage_and_stop(client):
    body = chat_body("Describe it.", [to_data_url(png_bytes(64, 64, 0))], max_tokens=6)
    reply = post(client, body).json()
    choice = reply["choices"][0]
    assert reply["object"] == "chat.completion" and reply["model"] == "tiny-eve"
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    text = choice["message"]["content"]
    assert reply["usage"]["completion_tokens"] == 6 and reply["usage"]["total_tokens"] == 6 + reply["usage"][
        "prompt_tokens"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    stopped = post(client, {**body, "stop": stop}).json()["choices"][0]
    assert stopped["message"]["content"] == text[:text.find(stop)] and stopped["finish_reason"] == "stop"
    assert post(client, chat_body("no max_tokens")).json()["usage"]["completion_tokens"] == 5  # the server default


def test_streamed_equals_non_streamed(client):
    body = chat_body("What do you see?", [to_data_url(png_bytes(32, 96, 1))], max_tokens=8)
    plain = post(client, body).json()
    response = post(client, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    assert len([d for d in deltas if d]) > 1
    assert "".join(deltas) == plain["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert events[-1]["usage"] == plain["usage"] and events[-1]["choices"] == []


def flat_png(h: int, w: int, comment_bytes: int = 0) -> bytes:
    """One colour compresses to almost nothing; a text chunk adds bytes without adding pixels."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * comment_bytes)
    buffer = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 7, dtype=np.uint8)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


GOOD = to_data_url(png_bytes(32, 32, 2))

ERROR_CASES = [
    # (body, status, fragment of the message, param)
    (b"{not json", 400, "malformed JSON", None),
    (b"[1, 2]", 400, "", None),
    ({"temperature": 0}, 400, "messages", "messages"),
    ({**chat_body("hi"), "max_tokens": "ten"}, 400, "valid integer", "max_tokens"),
    ({**chat_body("hi"), "temperature": "hot"}, 400, "valid number", "temperature"),
    ({**chat_body("hi"), "stream": "yes"}, 400, "valid boolean", "stream"),
    ({**chat_body("hi"), "top_p": 1.5}, 400, "less than or equal", "top_p"),
    ({**chat_body("hi"), "max_tokens": 0}, 400, "greater than or equal", "max_tokens"),
    ({**chat_body("hi"), "n": 2}, 400, "", "n"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "", "messages.0.content.str"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "", "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, 400, "", None),
    ({**chat_body("hi"), "model": "gpt-4"}, 404, "does not exist", "model"),
    (chat_body("hi", ["data:text/plain;base64,aGVsbG8="]), 400, "image/*", None),
    (chat_body("hi", [to_data_url(b"\x89PNG\r\n\x1a\nnot really")]), 400, "cannot decode", None),
    (chat_body("hi", ["data:image/png;base64,%%%"]), 400, "base64", None),
    (chat_body("hi", [to_data_url(flat_png(100, 100))]), 400, "over the cap", None),  # 10000 pixels, few bytes
    (chat_body("hi", [to_data_url(flat_png(32, 32, 40_000))]), 400, "over the limit", None),  # 40 kB, few pixels
    (chat_body("hi", [GOOD, GOOD, GOOD]), 400, "limit is 2", "images"),
    (chat_body("hi", ["file:///etc/passwd"]), 400, "data:image", "messages"),
    (chat_body("hi", ["/etc/passwd"]), 400, "data:image", "messages"),
    (chat_body("hi", ["http://169.254.169.254/latest/meta-data"]), 400, "disabled", None),
    (chat_body("hi", [GOOD], max_tokens=4000), 400, "context window", "max_tokens"),
    ({"messages": [{"role": "assistant", "content": "I speak first"}]}, 400, "user", "messages"),
    (chat_body("x" * 300_000), 413, "over 200000 bytes", None),
]


@pytest.mark.parametrize("body, status, fragment, param", ERROR_CASES)
def test_client_errors_are_4xx_json_without_internals(client, body, status, fragment, param):
    response = post(client, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
    assert "Traceback" not in response.text and "File \"" not in response.text


def test_the_server_still_answers_after_every_error(client):
    for body, *_ in ERROR_CASES:
        post(client, body)
    assert client.get("/nowhere").json()["error"]["message"] == "Not Found"
    ok = post(client, chat_body("still there?", [GOOD], max_tokens=3))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_a_chunked_body_is_cut_off_at_the_limit(client):
    """No Content-Length to check up front: the body is counted as it is read."""

    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"x" * 10_000
        yield b'"}]}'

    response = client.post("/v1/chat/completions", content=chunks(),
                           headers={**AUTH, "Content-Type": "application/json"})
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 413 and "over 200000 bytes" in response.json()["error"]["message"]
