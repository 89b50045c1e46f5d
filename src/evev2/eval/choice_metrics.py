"""Multiple-choice scoring (ScienceQA-IMG, MMBench, SEED-Bench, AI2D): option extraction and MMBench CircularEval.

Models rarely answer with a bare letter, so the letter is recovered from free-form output in a fixed order of
evidence, strongest first; an output that names no single option counts as wrong (never guessed at random).
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from typing import Hashable, Iterable, Sequence

LETTERS = string.ascii_uppercase
# MMBench/VLMEvalKit convention: the k-th circular copy of question i has index i + k * CIRCULAR_OFFSET.
CIRCULAR_OFFSET = 1_000_000

_WHOLE_LETTER = re.compile(r"^\(?([A-Za-z])\)?[.):]?$")
_LEADING_LETTER = re.compile(r"^\(?([A-Za-z])[.):]\s")
_ANSWER_IS_BRACKETED = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*:?\s*\(([A-Za-z])\)", re.IGNORECASE)
_ANSWER_IS_CAPITAL = re.compile(r"(?:[Aa]nswer|[Oo]ption|[Cc]hoice)\s*(?:is|:)?\s*:?\s*([A-Z])\b")
# A lower-case letter after "answer is" only when it ends the output ("the answer is a cat" names no option).
_ANSWER_IS_FINAL = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*:?\s*([A-Za-z])[.!)]?$", re.IGNORECASE)
_BRACKETED = re.compile(r"\(([A-Za-z])\)")
_CAPITAL_TOKEN = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")


def _normalize_text(text: str) -> str:
    """Lower-case, punctuation to spaces, single spaces: makes option text comparable with prose."""
    text = "".join(" " if ch in string.punctuation else ch for ch in text.lower())
    return " ".join(text.split())


def _single(letters: Iterable[str], valid: str) -> str | None:
    found = {letter.upper() for letter in letters} & set(valid)
    return found.pop() if len(found) == 1 else None


def _letter_from_option_text(output: str, options: Sequence[str], valid: str) -> str | None:
    said = _normalize_text(output)
    texts = [_normalize_text(option) for option in options]
    exact = [valid[i] for i, text in enumerate(texts) if text and text == said]
    if len(exact) == 1:
        return exact[0]
    padded = f" {said} "
    contained = [i for i, text in enumerate(texts) if text and f" {text} " in padded]
    # "black cat" also contains "cat": keep only options not inside another matched option.
    maximal = [i for i in contained if not any(i != j and texts[i] in texts[j] for j in contained)]
    return valid[maximal[0]] if len(maximal) == 1 else None


def extract_option_letter(output: str, options: Sequence[str]) -> str | None:
    """The option letter ("A", "B", ...) that a free-form `output` picks among `options`, or None if it names none
    or several. Handles "B", "(b)", "B. cat", "The answer is (B).", "Answer: C", a lone capital in prose, and the
    option text itself ("cat", "It is a cat.")."""
    valid = LETTERS[: len(options)]
    text = output.strip()
    if not text:
        return None
    for pattern in (_WHOLE_LETTER, _LEADING_LETTER):
        match = pattern.match(text)
        if match and match.group(1).upper() in valid:
            return match.group(1).upper()
    for pattern in (_ANSWER_IS_BRACKETED, _ANSWER_IS_CAPITAL, _ANSWER_IS_FINAL, _BRACKETED):
        letter = _single(pattern.findall(text), valid)
        if letter:
            return letter
    # A capital standing alone, except the article "A" ("A cat sits") and the pronoun "I".
    capitals = [m.group(1) for m in _CAPITAL_TOKEN.finditer(text)
                if m.group(1) != "I" and not (m.group(1) == "A" and re.match(r" [a-z]", text[m.end():m.end() + 2]))]
    return _single(capitals, valid) or _letter_from_option_text(text, options, valid)


def answer_letter(answer: str | int, options: Sequence[str]) -> str:
    """The gold letter from whatever a benchmark stores: a letter, a 0-based index (int or digit string, as
    ScienceQA and AI2D do) or the option text."""
    valid = LETTERS[: len(options)]
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        index = int(answer)
        if not 0 <= index < len(options):
            raise ValueError(f"answer index {index} out of range for {len(options)} options")
        return valid[index]
    answer = answer.strip()
    if len(answer) == 1 and answer.upper() in valid:
        return answer.upper()
    matches = [valid[i] for i, option in enumerate(options) if _normalize_text(option) == _normalize_text(answer)]
    if len(matches) != 1:
        raise ValueError(f"answer {answer!r} is neither a letter, an index nor one option of {list(options)}")
    return matches[0]


def rotate_options(options: Sequence[str], gold: str, shift: int) -> tuple[list[str], str]:
    """Options rotated left by `shift` (MMBench CircularEval) and the gold letter's new position."""
    n = len(options)
    rotated = [options[(i + shift) % n] for i in range(n)]
    return rotated, LETTERS[(LETTERS.index(gold) - shift) % n]


def circular_accuracy(results: Iterable[tuple[Hashable, bool]]) -> tuple[float, int]:
    """(fraction of groups whose every rotation is correct, number of groups) from (group id, correct) pairs."""
    groups: dict[Hashable, bool] = defaultdict(lambda: True)
    for group, correct in results:
        groups[group] = groups[group] and correct
    if not groups:
        return 0.0, 0
    return sum(groups.values()) / len(groups), len(groups)
