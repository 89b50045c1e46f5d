"""Each caption filter drops its planted bad caption and keeps real English (the synthetic world's own captions)."""

from __future__ import annotations

import random

import pytest

from evev2.synth.world import generate_world
from evev2.recap.filters import (
    EMPTY,
    NOT_ENGLISH,
    REPETITIVE,
    TOO_LONG,
    TOO_SHORT,
    TRUNCATED,
    CaptionDeduplicator,
    FilterConfig,
    caption_words,
    check_caption,
    repeated_ngram_ratio,
)

GOOD = ("A small red car is parked on the left side of a quiet street, and two people walk past it "
        "under a large green tree.")
CONFIG = FilterConfig()


def test_real_english_captions_are_kept():
    captions = [scene.caption for scene in generate_world(200, seed=5, level=3, render=False)]
    assert [check_caption(c, "stop", CONFIG) for c in captions + [GOOD]] == [None] * (len(captions) + 1)


@pytest.mark.parametrize("caption, finish, reason", [
    ("", "stop", EMPTY),
    (" ... :::: !!", "stop", EMPTY),
    ("a red car", "stop", TOO_SHORT),
    ("the car is red " * 12, "length", REPETITIVE),  # a loop that ran into the cap counts as repetitive
    ("car car car car car car car car", "stop", REPETITIVE),
    ("一辆红色的汽车停在街道的左边，两个人从它旁边走过 汽车 街道 红色", "stop", NOT_ENGLISH),
    ("Ein kleines rotes Auto steht am linken Rand einer ruhigen Straße", "stop", NOT_ENGLISH),  # ASCII but no stopwords
    ("xq zork blim vundo praxel quimby lorp snick tazzle", "stop", NOT_ENGLISH),
    (GOOD, "length", TRUNCATED),
])
def test_planted_bad_captions_are_dropped_with_their_reason(caption, finish, reason):
    assert check_caption(caption, finish, CONFIG) == reason


def test_length_bounds_are_inclusive_and_configurable():
    words = GOOD.split()
    config = FilterConfig(min_words=5, max_words=len(caption_words(GOOD)))
    assert check_caption(GOOD, "stop", config) is None
    assert check_caption(GOOD, "stop", FilterConfig(max_words=len(caption_words(GOOD)) - 1)) == TOO_LONG
    assert check_caption(" ".join(words[:5]), "stop", config) is None
    assert check_caption(" ".join(words[:4]), "stop", config) == TOO_SHORT
    assert check_caption(GOOD, "length", FilterConfig(drop_truncated=False)) is None
    with pytest.raises(ValueError, match="min_words"):
        FilterConfig(min_words=10, max_words=5)


def test_repeated_ngram_ratio_matches_a_brute_force_count():
    rng = random.Random(0)
    for _ in range(50):
        words = [rng.choice("abcd") for _ in range(rng.randint(0, 20))]
        n = rng.randint(1, 4)
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        repeats = sum(gram in grams[:i] for i, gram in enumerate(grams))
        assert repeated_ngram_ratio(words, n) == pytest.approx(repeats / len(grams) if grams else 0.0)


def test_caption_dedup_ignores_case_spacing_and_punctuation():
    dedup = CaptionDeduplicator()
    assert GOOD not in dedup
    dedup.add(GOOD)
    assert GOOD.upper().replace(",", " ,  ") in dedup
    assert GOOD.replace("red", "blue") not in dedup
    assert len(dedup) == 1
