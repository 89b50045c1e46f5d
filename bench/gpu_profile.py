"""Where an eager training step spends its time on a GPU: kernel launches and the top ops, ours against dense Qwen2.

Answers one question from BENCHMARKS.md: is the eager routed step bound by the CPU launching kernels (then
`train.compile` is the fix) or by GPU work? Prints, per model, the number of kernel launches per step, the CPU and
GPU totals, and the ops with the most self CPU time. `--smoke` runs tiny dims on the CPU.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from gpu_train_step import BATCHES, SHAPES, build, loss_fn, make_batch


def profile_step(kind: str, shape: str, batch_name: str, device: torch.device, top: int) -> None:
    dims = SHAPES[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = make_batch(dims, *BATCHES[batch_name], device, dtype)
    model = build(kind, dims, device, dtype)
    spliced = build("ours", dims, device, dtype) if kind == "dense" else None
    step = loss_fn(kind, model, batch, spliced)
    del spliced
    for _ in range(3):  # warm-up
        step().backward()
        model.zero_grad(set_to_none=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        step().backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key == "cudaMemcpyAsync")
    cpu_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    gpu_ms = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3
    print(f"== {kind} {shape} {batch_name}: {launches} kernel launches, {syncs} sync/memcpy calls, "
          f"self CPU {cpu_ms:.1f} ms, self GPU {gpu_ms:.1f} ms")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top))
    del model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny dims on the CPU")
    parser.add_argument("--shape", default="0.5B")
    parser.add_argument("--kinds", nargs="+", default=["ours", "dense"])
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    shape, batch = ("smoke", "smoke") if args.smoke else (args.shape, "anchor")
    for kind in args.kinds:
        profile_step(kind, shape, batch, device, args.top)


if __name__ == "__main__":
    main()
