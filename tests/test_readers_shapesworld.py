"""A tiny ShapesWorld, written by the generator, read back through every reader in dvd.data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dvd.data.captions import CocoCaptions
from dvd.data.image_text import image_text_shards
from dvd.data.instruct import LlavaInstruct
from dvd.data.pope import Pope
from dvd.data.shapesworld import generate
from dvd.data.transforms import image_transform
from dvd.data.vqa import VQAv2
from dvd.data.zeroshot import load_zeroshot
from dvd.io import read_json

T32 = image_transform(32)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("shapesworld")
    generate(root, seed=0, size=100, image_size=32, eval_size=20, shard_size=40)
    return root, read_json(root / "summary.json")


def records(summary: dict[str, Any], name: str) -> int:
    return summary["files"][name]["records"]


def in_unit_range(image: Any) -> bool:
    return image.shape == (3, 32, 32) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_pretraining_shards_read_back_every_pair(world):
    root, summary = world
    ds = image_text_shards(str(root / summary["pretrain"]["urls"]), transform=T32)
    pairs = list(ds)
    assert len(pairs) == summary["pretrain"]["samples"] == 100
    assert all(in_unit_range(image) and caption for image, caption in pairs)
    assert ds.skipped == []


def test_pretraining_shards_split_over_two_ranks_cover_each_pair_once(world, monkeypatch):
    root, summary = world
    assert len(summary["pretrain"]["shards"]) == 3
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(
            [
                caption
                for _, caption in image_text_shards(str(root / summary["pretrain"]["urls"]), transform=T32)
            ]
        )
    assert len(per_rank[0]) + len(per_rank[1]) == 100 and per_rank[0] and per_rank[1]


def test_every_zero_shot_task_reads_as_clip_benchmark_data(world):
    root, summary = world
    assert {"shape", "color", "count"} <= set(summary["zeroshot"])
    for task, info in summary["zeroshot"].items():
        data = load_zeroshot(root / "zeroshot" / task, transform=T32)
        assert data.layout == "webdataset" and data.name == task
        assert data.classnames == info["classnames"]
        assert data.templates and all("{c}" in t for t in data.templates)
        pairs = list(data.dataset)
        assert len(pairs) == info["samples"] and data.dataset.skipped == []
        assert all(in_unit_range(image) and 0 <= label < len(data.classnames) for image, label in pairs)


def test_coco_captions_and_karpathy_splits_read_back(world):
    root, summary = world
    coco = CocoCaptions(root / "captions" / "annotations.json", root / "images", transform=T32)
    assert len(coco) == records(summary, "captions/karpathy_split.json")
    assert sum(len(item["captions"]) for item in coco) == records(summary, "captions/annotations.json")
    assert all(in_unit_range(item["image"]) for item in coco) and coco.skipped == []
    sizes = {
        split: len(
            CocoCaptions(
                root / "captions" / "annotations.json",
                root / "images",
                transform=T32,
                karpathy_json=root / "captions" / "karpathy_split.json",
                split=split,
            )
        )
        for split in ("train", "val", "test")
    }
    assert sizes == summary["images"]["splits"]


def test_vqa_questions_read_back_with_ten_answers(world):
    root, summary = world
    vqa = VQAv2(
        root / "vqa" / "questions.json", root / "vqa" / "annotations.json", root / "images", transform=T32
    )
    items = list(vqa)
    assert len(items) == records(summary, "vqa/questions.json") and vqa.skipped == []
    assert all(
        len(item["answers"]) == 10 and item["answer_type"] and in_unit_range(item["image"]) for item in items
    )


def test_pope_files_read_back_in_all_three_settings(world):
    root, summary = world
    for setting in ("random", "popular", "adversarial"):
        pope = Pope(root / "pope" / f"pope_{setting}.jsonl", root / "images", transform=T32)
        items = list(pope)
        assert len(items) == records(summary, f"pope/pope_{setting}.jsonl") and pope.skipped == []
        assert {item["label"] for item in items} == {"yes", "no"}


def test_llava_stage_one_and_two_read_back(world):
    root, summary = world
    for name in ("stage1_captions", "stage2_instruct"):
        llava = LlavaInstruct(root / "llava" / f"{name}.json", root / "images", transform=T32)
        items = list(llava)
        assert len(items) == records(summary, f"llava/{name}.json") and llava.skipped == []
        for item in items:
            turns = item["conversations"]
            assert turns[0]["from"] == "human" and "<image>" in turns[0]["value"]
            assert in_unit_range(item["image"])
