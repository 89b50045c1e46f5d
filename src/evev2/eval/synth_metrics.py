"""Scoring for our synthetic world's held-out split: per-type exact match against chance, and caption BLEU-4.

The chance level is what a model that ignores the image would get, so a type's accuracy only means something next
to it (see the feasibility notes: colour and count leave chance first).
"""

from __future__ import annotations

import math
import string
from collections import Counter, defaultdict
from typing import Iterable, Sequence

SYNTH_TYPES = ("color", "shape", "count", "relation", "text")


def normalize_synth_answer(text: str) -> str:
    """Case, punctuation and whitespace do not count: "Red." == "red"."""
    text = "".join(" " if ch in string.punctuation else ch for ch in text.lower())
    return " ".join(text.split())


def synth_answer_matches(prediction: str, answer: str) -> bool:
    return normalize_synth_answer(prediction) == normalize_synth_answer(answer)


def per_type_accuracy(results: Iterable[tuple[str, str, str, float | None]]) -> dict[str, float]:
    """Accuracy and chance (both %) per question type, from (type, prediction, answer, chance or None) tuples.

    A missing chance is 1 / (number of distinct gold answers of that type) - the best a blind guesser can promise.
    """
    correct: dict[str, list[bool]] = defaultdict(list)
    given_chance: dict[str, list[float]] = defaultdict(list)
    vocabulary: dict[str, set[str]] = defaultdict(set)
    for kind, prediction, answer, chance in results:
        correct[kind].append(synth_answer_matches(prediction, answer))
        vocabulary[kind].add(normalize_synth_answer(answer))
        if chance is not None:
            given_chance[kind].append(chance)
    metrics: dict[str, float] = {}
    for kind in sorted(correct):
        metrics[f"{kind}/accuracy"] = 100 * sum(correct[kind]) / len(correct[kind])
        chances = given_chance[kind]
        chance = sum(chances) / len(chances) if chances else 1 / len(vocabulary[kind])
        metrics[f"{kind}/chance"] = 100 * chance
        metrics[f"{kind}/count"] = len(correct[kind])
    every = [c for answers in correct.values() for c in answers]
    metrics["accuracy"] = 100 * sum(every) / len(every) if every else 0.0
    return metrics


def corpus_bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002: clipped n-gram precisions, uniform weights, brevity penalty, no
    smoothing) in %, on whitespace tokens of the normalised captions. 0 when some n-gram order has no match."""
    matched, proposed = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        hyp, ref = normalize_synth_answer(hypothesis).split(), normalize_synth_answer(reference).split()
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, 5):
            hyp_ngrams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
            ref_ngrams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
            matched[n - 1] += sum((hyp_ngrams & ref_ngrams).values())
            proposed[n - 1] += sum(hyp_ngrams.values())
    if hyp_len == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / p) for m, p in zip(matched, proposed)) / 4
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * brevity * math.exp(log_precision)
