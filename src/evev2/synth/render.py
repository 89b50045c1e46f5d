"""Draw a synthetic layout with PIL: flat background, filled shapes, one outlined word in the built-in font."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

from evev2.synth.layout import TEXT_STROKE_PX, Box, Layout, SceneObject

_STAR_INNER_RATIO = 0.45  # inner/outer radius: fat enough that a 32-px star is still a star
_CROSS_ARM_RATIO = 1 / 3  # arm thickness / box side


def _star(box: Box) -> list[tuple[float, float]]:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    outer = (box[2] - box[0]) / 2
    points = []
    for k in range(10):  # 5 outer tips alternating with 5 inner corners, first tip pointing up
        radius = outer if k % 2 == 0 else outer * _STAR_INNER_RATIO
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _cross(box: Box) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    arm = (x1 - x0) * _CROSS_ARM_RATIO
    a0, a1 = x0 + ((x1 - x0) - arm) / 2, x0 + ((x1 - x0) + arm) / 2  # vertical arm's x range
    b0, b1 = y0 + ((y1 - y0) - arm) / 2, y0 + ((y1 - y0) + arm) / 2  # horizontal arm's y range
    return [(a0, y0), (a1, y0), (a1, b0), (x1, b0), (x1, b1), (a1, b1),
            (a1, y1), (a0, y1), (a0, b1), (x0, b1), (x0, b0), (a0, b0)]


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x0, y0, x1, y1 = obj.box
    last = (x1 - 1, y1 - 1)  # PIL's rectangle/ellipse corners are inclusive; boxes are exclusive
    if obj.shape == "circle":
        draw.ellipse((x0, y0, *last), fill=obj.rgb)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, *last), fill=obj.rgb)
    elif obj.shape == "triangle":
        draw.polygon([(x0, last[1]), (last[0], last[1]), ((x0 + last[0]) / 2, y0)], fill=obj.rgb)
    elif obj.shape == "star":
        draw.polygon(_star(obj.box), fill=obj.rgb)
    elif obj.shape == "cross":
        draw.polygon(_cross(obj.box), fill=obj.rgb)
    else:
        raise ValueError(f"no drawing for shape {obj.shape!r}")


def render_layout(layout: Layout) -> Image.Image:
    """The RGB image of a layout; deterministic, about 0.1 ms for a 320x320 canvas."""
    image = Image.new("RGB", (layout.width, layout.height), layout.background)
    draw = ImageDraw.Draw(image)
    for obj in layout.objects:
        _draw_object(draw, obj)
    if layout.text is not None:
        text = layout.text
        x0, y0 = (v + TEXT_STROKE_PX for v in text.box[:2])  # the outlines, not the glyphs, start at the box
        draw.text((x0, y0), text.word, font=ImageFont.load_default(size=text.font_size), fill=text.rgb, anchor="lt",
                  stroke_width=TEXT_STROKE_PX, stroke_fill=text.rgb)
    return image
