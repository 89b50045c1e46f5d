"""ChartQA relaxed accuracy and the OCRBench matching rule, as their reference evaluators define them."""

from __future__ import annotations

from typing import Sequence

OCRBENCH_HANDWRITTEN_MATH = "Handwritten Mathematical Expression Recognition"
OCRBENCH_TEXT_RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                             "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition")


def _number(text: str) -> float | None:
    """A float from "12.5" or "40%" (-> 0.4), else None."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    """ChartQA's relaxed match: numbers within `tolerance` relative error of the target, everything else an exact
    case-insensitive match. As in the reference code, a target of 0 (no relative error defined) falls back to the
    string match, and "40%" is read as 0.4."""
    prediction, target = prediction.strip(), target.strip()
    predicted, expected = _number(prediction), _number(target)
    if predicted is not None and expected:
        return abs(predicted - expected) / abs(expected) <= tolerance
    return prediction.lower() == target.lower()


def ocrbench_correct(prediction: str, answers: Sequence[str], category: str) -> bool:
    """OCRBench: right when some gold answer is a substring of the prediction, after lower-casing and newline
    removal; for handwritten math, case is kept and all spaces are removed instead."""
    if category == OCRBENCH_HANDWRITTEN_MATH:
        said = prediction.strip().replace("\n", " ").replace(" ", "")
        return any(answer.strip().replace("\n", " ").replace(" ", "") in said for answer in answers)
    said = prediction.lower().strip().replace("\n", " ")
    return any(answer.lower().strip().replace("\n", " ") in said for answer in answers)
