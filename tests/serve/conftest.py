"""Serving fixtures: PNG data URLs, and one live uvicorn server (API key "test-key") shared by the live tests."""

from __future__ import annotations

import base64
import io
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

API_KEY = "test-key"


def png_bytes(h: int, w: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def to_data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def image_urls() -> list[str]:
    """Eight noise PNGs of different sizes (so their token counts differ), as data URLs."""
    sizes = [(64, 64), (32, 96), (50, 40), (64, 32), (40, 64), (32, 32), (96, 32), (48, 48)]
    return [to_data_url(png_bytes(h, w, seed)) for seed, (h, w) in enumerate(sizes)]


def chat_body(question: str, urls: list[str] = (), **fields) -> dict:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


@pytest.fixture(scope="session")
def live_server(tiny_chat_engine):
    """A real uvicorn server on a free 127.0.0.1 port, in a background thread."""
    from evev2.serve import ServeSettings, create_app
    from evev2.serve.background import background_server

    settings = ServeSettings(model_name="tiny-eve", api_key=API_KEY)
    app = create_app(tiny_chat_engine, settings)
    with background_server(app) as url:
        yield SimpleNamespace(url=url, app=app, engine=tiny_chat_engine)


def wait_idle(server, timeout: float = 20.0) -> dict:
    """The live server's /health once no request is running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(f"{server.url}/health").json()
        if not health["busy"]:
            return health
        time.sleep(0.05)
    raise AssertionError("the server stayed busy")
