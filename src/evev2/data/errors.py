"""Why a training sample is unusable.

Every error carries a short `reason` so the data pipeline can count skips per cause instead of crashing; anything
that is not a `SampleError` is a bug and propagates.
"""

from __future__ import annotations

from evev2.errors import UserError


class SampleError(ValueError):
    """A sample that cannot be turned into training tokens; `reason` names the skip counter it lands in."""

    reason = "bad_sample"


class MalformedRecordError(SampleError):
    """The record is not valid JSON, lacks required fields, or its roles do not alternate user/assistant."""

    reason = "malformed_record"


class EmptyConversationError(SampleError):
    """The conversation has no assistant answer to learn from."""

    reason = "empty_conversation"


class ImageCountMismatchError(SampleError):
    """The number of `<image>` markers differs from the number of images supplied."""

    reason = "image_count_mismatch"


class TemplateMismatchError(SampleError):
    """Rendered text and tokens disagree (a token straddles a supervised boundary, or decode != text).

    The official code masks such samples silently; we refuse them so the cause is visible.
    """

    reason = "template_mismatch"


class SampleTooLongError(SampleError):
    """The spliced sequence (text + image tokens) is longer than the token budget."""

    reason = "too_long"


class MissingImageError(SampleError):
    """An image file named by the record does not exist."""

    reason = "missing_image"


class BadImageError(SampleError):
    """An image exists but cannot be decoded (corrupt, truncated, not an image, decompression bomb)."""

    reason = "bad_image"


class TooManyBadSamplesError(UserError, RuntimeError):
    """More than `max_bad_fraction` of the samples seen were skipped: the data (or its paths) is broken."""
