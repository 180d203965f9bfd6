"""VQAv2 accuracy: the official answer normalisation and the leave-one-annotator-out average."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvd.eval.vqa import normalize_answer, vqa_accuracy


def by_subsets(prediction: str, answers: list[str]) -> float:
    """The definition, spelled out: mean over the 10-choose-9 subsets of min(#matches / 3, 1)."""
    subsets = list(itertools.combinations(range(len(answers)), len(answers) - 1))
    return sum(min(sum(answers[i] == prediction for i in s) / 3, 1.0) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        # 0 matches: every subset has 0 -> 0.
        (0, 0.0),
        # 1 match: leaving out that annotator (1 subset) -> 0; the other 9 subsets -> 1/3. 9/3/10 = 0.3.
        (1, 0.3),
        # 2 matches: leaving out one of them (2 subsets) -> 1/3; the other 8 -> 2/3. (2/3 + 16/3)/10 = 0.6.
        (2, 0.6),
        # 3 matches: leaving out one of them (3 subsets) -> 2/3; the other 7 -> 1. (2 + 7)/10 = 0.9.
        (3, 0.9),
        # 4 matches: every subset keeps >= 3 -> 1.
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_averages_min_matches_over_three_across_annotator_subsets(matches, expected):
    others = ["cat", "horse", "cow", "sheep", "bird", "fish", "frog", "bear", "lion", "ant"]
    answers = (["dog"] * matches + others)[:10]
    assert vqa_accuracy("dog", answers) == pytest.approx(expected)
    assert by_subsets("dog", answers) == pytest.approx(expected)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["yes", "no", "2", "red"]), min_size=10, max_size=10),
       st.sampled_from(["yes", "2"]))
def test_vqa_accuracy_equals_the_subset_definition(answers, prediction):
    assert vqa_accuracy(prediction, answers) == pytest.approx(by_subsets(prediction, answers))


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [
        ("Two", "2"),
        ("two dogs", "2 dogs"),
        ("none", "0"),
        ("a dog", "dog"),
        ("The red one", "red one"),
        ("an apple", "apple"),
        ("yes.", "yes"),
        ("Yes!", "yes"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("10 ", "10"),
        (" 10\n", "10"),
        ("black/white", "black white"),
        ("1,000", "1000"),
        ("hot - dog", "hot dog"),
    ],
)
def test_official_normalisation_makes_equivalent_answers_match(prediction, answer):
    assert normalize_answer(prediction) == normalize_answer(answer)
    assert vqa_accuracy(prediction, [answer] * 10) == 1.0


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),
        ("a dog", "dog"),
        ("yes.", "yes"),
        ("dont", "don't"),
        ("10 ", "10"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("it's", "it's"),  # apostrophes are not punctuation here
        ("its", "its"),  # a word of its own, not a contraction
        ("black/white", "black white"),  # a mark between words separates them
        ("black / white", "black white"),  # a mark next to a space is deleted
        ("12:30", "12:30"),
    ],
)
def test_normalize_answer_follows_the_official_rules(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_answers_that_differ_after_normalisation_do_not_match():
    assert vqa_accuracy("2", ["3"] * 10) == 0.0
    assert vqa_accuracy("dog", ["dogs"] * 10) == 0.0


def test_official_script_mode_normalises_human_answers_only_as_the_official_script_does():
    # Unanimous raw answers are compared as they are: the prediction "two" becomes "2" and misses "two".
    assert vqa_accuracy("two", ["two"] * 10, as_official_script=True) == 0.0
    assert vqa_accuracy("two", ["two"] * 10) == 1.0
    # Disagreeing answers get the punctuation step only (no lowercasing, no digits, no articles).
    answers = ["yes."] * 5 + ["yes"] * 4 + ["no"]
    assert vqa_accuracy("Yes!", answers, as_official_script=True) == 1.0
    assert vqa_accuracy("a dog", ["a dog"] * 5 + ["dog"] * 5, as_official_script=True) == 1.0  # 5 "dog"s
    assert vqa_accuracy("2", ["Two"] * 9 + ["2"], as_official_script=True) == pytest.approx(0.3)
    assert vqa_accuracy("2", ["Two"] * 9 + ["2"]) == 1.0


@pytest.mark.parametrize("answers", [[], ["yes"], "yes"])
def test_vqa_accuracy_needs_a_list_of_human_answers(answers):
    with pytest.raises(ValueError, match="human answers"):
        vqa_accuracy("yes", answers)
