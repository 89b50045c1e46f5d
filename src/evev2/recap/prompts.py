"""Captioning instructions ("prompt sets") and how grounding hints are fused into them.

`dense` asks a general instruction-tuned captioner for a DenseFusion-style dense description; `synth` is the
synthetic world's own caption question, the one the demo model was trained on. Hints go before the instruction,
introduced as tool output the captioner may trust, as DenseFusion's perceptual fusion fed OCR and detector results.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from evev2.synth.language import CAPTION_PROMPT

PROMPT_SETS: Mapping[str, str] = MappingProxyType({
    "dense": ("Describe this image in detail. Mention every visible object with its color, shape, size and position, "
              "their spatial relations, any text written in the image, and the overall scene. Write plain English "
              "sentences and describe only what is visible."),
    "synth": CAPTION_PROMPT,
})

HINT_PREAMBLE = "Perception tools report the following about this image; use what is visible and correct."


def get_instruction(prompt_set: str) -> str:
    """The instruction of a prompt set; an unknown name lists the known ones."""
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}; choose one of {sorted(PROMPT_SETS)}")
    return PROMPT_SETS[prompt_set]


def build_prompt(instruction: str, hint: str) -> str:
    """The user text of one captioning request: the hint block (when there is a hint) then the instruction."""
    if not hint:
        return instruction
    return f"{HINT_PREAMBLE}\n{hint}\n\n{instruction}"
