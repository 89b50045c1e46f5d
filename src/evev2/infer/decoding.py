"""Per-row decoding state for batched generation: text deltas, stop strings, EOS, length and cancellation.

Every row of a batch is its own request, with its own sampling parameters and stop strings. The batcher
(`batcher.py`) feeds each row's newest token to that row's `RowDecoder`, and `PerRowSampling` applies each row's
temperature and top-p with HF's own warpers. A greedy row keeps only its argmax, so it is exactly greedy even in a
sampled batch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from transformers import PreTrainedTokenizerBase, TemperatureLogitsWarper, TopPLogitsWarper

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class RowControl:
    """A caller's hooks into one row: where its text deltas go as they are decoded, and a flag that ends it early."""

    on_delta: Callable[[str], None] | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this row at the next step (e.g. the client went away); the others go on."""
        self.cancel_event.set()


class RowDecoder:
    """Turns one row's generated token ids into text, incrementally.

    Text is released only when it is final: never half a UTF-8 character, and never a tail that could still become
    a stop string. The stop string itself and everything after it are dropped.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        eos_token_ids: set[int],
        max_new_tokens: int,
        stop: list[str],
        control: RowControl | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_new_tokens = max_new_tokens
        self.stop = [s for s in stop if s]
        self.control = control or RowControl()
        self._complete = ""  # decoded text of the tokens up to the last whole character
        self._pending: list[int] = []  # tokens after it, whose bytes may still end mid-character
        self.completion_tokens = 0
        self.text = ""  # final text released so far
        self.finish_reason: FinishReason | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int) -> None:
        """Take the next generated token (ignored once the row is done)."""
        if self.done:
            return
        self.completion_tokens += 1
        if token_id in self.eos_token_ids:
            self._finish("stop", self._decoded())
            return
        self._pending.append(token_id)
        decoded = self._decoded()
        cut = self._first_stop(decoded)
        if cut is not None:
            self._finish("stop", decoded[:cut])
        elif self.completion_tokens >= self.max_new_tokens:
            self._finish("length", decoded)
        else:
            self._release(decoded[:len(decoded) - self._held_back(decoded)])

    def check_cancelled(self) -> None:
        """End the row if its caller cancelled it; the batch goes on for the other rows."""
        if not self.done and self.control.cancel_event.is_set():
            self.finish_reason = "cancelled"

    def _decoded(self) -> str:
        """All text decoded so far, without a trailing incomplete UTF-8 sequence (it waits for its next bytes).

        Byte-level BPE decodes piecewise (decode(a + b) == decode(a) + decode(b) when `a` ends on a whole character),
        so only the tokens since the last whole character are decoded again: O(1) per token, not O(length).
        """
        piece = self.tokenizer.decode(self._pending, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if piece.endswith("\ufffd"):
            return (self._complete + piece.rstrip("\ufffd")).lstrip()
        self._complete += piece
        self._pending = []
        # Answers start after "ASSISTANT:" (eve) or a newline, so the first token usually carries a space; the
        # official CLI strips it too. Stripping only the start keeps every later delta an exact suffix.
        return self._complete.lstrip()

    def _first_stop(self, decoded: str) -> int | None:
        # A stop string can only be new if it ends in the unreleased tail, so search from just before it.
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (decoded.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, decoded: str) -> int:
        """Length of the longest tail of `decoded` that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(decoded)), longest, -1):
                if decoded.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _release(self, text: str) -> None:
        if len(text) > len(self.text):
            delta, self.text = text[len(self.text):], text
            if self.control.on_delta is not None:
                self.control.on_delta(delta)

    def _finish(self, reason: FinishReason, text: str) -> None:
        self._release(text)
        self.finish_reason = reason


class PerRowSampling:
    """Each row's own temperature and top-p (HF's warpers, on the rows that share them); temperature 0 = greedy."""

    def __init__(self, temperatures: list[float], top_ps: list[float]) -> None:
        self.temperatures = temperatures
        self.top_ps = top_ps

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> (B, V) scores to sample from (-inf outside each row's nucleus)."""
        scores = scores.clone()
        groups: dict[tuple[float, float], list[int]] = {}
        for row, (t, p) in enumerate(zip(self.temperatures, self.top_ps, strict=True)):
            groups.setdefault((t, p), []).append(row)
        for (t, p), rows in groups.items():
            idx = torch.tensor(rows, device=scores.device)
            warped = TemperatureLogitsWarper(t)(None, scores[idx]) if t > 0 else None
            # Greedy: only the argmax survives, so sampling picks it with probability 1. Also for a t > 0 so small that
            # logits / t overflow (inf, or NaN below the dtype's tiniest value): softmax would be NaN, and the limit of
            # softmax(logits / t) as t -> 0 is the argmax anyway.
            if warped is None or not torch.isfinite(warped.max(dim=-1).values).all():
                best = scores[idx].argmax(dim=-1, keepdim=True)
                scores[idx] = torch.full_like(scores[idx], -float("inf")).scatter(1, best, scores[idx].gather(1, best))
                continue
            if p < 1.0:
                warped = TopPLogitsWarper(p)(None, warped)
            scores[idx] = warped
        return scores
