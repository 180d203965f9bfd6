"""POPE: answer parsing as in the POPE script, and the scores of a hand-worked confusion matrix."""

from __future__ import annotations

import pytest

from dvd.eval.pope import pope_answer, pope_metrics


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Yes", "yes"),
        ("yes, there is a dog in the image.", "yes"),
        ("No", "no"),
        ("No, there is no dog.", "no"),
        ("There is not a dog in the image.", "no"),
        ("no", "no"),
        ("Yes. There is no cat, but a dog.", "yes"),  # only the first sentence counts
        ("The dog is nowhere", "yes"),  # "no" must be a whole word
        ("NO", "yes"),  # the POPE script matches "No", "no" and "not" exactly
        ("I see a dog, not a cat", "no"),
        ("", "yes"),
    ],
)
def test_pope_reads_answers_like_the_pope_script(text, answer):
    assert pope_answer(text) == answer


def test_pope_metrics_on_a_hand_worked_confusion_matrix():
    # 10 questions: labels 6 yes / 4 no. Predictions: 4 yes-questions answered yes (TP=4), 2 answered no
    # (FN=2); 1 no-question answered yes (FP=1), 3 answered no (TN=3).
    labels = ["yes"] * 6 + ["no"] * 4
    predictions = ["Yes.", "yes", "Yes, it is.", "yes there is", "No.", "There is not.",
                   "Yes", "no", "No, there isn't.", "not at all"]
    m = pope_metrics(predictions, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n"]) == (4, 2, 1, 3, 10)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["recall"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))  # = 8/11
    assert m["f1"] == pytest.approx(8 / 11)
    assert m["yes_ratio"] == pytest.approx(5 / 10)


def test_pope_metrics_never_yes_has_zero_precision_recall_and_f1_instead_of_dividing_by_zero():
    m = pope_metrics(["no", "No.", "not"], ["yes", "no", "no"])
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_pope_metrics_accept_labels_in_any_case_and_spacing():
    assert pope_metrics(["yes"], [" Yes "])["accuracy"] == 1.0


@pytest.mark.parametrize(
    ("predictions", "labels", "match"),
    [
        (["yes"], ["yes", "no"], "1 predictions but 2 labels"),
        ([], [], "at least one"),
        (["yes"], ["maybe"], "'yes' or 'no'"),
    ],
)
def test_pope_metrics_bad_input_is_a_one_line_error(predictions, labels, match):
    with pytest.raises(ValueError, match=match):
        pope_metrics(predictions, labels)
