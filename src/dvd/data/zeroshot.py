"""Zero-shot classification data: class names, prompt templates and labelled images.

Two layouts are recognised under ``root``:

* CLIP_benchmark's webdataset layout: ``classnames.txt``, ``zeroshot_classification_templates.txt``
  and ``{split}/*.tar`` shards (``{split}/nshards.txt`` naming ``0.tar .. n-1.tar`` when present),
  each sample an image (``webp``/``png``/``jpg``) plus ``KEY.cls`` holding the class index.
* An ImageFolder: ``{split}/<class folder>/*.jpg`` (or the class folders directly under ``root``).
  Class index = position of the folder in sorted order (torchvision's rule). An optional
  ``classnames.txt`` gives the readable name of each class, one line per folder in that same
  sorted order (CLIP_benchmark style); without it the folder names are used, ``_`` read as a space.

Templates use CLIP_benchmark's ``{c}`` placeholder; without a templates file the single prompt
``"a photo of a {c}."`` is used and a note is logged. An ImageNet ImageFolder (the 1000 ``n########``
class folders) without ``classnames.txt`` gets open_clip's ImageNet class names and, without a
templates file, OpenAI's 80 ImageNet templates (CLIP_benchmark's names and default templates).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
from torch.utils.data import DataLoader

from dvd.data.image_text import (
    CorruptSample,
    ImageRecords,
    ShardStream,
    collate_pairs,
    existing_dir,
    existing_file,
)
from dvd.data.transforms import ImageTransform

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {c}.",)
WNID = re.compile(r"n\d{8}")  # an ImageNet class folder
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")


@dataclass
class ZeroShotData:
    """A zero-shot classification task: ``dataset`` yields (image [0,1] (3,H,W), label int)."""

    name: str
    classnames: list[str]
    templates: list[str]
    dataset: Any  # ShardStream (webdataset layout) or ImageFolderClasses (map-style)
    root: Path
    layout: str  # "webdataset" or "imagefolder"

    def loader(self, batch_size: int, *, num_workers: int = 0) -> DataLoader:
        """Batches of (images (B,3,H,W), labels (B,)), corrupt samples left out."""
        return DataLoader(
            self.dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_pairs
        )


def read_lines(path: Path, what: str) -> list[str]:
    """Stripped lines of a text file; trailing blank lines ignored, blank lines inside are an error."""
    try:
        lines = [line.strip() for line in path.read_bytes().decode("utf-8").splitlines()]
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); expected {what}"
        ) from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: empty; expected {what}, one per line")
    for number, line in enumerate(lines, start=1):
        if not line:
            raise ValueError(f"{path}: line {number} is blank; expected {what}, one per line")
    return lines


def imagenet_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompts (open_clip's), with CLIP_benchmark's ``{c}`` placeholder."""
    return [template("{c}") for template in open_clip.OPENAI_IMAGENET_TEMPLATES]


def read_templates(root: Path, *, imagenet: bool = False) -> list[str]:
    path = root / "zeroshot_classification_templates.txt"
    if not path.is_file() and imagenet:
        log.info("%s: no zeroshot_classification_templates.txt; using OpenAI's ImageNet templates", root)
        return imagenet_templates()
    if not path.is_file():
        log.warning("%s: no zeroshot_classification_templates.txt; using %r", root, DEFAULT_TEMPLATES[0])
        return list(DEFAULT_TEMPLATES)
    templates = read_lines(path, "prompt templates with a {c} placeholder")
    for number, template in enumerate(templates, start=1):
        try:
            ok = "{c}" in template and template.format(c="x") is not None
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{path}: line {number} {template!r} must contain {{c}} and no other braces")
    return templates


def class_label(sample: dict[str, Any], num_classes: int) -> int:
    """The class index in ``KEY.cls``, checked against the number of class names."""
    if "cls" not in sample:
        raise CorruptSample("no .cls label")
    text = sample["cls"].decode("ascii").strip()
    if not re.fullmatch(r"\d+", text):
        raise CorruptSample(f"label {text[:20]!r} is not a class index")
    label = int(text)
    if label >= num_classes:
        raise CorruptSample(f"label {label} outside 0..{num_classes - 1}")
    return label


def _natural(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def shard_urls(split_dir: Path) -> list[str]:
    """``split_dir``'s shards: ``0.tar .. n-1.tar`` when ``nshards.txt`` says n, else every ``*.tar``."""
    count_file = split_dir / "nshards.txt"
    if count_file.is_file():
        text = count_file.read_text(errors="replace").strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{count_file}: expected a positive number of shards, got {text[:30]!r}")
        return [str(split_dir / f"{index}.tar") for index in range(int(text))]
    return [str(path) for path in sorted(split_dir.glob("*.tar"), key=_natural)]


class ImageFolderClasses(ImageRecords):
    """(image, label) from class folders; missing or corrupt images give None (see ImageRecords)."""

    def _item(self, record: dict[str, Any], image: Any) -> tuple[Any, int]:
        return image, record["fields"]["label"]


def _image_folder(
    folder: Path, root: Path, transform: ImageTransform | None
) -> tuple[list[str], ImageRecords]:
    classes = sorted(
        entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith(".")
    )
    records = []
    for label, name in enumerate(classes):
        for directory, _, files in sorted(os.walk(folder / name, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    path = Path(directory) / file
                    key = str(path.relative_to(folder))
                    records.append({"key": key, "paths": (str(path),), "fields": {"label": label}})
    if not records:
        raise ValueError(
            f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders; expected "
            f"{root}/<split>/*.tar (CLIP_benchmark) or <class>/<image> folders"
        )
    names_file = root / "classnames.txt"
    if names_file.is_file():
        names = read_lines(names_file, "class names")
        if len(names) != len(classes):
            raise ValueError(
                f"{names_file}: {len(names)} class names for {len(classes)} class folders in {folder}; "
                "write one name per folder, in sorted folder order"
            )
    elif len(classes) == len(open_clip.IMAGENET_CLASSNAMES) and all(WNID.fullmatch(c) for c in classes):
        names = list(open_clip.IMAGENET_CLASSNAMES)  # sorted wnids are ImageNet's class order
        log.info("%s: ImageNet class folders, no classnames.txt; using open_clip's ImageNet names", root)
    else:
        names = [name.replace("_", " ") for name in classes]
        log.info("%s: no classnames.txt; class names are the folder names", root)
    return names, ImageFolderClasses(records, source=str(folder), transform=transform)


def load_zeroshot(
    root: str | Path,
    *,
    transform: ImageTransform | None,
    split: str = "test",
    split_by_node: bool = False,
) -> ZeroShotData:
    """Load a zero-shot task from ``root`` (layout auto-detected, see the module docstring).

    Webdataset shards are split across DataLoader workers; across torchrun ranks only with
    ``split_by_node=True`` (evaluation usually wants every rank, or rank 0, to see every image).
    """
    root = existing_dir(root, "zero-shot dataset root")
    name = root.resolve().name
    kind_file = root / "dataset_type.txt"
    if kind_file.is_file():
        kind = kind_file.read_text(errors="replace").strip().lower()
        if kind not in ("", "classification"):
            raise ValueError(
                f"{kind_file}: {root} is a CLIP_benchmark {kind[:30]!r} dataset, not classification"
            )
    split_dir = root / split
    urls = shard_urls(split_dir) if split_dir.is_dir() else []
    if urls:
        names = read_lines(
            existing_file(root / "classnames.txt", "class names of a zero-shot task"), "class names"
        )
        target = functools.partial(class_label, num_classes=len(names))
        dataset: Any = ShardStream(urls, transform=transform, target=target, split_by_node=split_by_node)
        layout = "webdataset"
    else:
        folder = split_dir if split_dir.is_dir() else root
        names, dataset = _image_folder(folder, root, transform)
        layout = "imagefolder"
    imagenet = names == list(open_clip.IMAGENET_CLASSNAMES)
    templates = read_templates(root, imagenet=imagenet)
    return ZeroShotData(
        name=name, classnames=names, templates=templates, dataset=dataset, root=root, layout=layout
    )
