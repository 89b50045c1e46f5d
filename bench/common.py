"""Timing helpers shared by the benchmarks: median wall time of repeated calls, after warm-up."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 2) -> dict[str, float]:
    """Median wall time of each function, measured round-robin so that machine noise hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    return f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in row) + " |")
