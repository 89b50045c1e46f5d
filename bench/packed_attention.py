"""Attention over packed rows: sample-by-sample causal SDPA (`PackedSamples`, what training runs with SDPA) against
one block-causal mask per row (SDPA with a boolean mask equal to the one HF's `create_causal_mask` built for it, what
training ran before).

Forward + backward of the attention alone, q/k/v random, on rows packed as the demo's stage 2.2 packs them (8 rows of
640 tokens, samples of 60-280 tokens, the last row half padding; 4 heads of 32) and as a larger model's would be
(4 rows of 4096, samples of 300-2400 tokens; 14 heads of 64, 2 KV heads). The mask's construction is timed with it.
The Trainer's step on the demo's stages is in BENCHMARKS.md, measured against the previous commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median_seconds, print_table  # noqa: E402

from evev2.model.packed_attention import PackedSamples  # noqa: E402

SHAPES = {  # name: (rows, row length, heads, kv heads, head dim, shortest and longest sample)
    "demo stage 2.2": (8, 640, 4, 4, 32, 60, 280),
    "Qwen2.5-0.5B heads, 4096-token rows": (4, 4096, 14, 2, 64, 300, 2400),
}


def packed_ids(rows: int, length: int, shortest: int, longest: int, g: torch.Generator) -> torch.Tensor:
    """Sample ids (rows, length) as a packer leaves them: samples until the next one does not fit, then padding; the
    last row is half padding."""
    ids = torch.zeros(rows, length, dtype=torch.long)
    for r in range(rows):
        end = length // 2 if r == rows - 1 else length
        pos, sample = 0, 1
        while True:
            n = int(torch.randint(shortest, longest + 1, (1,), generator=g))
            if pos + n > end:
                break
            ids[r, pos:pos + n], pos, sample = sample, pos + n, sample + 1
    return ids


def main(repeats: int = 5) -> list[list[object]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (B, L, H, Hkv, hd, shortest, longest) in SHAPES.items():
        ids = packed_ids(B, L, shortest, longest, g)
        q = torch.randn(B, H, L, hd, generator=g, requires_grad=True)
        k, v = (torch.randn(B, Hkv, L, hd, generator=g, requires_grad=True) for _ in range(2))
        grad = torch.randn(B, L, H * hd, generator=g)

        def by_sample():
            PackedSamples.from_sample_ids(ids).attend(q, k, v, hd ** -0.5).backward(grad)

        def block_mask():
            causal = torch.ones(L, L, dtype=torch.bool).tril()
            mask = (ids[:, :, None] == ids[:, None, :]) & causal & (ids > 0)[:, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=Hkv != H)
            out.transpose(1, 2).reshape(B, L, H * hd).backward(grad)

        t = median_seconds({"mask": block_mask, "samples": by_sample}, repeats)
        fill = float((ids > 0).float().mean())
        rows.append([name, f"{B}x{L}, {fill:.0%} filled", t["mask"] * 1e3, t["samples"] * 1e3,
                     t["mask"] / t["samples"]])
    print_table(f"packed_attention: fwd+bwd of the attention over packed rows [{machine()}]",
                ["rows", "tokens", "block mask ms", "sample by sample ms", "speed-up"], rows)
    return rows


if __name__ == "__main__":
    main()
