"""`evev2 serve`: load a model folder and serve it with uvicorn."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from evev2.infer.engine import DEFAULT_MAX_BATCH_SIZE, InferenceEngine
from evev2.infer.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from evev2.serve.app import ServeSettings, create_app

API_KEY_ENV = "EVEV2_API_KEY"


def serve_cli(
    *,
    model: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    template: Literal["eve", "chatml", "plain"] | None = None,
    device: str | None = None,
    dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = None,
    quantize: Literal["int8"] | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_waiting: int = 64,
    default_max_tokens: int = 256,
    max_images: int = 8,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    allow_remote_images: bool = False,
    compile: bool | None = None,
) -> None:
    """Serve a model with an OpenAI-compatible API (POST /v1/chat/completions), /v1/models, /health and a web page at /.

    Args:
        model: model folder (weights + processor files).
        host: interface to bind; 127.0.0.1 keeps the server local. Use 0.0.0.0 only behind an API key.
        port: TCP port.
        api_key: require 'Authorization: Bearer KEY' on /v1/ routes; default from the EVEV2_API_KEY variable.
        model_name: the id clients send as "model"; default the folder name.
        template: chat template override (eve, chatml, plain); default the folder's.
        device: e.g. cpu, cuda, cuda:1; default cuda when available.
        dtype: float32, bfloat16, float16 or float64; default bfloat16 on GPU, float32 on CPU.
        quantize: int8 stores the decoder's linear weights as int8 (torchao, the `quantize` extra).
        max_batch_size: most requests decoding at once (continuous batching: others join as rows finish).
        max_waiting: requests waiting for a row beyond this get 503.
        default_max_tokens: max_tokens when a request gives none.
        max_images: most images per request.
        max_image_pixels: most pixels per image (checked before decoding).
        max_image_bytes: most encoded bytes per image.
        allow_remote_images: fetch http(s) image URLs (off: server-side request forgery risk).
        compile: a compiled decode step (static cache, CUDA graphs) or eager steps; default on for CUDA, off for CPU.
    """
    import uvicorn

    engine = InferenceEngine.from_pretrained(model, device=device, dtype=dtype, template=template,
                                             allow_remote_images=allow_remote_images, max_pixels=max_image_pixels,
                                             max_image_bytes=max_image_bytes, max_images=max_images,
                                             max_batch_size=max_batch_size, quantize=quantize, compile=compile)
    settings = ServeSettings(
        model_name=model_name or Path(model).resolve().name, api_key=api_key or os.environ.get(API_KEY_ENV) or None,
        max_waiting=max_waiting, default_max_tokens=default_max_tokens,
        max_body_bytes=max_images * max_image_bytes * 4 // 3 + 2**20)  # base64 images + the text
    uvicorn.run(create_app(engine, settings), host=host, port=port)
