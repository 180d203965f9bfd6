"""Paired differences (dvd.eval.paired): two models' gain on the same samples and its standard error."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from _eval_helpers import run
from dvd.eval import captioning
from dvd.eval.paired import (
    caption_scores,
    compare,
    compare_ratio,
    paired_difference,
    paired_ratio,
    read_records,
    vqa_scores,
)
from dvd.eval.vqa import vqa_accuracy

scores = st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=40)


def test_the_gain_is_the_mean_difference_and_its_error_the_differences_sd_over_root_n() -> None:
    a = {"x": 1.0, "y": 2.0, "z": 3.0}
    b = {"x": 2.0, "y": 2.0, "z": 5.0}  # differences 1, 0, 2: mean 1, sample SD 1
    got = paired_difference(a, b)
    assert (got.mean, got.n) == (1.0, 3)
    assert got.se == pytest.approx(1 / math.sqrt(3))
    assert got.sigmas() == pytest.approx(math.sqrt(3))
    assert got.sigmas(bound=1.0) == 0.0
    assert paired_difference(a, a).sigmas() is None  # no spread to measure against


@given(scores, scores)
def test_a_paired_difference_is_the_difference_of_means_and_antisymmetric(xs, ys) -> None:
    n = min(len(xs), len(ys))
    a = {str(i): x for i, x in enumerate(xs[:n])}
    b = {str(i): y for i, y in enumerate(ys[:n])}
    ab, ba = paired_difference(a, b), paired_difference(b, a)
    assert ab.mean == pytest.approx(statistics.fmean(ys[:n]) - statistics.fmean(xs[:n]), abs=1e-9)
    assert ba.mean == pytest.approx(-ab.mean, abs=1e-12) and ba.se == pytest.approx(ab.se)
    assert ab.se >= 0


@given(scores, st.floats(-3, 3, allow_nan=False))
def test_a_constant_shift_has_no_error(xs, shift) -> None:
    a = {str(i): x for i, x in enumerate(xs)}
    got = paired_difference(a, {k: v + shift for k, v in a.items()})
    assert got.mean == pytest.approx(shift, abs=1e-9) and got.se == pytest.approx(0, abs=1e-9)


def test_a_ratio_of_means_gets_the_delta_methods_error() -> None:
    a = {"x": 1.0, "y": 2.0, "z": 3.0}  # mean 2
    b = {"x": 3.0, "y": 3.0, "z": 6.0}  # mean 4: ratio 2, residuals b - 2a = 1, -1, 0 (SD 1)
    got = paired_ratio(a, b)
    assert (got.ratio, got.n) == (2.0, 3)
    assert got.se == pytest.approx(1 / math.sqrt(3) / 2)
    assert paired_ratio({"x": 0.0}, {"x": 1.0}) is None  # against nothing: unbounded, no error to give


@given(scores, st.floats(0.1, 10))
def test_a_model_scoring_a_constant_multiple_has_that_ratio_without_error(xs, factor) -> None:
    a = {str(i): abs(x) + 0.5 for i, x in enumerate(xs)}
    got = paired_ratio(a, {k: factor * v for k, v in a.items()})
    assert got.ratio == pytest.approx(factor) and got.se == pytest.approx(0, abs=1e-9)


def test_evaluations_of_different_samples_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="different samples .* same --data, --limit and --seed"):
        paired_difference({"0": 1.0, "1": 1.0}, {"0": 1.0, "2": 1.0})
    with pytest.raises(ValueError, match="no samples"):
        paired_difference({}, {})


REFERENCES = {
    0: ["Two red circles.", "A pair of red circles on a grey background.", "Two small red circles."],
    1: ["A blue striped square.", "One square with blue stripes.", "A large blue square with stripes."],
    2: ["Three green stars.", "Green stars, three of them.", "Three dotted green stars."],
}
OUTPUTS = {  # clean first, then what the attacks made of it
    0: ["two red circles.", "two red squares.", "a red circle."],
    1: ["a blue striped square.", "a blue striped square."],
    2: ["three green stars.", "four green stars.", "three stars."],
}


def _records(outputs: dict[int, list[str]]) -> list[dict]:
    return [{"id": k, "references": REFERENCES[k], "clean": v[0], "outputs": v} for k, v in outputs.items()]


def test_per_image_cider_averages_to_the_caption_rows_values() -> None:
    clean, worst = captioning.caption_scores(
        REFERENCES, [{"position": k, "outputs": v} for k, v in OUTPUTS.items()]
    )
    per_image = caption_scores(_records(OUTPUTS))
    assert statistics.fmean(c for c, _ in per_image.values()) == pytest.approx(clean)
    assert statistics.fmean(w for _, w in per_image.values()) == pytest.approx(worst)
    assert per_image["1"][0] == per_image["1"][1]  # unbroken: its worst case is its clean caption
    assert all(w < c for k, (c, w) in per_image.items() if k != "1")


def test_a_model_with_better_captions_gains_on_every_image_it_captions_better() -> None:
    better = {k: [v[0]] * len(v) for k, v in OUTPUTS.items()}  # attacks leave its captions unchanged
    gain = compare("caption", _records(OUTPUTS), _records(better))
    assert gain.mean > 0 and gain.n == 3
    assert compare("caption", _records(OUTPUTS), _records(better), which="clean").mean == 0.0
    assert compare_ratio("caption", _records(OUTPUTS), _records(better)).ratio > 1


def test_vqa_scores_each_question_against_its_human_answers() -> None:
    answers = ["2"] * 6 + ["3"] * 4
    records = [{"id": 7, "answers": answers, "clean": "2", "outputs": ["2", "3", "two"]}]
    assert vqa_scores(records) == {"7": (vqa_accuracy("2", answers), vqa_accuracy("two", answers))}
    assert vqa_scores(records)["7"] == (1.0, 1.0)  # VQA's normalisation reads "two" as "2"


@pytest.mark.parametrize("command", ["caption", "vqa"])
def test_the_saved_records_of_a_real_evaluation_give_its_rows_values(
    shapesworld, tiny_vlm, tmp_path, command
) -> None:
    samples = tmp_path / "samples"
    (row,) = run(["eval", command], tmp_path / "r.json", "--model", str(tiny_vlm), "--data", str(shapesworld),
                 "--eps", "8/255", "--save-samples", str(samples))
    (jsonl,) = samples.glob("*-eps8of255.jsonl")
    records = read_records(jsonl)
    per_sample = (caption_scores if command == "caption" else vqa_scores)(records)
    assert len(per_sample) == row.n
    assert statistics.fmean(c for c, _ in per_sample.values()) == pytest.approx(row.clean)
    assert statistics.fmean(w for _, w in per_sample.values()) == pytest.approx(row.adversarial)
    assert compare(command, records, records).se == 0.0
