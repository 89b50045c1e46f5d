"""Near-duplicate image detection: a 64-bit difference hash (dHash) and an index that finds hashes within a
Hamming distance without comparing against every stored hash.

dHash compares each pixel of a 9x8 grayscale thumbnail with its right neighbour: it survives resizing, recompression
and small colour shifts, which is what web-scale near-duplicates are. PIL + numpy only, no new dependency.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from PIL import Image

HASH_BITS = 64
_SIDE = 8  # thumbnail rows; columns are _SIDE + 1 so that each row gives _SIDE comparisons


def dhash(image: Image.Image) -> int:
    """The 64-bit difference hash of an image (bit i set when thumbnail pixel i is darker than its right one)."""
    thumbnail = image.convert("L").resize((_SIDE + 1, _SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(thumbnail, dtype=np.int16)  # (8, 9)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()  # (64,) row-major
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class NearDuplicateIndex:
    """Hashes seen so far; `contains_near(h)` asks for one within `max_distance` bits.

    Pigeonhole (multi-index hashing): split the 64 bits into `max_distance + 1` bands; two hashes at distance
    <= max_distance agree exactly on at least one band, so only hashes sharing a band are compared.
    """

    def __init__(self, max_distance: int) -> None:
        if not 0 <= max_distance < HASH_BITS // 2:
            raise ValueError(f"max_distance must be in [0, {HASH_BITS // 2}), got {max_distance}")
        self.max_distance = max_distance
        bands = max_distance + 1
        edges = [round(i * HASH_BITS / bands) for i in range(bands + 1)]
        self._masks = [((1 << (hi - lo)) - 1) << lo for lo, hi in zip(edges, edges[1:])]
        self._buckets: list[defaultdict[int, list[int]]] = [defaultdict(list) for _ in self._masks]
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def contains_near(self, value: int) -> bool:
        return any(hamming(value, other) <= self.max_distance
                   for mask, bucket in zip(self._masks, self._buckets) for other in bucket.get(value & mask, ()))

    def add(self, value: int) -> None:
        for mask, bucket in zip(self._masks, self._buckets):
            bucket[value & mask].append(value)
        self._count += 1
