"""Hint sources and prompt fusion."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from evev2.recap.hints import HINT_SOURCES, get_hint_source, synth_truth_hint
from evev2.recap.prompts import HINT_PREAMBLE, PROMPT_SETS, build_prompt, get_instruction


def test_synth_truth_phrases_every_object_and_the_word(world_shards):
    records = json.loads((world_shards / "train.json").read_text())
    for record in records:
        image = Image.open(world_shards / record["image"])
        hint = synth_truth_hint(image, record)
        assert hint.startswith("Objects: ")
        for obj in record["objects"]:
            box = ",".join(str(round(v)) for v in obj["box"])
            assert f"{obj['color']} {obj['shape']} (box {box})" in hint
        assert hint.endswith(f'Text: "{record["word"]}".' if record["word"] else "Text: none.")


def test_synth_truth_is_silent_without_ground_truth():
    image = Image.new("RGB", (32, 32))
    assert synth_truth_hint(image, {}) == ""
    assert synth_truth_hint(image, {"objects": "not a list"}) == ""
    broken = {"objects": [{"color": "red", "shape": "circle", "box": ["a", 1, 2, 3]}, {"shape": "star"},
                          {"color": "blue", "shape": "square", "box": [1, 2.4, 3, 4]}], "word": None}
    assert synth_truth_hint(image, broken) == "Objects: blue square (box 1,2,3,4). Text: none."


def test_registry_lookup():
    assert get_hint_source("none") is None
    assert get_hint_source("synth-truth") is synth_truth_hint is HINT_SOURCES["synth-truth"]
    with pytest.raises(ValueError, match="synth-truth"):
        get_hint_source("ocr")
    with pytest.raises(TypeError):
        HINT_SOURCES["mine"] = synth_truth_hint  # the registry is read-only


def test_prompt_puts_the_hint_before_the_instruction():
    instruction = get_instruction("dense")
    assert build_prompt(instruction, "") == instruction == PROMPT_SETS["dense"]
    prompt = build_prompt(instruction, 'Objects: red circle (box 1,2,3,4). Text: "cat".')
    assert prompt == f'{HINT_PREAMBLE}\nObjects: red circle (box 1,2,3,4). Text: "cat".\n\n{instruction}'
    with pytest.raises(ValueError, match="dense"):
        get_instruction("fancy")
