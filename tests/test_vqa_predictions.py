"""dvd eval vqa on questions without answers (test-dev): clean answers in VQAv2's submission format;
images named by a pattern the reader cannot guess are given with --image-pattern."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from _eval_helpers import FAST
from dvd.cli import main


@pytest.fixture
def test_dev(shapesworld: Path, tmp_path: Path) -> tuple[Path, Path]:
    """VQAv2 test-dev style: questions by image id only, images named img_<id>.png, no annotations."""
    doc = json.loads((shapesworld / "vqa" / "questions.json").read_text())
    for question in doc["questions"]:
        source = shapesworld / "images" / question.pop("image")
        (tmp_path / "images").mkdir(exist_ok=True)
        shutil.copy(source, tmp_path / "images" / f"img_{question['image_id']}.png")
    (tmp_path / "questions.json").write_text(json.dumps(doc))
    return tmp_path / "questions.json", tmp_path / "images"


def vqa(checkpoint: Path, questions: Path, images: Path, *extra: str) -> int:
    return main(["eval", "vqa", "--model", str(checkpoint), "--questions", str(questions), "--images",
                 str(images), *FAST, *extra])


def test_questions_without_answers_give_clean_answers_in_the_submission_format(
    tiny_vlm, test_dev, tmp_path
) -> None:
    out, predictions = tmp_path / "r.json", tmp_path / "answers.json"
    args = ["--image-pattern", "img_{image_id}.png", "--attack", "none", "--predictions", str(predictions)]
    assert vqa(tiny_vlm, *test_dev, *args, "--out", str(out)) == 0
    answers = json.loads(predictions.read_text())
    assert [sorted(a) for a in answers] == [["answer", "question_id"]] * 4
    assert [a["question_id"] for a in answers] == [1000, 1001, 1002, 1003]
    assert all(isinstance(a["answer"], str) and a["answer"] == a["answer"].strip() for a in answers)
    assert not out.exists() and not Path(f"{out}.partial").exists()  # no rows: nothing to score


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attack", "none"], "give --predictions FILE"),
        (["--predictions", "P"], "--attack ensemble needs the human answers (--annotations)"),
        (["--attack", "none", "--predictions", "P", "--image-pattern", "no_{image_id}.png"], "no_1.png"),
        (["--attack", "none", "--predictions", "P"], "give the file name pattern with --image-pattern"),
    ],
)
def test_what_cannot_run_without_answers_is_a_one_line_error(
    tiny_vlm, test_dev, tmp_path, capsys, extra, message
) -> None:
    extra = [e.replace("P", str(tmp_path / "answers.json")) if e == "P" else e for e in extra]
    code = vqa(tiny_vlm, *test_dev, *extra, "--out", str(tmp_path / "r.json"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err
