import pytest

from evev2.eval.yesno_metrics import binary_metrics, mme_label, mme_scores, pope_label


@pytest.mark.parametrize("output, expected", [
    ("Yes, there is a dog.", "yes"), ("No.", "no"), ("There is not a dog", "no"), ("no, there isn't", "no"),
    ("Yes. No other dogs", "yes"),   # only the first sentence counts
    ("NO", "yes"),                   # official quirk: only "no", "No" and "not" are negative words
    ("Nope", "yes"),
])
def test_pope_label(output, expected):
    assert pope_label(output) == expected


def test_binary_metrics_hand_counts():
    pairs = [("yes", "yes")] * 2 + [("yes", "no")] + [("no", "no")] * 3 + [("no", "yes")]
    m = binary_metrics(pairs)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 3, 1)
    assert m["accuracy"] == pytest.approx(100 * 5 / 7)
    assert m["precision"] == pytest.approx(100 * 2 / 3)
    assert m["recall"] == pytest.approx(100 * 2 / 3)
    assert m["f1"] == pytest.approx(100 * 2 / 3)
    assert m["yes_ratio"] == pytest.approx(100 * 3 / 7)


def test_binary_metrics_never_yes():
    m = binary_metrics([("no", "yes"), ("no", "no")])
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 50.0


@pytest.mark.parametrize("output, expected", [
    ("Yes", "yes"), ("no", "no"), ("No, it is not.", "no"), ("yes.", "yes"),
    ("The answer is yes", "other"), ("not sure", "no"),  # the official rule looks at the first 4 characters only
])
def test_mme_label(output, expected):
    assert mme_label(output) == expected


def test_mme_acc_plus_pairs_questions_by_image():
    results = [("existence", "1.png", True), ("existence", "1.png", True),
               ("existence", "2.png", True), ("existence", "2.png", False),
               ("code_reasoning", "9.png", False), ("code_reasoning", "9.png", True)]
    m = mme_scores(results)
    assert m["existence/acc"] == pytest.approx(75.0)
    assert m["existence/acc_plus"] == pytest.approx(50.0)
    assert m["existence/score"] == pytest.approx(125.0)
    assert m["code_reasoning/score"] == pytest.approx(50.0)
    assert m["perception"] == pytest.approx(125.0)
    assert m["cognition"] == pytest.approx(50.0)
    assert m["total"] == pytest.approx(175.0)
