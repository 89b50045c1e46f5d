"""Caption quality filters: length, repetition, language, exact duplicates (and, via `image_hash`, near-duplicate
images). Each drop carries one reason, the first failing check in `check_caption`'s order, counted in `stats.json`.

The language check is dependency-free and deliberately simple: a caption is English when at least
`min_ascii_ratio` of its words are plain ASCII and, for captions of `STOPWORD_MIN_WORDS` words or more, at least
`min_stopword_ratio` of its words are common English function words ("a", "the", "of", ...). Real English prose
has 30-50 % such words; random-token or non-English output has almost none, or fails the ASCII test.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# drop reasons written by the filters (input problems have their own: see `evev2.recap.engine`)
EMPTY, TOO_SHORT, REPETITIVE, NOT_ENGLISH, TRUNCATED, TOO_LONG = (
    "empty", "too_short", "repetitive", "not_english", "truncated", "too_long")
DUPLICATE_CAPTION, NEAR_DUPLICATE_IMAGE = "duplicate_caption", "near_duplicate_image"

STOPWORD_MIN_WORDS = 6
ENGLISH_STOPWORDS = frozenset(
    "a an the and or but of in on at to from by with without for as is are was were be been being there here this "
    "that these those it its they them their he she his her we you i not no into over under above below near next "
    "behind front left right top bottom between while which who what where has have had can one two some many each "
    "other another than then also very".split())

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # letters/digits of any script, inner apostrophes kept


def caption_words(text: str) -> list[str]:
    """Lower-cased words of a caption; punctuation is not a word."""
    return [word.lower() for word in _WORD.findall(text)]


def repeated_ngram_ratio(words: list[str], n: int) -> float:
    """Share of a caption's n-grams that repeat an earlier one: 0 for fresh text, near 1 for a loop."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def ascii_word_ratio(words: list[str]) -> float:
    return sum(word.isascii() for word in words) / len(words) if words else 0.0


def stopword_ratio(words: list[str]) -> float:
    return sum(word in ENGLISH_STOPWORDS for word in words) / len(words) if words else 0.0


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of the caption filters; `image_dedup_distance` None turns near-duplicate image removal off."""

    min_words: int = 5
    max_words: int = 300
    repeat_ngram: int = 3
    max_repeat_ratio: float = 0.3
    min_ascii_ratio: float = 0.9
    min_stopword_ratio: float = 0.15
    drop_truncated: bool = True  # a caption cut by max_new_tokens ends mid-sentence
    dedup_captions: bool = True
    image_dedup_distance: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_words <= self.max_words:
            raise ValueError(f"need 0 <= min_words <= max_words, got {self.min_words} and {self.max_words}")
        if self.repeat_ngram < 1:
            raise ValueError(f"repeat_ngram must be >= 1, got {self.repeat_ngram}")


def check_caption(text: str, finish_reason: str, config: FilterConfig) -> str | None:
    """The reason to drop a generated caption, or None to keep it (duplicates are checked by `CaptionDeduplicator`).

    Order: empty, too_short, repetitive, not_english, truncated, too_long; a looping caption that ran into the
    token cap is counted as repetitive, its cause, not as truncated.
    """
    words = caption_words(text)
    if not words:
        return EMPTY
    if len(words) < config.min_words:
        return TOO_SHORT
    if repeated_ngram_ratio(words, config.repeat_ngram) > config.max_repeat_ratio:
        return REPETITIVE
    if ascii_word_ratio(words) < config.min_ascii_ratio or (
            len(words) >= STOPWORD_MIN_WORDS and stopword_ratio(words) < config.min_stopword_ratio):
        return NOT_ENGLISH
    if config.drop_truncated and finish_reason == "length":
        return TRUNCATED
    if len(words) > config.max_words:
        return TOO_LONG
    return None


class CaptionDeduplicator:
    """Captions kept so far, compared after normalisation (case, spacing and punctuation ignored)."""

    def __init__(self) -> None:
        self._digests: set[bytes] = set()

    @staticmethod
    def _digest(text: str) -> bytes:
        return hashlib.blake2b(" ".join(caption_words(text)).encode("utf-8"), digest_size=16).digest()

    def __len__(self) -> int:
        return len(self._digests)

    def __contains__(self, text: str) -> bool:
        return self._digest(text) in self._digests

    def add(self, text: str) -> None:
        self._digests.add(self._digest(text))
