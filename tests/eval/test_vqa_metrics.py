import random

import pytest

from evev2.eval.vqa_metrics import (gqa_match, leave_one_out_accuracy, normalize_evalai_answer, normalize_vqa_answer,
                                    process_digit_article, process_punctuation, textvqa_accuracy, vqav2_accuracy)


@pytest.mark.parametrize("raw, expected", [
    ("black/white", "black white"),       # mark not touching a space -> space
    ("yes, it is", "yes it is"),           # mark followed by a space -> deleted
    ("1,000", "1000"),                     # digit-comma-digit anywhere -> every mark deleted
    ("a/b 1,5", "ab 15"),
    ("3.5", "3.5"),                        # period before a digit stays
    ("end.", "end"),
    ("a.m.", "am"),
    ("well-known", "well known"),
    ("tom's", "tom's"),                    # apostrophe is not in the list
])
def test_punctuation_rules(raw, expected):
    assert process_punctuation(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("The Two Dogs", "2 dogs"),
    ("an apple", "apple"),
    ("none", "0"),
    ("dont know", "don't know"),
    ("ten thousand", "10 thousand"),
])
def test_digit_article_contraction_rules(raw, expected):
    assert process_digit_article(raw) == expected


def test_normalizers_end_to_end():
    assert normalize_vqa_answer(" Two\tdogs.\n") == "2 dogs"
    assert normalize_evalai_answer("It's 1,000 dollars!") == "it 's 1000 dollars"
    assert normalize_evalai_answer("Is it RED?") == "is it red"


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_hand_values(matches, expected):
    # matches m of 10: leaving out a match gives min((m-1)/3, 1), leaving out another min(m/3, 1).
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert leave_one_out_accuracy("cat", answers) == pytest.approx(expected)


def test_leave_one_out_matches_the_official_subset_loop():
    rng = random.Random(0)
    for _ in range(200):
        answers = [rng.choice("abc") for _ in range(10)]
        prediction = rng.choice("abcd")
        subsets = [answers[:i] + answers[i + 1:] for i in range(10)]
        reference = sum(min(1.0, s.count(prediction) / 3) for s in subsets) / 10
        assert leave_one_out_accuracy(prediction, answers) == pytest.approx(reference, abs=1e-12)


def test_vqav2_normalizes_prediction():
    assert vqav2_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)


def test_vqav2_processes_human_answers_only_when_they_disagree():
    # Official quirk: unanimous answers are compared raw, so "black/white" (-> "black white") cannot match them.
    assert vqav2_accuracy("black/white", ["black/white"] * 10) == 0.0
    assert vqav2_accuracy("black/white", ["black/white"] * 4 + ["gray"] * 6) == pytest.approx(1.0)


def test_textvqa_processes_both_sides():
    assert textvqa_accuracy("coca cola", ["Coca-Cola"] * 3 + ["pepsi"] * 7) == pytest.approx(0.9)
    assert textvqa_accuracy("STOP", ["stop"] * 10) == 1.0


def test_gqa_exact_match():
    assert gqa_match("Yes.", "yes")
    assert gqa_match(" left ", "left")
    assert not gqa_match("yes it is", "yes")
