"""Batching: sequence packing up to a spliced-token budget, the unpacked collator, and modality/length grouping.

Every batch follows the model's contract: `input_ids` / `labels` (B, T) right-padded with the pad id / -100,
`attention_mask` (B, T) = sample id 1..k inside a packed row and 0 on padding, `images` in row-major placeholder order.
Budgets count spliced tokens (`Sample.num_tokens`), because that is what the decoder actually processes.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import BatchFeature

from evev2.data.samples import Sample
from evev2.data.templates import IGNORE_INDEX


def collate_rows(rows: Sequence[Sequence[Sample]], pad_token_id: int) -> BatchFeature:
    """Rows of samples (one or several per row) -> the model's batch contract, right-padded."""
    lengths = [sum(len(s.input_ids) for s in row) for row in rows]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    images: list[torch.Tensor] = []
    for r, row in enumerate(rows):
        cursor = 0
        for sample_index, sample in enumerate(row, start=1):
            span = slice(cursor, cursor + len(sample.input_ids))
            input_ids[r, span] = sample.input_ids
            labels[r, span] = sample.labels
            attention_mask[r, span] = sample_index
            images.extend(sample.images)
            cursor = span.stop
    return BatchFeature(data={"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "images": images})


def collate_unpacked(samples: Sequence[Sample], pad_token_id: int) -> BatchFeature:
    """One sample per row (attention_mask is 1 on real tokens): the unpacked baseline."""
    return collate_rows([[sample] for sample in samples], pad_token_id)


def first_fit_rows(samples: Sequence[Sample], token_budget: int) -> list[list[Sample]]:
    """First-fit decreasing: longest first, each into the first row with room; no row exceeds the budget."""
    rows: list[list[Sample]] = []
    room: list[int] = []
    for sample in sorted(samples, key=lambda s: s.num_tokens, reverse=True):
        if sample.num_tokens > token_budget:
            raise ValueError(f"sample {sample.sample_id} has {sample.num_tokens} tokens > budget {token_budget}")
        slot = next((i for i, free in enumerate(room) if free >= sample.num_tokens), None)
        if slot is None:
            rows.append([])
            room.append(token_budget)
            slot = len(rows) - 1
        rows[slot].append(sample)
        room[slot] -= sample.num_tokens
    return rows


def packing_efficiency(rows: Sequence[Sequence[Sample]], token_budget: int) -> float:
    """Real spliced tokens / (rows x budget): the share of the compute budget spent on data."""
    return sum(s.num_tokens for row in rows for s in row) / (len(rows) * token_budget)


@dataclass
class PackingStats:
    """Running totals over emitted batches; `efficiency` = real spliced tokens / (rows x budget)."""

    token_budget: int
    rows: int = 0
    samples: int = 0
    tokens: int = 0

    @property
    def efficiency(self) -> float:
        return self.tokens / (self.rows * self.token_budget) if self.rows else 0.0


class PackedBatches:
    """Stream samples into packed batches of `rows_per_batch` rows of at most `token_budget` spliced tokens.

    Samples are buffered `buffer_size` at a time and first-fit packed; the fullest rows are emitted, and the samples
    of rows left over (fewer than a batch) go back into the buffer to be packed with the next arrivals.
    """

    def __init__(
        self,
        samples: Iterable[Sample],
        token_budget: int,
        rows_per_batch: int,
        pad_token_id: int,
        buffer_size: int = 64,
    ) -> None:
        if buffer_size < rows_per_batch:
            raise ValueError("buffer_size must be at least rows_per_batch")
        self.samples = samples
        self.token_budget = token_budget
        self.rows_per_batch = rows_per_batch
        self.pad_token_id = pad_token_id
        self.buffer_size = buffer_size
        self.stats = PackingStats(token_budget)

    def _emit(self, rows: list[list[Sample]]) -> BatchFeature:
        self.stats.rows += len(rows)
        self.stats.samples += sum(len(row) for row in rows)
        self.stats.tokens += sum(s.num_tokens for row in rows for s in row)
        return collate_rows(rows, self.pad_token_id)

    def __iter__(self) -> Iterator[BatchFeature]:
        buffer: list[Sample] = []
        for sample in self.samples:
            buffer.append(sample)
            if len(buffer) < self.buffer_size:
                continue
            rows = sorted(first_fit_rows(buffer, self.token_budget), key=lambda row: -sum(s.num_tokens for s in row))
            full = len(rows) // self.rows_per_batch * self.rows_per_batch
            for start in range(0, full, self.rows_per_batch):
                yield self._emit(rows[start : start + self.rows_per_batch])
            buffer = [s for row in rows[full:] for s in row]
        rows = first_fit_rows(buffer, self.token_budget)
        for start in range(0, len(rows), self.rows_per_batch):
            yield self._emit(rows[start : start + self.rows_per_batch])


def group_by_modality_length(
    samples: Iterable[Sample], batch_size: int, buffer_size: int = 256, seed: int = 0
) -> Iterator[list[Sample]]:
    """Unpacked batching that keeps image and text-only samples apart and similar lengths together.

    Within each buffer, each modality is sorted by length and cut into batches; batch order is then shuffled
    (seeded) so training does not see lengths in order. A trailing partial batch per modality is kept for the next
    buffer, and flushed at the end.
    """
    rng = random.Random(seed)
    buffer: list[Sample] = []

    def cut(pool: list[Sample], final: bool) -> tuple[list[list[Sample]], list[Sample]]:
        batches: list[list[Sample]] = []
        leftover: list[Sample] = []
        for has_images in (True, False):
            group = sorted((s for s in pool if s.has_images == has_images), key=lambda s: s.num_tokens)
            whole = len(group) if final else len(group) // batch_size * batch_size
            batches += [group[i : i + batch_size] for i in range(0, whole, batch_size)]
            leftover += group[whole:]
        rng.shuffle(batches)
        return batches, leftover

    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            batches, buffer = cut(buffer, final=False)
            yield from batches
    batches, _ = cut(buffer, final=True)
    yield from batches
