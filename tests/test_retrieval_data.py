"""Retrieval sets: Karpathy files evaluate their test split by default; CLIP_benchmark's retrieval
webdatasets (several captions per image, one per line) read as a folder, as wds/<name> and as shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dvd.cli import main
from dvd.data.retrieval import load_retrieval
from dvd.eval.results import read_rows

CAPTIONS = {"red": ["a red square", "red", "a square in red"], "blue": ["a blue square", "blue"]}
COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255)}


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), color, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def wds(tmp_path: Path) -> Path:
    """CLIP_benchmark's layout: wds_<name>/test/0.tar + nshards.txt, captions one per line in KEY.txt."""
    root = tmp_path / "clip_benchmark" / "wds_squares"
    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, (color, captions) in enumerate(CAPTIONS.items()):
            add(tar, f"s{i:04d}.webp", png(COLORS[color]))  # PIL decodes by content, whatever the name
            add(tar, f"s{i:04d}.txt", "\n".join(captions).encode() + b"\n")
    (root / "test" / "nshards.txt").write_text("1\n")
    return root


def samples(spec: str) -> list[list[str]]:
    return [captions for _, captions in load_retrieval(spec, transform=None).dataset]


def test_a_clip_benchmark_retrieval_folder_reads_every_caption_of_every_image(wds: Path) -> None:
    assert samples(str(wds)) == list(CAPTIONS.values())
    assert load_retrieval(str(wds), transform=None).name == "squares"


def test_a_shard_path_reads_the_captions_one_per_line(wds: Path) -> None:
    assert samples(str(wds / "test" / "0.tar")) == list(CAPTIONS.values())


def test_wds_names_resolve_under_dataset_root_in_the_command(wds: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    args = ["eval", "retrieval", "--model", "dvd-tiny-vit", "--dataset", "wds/squares", "--dataset-root",
            str(wds.parent), "--attack", "none", "--ks", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    rows = read_rows(out)
    assert {(r.dataset, r.n) for r in rows} == {("squares", 2), ("squares", 5)}  # 2 images, 5 captions


def test_a_karpathy_file_without_split_evaluates_the_test_split(tmp_path: Path) -> None:
    images, entries = tmp_path / "images", []
    images.mkdir()
    for i, split in enumerate(["train", "restval", "val", "test", "test"]):
        (images / f"{i}.png").write_bytes(png((i * 50, 0, 0)))
        entries.append({"filename": f"{i}.png", "cocoid": i, "split": split, "sentences": [{"raw": f"c{i}"}]})
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": entries}))
    annotations = tmp_path / "captions.json"
    annotations.write_text(json.dumps({"images": [], "annotations": []}))
    data = load_retrieval(str(annotations), transform=None, image_root=str(images), karpathy=str(karpathy))
    assert [captions for _, captions in data.dataset] == [["c3"], ["c4"]]
    val = load_retrieval(
        str(annotations), transform=None, image_root=str(images), karpathy=str(karpathy), split="val"
    )
    assert [captions for _, captions in val.dataset] == [["c2"]]
