"""The synthetic world's little language: questions, short answers and a dense caption for a layout.

Question wording never carries the answer: colours and shapes are drawn independently, and a relation question
picks a random ordered pair and then either a true relation ("yes") or the opposite of one ("no"), so the relation
word is equally likely under both answers. The yes/no balance itself is set by the caller (see `synth.iter_scenes`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import MappingProxyType

from evev2.synth.layout import NUMBER_WORDS, Layout, SceneObject

QA_TYPES = ("color", "shape", "count", "relation", "relation_choice", "text")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = MappingProxyType({"left of": "right of", "right of": "left of", "above": "below", "below": "above"})
CAPTION_PROMPT = "describe the image ."
WORD_QUESTION = "what word is written ?"
_ROWS = ("top", "middle", "bottom")
_COLUMNS = ("left", "center", "right")


@dataclass(frozen=True)
class QA:
    """One question with its answer ("the circle is red", "a red star", or one word); `type` is one of QA_TYPES.
    `choices` lists the candidate answers of a question that offers them (the answer is one of them)."""

    type: str
    question: str
    answer: str
    choices: tuple[str, ...] = ()


def true_relations(a: SceneObject, b: SceneObject) -> list[str]:
    """Relations "a <rel> b" that hold with a clear gap: a's box lies wholly on that side of b's box."""
    found = []
    if a.box[2] <= b.box[0]:
        found.append("left of")
    if b.box[2] <= a.box[0]:
        found.append("right of")
    if a.box[3] <= b.box[1]:
        found.append("above")
    if b.box[3] <= a.box[1]:
        found.append("below")
    return found


def relation_qa(rng: random.Random, objects: tuple[SceneObject, ...], answer_yes: bool) -> QA:
    """A yes/no relation question about a random ordered pair whose answer is `answer_yes`."""
    a, b = rng.sample(objects, 2)
    holds = true_relations(a, b)
    if not holds:
        raise ValueError(f"objects at {a.box} and {b.box} overlap on both axes; the layout must keep them apart")
    relation = rng.choice(holds)
    if not answer_yes:
        relation = OPPOSITE[relation]
    question = f"is the {a.color} {a.shape} {relation} the {b.color} {b.shape} ?"
    return QA("relation", question, "yes" if answer_yes else "no")


def relation_choice_qa(rng: random.Random, objects: tuple[SceneObject, ...]) -> QA | None:
    """Which of two named objects is higher (one wholly above the other) or further left (side by side: the same top
    edge), the two named in a random order; None when no pair is either.

    Unlike the yes/no question, the answer names an object ("the red circle"), so it has something to look for: the
    named object that comes first in the image tokens' reading order, which is the higher one, or of two side by side
    the left one (README: learnt in the demo's stage 3, where yes/no is not).
    """
    pairs = [(word, a, b) for a in objects for b in objects if a is not b
             for word, holds in (("higher", a.box[3] <= b.box[1]),
                                 ("further left", a.box[1] == b.box[1] and a.box[2] <= b.box[0])) if holds]
    if not pairs:
        return None
    word, winner, loser = rng.choice(pairs)
    named = [f"the {winner.color} {winner.shape}", f"the {loser.color} {loser.shape}"]
    rng.shuffle(named)
    return QA("relation_choice", f"which is {word} , {named[0]} or {named[1]} ?", f"the {winner.color} {winner.shape}",
              tuple(named))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def color_qa(obj: SceneObject) -> QA:
    """The colour of an object, which the question names by its shape (shapes are distinct within a scene).

    The answer repeats the name ("the circle is red"), so the object to look at is named next to the token that
    predicts the colour, as in `shape_qa`."""
    return QA("color", f"what color is the {obj.shape} ?", f"the {obj.shape} is {obj.color}")


def shape_qa(obj: SceneObject) -> QA:
    """The shape of an object, which the question names by its colour (colours are distinct within a scene).

    The answer names it as the caption does ("a red star"), so the token that predicts the shape is the colour word
    itself: the object to look at is named at the answering position instead of several tokens back. Measured on the
    demo's model (README): multi-object shape naming alone, 0.48 with the bare shape word, 0.82 with this answer.
    """
    return QA("shape", f"what shape is the {obj.color} object ?", f"{_article(obj.color)} {obj.color} {obj.shape}")


def perception_qa(obj: SceneObject) -> QA:
    """A lone object's shape, asked without naming it and answered with the shape word alone: stage 2.1's perception
    question. Through the frozen LLM of stage 2.1, "a red star" is not learnt in the demo's budget (one-object shape
    0.16 after the demo; 400 steps of it alone plateau); this is, once the stage-0 LLM has answered it in its text
    (README, "what was measured")."""
    return QA("shape", "what shape is this ?", obj.shape)


#: The questions that name one object of a scene by its other attribute, by the attribute they ask for.
NAMING = MappingProxyType({"color": color_qa, "shape": shape_qa})


def make_qa(rng: random.Random, layout: Layout, relation_yes: bool | None) -> tuple[QA, ...]:
    """Every applicable question type once, in QA_TYPES order; relation only when `relation_yes` is given."""
    objects = layout.objects
    # about different objects when there are several: one cannot then give the other away (`training_turns`)
    about_color, about_shape = rng.sample(objects, 2) if len(objects) > 1 else (objects[0], objects[0])
    qa = [
        color_qa(about_color),
        shape_qa(about_shape),
        QA("count", "how many shapes are there ?", NUMBER_WORDS[len(objects)]),
    ]
    if relation_yes is not None:
        qa.append(relation_qa(rng, objects, relation_yes))
    if layout.text is not None:
        qa.append(QA("text", WORD_QUESTION, layout.text.word))
    return tuple(qa)


def grid_position(center: tuple[float, float], width: int, height: int) -> str:
    """Where a point lies on a 3x3 grid: "top left", "top", ..., "center", ..., "bottom right"."""
    column = _COLUMNS[min(2, int(3 * center[0] / width))]
    row = _ROWS[min(2, int(3 * center[1] / height))]
    if row == "middle":
        return column
    return row if column == "center" else f"{row} {column}"


def _reading_order(center: tuple[float, float], width: int, height: int) -> tuple[int, int, float]:
    return min(2, int(3 * center[1] / height)), min(2, int(3 * center[0] / width)), center[0]


def make_caption(layout: Layout) -> str:
    """Dense caption: the count, then every object in reading order with its grid position, then the word.

    The order is fixed by the image (top-to-bottom, left-to-right), so the caption is a function of the pixels.
    """
    n, width, height = len(layout.objects), layout.width, layout.height
    parts = ["there is one shape ." if n == 1 else f"there are {NUMBER_WORDS[n]} shapes ."]
    ordered = sorted(layout.objects, key=lambda o: _reading_order(o.center, width, height))
    parts += [f"{_article(o.color)} {o.color} {o.shape} at {grid_position(o.center, width, height)} ." for o in ordered]
    if layout.text is not None:
        box = layout.text.box
        center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        parts.append(f"the word {layout.text.word} is written at {grid_position(center, width, height)} .")
    return " ".join(parts)
