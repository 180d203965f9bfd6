"""Result rows say how many samples of each dataset were left out as unreadable (`skipped`)."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
import skimage

from _eval_helpers import FAST
from dvd.cli import main
from dvd.eval.results import read_rows

PHOTOS = {"cat": ["chelsea.png", "coffee.png"], "space": ["rocket.jpg", "moon.png"]}


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """An ImageFolder with one broken image in it."""
    root = tmp_path / "photos"
    source = Path(skimage.data.__file__).parent
    for name, files in PHOTOS.items():
        (root / "test" / name).mkdir(parents=True)
        for file in files:
            shutil.copy(source / file, root / "test" / name / file)
    (root / "test" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def test_zeroshot_rows_count_the_unreadable_images_of_an_image_folder(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    args = ["eval", "zeroshot", "--model", "dvd-tiny-vit", "--dataset", str(photos), "--eps", "2/255",
            "--steps", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert [(r.n, r.skipped) for r in read_rows(out)] == [(4, 1)]


@pytest.mark.parametrize("workers", ["0", "1"])  # a worker process reads (and drops) the corrupt sample
def test_zeroshot_rows_count_what_a_shard_stream_dropped(photos: Path, tmp_path: Path, workers: str) -> None:
    root = tmp_path / "wds_photos"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("cat\nspace\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        files = sorted((photos / "test").rglob("*.*"))
        for i, path in enumerate(files):
            label = str(int(path.parent.name == "space")).encode()
            for ext, data in (("png", path.read_bytes()), ("cls", label)):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "r.json"
    args = ["eval", "zeroshot", "--model", "dvd-tiny-vit", "--dataset", str(root), "--attack", "none",
            "--workers", workers, "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert [(r.n, r.skipped) for r in read_rows(out)] == [(4, 1)]


def test_retrieval_rows_count_the_unreadable_images(tmp_path: Path) -> None:
    import json

    images = tmp_path / "images"
    images.mkdir()
    source = Path(skimage.data.__file__).parent
    entries, annotations = [], []
    for i, name in enumerate(["chelsea.png", "rocket.jpg", "broken.png"]):
        if name == "broken.png":
            (images / name).write_bytes(b"not an image")
        else:
            shutil.copy(source / name, images / name)
        entries.append({"id": i, "file_name": name})
        annotations.append({"id": i, "image_id": i, "caption": f"photo {i}"})
    (tmp_path / "c.json").write_text(json.dumps({"images": entries, "annotations": annotations}))
    out = tmp_path / "r.json"
    args = ["eval", "retrieval", "--model", "dvd-tiny-vit", "--dataset", str(tmp_path / "c.json"),
            "--image-root", str(images), "--attack", "none", "--ks", "1", "--out", str(out)]
    assert main(args) == 0
    assert {(r.n, r.skipped) for r in read_rows(out)} == {(2, 1)}


def test_vlm_rows_count_the_unreadable_images(shapesworld: Path, tiny_vlm: Path, tmp_path: Path):
    broken = tmp_path / "world"
    shutil.copytree(shapesworld, broken)
    (broken / "images" / "test" / "000000000001.png").write_bytes(b"not an image")  # the first questions'
    out = tmp_path / "r.json"
    args = ["eval", "vqa", "--model", str(tiny_vlm), "--data", str(broken), "--attack", "none",
            "--out", str(out), *FAST, "--limit", "8"]
    assert main(args) == 0
    (row,) = read_rows(out)
    assert row.skipped == 4 and row.n == 4  # image 1 is asked about in questions 1000-1003
