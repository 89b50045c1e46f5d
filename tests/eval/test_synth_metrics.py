import math

import pytest

from evev2.eval.synth_metrics import corpus_bleu4, normalize_synth_answer, per_type_accuracy


def test_normalize():
    assert normalize_synth_answer("  Red. ") == "red"
    assert normalize_synth_answer("Top-Left") == "top left"


def test_per_type_accuracy_and_chance():
    results = [("color", "Red.", "red", None), ("color", "blue", "green", None), ("color", "blue", "blue", None),
               ("count", "two", "two", 0.2), ("count", "one", "three", 0.2)]
    m = per_type_accuracy(results)
    assert m["color/accuracy"] == pytest.approx(200 / 3)
    assert m["color/chance"] == pytest.approx(100 / 3)      # 3 distinct gold colours
    assert m["count/accuracy"] == pytest.approx(50.0)
    assert m["count/chance"] == pytest.approx(20.0)         # given in the records
    assert m["accuracy"] == pytest.approx(60.0)


def test_bleu_hand_value():
    # p1..p4 = 4/5, 3/4, 2/3, 1/2 and equal lengths (no brevity penalty).
    expected = 100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert corpus_bleu4(["a b c d e"], ["a b c d f"]) == pytest.approx(expected)
    assert corpus_bleu4(["a b c d"], ["a b c d"]) == pytest.approx(100.0)
    # Short hypothesis: brevity penalty exp(1 - 6/4).
    assert corpus_bleu4(["a b c d"], ["a b c d e f"]) == pytest.approx(100 * math.exp(1 - 6 / 4))
    assert corpus_bleu4(["x y z w"], ["a b c d"]) == 0.0
