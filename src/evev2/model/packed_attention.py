"""SDPA over packed rows, one sample at a time.

A packed row holds several samples that must not see each other. A block-diagonal mask over the whole row costs the
row's full L x L scores in every layer, whatever the samples' lengths (padding included), and the mask itself is built
every forward. Here the samples are cut out of their rows, samples of similar length are padded into a few small
batches, and each batch runs SDPA with `is_causal`: no mask, and work in proportion to the samples' own lengths
(BENCHMARKS.md, "packed attention"). Under bidirectional image attention each batch gets its own small mask (causal,
or the same image), built once per forward and shared by all layers. The other kernels keep the row's mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from evev2.model.routing import RowMove
from evev2.model.splice import run_starts


@dataclass(frozen=True)
class PackedSamples:
    """Where the tokens of packed rows go in the padded batches: `slots` moves the B*L tokens (padding tokens go
    nowhere, and get a zero output) to the slots of the batches, whose (samples, length) are `batches`, in slot order;
    `masks`, one (samples, 1, length, length) boolean mask per batch under bidirectional image attention, else None."""

    slots: RowMove
    batches: tuple[tuple[int, int], ...]
    masks: tuple[torch.Tensor, ...] | None = None

    @classmethod
    def from_sample_ids(cls, sample_ids: torch.Tensor, image_blocks: torch.Tensor | None = None) -> PackedSamples:
        """From the packed attention mask (B, L): sample id 1..k per token, 0 on padding; and under bidirectional
        image attention `image_blocks` (B, L): one id per image (unique in its row), -1 on text."""
        B, L = sample_ids.shape
        n, device = B * L, sample_ids.device
        flat = sample_ids.reshape(-1)
        starts = run_starts(sample_ids).reshape(-1).nonzero().squeeze(1)
        lengths = torch.diff(starts, append=torch.tensor([n], device=device))
        samples = (flat[starts] > 0).nonzero().squeeze(1)  # runs that are samples, not padding
        starts, lengths = starts[samples], lengths[samples]
        # longest first; a batch takes samples while they are over half its longest: padding < half of each batch
        order = torch.argsort(lengths, descending=True, stable=True).tolist()
        length_of = lengths.tolist()
        batches: list[list[int]] = []
        for i in order:
            if not batches or 2 * length_of[i] <= length_of[batches[-1][0]]:
                batches.append([])
            batches[-1].append(i)
        index_parts = []
        for members in batches:
            offsets = torch.arange(length_of[members[0]], device=device)
            part = starts[members, None] + offsets  # (samples, longest)
            index_parts.append(torch.where(offsets < lengths[members, None], part, n).reshape(-1))
        index = torch.cat(index_parts)
        real = index < n
        inverse = torch.full((n,), index.numel(), dtype=torch.long, device=device)
        inverse[index[real]] = torch.arange(index.numel(), device=device)[real]
        tokens = sum(length_of)
        shapes = tuple((len(m), length_of[m[0]]) for m in batches)
        masks = None
        if image_blocks is not None:  # padding slots read block -1 (text): they see only back, and nobody sees them
            blocks = torch.cat([image_blocks.reshape(-1), image_blocks.new_full((1,), -1)])[index]
            masks = tuple(_causal_or_same_image(b.view(s, m))
                          for b, (s, m) in zip(blocks.split([s * m for s, m in shapes]), shapes))
        return cls(RowMove(index, inverse, index_reads_zero=index.numel() > tokens, inverse_reads_zero=tokens < n),
                   shapes, masks)

    @torch.compiler.disable
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
               dropout: float = 0.0) -> torch.Tensor:
        """Attention of each sample over itself. q (B, H, L, Hd), k/v (B, Hkv, L, Hd) -> (B, L, H*Hd).

        Eager inside compiled layers (a graph break): its loop over batches has data-dependent sizes, and tracing it
        failed at the first new packing (`train.compile` with packed SDPA rows)."""
        B, H, L, hd = q.shape
        sizes = [s * m for s, m in self.batches]
        slotted = [self.slots(t.transpose(1, 2).reshape(B * L, -1)).split(sizes)
                   for t in (q, k, v)]  # 3 x per batch (samples * length, heads * Hd)
        out = []
        masks = self.masks or (None,) * len(self.batches)
        for (s, m), mask, qb, kb, vb in zip(self.batches, masks, *slotted):
            qb, kb, vb = (t.view(s, m, -1, hd).transpose(1, 2) for t in (qb, kb, vb))  # (s, heads, m, Hd)
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                               scale=scaling, enable_gqa=kb.shape[1] != H)
            out.append(o.transpose(1, 2).reshape(s * m, H * hd))
        return self.slots.reverse()(torch.cat(out)).view(B, L, H * hd)


def _causal_or_same_image(blocks: torch.Tensor) -> torch.Tensor:
    """(samples, length) image ids (-1 on text) -> (samples, 1, length, length): a query sees the keys before it and
    every token of its own image."""
    length = blocks.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=blocks.device).tril()
    same_image = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    return (causal | same_image)[:, None]
