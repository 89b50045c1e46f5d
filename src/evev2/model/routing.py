"""Modality routing: every token goes through exactly one copy (text or vision) of each routed module.

The router is built once per forward from the explicit per-token modality mask and shared by all layers. In "index"
mode the residual stream is kept *sorted by modality* ([all text rows | all vision rows]) for the whole decoder, so each
routed module is two contiguous matmuls with no per-module gather/scatter and no host sync per layer. Only attention needs
sequence order: q/k/v are un-sorted once per layer and the attention output is re-sorted once.

"blend" mode is the official formulation (both copies on every token, mixed by a float mask). It costs twice the linear
FLOPs and exists only as a numerical oracle and benchmark baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Module = Callable[[torch.Tensor], torch.Tensor]


def _take_rows(x: torch.Tensor, index: torch.Tensor, reads_zero: bool) -> torch.Tensor:
    """x[index], where index may name x.shape[0], a zero row, if `reads_zero`."""
    if reads_zero:
        x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
    return x.index_select(0, index)


@dataclass(frozen=True)
class RowMove:
    """A one-to-one move of rows, y = [x; 0][index]: row i of x lands in row inverse[i] of y, or nowhere if inverse[i]
    = len(y); a row of y that receives none has index len(x) and is zero. `reverse()` moves back.

    Its backward is the move back, a gather: an indexing backward is a scatter-add, a large share of a CPU step.
    """

    index: torch.Tensor  # (len(y),)
    inverse: torch.Tensor  # (len(x),)
    index_reads_zero: bool = False  # y has rows that receive none
    inverse_reads_zero: bool = False  # x has rows that land nowhere

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _MoveRows.apply(x, self.index, self.inverse, self.index_reads_zero, self.inverse_reads_zero)

    def reverse(self) -> RowMove:
        return RowMove(self.inverse, self.index, self.inverse_reads_zero, self.index_reads_zero)


class _MoveRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, index_reads_zero: bool,
                inverse_reads_zero: bool) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.inverse_reads_zero = inverse_reads_zero
        return _take_rows(x, index, index_reads_zero)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inverse,) = ctx.saved_tensors
        return _take_rows(grad, inverse, ctx.inverse_reads_zero), None, None, None, None


class ModalityRouter:
    def __init__(self, vision_mask: torch.Tensor, mode: str = "index", keep_both: bool = False,
                 text_only: bool = False):
        """vision_mask: bool [B, L], True for image tokens (class, patch and split tokens).

        keep_both: in a single-modality batch, still call the other copy on zero rows, so that every trainable weight
        is in the autograd graph (with zero gradient). Data-parallel training needs this: all ranks must reduce the
        same gradients even when one rank's micro-batch has no image.
        text_only: the caller knows there is no image token (generated tokens), so the image tokens are not counted:
        no host sync, and a compiled decode step stays one graph (a CUDA graph on GPU).
        """
        self.shape = tuple(vision_mask.shape)  # (B, L)
        self.keep_both = keep_both
        flat = vision_mask.reshape(-1)
        if mode == "blend":
            self.mode = "blend"
            self.weight = flat.unsqueeze(-1)  # (N, 1), cast to the activation dtype at use
            return
        num_vision = 0 if text_only else int(flat.sum())  # the single host sync of the forward
        if num_vision == 0 or num_vision == flat.numel():
            self.mode = "text" if num_vision == 0 else "vision"
            return
        self.mode = "sorted"
        self.num_text = flat.numel() - num_vision
        order = torch.argsort(flat.to(torch.uint8), stable=True)  # text rows first, then vision rows
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(flat.numel(), device=flat.device)
        self.sort = RowMove(order, inverse)
        self.unsort = self.sort.reverse()

    def to_stream(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, F] sequence layout -> [N, F] stream layout (sorted by modality in "sorted" mode)."""
        x = x.reshape(-1, x.shape[-1])
        return self.sort(x) if self.mode == "sorted" else x

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[N, F] stream layout -> [B, L, F] sequence layout."""
        if self.mode == "sorted":
            x = self.unsort(x)
        return x.view(*self.shape, x.shape[-1])

    def __call__(self, text: Module, vision: Module | None, x: torch.Tensor) -> torch.Tensor:
        """Apply `text` to text rows and `vision` to vision rows of the stream `x`; `vision=None` means shared."""
        if vision is None:
            return text(x)
        if self.mode == "text":
            return torch.cat([text(x), vision(x[:0])]) if self.keep_both else text(x)
        if self.mode == "vision":
            return torch.cat([text(x[:0]), vision(x)]) if self.keep_both else vision(x)
        if self.mode == "sorted":  # split, not two slices: its backward is one cat, not two zero-filled copies
            text_rows, vision_rows = x.split([self.num_text, x.shape[0] - self.num_text])
            return torch.cat([text(text_rows), vision(vision_rows)])
        w = self.weight.to(x.dtype)
        return text(x) * (1 - w) + vision(x) * w
