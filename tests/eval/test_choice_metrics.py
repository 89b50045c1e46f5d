import pytest

from evev2.eval.choice_metrics import answer_letter, circular_accuracy, extract_option_letter, rotate_options

ANIMALS = ["dog", "cat", "bird", "fish"]


@pytest.mark.parametrize("output, expected", [
    ("B", "B"), ("b", "B"), ("(b)", "B"), ("B.", "B"), ("B. cat", "B"), ("(B) cat", "B"), ("c) bird", "C"),
    ("The answer is (C).", "C"), ("Answer: D", "D"), ("the answer is d", "D"), ("The answer is a fish.", "D"),
    ("I think it is B because of the whiskers.", "B"),
    ("cat", "B"), ("It is a cat.", "B"), ("A cat.", "B"), ("A", "A"), ("The Fish!", "D"),
    ("E", None), ("", None), ("I don't know", None), ("B or C", None), ("a cat and a dog", None),
])
def test_extract_option_letter(output, expected):
    assert extract_option_letter(output, ANIMALS) == expected


def test_longest_option_text_wins():
    assert extract_option_letter("a black cat", ["cat", "black cat"]) == "B"


@pytest.mark.parametrize("answer, expected", [(2, "C"), ("1", "B"), ("c", "C"), ("Bird", "C")])
def test_answer_letter(answer, expected):
    assert answer_letter(answer, ANIMALS) == expected


@pytest.mark.parametrize("answer", [7, "cow", "Z"])
def test_answer_letter_rejects_unknown(answer):
    with pytest.raises(ValueError):
        answer_letter(answer, ANIMALS)


def test_rotation_moves_gold():
    rotated, gold = rotate_options(ANIMALS, "B", 1)
    assert rotated == ["cat", "bird", "fish", "dog"] and gold == "A"
    rotated, gold = rotate_options(ANIMALS, "A", 3)
    assert rotated == ["fish", "dog", "cat", "bird"] and gold == "B"
    assert rotated[ord(gold) - ord("A")] == "dog"


def test_circular_accuracy_needs_every_rotation():
    results = [(1, True), (1, True), (1, True), (1, False), (2, True), (2, True), (3, False)]
    assert circular_accuracy(results) == (pytest.approx(1 / 3), 3)
    assert circular_accuracy([]) == (0.0, 0)
