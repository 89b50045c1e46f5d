"""Splicing: replace each image placeholder in `input_ids` with that image's tokens.

Everything the decoder needs is built here, in the spliced coordinates: embeddings, the per-token modality mask, which
image each image token belongs to (for bidirectional image attention), sample ids (for packed rows), position ids that
restart per sample, and labels with image positions ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evev2.constants import IGNORE_INDEX


@dataclass
class SplicedInputs:
    inputs_embeds: torch.Tensor  # (B, L, D)
    attention_mask: torch.Tensor  # (B, L) long: 0 = padding, k > 0 = k-th sample of a packed row
    position_ids: torch.Tensor  # (B, L) long, restarting at 0 for every sample
    mm_token_type_ids: torch.Tensor  # (B, L) long: 1 = image token, 0 = text or padding
    image_ids: torch.Tensor  # (B, L) long: k > 0 = a token of the batch's k-th image (placeholder order), 0 = not one
    labels: torch.Tensor | None  # (B, L) long, IGNORE_INDEX on image tokens and padding


def is_left_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row ends with a real token and some row starts with padding (generation-style batches)."""
    return bool((attention_mask[:, -1] != 0).all() and (attention_mask[:, 0] == 0).any())


def run_starts(segments: torch.Tensor) -> torch.Tensor:
    """True where a run of equal sample ids begins, each row's first token included. (B, L) -> bool (B, L)."""
    new_run = torch.ones_like(segments, dtype=torch.bool)
    new_run[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return new_run


def positions_from_segments(segments: torch.Tensor) -> torch.Tensor:
    """Position ids that count from 0 at the start of every run of equal sample ids. (B, L) -> (B, L)."""
    idx = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    new_run = run_starts(segments)
    run_start = torch.cummax(torch.where(new_run, idx, torch.zeros_like(idx)), dim=1).values
    return torch.where(segments > 0, idx - run_start, torch.zeros_like(idx))


def splice_images(
    input_ids: torch.Tensor,
    image_tokens: list[torch.Tensor],
    text_embeds: torch.Tensor,
    image_token_index: int,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    padding_side: str = "right",
) -> SplicedInputs:
    """Build the spliced batch with a single gather.

    Args:
        input_ids: (B, T) with one `image_token_index` per image, in row-major order.
        image_tokens: per image, (N_i, D) tokens from the patch embedding, in placeholder order.
        text_embeds: (B, T, D) embeddings of `input_ids` (placeholder rows are ignored).
        attention_mask: (B, T); 0 = padding, k > 0 = sample id inside a packed row. Defaults to all ones.
        labels: (B, T) aligned with input_ids; placeholders must be IGNORE_INDEX.
        padding_side: where rows shorter than the longest spliced row get their filler ("left" for generation).
    """
    B, T = input_ids.shape
    device = input_ids.device
    is_image = input_ids == image_token_index
    num_placeholders = int(is_image.sum())
    if num_placeholders != len(image_tokens):
        raise ValueError(f"input_ids hold {num_placeholders} image placeholders but {len(image_tokens)} images were given")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.long()

    image_lengths = torch.tensor([t.shape[0] for t in image_tokens], dtype=torch.long, device=device)
    width = torch.ones(B, T, dtype=torch.long, device=device)
    width[is_image] = image_lengths  # boolean indexing is row-major, the same order as the images
    row_length = width.sum(1)  # (B,)
    L = int(row_length.max())
    offset = (L - row_length) if padding_side == "left" else torch.zeros_like(row_length)
    start = offset[:, None] + width.cumsum(1) - width  # (B, T) spliced position of each input token
    flat_start = start + torch.arange(B, device=device)[:, None] * L  # (B, T) index into B*L

    # One source table: [text rows | image rows | a zero row for filler], gathered into (B*L) slots.
    D = text_embeds.shape[-1]
    text_rows = text_embeds[~is_image]  # (n_text, D)
    image_rows = torch.cat(image_tokens).to(text_embeds.dtype) if image_tokens else text_embeds.new_zeros(0, D)
    source = torch.cat([text_rows, image_rows, text_embeds.new_zeros(1, D)])
    filler = source.shape[0] - 1
    gather = torch.full((B * L,), filler, dtype=torch.long, device=device)
    gather[flat_start[~is_image]] = torch.arange(text_rows.shape[0], device=device)
    image_starts = flat_start[is_image]  # (n_images,)
    within = torch.arange(int(image_lengths.sum()), device=device) - torch.repeat_interleave(
        image_lengths.cumsum(0) - image_lengths, image_lengths)
    image_slots = torch.repeat_interleave(image_starts, image_lengths) + within
    gather[image_slots] = text_rows.shape[0] + torch.arange(image_rows.shape[0], device=device)
    inputs_embeds = source[gather].view(B, L, D)

    def scatter(values: torch.Tensor, fill: int, image_value: torch.Tensor | int | None) -> torch.Tensor:
        out = torch.full((B * L,), fill, dtype=torch.long, device=device)
        out[flat_start[~is_image]] = values[~is_image]
        if image_value is not None:
            out[image_slots] = image_value if isinstance(image_value, int) else torch.repeat_interleave(
                image_value, image_lengths)
        return out.view(B, L)

    segments = scatter(attention_mask, 0, attention_mask[is_image])
    image_ids = torch.zeros(B * L, dtype=torch.long, device=device)
    image_ids[image_slots] = torch.repeat_interleave(torch.arange(1, len(image_tokens) + 1, device=device),
                                                     image_lengths)
    spliced_labels = None
    if labels is not None:
        spliced_labels = scatter(labels.long(), IGNORE_INDEX, IGNORE_INDEX)
    return SplicedInputs(
        inputs_embeds=inputs_embeds,
        attention_mask=segments,
        position_ids=positions_from_segments(segments),
        mm_token_type_ids=(image_ids > 0).long().view(B, L),
        image_ids=image_ids.view(B, L),
        labels=spliced_labels,
    )
