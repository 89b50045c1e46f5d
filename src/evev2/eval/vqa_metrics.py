"""Open-ended VQA scoring: the official VQA answer normalisation and soft accuracy, and GQA exact match.

Two official pipelines exist and benchmarks differ in which they use, so both are kept, built from the same steps:
- VQAv2 (GT-Vision-Lab `vqaEval.py`): the prediction is punctuation- and digit/article-normalised; the human answers
  get only the punctuation step, and only when the ten humans disagree. LLaVA-style submissions first pass predictions
  through the EvalAI answer processor, so `vqav2_accuracy` does too.
- TextVQA (EvalAI / m4c evaluator used by LLaVA and lmms-eval): the EvalAI processor on prediction and on every answer.
Both then score min(#other humans agreeing / 3, 1) averaged over the ten leave-one-out subsets of nine humans.
"""

from __future__ import annotations

import re
from typing import Sequence

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
# The evaluator's "manual map": number words become digits ("none" counts as zero).
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official pattern is written "(?!<=\d)" (a typo for a look-behind), so it strips every period not followed by a
# digit: "3.5" keeps its point, "a.m." loses both. Kept as written so scores match the official ones.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# The official code passes re.UNICODE (= 32) in the position of `count`, so at most 32 periods are removed.
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Official punctuation step: a mark touching a space, or any mark in a text with a digit-comma-digit, is deleted;
    other marks become a space (so "black/white" -> "black white" but "1,000" -> "1000")."""
    out = text
    has_number_comma = _COMMA_IN_NUMBER.search(text) is not None
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_number_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Official word step: lower-case, number words -> digits, drop articles, restore apostrophes of contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA evaluator's normalisation of a predicted answer."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def normalize_evalai_answer(text: str) -> str:
    """The EvalAI answer processor (LLaVA's VQAv2 submission converter, the m4c TextVQA evaluator): lower-case, drop
    commas and question marks, split off "'s", then the official steps."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa_answer(text)


def leave_one_out_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """min(#other humans giving `prediction` / 3, 1), averaged over every way of leaving one human out."""
    if not human_answers:
        raise ValueError("a VQA question needs at least one human answer")
    matches = sum(answer == prediction for answer in human_answers)
    # Leaving out a matching human removes one match; leaving out another keeps all of them.
    per_subset = [min(1.0, (matches - (answer == prediction)) / 3) for answer in human_answers]
    return sum(per_subset) / len(per_subset)


def vqav2_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQAv2 soft accuracy in [0, 1] for one question, as the evaluation server computes it."""
    predicted = normalize_vqa_answer(normalize_evalai_answer(prediction))
    if len(set(human_answers)) > 1:
        human_answers = [process_punctuation(answer) for answer in human_answers]
    return leave_one_out_accuracy(predicted, human_answers)


def textvqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """TextVQA soft accuracy in [0, 1] for one question (EvalAI processing on both sides)."""
    return leave_one_out_accuracy(normalize_evalai_answer(prediction),
                                  [normalize_evalai_answer(answer) for answer in human_answers])


def gqa_match(prediction: str, answer: str) -> bool:
    """GQA exact match: LLaVA's converter strips trailing periods and lower-cases, then the official script compares
    the strings exactly (its gold answers are lower-case single words or phrases)."""
    return prediction.strip().rstrip(".").lower() == answer.strip().lower()
