"""Joining the process group that `torchrun` describes, shared by training, evaluation and re-captioning."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is one
    process. Joins the group once (NCCL on GPUs, gloo on CPU); calling it again returns the same answer."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available()
              else torch.device("cpu"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives run on the current device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if dist.is_initialized() else 0), world, device


@contextmanager
def distributed_session() -> Iterator[tuple[int, int, torch.device]]:
    """`init_distributed()` for the length of a command; the group is destroyed at the end if this call made it."""
    created = not dist.is_initialized()
    try:
        yield init_distributed()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
