"""ShapesWorld on disk: real formats read back with plain tarfile / webdataset / json, byte-stable."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from skimage.measure import label as connected_components

from dvd.config import ConfigError
from dvd.data.shapesworld import cli, generate
from dvd.data.shapesworld_scenes import SPEC

SIZES = {"size": 200, "eval_size": 40, "instruct_size": 30, "shard_size": 80}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("world") / "sw"
    return root, generate(root, seed=7, **SIZES)


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            handle = tar.extractfile(member)
            assert handle is not None
            samples.setdefault(key, {})[ext] = handle.read()
    return samples


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_pretrain_shards_hold_png_caption_and_attributes(world: tuple[Path, dict[str, Any]]) -> None:
    root, summary = world
    assert summary["pretrain"]["urls"] == "pretrain/shard-{000000..000002}.tar"
    shards = (root / "pretrain" / "shards.txt").read_text().split()
    assert shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    counts = []
    for name in shards:
        samples = _tar_samples(root / "pretrain" / name)
        counts.append(len(samples))
        for key, files in samples.items():
            assert set(files) == {"png", "txt", "json"}
            meta = json.loads(files["json"])
            assert meta["caption"] == files["txt"].decode() and meta["key"] == key
            assert meta["shape"] in SPEC.shapes and meta["color"] in SPEC.colors
            assert meta["count"] in (1, 2, 3, 4)
            assert len(meta["objects"]) == meta["count"] + (meta["distractor"] is not None)
            assert _image(files["png"]).shape == (32, 32, 3)
    assert counts == [80, 80, 40]
    assert summary["files"]["pretrain/shard-000002.tar"]["records"] == 40


def test_pretrain_shards_stream_through_webdataset(world: tuple[Path, dict[str, Any]]) -> None:
    root, summary = world
    dataset = wds.WebDataset(str(root / summary["pretrain"]["urls"]), shardshuffle=False).decode("pil")
    pairs = list(dataset.to_tuple("png", "txt"))
    assert len(pairs) == SIZES["size"]
    assert all(image.size == (32, 32) and isinstance(text, str) and text for image, text in pairs)


def test_same_seed_gives_a_byte_identical_tree_with_any_number_of_workers_and_another_seed_does_not(
    world: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, _ = world
    generate(tmp_path / "again", seed=7, **SIZES, workers=2)  # the shards written by two processes
    generate(tmp_path / "other", seed=8, **SIZES)
    first, again = _tree_digest(root), _tree_digest(tmp_path / "again")
    other = _tree_digest(tmp_path / "other")
    assert len(first) > 100 and first == again
    # MME's subtask folders hold the images whose scene decides that subtask's question: seed-dependent
    layout = lambda digest: {name for name in digest if not name.startswith("mme/")}  # noqa: E731
    assert layout(first) == layout(other)
    differing = [name for name in layout(first) if first[name] != other[name]]
    assert "pretrain/shard-000000.tar" in differing and "images/test/000000000001.png" in differing


def test_a_separate_process_with_another_hash_seed_writes_the_same_bytes(
    world: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, _ = world
    code = (
        f"from dvd.data.shapesworld import generate; generate({str(tmp_path / 'proc')!r}, seed=7, "
        + ", ".join(f"{k}={v}" for k, v in SIZES.items())
        + ")"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert _tree_digest(tmp_path / "proc") == _tree_digest(root)


def test_tar_members_have_fixed_owner_time_and_mode(world: tuple[Path, dict[str, Any]]) -> None:
    root, _ = world
    for path in [root / "pretrain" / "shard-000000.tar", root / "zeroshot" / "color" / "test" / "0.tar"]:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
            (946684800, 0, 0, "", "", 0o644)
        }


def test_zeroshot_tasks_follow_the_clip_benchmark_layout(world: tuple[Path, dict[str, Any]]) -> None:
    root, summary = world
    assert set(summary["zeroshot"]) >= {"shape", "color", "count", "size", "texture"}
    for task, info in summary["zeroshot"].items():
        task_dir = root / "zeroshot" / task
        classnames = task_dir.joinpath("classnames.txt").read_text().splitlines()
        templates = task_dir.joinpath("zeroshot_classification_templates.txt").read_text().splitlines()
        assert classnames == info["classnames"] and len(classnames) >= 2
        assert len(templates) >= 3 and all("{c}" in t for t in templates)
        assert task_dir.joinpath("test", "nshards.txt").read_text().strip() == "1"
        samples = _tar_samples(task_dir / "test" / "0.tar")
        assert len(samples) == SIZES["eval_size"]
        labels = Counter(int(files["cls"]) for files in samples.values())
        assert set(labels) == set(range(len(classnames)))
        assert max(labels.values()) - min(labels.values()) <= 1  # balanced
        assert all(set(files) == {"png", "cls"} for files in samples.values())


def _zeroshot(root: Path, task: str) -> list[tuple[str, np.ndarray]]:
    names = (root / "zeroshot" / task / "classnames.txt").read_text().splitlines()
    samples = _tar_samples(root / "zeroshot" / task / "test" / "0.tar")
    return [(names[int(files["cls"])], _image(files["png"])) for _, files in sorted(samples.items())]


def test_colour_labels_match_the_dominant_saturated_colour(world: tuple[Path, dict[str, Any]]) -> None:
    palette = {name: np.array(rgb, dtype=float) for name, rgb in SPEC.colors.items()}
    for label, image in _zeroshot(world[0], "color"):
        pixels = image.reshape(-1, 3).astype(float)
        saturated = pixels[pixels.max(1) - pixels.min(1) > 100]  # backgrounds are gray; objects are not
        votes = Counter(min(palette, key=lambda c: np.abs(palette[c] - p).sum()) for p in saturated)
        assert votes.most_common(1)[0][0] == label


def _objects_on_plain_background(image: np.ndarray) -> list[np.ndarray] | None:
    """Boolean masks of the objects, or None when the background is not one flat colour."""
    flat = image.reshape(-1, 3)
    values, counts = np.unique(flat, axis=0, return_counts=True)
    background = values[counts.argmax()]
    if counts.max() < 0.4 * len(flat):
        return None  # noise or gradient
    foreground = np.abs(image.astype(int) - background).max(axis=2) > 25
    labels = connected_components(foreground, connectivity=1)
    return [labels == i for i in range(1, labels.max() + 1) if (labels == i).sum() >= 4]


def test_count_and_size_labels_match_the_drawn_objects(world: tuple[Path, dict[str, Any]]) -> None:
    root, _ = world
    checked = 0
    words = {"one": 1, "two": 2, "three": 3, "four": 4}
    for label, image in _zeroshot(root, "count"):
        objects = _objects_on_plain_background(image)
        if objects is not None:
            assert len(objects) == words[label]
            checked += 1
    for label, image in _zeroshot(root, "size"):
        objects = _objects_on_plain_background(image)
        if objects is not None:
            for mask in objects:
                ys, xs = np.nonzero(mask)
                extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1  # 5-8 px small, 9-14 px large
                assert (extent >= 9) == (label == "large"), (label, extent)
            checked += 1
    assert checked >= 20


def _scenes(root: Path) -> dict[str, dict[str, Any]]:
    return {scene["file_name"]: scene for scene in json.loads((root / "images" / "scenes.json").read_text())}


def test_pope_is_balanced_and_its_negatives_are_absent(world: tuple[Path, dict[str, Any]]) -> None:
    root, _ = world
    scenes = _scenes(root)
    held_out = [
        {o["shape"] for o in scene["objects"]}
        for scene in scenes.values()
        if scene["file_name"].startswith("test/")
    ]
    frequency = Counter(s for shapes in held_out for s in shapes)
    together = Counter((a, b) for shapes in held_out for a in shapes for b in shapes if a != b)
    for setting in ("random", "popular", "adversarial"):
        lines = (root / "pope" / f"pope_{setting}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        assert Counter(r["label"] for r in rows)["yes"] == Counter(r["label"] for r in rows)["no"] > 0
        assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
        asked: dict[str, list[tuple[str, str]]] = {}
        for row in rows:
            assert row["text"].startswith("Is there a ") and row["text"].endswith(" in the image?")
            shape = row["text"][len("Is there a ") : -len(" in the image?")]
            present = {o["shape"] for o in scenes[row["image"]]["objects"]}
            assert (shape in present) == (row["label"] == "yes"), (setting, row)
            assert (root / "images" / row["image"]).is_file() and row["image"].startswith("test/")
            asked.setdefault(row["image"], []).append((shape, row["label"]))
        for image, pairs in asked.items():
            present = {o["shape"] for o in scenes[image]["objects"]}
            chosen = [s for s, label in pairs if label == "no"]
            left = [s for s in SPEC.shapes if s not in present and s not in chosen]
            if setting == "popular":  # negatives: the most frequent absent shapes
                assert min(frequency[s] for s in chosen) >= max(frequency[s] for s in left)
            if setting == "adversarial":  # negatives: the absent shapes seen most often with these
                score = {s: sum(together[(p, s)] for p in present) for s in SPEC.shapes}
                assert min(score[s] for s in chosen) >= max(score[s] for s in left)


def test_vqa_has_ten_answers_agreeing_with_the_scene(world: tuple[Path, dict[str, Any]]) -> None:
    root, summary = world
    scenes = _scenes(root)
    questions = json.loads((root / "vqa" / "questions.json").read_text())["questions"]
    annotations = json.loads((root / "vqa" / "annotations.json").read_text())["annotations"]
    assert len(questions) == len(annotations) == summary["files"]["vqa/questions.json"]["records"] > 0
    by_id = {a["question_id"]: a for a in annotations}
    assert [q["question_id"] for q in questions] == [a["question_id"] for a in annotations]
    types = Counter()
    for q in questions:
        a = by_id[q["question_id"]]
        assert a["image_id"] == q["image_id"] and a["answer_type"] in ("yes/no", "number", "other")
        types[a["answer_type"]] += 1
        answers = [x["answer"] for x in a["answers"]]
        assert len(answers) == 10 and [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert Counter(answers).most_common(1)[0][0] == a["multiple_choice_answer"]
        assert answers.count(a["multiple_choice_answer"]) >= 7
        scene = scenes[q["image"]]
        if q["question"].startswith("How many "):
            noun = q["question"][len("How many ") : -len(" are there?")]
            true = sum(1 for o in scene["objects"] if noun in (o["shape"] + "s", o["shape"] + "es"))
            assert a["multiple_choice_answer"] == str(true)
        if q["question"].startswith("What color is the ") and "background" not in q["question"]:
            shape = q["question"][len("What color is the ") : -1]
            colors = {o["color"] for o in scene["objects"] if o["shape"] == shape}
            assert colors == {a["multiple_choice_answer"]}
    assert set(types) == {"yes/no", "number", "other"}
    assert sum(1 for a in annotations for x in a["answers"] if x["answer"] != a["multiple_choice_answer"]) > 0


def test_coco_captions_and_karpathy_split(world: tuple[Path, dict[str, Any]]) -> None:
    root, _ = world
    coco = json.loads((root / "captions" / "annotations.json").read_text())
    karpathy = json.loads((root / "captions" / "karpathy_split.json").read_text())
    assert karpathy["dataset"] == "shapesworld"
    refs = Counter(a["image_id"] for a in coco["annotations"])
    assert set(refs.values()) == {5} and set(refs) == {i["id"] for i in coco["images"]}
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    for image in coco["images"]:
        assert (root / "images" / image["file_name"]).is_file() and image["height"] == image["width"] == 32
    splits = Counter(entry["split"] for entry in karpathy["images"])
    assert splits == {"train": SIZES["instruct_size"], "val": 8, "test": 32}
    captions = {(a["image_id"], a["caption"]) for a in coco["annotations"]}
    for entry in karpathy["images"]:
        assert entry["filename"].startswith("train/" if entry["split"] == "train" else "test/")
        assert len(entry["sentences"]) == 5
        for sentence in entry["sentences"]:
            assert (entry["cocoid"], sentence["raw"]) in captions
            assert sentence["tokens"] and all(t == t.lower() and t.isalnum() for t in sentence["tokens"])


def test_llava_sets_have_one_image_token_in_the_first_human_turn(world: tuple[Path, dict[str, Any]]) -> None:
    root, _ = world
    test_images = {q["image"] for q in json.loads((root / "vqa" / "questions.json").read_text())["questions"]}
    for name in ("stage1_captions.json", "stage2_instruct.json"):
        rows = json.loads((root / "llava" / name).read_text())
        assert len(rows) == SIZES["instruct_size"]
        for row in rows:
            assert set(row) == {"id", "image", "conversations"}
            assert row["image"].startswith("train/") and row["image"] not in test_images
            assert (root / "images" / row["image"]).is_file()
            turns = row["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
            assert sum(t["value"].count("<image>") for t in turns) == 1
            assert turns[0]["value"].startswith("<image>\n")
            assert all(t["value"].strip() for t in turns)
    stage2 = json.loads((root / "llava" / "stage2_instruct.json").read_text())
    assert max(len(row["conversations"]) for row in stage2) >= 6  # multi-turn


def test_summary_counts_every_file_it_lists(world: tuple[Path, dict[str, Any]]) -> None:
    root, summary = world
    assert json.loads((root / "summary.json").read_text()) == summary
    assert summary["seed"] == 7 and summary["image_size"] == 32
    assert summary["spec"]["shapes"] == list(SPEC.shapes)
    for name, info in summary["files"].items():
        assert (root / name).stat().st_size == info["bytes"] and info["records"] > 0
        assert (root / name).stat().st_mode & 0o777 == 0o644  # readable by all, like any dataset
    assert len(list((root / "images" / "test").glob("*.png"))) == summary["images"]["test"] == 40
    assert len(list((root / "images" / "train").glob("*.png"))) == summary["images"]["train"] == 30


def test_cli_writes_a_world_and_prints_what_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert cli(["--out", str(out), "--size", "30", "--eval-size", "8", "--image-size", "16"]) == 0
    printed = capsys.readouterr().out
    assert "30 pairs" in printed and "pope/pope_adversarial.jsonl" in printed and " s," in printed
    assert json.loads((out / "summary.json").read_text())["image_size"] == 16
    # writing again into the same world with fewer shards leaves no stale shard behind
    assert cli(["--out", str(out), "--size", "10", "--eval-size", "8", "--shard-size", "5"]) == 0
    shards = sorted(p.name for p in (out / "pretrain").glob("*.tar"))
    assert shards == ["shard-000000.tar", "shard-000001.tar"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "-5"], "--size must be >= 1"),
        (["--image-size", "12"], "--image-size must be >= 16"),
        (["--eval-size", "0"], "--eval-size must be >= 2"),
        (["--seed", "-1"], "--seed must be a non-negative"),
        (["--workers", "0"], "--workers must be >= 1"),
    ],
)
def test_cli_refuses_bad_numbers_with_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        cli(["--out", str(tmp_path / "w"), *argv])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "w").exists()


def test_cli_refuses_a_file_or_a_foreign_directory_as_out(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("not a directory")
    with pytest.raises(ConfigError, match="is a file"):
        cli(["--out", str(target), "--size", "5"])
    with pytest.raises(ConfigError, match="is a file"):
        cli(["--out", str(target / "below"), "--size", "5"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.md").write_text("mine")
    with pytest.raises(ConfigError, match="no ShapesWorld summary.json"):
        cli(["--out", str(tmp_path / "busy"), "--size", "5"])
    assert (tmp_path / "busy" / "notes.md").read_text() == "mine"


def test_stage2_presence_questions_are_balanced_between_yes_and_no(tmp_path):
    """Trained on mostly-"no" presence questions a model always says no; POPE then measures nothing."""
    import json

    from dvd.data.shapesworld import generate

    generate(tmp_path / "w", seed=3, size=40, image_size=32, eval_size=10, instruct_size=400)
    answers = []
    for conversation in json.loads((tmp_path / "w" / "llava" / "stage2_instruct.json").read_text()):
        turns = conversation["conversations"]
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            if question["value"].replace("<image>\n", "").startswith("Is there a"):
                answers.append(answer["value"])
    assert len(answers) > 100
    assert 0.4 <= answers.count("yes") / len(answers) <= 0.6


def test_a_generation_killed_part_way_can_be_rerun_into_the_same_out(tmp_path: Path) -> None:
    out = tmp_path / "world"
    command = [sys.executable, "-m", "dvd.cli", "data", "shapesworld", "--out", str(out), "--size", "20000"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.rglob("*.tar")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.kill()
    assert process.wait() == -signal.SIGKILL, "the generation finished before it could be killed"
    assert not out.exists()  # the killed run wrote into a temporary folder only
    generate(out, seed=7, **SIZES)
    assert (out / "summary.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["world"]  # the dead run's folder is gone


def test_regenerating_replaces_the_previous_world_whole(world: tuple[Path, dict[str, Any]], tmp_path: Path):
    generate(tmp_path / "w", seed=7, **{**SIZES, "size": 400})
    generate(tmp_path / "w", seed=7, **SIZES)
    assert _tree_digest(tmp_path / "w") == _tree_digest(world[0])
    assert [p.name for p in tmp_path.iterdir()] == ["w"]
