"""The synthetic world's contents and layout: what is in a scene and where, before any pixel is drawn.

Sizes are chosen for a tiny VLM on CPU, whose every token covers one 32x32 px cell: the canvas is a grid of cells
(sides multiples of 32 between 96 and 320 px, several aspect ratios), and every item fills whole cells: a shape one or
two cells wide, drawn `INSET_PX` inside its cells, and a word one cell high. So a token sees either nothing, a whole
small shape, or the same part (a quarter) of a large one, wherever the item is; the world varies in position, size,
colour and count, not in how items straddle token borders. Levels form a curriculum; level 3 is the full world and
the held-out distribution.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from types import MappingProxyType

from PIL import ImageFont

# Name -> base RGB. Each object gets +-COLOR_JITTER per channel, so colour names stay unambiguous.
COLORS = MappingProxyType({
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 185),
    "orange": (245, 140, 30),
    "black": (25, 25, 25),
    "white": (240, 240, 240),
})
COLOR_JITTER = 20
SHAPES = ("circle", "square", "triangle", "star", "cross")
# Short words for OCR: 3-4 letters, none of them a colour, shape, number or answer word of the world.
WORDS = (
    "cat", "dog", "sun", "car", "fish", "bird", "moon", "cake", "ship", "lamp", "frog", "milk",
    "rain", "door", "key", "hat", "cup", "box", "pen", "bus", "egg", "tree", "book", "bell",
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
TEXT_COLORS = MappingProxyType({"black": (15, 15, 15), "white": (245, 245, 245)})
FONT_SIZES = (20, 22, 24)  # stroked glyphs at most 27 px high: a word sits inside one row of cells
# Glyph outlines thickened by this much: the plain font's 2-px strokes are not learnt (measured: word questions alone
# on the demo's model, 0.056 held-out with plain glyphs, 0.80 with these; a linear probe reads either)
TEXT_STROKE_PX = 2
WORD_PROBABILITY = 0.5
CELL_PX = 32  # one token of the tiny VLM (patch 16, merge 2)
INSET_PX = 4  # free margin inside an item's cells: items in neighbouring cells are 8 px apart
BACKGROUND_RANGE = (100, 160)  # near-grey base, +-BACKGROUND_JITTER per channel
BACKGROUND_JITTER = 12

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 and y1 exclusive
RGB = tuple[int, int, int]


@dataclass(frozen=True)
class LevelSpec:
    """One curriculum level: how many objects, which canvas sides, how large the shapes."""

    counts: tuple[int, ...]
    sides: tuple[int, ...]
    min_area: int  # smallest canvas area, so that the largest count always fits
    shape_cells: tuple[int, int]  # inclusive range of a shape's side, in cells


LEVELS = MappingProxyType({
    1: LevelSpec(counts=(1,), sides=(96, 128, 160), min_area=96 * 96, shape_cells=(1, 2)),
    2: LevelSpec(counts=(1, 2, 3), sides=(96, 128, 160, 192, 224), min_area=128 * 160, shape_cells=(1, 2)),
    3: LevelSpec(counts=(1, 2, 3, 4, 5), sides=(96, 128, 160, 192, 224, 256, 288, 320), min_area=160 * 192,
                 shape_cells=(1, 2)),
})
FULL_WORLD_LEVEL = 3


@dataclass(frozen=True)
class SceneObject:
    """One coloured shape; colours and shapes are distinct within a scene, so "the red object" is unique."""

    shape: str
    color: str
    rgb: RGB
    box: Box

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class SceneText:
    """One rendered word; `box` is where the glyphs are drawn (anchor left-top)."""

    word: str
    rgb: RGB
    box: Box
    font_size: int


@dataclass(frozen=True)
class Layout:
    """Everything visible in a scene."""

    width: int
    height: int
    background: RGB
    objects: tuple[SceneObject, ...]
    text: SceneText | None


def level_spec(level: int) -> LevelSpec:
    if level not in LEVELS:
        raise ValueError(f"unknown level {level}; choose one of {sorted(LEVELS)}")
    return LEVELS[level]


@functools.lru_cache(maxsize=len(WORDS) * len(FONT_SIZES))
def text_extent(word: str, font_size: int) -> tuple[int, int]:
    """(width, height) of `word` in Pillow's built-in scalable font with `TEXT_STROKE_PX` outlines."""
    left, top, right, bottom = ImageFont.load_default(size=font_size).getbbox(word, anchor="lt",
                                                                            stroke_width=TEXT_STROKE_PX)
    return int(right - left), int(bottom - top)


def _jitter(rng: random.Random, rgb: RGB, amount: int) -> RGB:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _text_cells(word: str, font_size: int) -> int:
    """Columns of cells a word takes, its glyphs starting `INSET_PX` into the first one."""
    return -(-(text_extent(word, font_size)[0] + 2 * INSET_PX) // CELL_PX)


def text_cells_box(text: SceneText) -> Box:
    """The pixel box of the cells a word fills: its row of cells, from its first cell to the last its outline
    reaches (the word's glyphs start `INSET_PX` into the first cell and are centred in the row)."""
    column, row = (text.box[0] - INSET_PX) // CELL_PX, text.box[1] // CELL_PX
    x0, y0 = column * CELL_PX, row * CELL_PX
    return x0, y0, x0 + _text_cells(text.word, text.font_size) * CELL_PX, y0 + CELL_PX


def _cell_box(corner: tuple[int, int], side: int) -> Box:
    """The pixel box of a shape filling `side` x `side` cells from cell `corner`, `INSET_PX` inside them."""
    x0, y0 = corner[0] * CELL_PX + INSET_PX, corner[1] * CELL_PX + INSET_PX
    return x0, y0, x0 + side * CELL_PX - 2 * INSET_PX, y0 + side * CELL_PX - 2 * INSET_PX


def _place(rng: random.Random, columns: int, rows: int, sizes: list[tuple[int, int]], tries: int
           ) -> list[tuple[int, int]] | None:
    """Rejection-sample the top-left cells of non-overlapping blocks of the given (w, h) cell sizes, in order; None
    when one does not fit."""
    taken: set[tuple[int, int]] = set()
    corners: list[tuple[int, int]] = []
    for w, h in sizes:
        if w > columns or h > rows:
            return None
        for _ in range(tries):
            cx, cy = rng.randint(0, columns - w), rng.randint(0, rows - h)
            cells = {(cx + i, cy + j) for i in range(w) for j in range(h)}
            if not cells & taken:
                taken |= cells
                corners.append((cx, cy))
                break
        else:
            return None
    return corners


def _canvas(rng: random.Random, spec: LevelSpec) -> tuple[int, int]:
    """Width and height drawn independently (so aspect ratios vary), regardless of the object count."""
    while True:
        width, height = rng.choice(spec.sides), rng.choice(spec.sides)
        if width * height >= spec.min_area:
            return width, height


def sample_layout(rng: random.Random, level: int) -> Layout:
    """Draw one scene: canvas, background, 1..N distinct objects and maybe a word, all placed without overlap.

    The canvas is drawn before the count and is kept when placement fails (only positions and sizes are redrawn),
    so image size carries no information about the count.
    """
    spec = level_spec(level)
    width, height = _canvas(rng, spec)
    base = rng.randint(*BACKGROUND_RANGE)
    background = _jitter(rng, (base, base, base), BACKGROUND_JITTER)
    count = rng.choice(spec.counts)
    color_names = rng.sample(sorted(COLORS), count)
    shape_names = rng.sample(SHAPES, count)
    word = rng.choice(WORDS) if rng.random() < WORD_PROBABILITY else None
    text_color = rng.choice(sorted(TEXT_COLORS))
    columns, rows = width // CELL_PX, height // CELL_PX
    fitting = [f for f in FONT_SIZES if word is not None and _text_cells(word, f) <= columns]
    for _ in range(200):
        sides = [rng.randint(*spec.shape_cells) for _ in range(count)]
        sizes = [(side, side) for side in sides]
        font_size = 0
        if word is not None:
            font_size = rng.choice(fitting)
            sizes.insert(0, (_text_cells(word, font_size), 1))  # the widest item goes first: it is the hardest to fit
        corners = _place(rng, columns, rows, sizes, tries=30)
        if corners is not None:
            break
    else:
        raise RuntimeError(f"cannot place {count} objects on a {width}x{height} canvas at level {level}")
    text = None
    if word is not None:
        cx, cy = corners.pop(0)
        w, h = text_extent(word, font_size)
        x0, y0 = cx * CELL_PX + INSET_PX, cy * CELL_PX + (CELL_PX - h) // 2
        text = SceneText(word, TEXT_COLORS[text_color], (x0, y0, x0 + w, y0 + h), font_size)
    objects = tuple(
        SceneObject(shape, color, _jitter(rng, COLORS[color], COLOR_JITTER), _cell_box(corner, side))
        for shape, color, corner, side in zip(shape_names, color_names, corners, sides)
    )
    return Layout(width, height, background, objects, text)
