"""ScienceQA (LLaVA's format) and MME: readers, the published scoring rules, the ShapesWorld sets, and
``dvd eval scienceqa`` / ``dvd eval mme`` end to end on a tiny VLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dvd.cli import main
from dvd.data.mme import MME
from dvd.data.scienceqa import is_correct, parse_letter, read_scienceqa, scienceqa_split
from dvd.data.shapesworld_reasoning import SCIENCEQA_FILE, mme_questions, write_reasoning_sets
from dvd.data.shapesworld_scenes import Scene
from dvd.data.transforms import image_transform
from dvd.eval import scienceqa as sqa_eval
from dvd.eval.mme import evaluate_mme, mme_answer, mme_scores
from dvd.eval.results import read_rows
from dvd.models.vlm import build_tokenizer, create_vlm
from dvd.models.vlm_io import save_vlm
from dvd.models.vlm_tokenizer import texts_from_files
from tiny_models import IMAGE_SIZE, TINY_LLAMA, tiny_tower

FAST = ["--limit", "6", "--batch-size", "3", "--steps", "2", "--max-new-tokens", "4", "--no-progress"]


def held_out_scenes(root: Path) -> list[tuple[int, str, Scene]]:
    scenes = json.loads((root / "images" / "scenes.json").read_text())
    held_out = [s for s in scenes if s["file_name"].startswith("test/")]
    return [(s["image_id"], s["file_name"], Scene.from_json(s)) for s in held_out]


@pytest.fixture(scope="module")
def checkpoint(shapesworld: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random VLM whose tokenizer covers the ScienceQA and MME texts and the answer letters."""
    texts = list(texts_from_files([shapesworld / SCIENCEQA_FILE]))
    mme = sorted((shapesworld / "mme").rglob("*.txt"))
    texts += [line for p in mme for line in p.read_text().splitlines()]
    torch.manual_seed(0)
    tokenizer = build_tokenizer([*texts, "A B C D E yes no"])
    model = create_vlm(tiny_tower(), TINY_LLAMA, tokenizer=tokenizer, template="vicuna_v1_short")
    return save_vlm(model, tmp_path_factory.mktemp("reasoning") / "tiny-dvd")


# --- the scoring rules, as LLaVA's eval_science_qa.py and MME's calculation.py apply them ------------
@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("C. a star", "C"),
        ("The answer is A.", "A"),
        ("The answer is A. The answer is B.", None),  # two claims: neither
        ("b", None),  # case matters
        ("B.", None),  # "X. " needs the space
        ("", None),
        ("I think D", None),
    ],
)
def test_scienceqa_answers_are_read_as_llava_reads_them(text, letter):
    assert parse_letter(text) == letter


def test_a_letter_beyond_the_options_is_wrong():
    assert is_correct("C", "C", 3) and not is_correct("D", "D", 3)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("Yes", "yes"), ("No.", "no"), ("Yes, it is.", "yes"), ("I see no", "other"), ("", "other")],
)
def test_mme_answers_are_read_from_their_first_four_characters(text, parsed):
    assert mme_answer(text) == parsed


def test_mme_scores_are_accuracy_plus_acc_plus_summed_into_perception_and_cognition():
    def rec(subtask, image, label, output):
        return {"subtask": subtask, "image_name": image, "label": label, "output": output}

    records = [
        rec("existence", "1.png", "yes", "Yes"),
        rec("existence", "1.png", "no", "No"),  # image 1: both right
        rec("existence", "2.png", "yes", "No"),
        rec("existence", "2.png", "no", "No"),  # image 2: one right
        rec("count", "3.png", "yes", "Yes"),
        rec("count", "3.png", "no", "Yes"),
        rec("code_reasoning", "4.png", "yes", "Yes"),
        rec("code_reasoning", "4.png", "no", "no"),
    ]
    scores = mme_scores(records)
    assert scores["existence"] == {"accuracy": 0.75, "acc_plus": 0.5, "score": 125.0, "n": 4}
    assert scores["count"]["score"] == 50.0
    assert scores["perception"] == {"score": 175.0, "n": 6}
    assert scores["cognition"] == {"score": 200.0, "n": 2}


# --- readers ---------------------------------------------------------------------------------------
def test_scienceqa_reader_takes_llavas_entries_and_splits_off_text_only_questions(tmp_path):
    (tmp_path / "img" / "7").mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "img" / "7" / "image.png")
    entries = [
        {
            "id": "7",
            "image": "7/image.png",
            "conversations": [
                {"from": "human", "value": "Context: N/A\nQuestion: Which?\nOptions: (A) x (B) y\n<image>"},
                {"from": "gpt", "value": "B"},
            ],
        },
        {
            "id": "8",
            "conversations": [
                {"from": "human", "value": "Context: c\nQuestion: Which?\nOptions: (A) x (B) y (C) z"},
                {"from": "gpt", "value": "The answer is C."},
            ],
        },
    ]
    path = tmp_path / "llava_test_CQM-A.json"
    path.write_text(json.dumps(entries))
    images, texts = scienceqa_split(path, tmp_path / "img", transform=image_transform(IMAGE_SIZE))
    item = images[0]
    assert item["question"] == "Context: N/A\nQuestion: Which?\nOptions: (A) x (B) y"
    assert (item["answer"], item["n_choices"], item["image"].shape) == ("B", 2, (3, IMAGE_SIZE, IMAGE_SIZE))
    assert [(t["id"], t["answer"], t["n_choices"]) for t in texts] == [("8", "C", 3)]
    entries[1]["conversations"][1]["value"] = "maybe"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="entry 1 answer 'maybe'"):
        read_scienceqa(path)


def test_mme_reader_takes_both_folder_layouts(tmp_path):
    flat, nested = tmp_path / "count", tmp_path / "artwork"
    (nested / "images").mkdir(parents=True)
    (nested / "questions_answers_YN").mkdir()
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    (flat / "a.txt").write_text("Are there two? Please answer yes or no.\tYes\nAre there three?\tNo\n")
    Image.new("RGB", (8, 8)).save(nested / "images" / "b.jpg")
    (nested / "questions_answers_YN" / "b.txt").write_text("Is this a painting?\tNo\nIs it a photo?\tYes\n")
    data = MME(tmp_path, transform=image_transform(IMAGE_SIZE))
    assert data.subtasks == ["artwork", "count"]
    items = [data[i] for i in range(len(data))]
    assert [(i["subtask"], i["image_name"], i["label"]) for i in items] == [
        ("artwork", "b.jpg", "no"),
        ("artwork", "b.jpg", "yes"),
        ("count", "a.png", "yes"),
        ("count", "a.png", "no"),
    ]
    (flat / "a.txt").write_text("no tab here\n")
    with pytest.raises(ValueError, match="line 1"):
        MME(tmp_path, transform=None)


def test_mme_reader_keeps_each_subtasks_first_images_with_all_their_questions(shapesworld):
    every = MME(shapesworld / "mme", transform=None)
    some = MME(shapesworld / "mme", transform=None, images_per_subtask=2)
    assert some.subtasks == every.subtasks
    for subtask in every.subtasks:
        questions = [r["fields"] for r in every.records if r["fields"]["subtask"] == subtask]
        first = sorted({q["image_name"] for q in questions})[:2]
        kept = [r["fields"] for r in some.records if r["fields"]["subtask"] == subtask]
        assert kept == [q for q in questions if q["image_name"] in first]  # both questions of each image
        assert len(kept) == 4 and len(questions) > 4
    with pytest.raises(ValueError, match="images_per_subtask must be >= 1"):
        MME(shapesworld / "mme", transform=None, images_per_subtask=0)


# --- ShapesWorld writes both formats -----------------------------------------------------------------
def test_shapesworld_questions_are_decided_by_the_scene(shapesworld):
    scenes = {i: s for i, _, s in held_out_scenes(shapesworld)}
    for entry in json.loads((shapesworld / SCIENCEQA_FILE).read_text()):
        question = entry["conversations"][0]["value"]
        letter = parse_letter(entry["conversations"][1]["value"])
        chosen = question.split(f"({letter}) ")[1].split(" (")[0].split("\n")[0]
        scene = scenes[int(entry["id"])]
        assert chosen in (scene.shape, scene.color, {1: "one", 2: "two", 3: "three", 4: "four"}[scene.count])
    data = MME(shapesworld / "mme", transform=None)
    assert set(data.subtasks) <= {"existence", "count", "position", "color"} and "existence" in data.subtasks
    for record in data.records:
        fields = record["fields"]
        scene = scenes[int(fields["image_name"].split(".")[0])]
        if fields["subtask"] == "existence":
            shape = fields["question"].split("Is there a ")[1].split(" in")[0]
            assert (shape in scene.present_shapes) == (fields["label"] == "yes")


def test_shapesworld_sets_are_byte_identical_for_a_seed(shapesworld, tmp_path):
    (tmp_path / "images").symlink_to(shapesworld / "images")
    write_reasoning_sets(tmp_path, 0, held_out_scenes(shapesworld))
    assert (tmp_path / SCIENCEQA_FILE).read_bytes() == (shapesworld / SCIENCEQA_FILE).read_bytes()
    some = sorted((shapesworld / "mme").rglob("*.txt"))[0]
    assert (tmp_path / some.relative_to(shapesworld)).read_bytes() == some.read_bytes()
    image_id, _, scene = held_out_scenes(shapesworld)[0]
    assert mme_questions(image_id, scene, 0) == mme_questions(image_id, scene, 0)


# --- the commands ------------------------------------------------------------------------------------
def run(out: Path, *args: str) -> list:
    assert main([*args, "--out", str(out), *FAST]) == 0
    return read_rows(out)


def test_scienceqa_command_clean_and_under_apgd(shapesworld, checkpoint, tmp_path):
    args = ["eval", "scienceqa", "--model", str(checkpoint), "--data", str(shapesworld), "--attack", "apgd"]
    rows = run(tmp_path / "r.json", *args, "--eps", "4/255")
    assert sorted(r.metric for r in rows) == ["accuracy", "image_accuracy"]
    for row in rows:
        assert (row.task, row.dataset, row.attack) == ("scienceqa", "shapesworld/scienceqa", "apgd")
        assert row.steps == 2
        assert row.adversarial is not None and row.adversarial <= row.clean
    image_row = next(r for r in rows if r.metric == "image_accuracy")
    assert image_row.n == 6


def test_scienceqa_accounting_clean_and_under_attack(shapesworld, checkpoint, monkeypatch):
    """A model that answers an image question right only on the unperturbed image, and every text-only
    question right: under attack the image questions fall, the text-only ones stay in the overall number."""
    from dvd.models.vlm_io import load_vlm

    model = load_vlm(checkpoint)
    images, texts = scienceqa_split(
        shapesworld / SCIENCEQA_FILE, shapesworld / "images", transform=image_transform(32)
    )
    clean = {images[i]["question"]: (images[i]["image"], images[i]["answer"]) for i in range(len(images))}
    instruction = "\n" + sqa_eval.SCIENCEQA_PROMPT

    def oracle(self, batch, prompts, **kwargs):
        out = []
        for image, prompt in zip(batch, prompts, strict=True):
            original, answer = clean[prompt.removesuffix(instruction)]
            out.append(answer if torch.equal(image, original) else "E")
        return out

    def text_oracle(model, prompts, **kwargs):
        return [f"The answer is {t['answer']}." for t in texts]

    monkeypatch.setattr(type(model), "generate", oracle)
    monkeypatch.setattr(sqa_eval, "text_only_answers", text_oracle)
    rows = sqa_eval.evaluate_scienceqa(
        model, images, texts, attack="apgd", eps_list=[4 / 255], steps=2, progress=False
    )
    by_metric = {r.metric: r for r in rows}
    total = len(images) + len(texts)
    assert texts and by_metric["image_accuracy"].clean == 1.0 and by_metric["accuracy"].clean == 1.0
    assert by_metric["image_accuracy"].adversarial == 0.0
    assert by_metric["accuracy"].adversarial == pytest.approx(len(texts) / total)
    assert (by_metric["accuracy"].n, by_metric["image_accuracy"].n) == (total, len(images))


def test_mme_command_writes_subtask_rows_and_the_perception_score(shapesworld, checkpoint, tmp_path):
    out = tmp_path / "m.json"
    args = ["eval", "mme", "--model", str(checkpoint), "--data", str(shapesworld), "--out", str(out)]
    assert main([*args, "--no-progress", "--max-new-tokens", "3"]) == 0
    rows = read_rows(out)
    perception = next(r for r in rows if r.metric == "perception")
    subtask_scores = [r.clean for r in rows if r.metric == "score"]
    assert perception.clean == pytest.approx(sum(subtask_scores))
    assert all(r.task == "mme" and r.attack == "none" and r.adversarial is None for r in rows)
    assert {(r.protocol, r.template) for r in rows} == {(None, "vicuna_v1_short")}
    assert main([*args, "--no-progress", "--images-per-subtask", "1", "--max-new-tokens", "3"]) == 0
    assert {r.n for r in read_rows(out) if r.metric == "accuracy"} == {2}  # one image: its two questions


def test_mme_command_refuses_a_non_positive_image_count_before_loading_the_model(
    shapesworld, tmp_path, capsys
):
    args = ["eval", "mme", "--model", str(tmp_path / "absent"), "--data", str(shapesworld)]
    assert main([*args, "--images-per-subtask", "0"]) == 2
    assert capsys.readouterr().err.strip() == "dvd: error: --images-per-subtask must be >= 1, got 0"


def test_mme_rows_follow_the_answers(shapesworld, checkpoint, monkeypatch):
    from dvd.models.vlm_io import load_vlm

    model = load_vlm(checkpoint)
    monkeypatch.setattr(type(model), "generate", lambda self, x, prompts, **k: ["Yes"] * len(prompts))
    rows = evaluate_mme(model, MME(shapesworld / "mme", transform=image_transform(32)), progress=False)
    for row in rows:
        if row.metric == "accuracy":
            assert row.clean == 0.5  # one Yes and one No question per image
        if row.metric == "acc_plus":
            assert row.clean == 0.0


@pytest.mark.parametrize("task", ["scienceqa", "mme"])
def test_save_samples_writes_each_questions_answer(task, shapesworld, checkpoint, tmp_path):
    """--save-samples reaches ScienceQA and MME as every other evaluation (it was silently dropped)."""
    samples = tmp_path / "samples"
    args = ["eval", task, "--model", str(checkpoint), "--data", str(shapesworld)]
    args += ["--save-samples", str(samples)]
    assert main([*args, "--out", str(tmp_path / "r.json"), "--no-progress", "--limit", "3"]) == 0
    records = [json.loads(line) for path in samples.glob(f"{task}-*.jsonl") for line in path.open()]
    assert records and all(isinstance(r["clean"], str) and r["references"] for r in records)
