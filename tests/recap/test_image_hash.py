"""dHash finds re-encoded / resized copies and tells different images apart; the banded index finds exactly the
hashes a brute-force Hamming scan finds."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from evev2.recap.image_hash import NearDuplicateIndex, dhash, hamming


def _random_image(seed: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)  # blocky content, as photos are at thumbnail scale
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


def test_copies_are_near_and_different_images_are_far():
    image = _random_image(0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=60)
    recompressed = Image.open(io.BytesIO(buffer.getvalue()))
    resized = image.resize((150, 121), Image.Resampling.BICUBIC)
    base = dhash(image)
    assert 0 <= base < 2 ** 64
    assert hamming(base, dhash(recompressed)) <= 4 and hamming(base, dhash(resized)) <= 4
    others = [hamming(base, dhash(_random_image(seed))) for seed in range(1, 20)]
    assert min(others) > 10


@pytest.mark.parametrize("distance", [0, 3, 8])
def test_index_agrees_with_brute_force(distance):
    rng = random.Random(distance)
    stored = [rng.getrandbits(64) for _ in range(200)]
    # probes: stored hashes with a few bits flipped (some within the distance, some beyond) and fresh ones
    probes = [h ^ sum(1 << b for b in rng.sample(range(64), rng.randint(0, distance + 3))) for h in stored[:100]]
    probes += [rng.getrandbits(64) for _ in range(50)]
    index = NearDuplicateIndex(distance)
    for h in stored:
        index.add(h)
    assert len(index) == len(stored)
    expected = [any(hamming(p, h) <= distance for h in stored) for p in probes]
    assert [index.contains_near(p) for p in probes] == expected
    assert any(expected) and not all(expected)


def test_index_rejects_a_meaningless_distance():
    with pytest.raises(ValueError, match="max_distance"):
        NearDuplicateIndex(40)
