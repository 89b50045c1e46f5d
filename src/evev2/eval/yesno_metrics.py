"""Yes/no benchmarks: POPE (object hallucination) and MME, each with its official answer parsing."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def pope_label(output: str) -> str:
    """POPE's rule: keep the first sentence, drop commas, split on spaces; "no"/"No"/"not" among the words means
    "no", anything else "yes"."""
    first_sentence = output.split(".")[0].replace(",", "")
    words = first_sentence.split(" ")
    return "no" if any(word in ("no", "No", "not") for word in words) else "yes"


def binary_metrics(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """Confusion counts and percentages (accuracy, precision, recall, F1, yes-ratio) with "yes" as the positive
    class, from (predicted, gold) label pairs. An empty denominator gives 0."""
    tp = fp = tn = fn = 0
    for predicted, gold in pairs:
        if predicted == "yes":
            tp, fp = (tp + 1, fp) if gold == "yes" else (tp, fp + 1)
        else:
            fn, tn = (fn + 1, tn) if gold == "yes" else (fn, tn + 1)
    total = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": 100 * (tp + tn) / total if total else 0.0,
        "precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1,
        "yes_ratio": 100 * (tp + fp) / total if total else 0.0,
    }


def mme_label(output: str) -> str:
    """MME's rule on the lower-cased output: exactly yes/no, else "yes" or "no" within the first four characters,
    else "other" (always wrong)."""
    text = output.strip().lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    return "no" if "no" in text[:4] else "other"


def mme_scores(results: Iterable[tuple[str, str, bool]]) -> dict[str, float]:
    """MME totals from (subtask, image id, correct) triples.

    Per subtask: acc = share of questions right, acc+ = share of images with both questions right, score =
    100 * (acc + acc+). Perception and cognition sum their standard subtasks; `total` (perception + cognition) is the
    number papers report as MME.
    """
    questions: dict[str, list[bool]] = defaultdict(list)
    images: dict[str, dict[str, bool]] = defaultdict(lambda: defaultdict(lambda: True))
    for subtask, image, correct in results:
        questions[subtask].append(correct)
        images[subtask][image] = images[subtask][image] and correct
    metrics: dict[str, float] = {}
    for subtask, answers in sorted(questions.items()):
        acc = sum(answers) / len(answers)
        acc_plus = sum(images[subtask].values()) / len(images[subtask])
        metrics[f"{subtask}/acc"] = 100 * acc
        metrics[f"{subtask}/acc_plus"] = 100 * acc_plus
        metrics[f"{subtask}/score"] = 100 * (acc + acc_plus)
    metrics["perception"] = sum(metrics.get(f"{s}/score", 0.0) for s in MME_PERCEPTION)
    metrics["cognition"] = sum(metrics.get(f"{s}/score", 0.0) for s in MME_COGNITION)
    metrics["total"] = metrics["perception"] + metrics["cognition"]
    return metrics
