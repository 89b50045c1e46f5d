"""Patch embedding: the whole "vision encoder" of an encoder-free VLM.

Two convs turn each 32x32 pixel patch into one token. A learned class vector opens the image and a learned split
vector closes every grid row (the last one included), so the decoder sees the 2-D layout without 2-D positions.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from transformers import initialization as init

from evev2.model.configuration_eve import EVEConfig


class EVEPatchEmbedding(nn.Module):
    def __init__(self, config: EVEConfig):
        super().__init__()
        c = config
        self.conv1 = nn.Conv2d(3, c.patch_hidden_size, kernel_size=c.patch_size, stride=c.patch_size)
        self.act = nn.GELU()  # exact (erf) GELU, as the official tower
        self.conv2 = nn.Conv2d(c.patch_hidden_size, c.hidden_size, kernel_size=c.patch_merge, stride=c.patch_merge)
        self.class_embedding = nn.Parameter(torch.randn(c.hidden_size))
        self.split_embedding = nn.Parameter(torch.randn(c.hidden_size))
        self.step = c.image_pixels_per_token

    def reset_parameters(self) -> None:
        """PyTorch's default conv init and N(0, 1) marker vectors, as the official tower (what __init__ already gives)."""
        for conv in (self.conv1, self.conv2):
            bound = 1.0 / conv.weight[0].numel() ** 0.5
            init.uniform_(conv.weight, -bound, bound)
            init.uniform_(conv.bias, -bound, bound)
        init.normal_(self.class_embedding, std=1.0)
        init.normal_(self.split_embedding, std=1.0)

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Embed each [3, H, W] image into [1 + h*(w+1), D] tokens (h = H/32, w = W/32), in input order.

        Images of equal size share one conv call, so a batch of same-size crops costs one kernel launch.
        """
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3 or img.shape[1] % self.step or img.shape[2] % self.step:
                raise ValueError(f"image {i} has shape {tuple(img.shape)}; expected [3, H, W] with H, W multiples "
                                 f"of {self.step}")
            groups[tuple(img.shape[1:])].append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        dtype = self.conv1.weight.dtype
        for idx in groups.values():
            x = torch.stack([images[i] for i in idx]).to(dtype)  # (N, 3, H, W)
            x = self.conv2(self.act(self.conv1(x)))  # (N, D, h, w)
            n, d, h, w = x.shape
            split = self.split_embedding.to(x.dtype).view(1, d, 1, 1).expand(n, d, h, 1)
            x = torch.cat([x, split], dim=3)  # (N, D, h, w+1): a split token ends every row
            x = x.flatten(2).transpose(1, 2)  # (N, h*(w+1), D), row-major
            cls = self.class_embedding.to(x.dtype).view(1, 1, d).expand(n, 1, d)
            x = torch.cat([cls, x], dim=1)  # (N, 1 + h*(w+1), D)
            for j, i in enumerate(idx):
                out[i] = x[j]
        return out  # type: ignore[return-value]
