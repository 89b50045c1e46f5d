"""Whole training steps prepared ahead of the training loop, in DataLoader worker processes.

Step k of a rank is made of the next `records_per_step` items of the rank's mixture stream. Every worker walks that
same stream (cheap: RNG draws and cursors, nothing decoded) and prepares only its own steps, k = w+1, w+1+W, ...: it
decodes the records, drops the unusable ones (each a counted `Skip`), packs the others into rows and collates the
micro-batches. The DataLoader returns steps in order, so the data of every step is the same for any number of
workers, 0 included (prepared in the training process). Each step carries the stream's state after it: the training
loop checkpoints that state and resumes exactly, with the same number of workers or another.

A bad record shortens its step by one sample instead of pulling in the next record: that is what keeps steps
independent of each other, and so of the worker that prepares them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from evev2.data.datasets import Mixture
from evev2.data.errors import SampleError
from evev2.data.packing import collate_rows, first_fit_rows
from evev2.data.samples import Sample, Skip
from evev2.constants import IGNORE_INDEX


@dataclass
class PreparedStep:
    """One optimiser step's data for one rank, ready to be moved to the device."""

    index: int  # 1-based step number
    micro_batches: list[dict[str, Any]]  # collate_rows() batches: input_ids, attention_mask, labels, images
    tokens: int  # spliced tokens of the step's samples
    supervised_tokens: int  # positions with a next-token label
    rows: int  # packed rows over all micro-batches
    kept: int  # samples built
    sample_ids: list[str]  # their ids, in draw order
    skips: list[Skip]  # records dropped from this step, and read errors met while drawing it
    state: dict[str, Any]  # the mixture's state after this step (JSON-safe): resume from here

    def pin_memory(self) -> PreparedStep:
        """Page-locked copies, so that `.to(device, non_blocking=True)` overlaps the copy (DataLoader's hook)."""
        return replace(self, micro_batches=[{k: [t.pin_memory() for t in v] if k == "images" else v.pin_memory()
                                             for k, v in batch.items()} for batch in self.micro_batches])


class StepStream(IterableDataset):
    """The endless sequence of `PreparedStep`s after `start_step`; in a worker, only that worker's share of it.

    Args:
        mixture: the rank's record stream, positioned after `start_step` steps.
        records_per_step: items drawn per step (the rank's share of the global batch).
        token_budget: spliced tokens per packed row.
        rows_per_micro_batch: packed rows per forward/backward.
        pad_token_id: filler of short rows.
        start_step: steps already taken (the mixture's state is the one after them).
    """

    def __init__(self, mixture: Mixture, records_per_step: int, token_budget: int, rows_per_micro_batch: int,
                 pad_token_id: int, start_step: int = 0) -> None:
        super().__init__()
        self.mixture = mixture
        self.records_per_step = records_per_step
        self.token_budget = token_budget
        self.rows_per_micro_batch = rows_per_micro_batch
        self.pad_token_id = pad_token_id
        self.start_step = start_step

    def __iter__(self) -> Iterator[PreparedStep]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step
        while True:
            step += 1
            draws = [self.mixture.next_draw(step) for _ in range(self.records_per_step)]
            read_skips = self.mixture.drain_read_skips()
            if (step - self.start_step - 1) % workers == worker:
                yield self.prepare(step, draws, read_skips)

    def prepare(self, step: int, draws: list[tuple[Any, Any]], skips: list[Skip]) -> PreparedStep:
        samples: list[Sample] = []
        for source, item in draws:
            try:
                samples.append(source.build(item))
            except SampleError as err:
                skips.append(Skip(err.reason, source.name, str(err)))
        rows = first_fit_rows(samples, self.token_budget)
        mb = self.rows_per_micro_batch
        batches = [dict(collate_rows(rows[i:i + mb], self.pad_token_id)) for i in range(0, len(rows), mb)]
        return PreparedStep(
            index=step, micro_batches=batches, tokens=sum(s.num_tokens for s in samples),
            supervised_tokens=sum(int((s.labels[1:] != IGNORE_INDEX).sum()) for s in samples), rows=len(rows),
            kept=len(samples), sample_ids=[s.sample_id for s in samples], skips=skips, state=self.mixture.state_dict())


def step_loader(stream: StepStream, num_workers: int, pin_memory: bool) -> Iterator[PreparedStep]:
    """Iterate `stream` through a DataLoader: `num_workers` processes, each with up to two steps in flight.

    The loader seeds its workers from a generator of its own: drawn from torch's global RNG when the first step is
    fetched, the seed would shift the training's random numbers (dropout) after a resume, which restores them before.
    """
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                        prefetch_factor=2 if num_workers else None, persistent_workers=False,
                        generator=torch.Generator())
    return iter(loader)


def default_num_workers(cuda: bool) -> int:
    """min(8, CPU cores per rank) on GPU; 2 on CPU, where the workers share the cores with the training threads."""
    if not cuda:
        return 2
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, len(os.sched_getaffinity(0)) // local_ranks))

