"""Readers for the field's data formats: what they yield, how they split, and how they fail.

Every fixture is written here, in the real public format (tar shards with KEY.png + KEY.txt,
CLIP_benchmark's zero-shot layout, COCO / Karpathy / VQAv2 JSON, POPE JSONL, LLaVA JSON).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from _shards import write_shard
from dvd.data.captions import CocoCaptions
from dvd.data.image_text import CsvImageText, collate_dicts, collate_pairs, image_text_shards
from dvd.data.instruct import LlavaInstruct
from dvd.data.pope import Pope
from dvd.data.transforms import image_transform
from dvd.data.vqa import VQAv2
from dvd.data.zeroshot import load_zeroshot

T16 = image_transform(16)
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def image_bytes(
    color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (20, 24), fmt: str = "PNG"
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def truncated_png() -> bytes:
    data = image_bytes(size=(64, 64))
    return data[: len(data) // 2]


def pair_shards(root: Path, shards: int, per_shard: int) -> list[str]:
    """``shards`` open_clip shards whose captions are the sample keys."""
    names = []
    for s in range(shards):
        samples = [
            (f"{s:03d}{i:03d}", {"png": image_bytes(COLORS[i % 6]), "txt": f"{s:03d}{i:03d}".encode()})
            for i in range(per_shard)
        ]
        names.append(str(write_shard(root / f"shard-{s}.tar", samples)))
    return names


def png_file(path: Path, color: tuple[int, int, int] = (0, 0, 255), data: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(color) if data is None else data)
    return path


# ------------------------------------------------------------------------------------ transforms


def test_eval_transform_resizes_the_shortest_side_then_crops_the_centre_into_unit_range():
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    wide.paste(Image.new("RGB", (32, 32), (0, 0, 255)), (32, 0))  # left half red, right half blue
    x = image_transform(32)(wide)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert x[0, :, :12].min() > 0.95 and x[2, :, :12].max() < 0.05  # the crop keeps the middle: red | blue
    assert x[2, :, 20:].min() > 0.95 and x[0, :, 20:].max() < 0.05
    tall = image_transform(8)(Image.new("RGB", (10, 30), (0, 255, 0)))
    assert tall.shape == (3, 8, 8) and torch.allclose(tall[1], torch.ones(8, 8))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_every_image_mode_becomes_three_channel_rgb(mode):
    x = image_transform(8)(Image.new(mode, (12, 9)))
    assert x.shape == (3, 8, 8) and 0.0 <= x.min() and x.max() <= 1.0


def test_train_transform_random_resized_crop_keeps_size_and_range():
    torch.manual_seed(0)
    image = Image.effect_noise((40, 40), 60).convert("RGB")
    train = image_transform(16, train=True)
    a, b = train(image), train(image)
    assert a.shape == b.shape == (3, 16, 16) and 0.0 <= a.min() and a.max() <= 1.0
    assert not torch.equal(a, b)  # random crops differ
    assert torch.equal(image_transform(16)(image), image_transform(16)(image))


# ---------------------------------------------------------------------------------- image-text shards


def test_image_text_shards_read_back_every_pair_with_its_caption(tmp_path):
    write_shard(
        tmp_path / "a.tar",
        [
            ("k0", {"png": image_bytes((255, 0, 0)), "txt": b"a red square\n"}),
            ("k1", {"jpg": image_bytes((0, 255, 0), fmt="JPEG"), "txt": b"a green square"}),
            ("k2", {"webp": image_bytes((0, 0, 255), fmt="WEBP"), "txt": "un carr\u00e9 bleu".encode()}),
        ],
    )
    ds = image_text_shards(str(tmp_path / "a.tar"), transform=T16)
    items = list(ds)
    assert [caption for _, caption in items] == ["a red square", "a green square", "un carr\u00e9 bleu"]
    for (image, _), channel in zip(items, (0, 1, 2), strict=True):
        assert image.shape == (3, 16, 16) and 0.0 <= image.min() and image.max() <= 1.0
        assert image[channel].mean() > 0.9
    assert ds.skipped == [] and ds.seen == 3


def test_truncated_png_in_the_middle_of_a_shard_is_skipped_counted_and_reported(tmp_path, caplog):
    samples = [(f"{i:06d}", {"png": image_bytes(), "txt": f"caption {i}".encode()}) for i in range(5)]
    samples[2] = ("000002", {"png": truncated_png(), "txt": b"caption 2"})
    url = str(write_shard(tmp_path / "shard.tar", samples))
    ds = image_text_shards(url, transform=T16)
    with caplog.at_level(logging.WARNING):
        captions = [caption for _, caption in ds]
    assert captions == ["caption 0", "caption 1", "caption 3", "caption 4"]
    assert len(ds.skipped) == 1 and ds.skipped[0][0] == "000002"
    assert "truncated" in ds.skipped[0][1].lower() or "OSError" in ds.skipped[0][1]
    reports = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(reports) == 1
    assert reports[0].startswith(f"skipped 1 corrupt samples of 5 in {url}: first: 000002 (")


def test_sample_without_caption_or_image_is_counted_not_silently_dropped(tmp_path, caplog):
    url = str(
        write_shard(
            tmp_path / "s.tar",
            [
                ("a", {"png": image_bytes(), "txt": b"ok"}),
                ("b", {"png": image_bytes()}),
                ("c", {"txt": b"x"}),
            ],
        )
    )
    ds = image_text_shards(url, transform=T16)
    with caplog.at_level(logging.WARNING):
        assert [c for _, c in ds] == ["ok"]
    assert [key for key, _ in ds.skipped] == ["b", "c"]
    assert "no .txt caption" in ds.skipped[0][1] and "no image" in ds.skipped[1][1]
    assert "skipped 2 corrupt samples of 3" in caplog.text


# Six samples of a small PNG + a 1-byte caption, each member one header block + one data block.
# Cut at 10240 (a 10 KiB record boundary, where tarfile alone sees no error), at 2600 (inside the
# data of 1.png) and at 3000 (after 1.png's data, before 1.txt: sample 1 also lacks its caption).
@pytest.mark.parametrize(
    ("cut_at", "kept", "skipped_keys"),
    [(10240, ["0", "1", "2", "3", "4"], ["cut"]), (2600, ["0"], ["cut"]), (3000, ["0"], ["cut", "1"])],
)
def test_a_shard_cut_short_keeps_what_came_before_and_reports_the_cut(tmp_path, cut_at, kept, skipped_keys):
    samples = [(f"{i}", {"png": image_bytes(size=(40, 40)), "txt": f"{i}".encode()}) for i in range(6)]
    whole = write_shard(tmp_path / "whole.tar", samples)
    assert len(image_bytes(size=(40, 40))) < 512 and whole.stat().st_size == 20480
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:cut_at])
    ds = image_text_shards(str(cut), transform=T16)
    assert [caption for _, caption in ds] == kept
    assert sorted(key for key, _ in ds.skipped) == sorted(str(cut) if k == "cut" else k for k in skipped_keys)
    assert len(kept) + len(ds.skipped) == ds.seen
    assert [c for _, c in image_text_shards(str(whole), transform=T16)] == ["0", "1", "2", "3", "4", "5"]


def test_missing_shard_is_a_one_line_error_naming_it(tmp_path):
    pair_shards(tmp_path, 1, 1)
    with pytest.raises(FileNotFoundError) as error:
        image_text_shards(str(tmp_path / "shard-{0..1}.tar"), transform=T16)
    assert str(tmp_path / "shard-1.tar") in str(error.value) and "\n" not in str(error.value)


def test_empty_shard_is_an_error_naming_the_path(tmp_path):
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(ValueError, match=f"no readable samples in {empty}"):
        list(image_text_shards(str(empty), transform=T16))


def test_brace_lists_double_colon_joins_and_pipe_urls_like_open_clip(tmp_path):
    pair_shards(tmp_path, 3, 2)
    joined = f"{tmp_path}/shard-{{0..1}}.tar::{tmp_path}/shard-2.tar"
    assert sorted(c for _, c in image_text_shards(joined, transform=T16)) == [
        "000000", "000001", "001000", "001001", "002000", "002001",
    ]
    piped = image_text_shards(f"pipe:cat {tmp_path}/shard-1.tar", transform=T16)
    assert [c for _, c in piped] == ["001000", "001001"]
    listed = image_text_shards([f"{tmp_path}/shard-2.tar", f"{tmp_path}/shard-0.tar"], transform=T16)
    assert [c for _, c in listed] == ["002000", "002001", "000000", "000001"]


@pytest.mark.parametrize("shuffle", [0, 4])
@pytest.mark.parametrize("shards", [2, 5])
def test_two_torchrun_ranks_read_disjoint_shards_covering_every_key_once(
    tmp_path, monkeypatch, shuffle, shards
):
    urls = pair_shards(tmp_path, shards, 3)
    seen: list[list[str]] = []
    for rank in (0, 1):  # what torchrun sets; webdataset's split_by_node reads it
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = image_text_shards(urls, transform=T16, shuffle=shuffle, seed=7)
        seen.append([caption for _, caption in ds])
    everything = [f"{s:03d}{i:03d}" for s in range(shards) for i in range(3)]
    assert seen[0] and seen[1]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == everything


def test_dataloader_workers_split_the_shards_without_duplicates(tmp_path):
    urls = pair_shards(tmp_path, 4, 2)
    loader = DataLoader(image_text_shards(urls, transform=T16), batch_size=None, num_workers=2)
    captions = [caption for _, caption in loader]
    assert sorted(captions) == sorted(f"{s:03d}{i:03d}" for s in range(4) for i in range(2))


def test_shuffle_is_a_deterministic_function_of_seed_and_epoch(tmp_path):
    urls = pair_shards(tmp_path, 4, 4)

    def order(seed: int, epoch: int) -> list[str]:
        ds = image_text_shards(urls, transform=T16, shuffle=8, seed=seed)
        ds.set_epoch(epoch)
        return [c for _, c in ds]

    plain = [c for _, c in image_text_shards(urls, transform=T16)]
    assert order(1, 0) == order(1, 0)
    assert sorted(order(1, 0)) == sorted(plain) and order(1, 0) != plain
    assert order(1, 1) != order(1, 0)


def test_set_epoch_reaches_persistent_dataloader_workers(tmp_path):
    ds = image_text_shards(pair_shards(tmp_path, 2, 4), transform=T16, shuffle=8, seed=5)
    loader = DataLoader(ds, batch_size=None, num_workers=1, persistent_workers=True)
    orders = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        orders.append([caption for _, caption in loader])
    assert orders[0] == orders[2] != orders[1] and sorted(orders[0]) == sorted(orders[1])


def test_resampled_stream_draws_known_samples_endlessly_and_reproducibly(tmp_path):
    urls = pair_shards(tmp_path, 2, 2)

    def first(n: int) -> list[str]:
        return [c for _, c in islice(image_text_shards(urls, transform=T16, resampled=True, seed=3), n)]

    drawn = first(40)
    assert len(drawn) == 40 and set(drawn) == {"000000", "000001", "001000", "001001"}
    assert first(40) == drawn


def test_resampled_stream_of_only_corrupt_shards_fails_instead_of_spinning(tmp_path):
    url = write_shard(tmp_path / "bad.tar", [("a", {"png": truncated_png(), "txt": b"x"})])
    with pytest.raises(ValueError, match="no readable samples"):
        next(iter(image_text_shards(str(url), transform=T16, resampled=True)))


# ---------------------------------------------------------------------------------------------- CSV


def test_csv_pairs_read_with_open_clips_columns_and_skip_a_corrupt_image(tmp_path, caplog):
    png_file(tmp_path / "img" / "a.png", (255, 0, 0))
    png_file(tmp_path / "img" / "b.png", data=truncated_png())
    png_file(tmp_path / "img" / "c.png", (0, 255, 0))
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("filepath\ttitle\nimg/a.png\ta red one\nimg/b.png\tbroken\nimg/c.png\ta green one\n")
    ds = CsvImageText(csv_path, transform=T16, image_root=tmp_path)
    assert len(ds) == 3
    with caplog.at_level(logging.WARNING):
        image, caption = ds[0]
        assert caption == "a red one" and image.shape == (3, 16, 16)
        assert ds[1] is None and ds.skipped[0][0] == "img/b.png"
        images, captions = collate_pairs([ds[i] for i in range(3)])
    assert images.shape == (2, 3, 16, 16) and captions == ["a red one", "a green one"]
    assert "img/b.png" in caplog.text


def test_csv_without_the_caption_column_names_it_and_suggests_one(tmp_path):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("filepath\ttitles\nx.png\ty\n")
    with pytest.raises(ValueError, match=r"no column 'title'.*did you mean 'titles'"):
        CsvImageText(csv_path, transform=T16)


# ------------------------------------------------------------------------------------------ zero-shot


def clip_benchmark_task(root: Path, labels: list[int], *, corrupt: dict[int, bytes] | None = None) -> Path:
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("cat\ndog\nbird\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    half = (len(labels) + 1) // 2
    for shard, part in enumerate((labels[:half], labels[half:])):
        samples = []
        for i, label in enumerate(part, start=shard * half):
            data = (corrupt or {}).get(i, image_bytes(COLORS[label], fmt="WEBP"))
            samples.append((f"s{i:04d}", {"webp": data, "cls": str(label).encode()}))
        write_shard(root / "test" / f"{shard}.tar", samples)
    (root / "test" / "nshards.txt").write_text("2\n")
    return root


def test_clip_benchmark_layout_gives_classnames_templates_and_cls_labels(tmp_path):
    labels = [0, 1, 2, 2, 1, 0, 1]
    task = load_zeroshot(clip_benchmark_task(tmp_path / "pets", labels), transform=T16)
    assert task.layout == "webdataset" and task.name == "pets"
    assert task.classnames == ["cat", "dog", "bird"]
    assert task.templates == ["a photo of a {c}.", "a drawing of a {c}."]
    pairs = list(task.dataset)
    assert [label for _, label in pairs] == labels
    assert all(image.shape == (3, 16, 16) for image, _ in pairs)
    batches = list(task.loader(4))
    assert [b[1].tolist() for b in batches] == [labels[:4], labels[4:]]


def test_zero_shot_label_outside_the_classnames_is_skipped_and_counted(tmp_path):
    root = clip_benchmark_task(tmp_path / "t", [0, 1, 2, 1])
    write_shard(
        root / "test" / "1.tar",
        [("bad", {"png": image_bytes(), "cls": b"7"}), ("ok", {"png": image_bytes(), "cls": b"1"})],
    )
    task = load_zeroshot(root, transform=T16)
    assert [label for _, label in task.dataset] == [0, 1, 1]
    assert task.dataset.skipped == [("bad", "CorruptSample: label 7 outside 0..2")]


def test_image_folder_classes_follow_sorted_folders_and_classnames_lines(tmp_path):
    for folder, n in (("n02_dog", 2), ("n01_cat", 1), ("n03_bird", 3)):
        for i in range(n):
            png_file(tmp_path / "task" / "test" / folder / f"{i}.png")
    (tmp_path / "task" / "classnames.txt").write_text("cat\ndog\nbird\n")  # sorted-folder order
    task = load_zeroshot(tmp_path / "task", transform=T16)
    assert task.layout == "imagefolder"
    assert task.classnames == ["cat", "dog", "bird"]
    assert [label for _, label in task.dataset] == [0, 1, 1, 2, 2, 2]
    assert len(task.dataset) == 6


def test_image_folder_without_classnames_uses_folder_names(tmp_path, caplog):
    png_file(tmp_path / "golden_retriever" / "a.jpg", data=image_bytes(fmt="JPEG"))
    png_file(tmp_path / "tabby_cat" / "b.png")
    with caplog.at_level(logging.INFO):
        task = load_zeroshot(tmp_path, transform=T16)
    assert task.classnames == ["golden retriever", "tabby cat"]
    assert task.templates == ["a photo of a {c}."] and "a photo of a {c}." in caplog.text


def test_classnames_that_do_not_match_the_folders_are_an_error(tmp_path):
    png_file(tmp_path / "test" / "a" / "0.png")
    png_file(tmp_path / "test" / "b" / "0.png")
    (tmp_path / "classnames.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="1 class names for 2 class folders"):
        load_zeroshot(tmp_path, transform=T16)


def test_template_without_the_c_placeholder_is_an_error_naming_the_line(tmp_path):
    root = clip_benchmark_task(tmp_path / "t", [0, 1])
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na photo of a {}.\n")
    with pytest.raises(ValueError, match="zeroshot_classification_templates.txt: line 2"):
        load_zeroshot(root, transform=T16)


def test_zero_shot_root_without_images_or_shards_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_zeroshot(tmp_path, transform=T16)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_zeroshot(tmp_path / "nowhere", transform=T16)


# ------------------------------------------------------------------------------------- JSON readers


def coco_files(root: Path) -> tuple[Path, Path]:
    for name in (
        "COCO_val2014_000000000001.jpg",
        "COCO_val2014_000000000002.jpg",
        "COCO_val2014_000000000003.jpg",
    ):
        png_file(root / "val2014" / name, data=image_bytes(fmt="JPEG"))
    annotations = {
        "images": [
            {"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "height": 24, "width": 20} for i in (1, 2, 3)
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "a dog "},
            {"id": 11, "image_id": 2, "caption": "a cat"},
            {"id": 12, "image_id": 1, "caption": "a brown dog"},
            {"id": 13, "image_id": 3, "caption": "a bird"},
        ],
    }
    karpathy = {
        "dataset": "coco",
        "images": [
            {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "imgid": i - 1, "cocoid": i,
             "split": split, "sentences": [{"raw": f"karpathy {i}", "tokens": ["karpathy"]}]}
            for i, split in ((1, "test"), (2, "restval"), (3, "train"))
        ],
    }
    (root / "captions.json").write_text(json.dumps(annotations))
    (root / "dataset_coco.json").write_text(json.dumps(karpathy))
    return root / "captions.json", root / "dataset_coco.json"


def test_coco_captions_group_every_reference_caption_under_its_image(tmp_path):
    annotations, _ = coco_files(tmp_path)
    ds = CocoCaptions(annotations, tmp_path / "val2014", transform=T16)
    assert len(ds) == 3
    item = ds[0]
    assert item["image_id"] == 1 and item["captions"] == ["a dog", "a brown dog"]
    assert item["image"].shape == (3, 16, 16)
    batch = collate_dicts([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["image_id"] == [1, 2]


def test_karpathy_split_selects_images_and_train_includes_restval(tmp_path):
    annotations, karpathy = coco_files(tmp_path)
    test = CocoCaptions(annotations, tmp_path, transform=T16, karpathy_json=karpathy, split="test")
    assert [item["image_id"] for item in test] == [1]
    assert test[0]["captions"] == ["a dog", "a brown dog"]  # references from the COCO annotations
    train = CocoCaptions(annotations, tmp_path, transform=T16, karpathy_json=karpathy, split="train")
    assert [item["image_id"] for item in train] == [2, 3]
    alone = CocoCaptions(None, tmp_path, transform=T16, karpathy_json=karpathy, split="test")
    assert alone[0]["captions"] == ["karpathy 1"] and alone[0]["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"no images in split 'tset' \(splits in the file: \['restval'"):
        CocoCaptions(annotations, tmp_path, transform=T16, karpathy_json=karpathy, split="tset")


def vqa_files(root: Path, *, answers_for: tuple[int, ...] = (101, 102, 201)) -> tuple[Path, Path]:
    png_file(root / "COCO_val2014_000000000001.jpg", data=image_bytes(fmt="JPEG"))
    png_file(root / "COCO_val2014_000000000002.jpg", data=image_bytes(fmt="JPEG"))
    questions = {
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 1, "question": "What color is it?", "question_id": 101},
            {"image_id": 1, "question": "Is it round?", "question_id": 102},
            {"image_id": 2, "question": "How many?", "question_id": 201},
        ],
    }
    answers = {101: ["red"] * 9 + ["orange"], 102: ["no"] * 10, 201: ["2"] * 8 + ["3", "two"]}
    types = {101: "other", 102: "yes/no", 201: "number"}

    def annotation(q: int) -> dict:
        listed = [
            {"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers[q])
        ]
        return {"question_id": q, "image_id": q // 100, "answer_type": types[q], "answers": listed}

    annotations = {"annotations": [annotation(q) for q in answers_for]}
    (root / "questions.json").write_text(json.dumps(questions))
    (root / "annotations.json").write_text(json.dumps(annotations))
    return root / "questions.json", root / "annotations.json"


def test_vqav2_items_carry_ten_answers_and_find_coco_named_images(tmp_path):
    questions, annotations = vqa_files(tmp_path)
    ds = VQAv2(questions, annotations, tmp_path, transform=T16)
    assert len(ds) == 3
    item = ds[2]
    assert item["question_id"] == 201 and item["image_id"] == 2 and item["question"] == "How many?"
    assert item["answers"] == ["2"] * 8 + ["3", "two"] and item["answer_type"] == "number"
    assert item["image"].shape == (3, 16, 16)
    test_set = VQAv2(questions, None, tmp_path, transform=T16)
    assert test_set[0]["answers"] == [] and test_set[0]["answer_type"] is None


def test_vqav2_with_a_wrong_image_root_names_it_and_the_names_tried(tmp_path):
    questions, annotations = vqa_files(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"elsewhere: no file for image_id 1; tried COCO_val2014_000000000001"
    ):
        VQAv2(questions, annotations, tmp_path / "elsewhere", transform=T16)


def test_vqav2_question_without_annotation_is_an_error_naming_both_files(tmp_path):
    questions, annotations = vqa_files(tmp_path, answers_for=(101, 102))
    with pytest.raises(
        ValueError, match=r"annotations.json: no annotation for question_id 201 of .*questions.json"
    ):
        VQAv2(questions, annotations, tmp_path, transform=T16)


def test_pope_jsonl_yields_yes_no_questions(tmp_path):
    png_file(tmp_path / "img.jpg", data=image_bytes(fmt="JPEG"))
    rows = [
        {"question_id": 1, "image": "img.jpg", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "img.jpg", "text": "Is there a car in the image?", "label": "no"},
    ]
    (tmp_path / "pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    ds = Pope(tmp_path / "pope.jsonl", tmp_path, transform=T16)
    assert [(item["question"], item["label"]) for item in ds] == [(r["text"], r["label"]) for r in rows]
    assert ds[0]["image"].shape == (3, 16, 16) and ds[1]["question_id"] == 2


def test_pope_label_other_than_yes_or_no_is_an_error_naming_the_line(tmp_path):
    (tmp_path / "pope.jsonl").write_text(
        '{"question_id": 1, "image": "a.jpg", "text": "Is there?", "label": "no"}\n'
        '{"question_id": 2, "image": "a.jpg", "text": "Is there?", "label": "maybe"}\n'
    )
    with pytest.raises(ValueError, match=r"pope.jsonl: line 2 label 'maybe' must be 'yes' or 'no'"):
        Pope(tmp_path / "pope.jsonl", tmp_path, transform=T16)


def test_llava_conversations_keep_turns_and_text_only_entries(tmp_path):
    png_file(tmp_path / "coco" / "train2017" / "000000033471.jpg", data=image_bytes(fmt="JPEG"))
    entries = [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is the colour?"}, {"from": "gpt", "value": "Blue."}]},
        {"id": "sharegpt-1", "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    ds = LlavaInstruct(tmp_path / "llava.json", tmp_path, transform=T16)
    assert len(ds) == 2
    assert ds[0]["conversations"] == entries[0]["conversations"] and ds[0]["id"] == "000000033471"
    assert ds[0]["image"].shape == (3, 16, 16) and ds[1]["image"] is None
    assert collate_dicts([ds[0], ds[1]])["image"][1] is None  # listed, not stacked


def test_map_style_reader_skips_a_corrupt_or_missing_image_and_reports_the_pass(tmp_path, caplog):
    png_file(tmp_path / "a.png")
    png_file(tmp_path / "b.png", data=truncated_png())
    rows = [{"question_id": i, "image": name, "text": "Is there a dog?", "label": "yes"}
            for i, name in enumerate(["a.png", "b.png", "gone.png", "a.png"])]
    (tmp_path / "pope.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = Pope(tmp_path / "pope.jsonl", tmp_path, transform=T16)
    with caplog.at_level(logging.WARNING):
        assert [item["question_id"] for item in ds] == [0, 3]
    assert [key for key, _ in ds.skipped] == ["1", "2"] and "missing image file" in ds.skipped[1][1]
    assert f"skipped 2 corrupt samples of 4 in {tmp_path / 'pope.jsonl'}: first: 1 (" in caplog.text
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_dicts)
    (batch,) = list(loader)
    assert batch["question_id"] == [0, 3] and batch["image"].shape == (2, 3, 16, 16)


def json_reader_cases(tmp_path: Path) -> dict[str, tuple]:
    return {
        "coco": (lambda p: CocoCaptions(p, tmp_path, transform=T16)),
        "karpathy": (lambda p: CocoCaptions(None, tmp_path, transform=T16, karpathy_json=p, split="test")),
        "vqa-questions": (lambda p: VQAv2(p, None, tmp_path, transform=T16)),
        "vqa-annotations": (lambda p: VQAv2(vqa_files(tmp_path)[0], p, tmp_path, transform=T16)),
        "pope": (lambda p: Pope(p, tmp_path, transform=T16)),
        "llava": (lambda p: LlavaInstruct(p, tmp_path, transform=T16)),
    }


@pytest.mark.parametrize("reader", ["coco", "karpathy", "vqa-questions", "vqa-annotations", "pope", "llava"])
def test_malformed_json_is_a_one_line_error_naming_the_file(tmp_path, reader):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [1, 2,, 3]}')
    with pytest.raises(ValueError) as error:
        json_reader_cases(tmp_path)[reader](bad)
    message = str(error.value)
    assert message.startswith(str(bad)) and "malformed JSON" in message and "\n" not in message


@pytest.mark.parametrize("reader", ["coco", "karpathy", "vqa-questions", "vqa-annotations", "pope", "llava"])
def test_missing_json_is_a_one_line_error_naming_the_file(tmp_path, reader):
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'absent.json'}: no such file"):
        json_reader_cases(tmp_path)[reader](tmp_path / "absent.json")


def test_json_of_the_wrong_shape_says_which_field_is_wrong(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": 5}], "annotations": []}))
    with pytest.raises(ValueError, match=r"c.json: images\[0\] 'file_name' must be a string, got an integer"):
        CocoCaptions(path, tmp_path, transform=T16)
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match=f"{path}: no samples"):
        CocoCaptions(path, tmp_path, transform=T16)


def test_missing_image_root_is_an_error_naming_it(tmp_path):
    questions, annotations = vqa_files(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: no such directory"):
        VQAv2(questions, annotations, tmp_path / "nope", transform=T16)
