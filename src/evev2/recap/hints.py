"""Grounding hints: extra facts about an image put into the captioning prompt (DenseFusion's "perceptual fusion").

A hint source is any `Callable[[PIL.Image.Image, dict], str]`: it sees the decoded image and the sample's record
(the input's JSON, `{}` when there is none) and returns hint text, or "" when it has nothing to say. OCR engines,
detectors or taggers plug in the same way; `synth-truth` needs no download: it phrases the synthetic world's
ground truth, so the demo model can be captioned with perfect "experts".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from PIL import Image

HintSource = Callable[[Image.Image, Mapping[str, Any]], str]


def _is_object(value: Any) -> bool:
    """A well-formed ground-truth object: colour and shape names and a numeric 4-value box (others are ignored)."""
    return (isinstance(value, Mapping) and isinstance(value.get("color"), str) and isinstance(value.get("shape"), str)
            and isinstance(value.get("box"), list) and len(value["box"]) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value["box"]))


def synth_truth_hint(image: Image.Image, record: Mapping[str, Any]) -> str:
    """'Objects: a red circle (box 10,12,40,44); ... Text: "cat".' from a synthetic-world record's `objects`/`word`.

    Boxes are in pixels of `image` (x0,y0,x1,y1). A record without ground truth gives "" (no hint, the prompt is
    then the plain instruction), so the source is safe to run over mixed data.
    """
    objects = record.get("objects")
    if not isinstance(objects, list):
        return ""
    described = [f"{o['color']} {o['shape']} (box {','.join(str(round(v)) for v in o['box'])})"
                 for o in objects if _is_object(o)]
    word = record.get("word")
    text = f'"{word}"' if isinstance(word, str) and word else "none"
    return f"Objects: {'; '.join(described) or 'none'}. Text: {text}."


#: Hint sources by command-line name ("none" is no source at all).
HINT_SOURCES: Mapping[str, HintSource] = MappingProxyType({"synth-truth": synth_truth_hint})


def get_hint_source(name: str) -> HintSource | None:
    """The hint source registered as `name`, None for "none"; an unknown name lists the known ones."""
    if name == "none":
        return None
    if name not in HINT_SOURCES:
        raise ValueError(f"unknown hint source {name!r}; choose one of {['none', *sorted(HINT_SOURCES)]}")
    return HINT_SOURCES[name]
