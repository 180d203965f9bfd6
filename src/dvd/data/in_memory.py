"""A training set decoded once and held in memory, for data that fits in RAM (ShapesWorld, small sets).

Streaming readers decode every image again on every epoch; a run of several epochs over a small set spends
a large share of its time there (ShapesWorld's quick preset: a quarter of the clean CLIP's step). Here each
sample is read, decoded and transformed once, and the images are kept as 8-bit tensors: ``ToTensor`` after
PIL (every transform of :mod:`dvd.data.transforms`) gives multiples of 1/255, so nothing is lost. Only a
deterministic transform can be kept this way (no random crops).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

log = logging.getLogger(__name__)


def _items(source: Any) -> Iterator[Any]:
    if isinstance(source, IterableDataset) or not hasattr(source, "__getitem__"):
        yield from source
    else:
        for i in range(len(source)):
            yield source[i]


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A [0, 1] image of multiples of 1/255 as uint8; anything else is refused (it would not round-trip)."""
    stored = image.mul(255).round_().to(torch.uint8)
    if not torch.equal(stored.float().div_(255), image):
        raise ValueError(
            "in_memory keeps 8-bit images, but the transform gives values that are not multiples of 1/255; "
            "use a PIL transform ending in ToTensor, or in_memory=false"
        )
    return stored


class InMemory(Dataset):
    """Every usable ``(image, target)`` item of ``source`` (skipped ones, ``None``, left out), read once.

    ``ds[i]`` is ``(float image in [0, 1], target)``, equal to what ``source`` gave. ``skipped_count`` is the
    number of corrupt samples the reading pass met (``source.skipped_count`` when it counts them).
    """

    def __init__(self, source: Iterable[Any] | Dataset, *, name: str = "dataset") -> None:
        images: list[torch.Tensor] = []
        self.targets: list[Any] = []
        dropped = 0
        for item in _items(source):
            if item is None:
                dropped += 1
                continue
            image, target = item
            images.append(to_uint8(image))
            self.targets.append(target)
        if not images:
            raise ValueError(f"{name}: no readable samples to keep in memory")
        self.images = torch.stack(images)
        self.skipped_count = int(getattr(source, "skipped_count", dropped))
        log.info("%s: %d samples decoded once, %.0f MB in memory", name, len(self.targets),
                 self.images.numel() / 2**20)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        return self.images[i].float().div_(255), self.targets[i]


class InMemoryRecords(Dataset):
    """A map-style reader of dict items (``{"image": ..., **fields}``, None when unreadable) read once: the
    same items, each image kept as 8-bit. Passes through the reader's ``records`` and ``source``."""

    def __init__(self, reader: Any, indices: Iterable[int], *, name: str = "dataset") -> None:
        self.records, self.source = reader.records, getattr(reader, "source", name)
        self.items: dict[int, dict[str, Any] | None] = {}
        for i in indices:
            item = reader[i]
            image = None if item is None else item.get("image")
            self.items[i] = None if image is None else {**item, "image": to_uint8(image)}
        kept = [item["image"] for item in self.items.values() if item is not None]
        if not kept:
            raise ValueError(f"{name}: no readable samples to keep in memory")
        log.info("%s: %d samples decoded once, %.0f MB in memory", name, len(kept),
                 sum(image.numel() for image in kept) / 2**20)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        item = self.items[i]
        return None if item is None else {**item, "image": item["image"].float().div_(255)}
