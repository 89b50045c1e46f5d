"""Batching: first-fit packing of a step's samples into rows of at most a spliced-token budget, and the collator.

Every batch follows the model's contract: `input_ids` / `labels` (B, T) right-padded with the pad id / -100,
`attention_mask` (B, T) = sample id 1..k inside a packed row and 0 on padding, `images` in row-major placeholder order.
Budgets count spliced tokens (`Sample.num_tokens`), because that is what the decoder actually processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import BatchFeature

from evev2.data.samples import Sample
from evev2.constants import IGNORE_INDEX


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
