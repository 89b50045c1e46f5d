"""`make bench`: every CPU benchmark, one after the other, each printing its side-by-side ratios.

Run it on a quiet machine: the ratios are measured round-robin within each benchmark, but other heavy processes
still add noise. BENCHMARKS.md records the numbers with the machine they ran on.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

BENCHMARKS = ["dnc_overhead", "packed_attention", "train_step", "data_throughput", "serve_load"]


def main() -> None:
    for name in BENCHMARKS:
        if not (Path(__file__).parent / f"{name}.py").exists():
            continue
        print(f"\n# bench/{name}.py", flush=True)
        importlib.import_module(name).main()


if __name__ == "__main__":
    main()
