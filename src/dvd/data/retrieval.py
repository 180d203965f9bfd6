"""Image-text retrieval sets: images, each with one or more captions.

Recognised (:func:`load_retrieval`): a ShapesWorld root (its COCO-style test captions), a COCO captions
JSON (``--image-root``; with a Karpathy split file only its ``test`` split unless another is named), a
CLIP_benchmark retrieval webdataset folder (``wds_flickr30k`` style: ``{split}/*.tar``, each sample an
image and a ``.txt`` holding its captions one per line), or image-text ``.tar`` shards (the ``.txt`` read
the same way: one caption per line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dvd.config import ConfigError, suggest
from dvd.data.captions import CocoCaptions
from dvd.data.image_text import CorruptSample, ShardStream
from dvd.data.transforms import ImageTransform
from dvd.data.zeroshot import shard_urls

DEFAULT_SPLIT = "test"  # Karpathy files and CLIP_benchmark folders: evaluate the test split by default


@dataclass
class RetrievalData:
    """Images with their captions: ``dataset`` yields ``(image (3,H,W) [0,1], captions list[str])``.

    ``skipped``: the samples the last pass left out (unreadable images, samples without captions)."""

    name: str
    dataset: Any
    skipped: int = 0


class _Pairs(torch.utils.data.Dataset):
    """Map-style (image, captions) view of COCO-style items ``dict(image, image_id, captions)``."""

    def __init__(self, items: Any) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[str]] | None:
        item = self.items[index]
        return None if item is None else (item["image"], list(item["captions"]))


def caption_lines(sample: dict[str, Any]) -> list[str]:
    """The captions of a sample's ``.txt``, one per non-blank line (CLIP_benchmark's retrieval format)."""
    if "txt" not in sample:
        raise CorruptSample("no .txt captions")
    captions = [line.strip() for line in sample["txt"].decode("utf-8").splitlines() if line.strip()]
    if not captions:
        raise CorruptSample("empty .txt captions")
    return captions


def _shards(urls: Any, transform: ImageTransform | None) -> ShardStream:
    # every rank reads every image: retrieval ranks each image against all captions
    return ShardStream(urls, transform=transform, target=caption_lines, split_by_node=False)


def load_retrieval(
    spec: str,
    *,
    transform: ImageTransform | None,
    image_root: str | None = None,
    karpathy: str | None = None,
    split: str | None = None,
    name: str | None = None,
) -> RetrievalData:
    """A retrieval set from ``spec`` (see the module docstring); ``split`` defaults to ``test``."""
    path = Path(spec)
    if path.is_dir() and (path / "captions" / "annotations.json").is_file():
        captions = CocoCaptions(
            path / "captions" / "annotations.json",
            path / "images",
            transform=transform,
            karpathy_json=path / "captions" / "karpathy_split.json",
            split=split or DEFAULT_SPLIT,
        )
        return RetrievalData(name or "shapesworld/captions", _Pairs(captions))
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"captions file {path} does not exist")
        if image_root is None:
            raise ConfigError(f"{path} is a COCO captions file; pass --image-root with its images")
        if split is not None and karpathy is None:
            raise ConfigError(f"--split {split} needs --karpathy (a dataset_coco.json-style split file)")
        chosen = (split or DEFAULT_SPLIT) if karpathy else None
        captions = CocoCaptions(path, image_root, transform=transform, karpathy_json=karpathy, split=chosen)
        return RetrievalData(name or path.parent.name or path.stem, _Pairs(captions))
    if path.is_dir():
        split_dir = path / (split or DEFAULT_SPLIT)
        urls = shard_urls(split_dir) if split_dir.is_dir() else []
        if not urls:
            raise FileNotFoundError(
                f"{path} is neither a ShapesWorld root nor a CLIP_benchmark retrieval folder "
                f"(no {split_dir.name}/*.tar shards)"
            )
        return RetrievalData(name or path.resolve().name.removeprefix("wds_"), _shards(urls, transform))
    if ".tar" in spec:
        dataset = _shards(spec, transform)
        return RetrievalData(name or Path(spec.split("{")[0]).parent.name or "shards", dataset)
    siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
    hint = suggest(path.name, siblings) if siblings else ""
    raise FileNotFoundError(
        f"retrieval dataset {spec!r} not found{hint}; give a ShapesWorld root, a COCO captions .json "
        "(with --image-root), a CLIP_benchmark retrieval folder, wds/<name> with --dataset-root, "
        "or image-text .tar shards"
    )

