import pytest

from evev2.eval.chart_ocr_metrics import ocrbench_correct, relaxed_correctness


@pytest.mark.parametrize("prediction, target, expected", [
    ("105", "100", True), ("95", "100", True),          # exactly 5 % off is still right
    ("105.1", "100", False), ("94.9", "100", False),
    ("-2.05", "-2", True), ("40%", "0.4", True), (" 12 ", "12.0", True),
    ("0.0", "0", False), ("0", "0", True),              # zero target: no relative error, string match
    ("Yes", "yes", True), ("apples", "apple", False), ("about 100", "100", False),
])
def test_relaxed_correctness(prediction, target, expected):
    assert relaxed_correctness(prediction, target) is expected


def test_ocrbench_substring_rule():
    assert ocrbench_correct("The sign says HELLO world", ["hello"], "Regular Text Recognition")
    assert ocrbench_correct("no", ["yes", "no"], "Scene Text-centric VQA")
    assert not ocrbench_correct("hell", ["hello"], "Regular Text Recognition")


def test_ocrbench_handwritten_math_ignores_spaces_keeps_case():
    category = "Handwritten Mathematical Expression Recognition"
    assert ocrbench_correct("x^2 + 1", ["x ^ 2 + 1"], category)
    assert not ocrbench_correct("x^2+1", ["X^2+1"], category)
