"""Records -> training `Sample`s, and the skip accounting that keeps bad data from killing (or silently eating) a run.

A record that cannot be used raises a `SampleError`; the caller turns it into a `Skip` and moves on. The training
process counts every skip in one `DataStats` (whichever worker found it), which fails the run with
`TooManyBadSamplesError` once the bad fraction passes `max_bad_fraction`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evev2.data.errors import (
    BadImageError,
    MissingImageError,
    SampleTooLongError,
    TooManyBadSamplesError,
)
from evev2.data.image_processing import ImageLoadError, num_image_tokens
from evev2.data.processor import EVEProcessor

logger = logging.getLogger(__name__)


@dataclass
class RawRecord:
    """One conversation and its images before decoding: paths (already resolved) or encoded bytes."""

    sample_id: str
    source: str
    conversations: list[dict[str, Any]]
    images: list[Path | bytes]


# A skip's detail is cut to this many characters: records choose what their errors quote, and a skip travels from
# a worker to the training process and into the log.
MAX_SKIP_DETAIL = 500


@dataclass(frozen=True)
class Skip:
    """One unusable record (or unreadable stretch of a shard): why, from which source, and the details.

    The detail is shortened to `MAX_SKIP_DETAIL` characters and made loggable (a lone surrogate quoted from a record
    becomes a `\\udc80` escape).
    """

    reason: str
    source: str
    detail: str

    def __post_init__(self) -> None:
        detail = self.detail
        if len(detail) > MAX_SKIP_DETAIL:
            detail = f"{detail[:MAX_SKIP_DETAIL]}... ({len(detail)} characters)"
        detail = detail.encode("utf-8", "backslashreplace").decode("utf-8")
        object.__setattr__(self, "detail", detail)


@dataclass(eq=False)  # tensors inside: compare by identity
class Sample:
    """A tokenized, decoded training example."""

    input_ids: torch.Tensor  # (T,) long, one IMAGE_TOKEN_INDEX per image
    labels: torch.Tensor  # (T,) long, IGNORE_INDEX where there is no loss
    images: list[torch.Tensor]  # per placeholder, in order: (3, H, W) float
    num_tokens: int  # spliced length: text ids + sum(image tokens - 1)
    source: str
    sample_id: str

    @property
    def has_images(self) -> bool:
        return bool(self.images)


@dataclass
class DataStats:
    """Counts of samples seen, kept and skipped (by reason and by source), with the bad-fraction guard.

    Args:
        max_bad_fraction: skipped / seen above this raises `TooManyBadSamplesError` ...
        min_seen: ... but only once this many samples (or skip events) have been seen.
    """

    max_bad_fraction: float = 0.05
    min_seen: int = 200
    seen: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_by_source: Counter = field(default_factory=Counter)  # source -> count

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def bad_fraction(self) -> float:
        return self.num_skipped / self.seen if self.seen else 0.0

    def record_kept(self, count: int = 1) -> None:
        self.seen += count
        self.kept += count

    def record_skip(self, reason: str, source: str, detail: str) -> None:
        """Count one unusable sample (or unreadable stretch of a shard), log it, and apply the guard."""
        self.seen += 1
        self.skipped[reason] += 1
        self.skipped_by_source[source] += 1
        count = self.skipped[reason]
        # Log the first of each reason and then every power of ten, so a bad dataset cannot flood the log.
        level = logging.WARNING if str(count).rstrip("0") == "1" else logging.DEBUG
        logger.log(level, "skipped sample (%s, %s #%d): %s | %s", source, reason, count, detail, self.summary())
        if self.seen >= self.min_seen and self.bad_fraction > self.max_bad_fraction:
            raise TooManyBadSamplesError(
                f"{self.num_skipped} of {self.seen} samples were unusable ({self.bad_fraction:.1%} > "
                f"max_bad_fraction {self.max_bad_fraction:.1%}): {dict(self.skipped)} by source "
                f"{dict(self.skipped_by_source)}"
            )

    def summary(self) -> str:
        return f"seen={self.seen} kept={self.kept} skipped={dict(self.skipped)}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "skipped_by_source": dict(self.skipped_by_source),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.kept = int(state["seen"]), int(state["kept"])
        self.skipped = Counter(state["skipped"])
        self.skipped_by_source = Counter(state["skipped_by_source"])


class SampleBuilder:
    """Template-encode a `RawRecord`, decode its images and enforce the spliced-token budget.

    Text is encoded first: it is cheap and catches marker/image count mismatches before any pixel is decoded, and a
    sample whose text (or number of images) cannot fit the budget is refused before it is tokenized (decoded).
    """

    def __init__(self, processor: EVEProcessor, max_tokens: int) -> None:
        self.processor = processor
        self.max_tokens = max_tokens

    def __call__(self, record: RawRecord) -> Sample:
        encoded = self.processor.encode_conversation(record.conversations, num_images=len(record.images),
                                                     max_tokens=self.max_tokens)
        unit = self.processor.image_processor.unit
        fewest = len(encoded.input_ids) + len(record.images) * (num_image_tokens(unit, unit, unit) - 1)
        if fewest > self.max_tokens:
            raise SampleTooLongError(f"at least {fewest} spliced tokens ({len(record.images)} images) > budget "
                                     f"{self.max_tokens}")
        pixel_values = self._load_images(record.images)
        image_extra = sum(num_image_tokens(p.shape[-2], p.shape[-1], unit) - 1 for p in pixel_values)
        num_tokens = len(encoded.input_ids) + image_extra
        if num_tokens > self.max_tokens:
            raise SampleTooLongError(f"{num_tokens} spliced tokens > budget {self.max_tokens}")
        return Sample(
            input_ids=torch.tensor(encoded.input_ids, dtype=torch.long),
            labels=torch.tensor(encoded.labels, dtype=torch.long),
            images=pixel_values,
            num_tokens=num_tokens,
            source=record.source,
            sample_id=record.sample_id,
        )

    def _load_images(self, images: list[Path | bytes]) -> list[torch.Tensor]:
        if not images:
            return []
        try:
            return list(self.processor.image_processor(images)["pixel_values"])
        except ImageLoadError as err:
            if isinstance(err.__cause__, FileNotFoundError):
                raise MissingImageError(str(err)) from err
            raise BadImageError(str(err)) from err
