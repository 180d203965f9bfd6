"""The samples CLIP_benchmark's ``--n_samples`` evaluates, in the order it evaluates them.

RobustVLM's and the paper's CLIP_benchmark read a webdataset split with ``shardshuffle`` off,
``.shuffle(10000, initial=10000, rng=random.Random(seed))``, ``.batched(batch_size)``, through a
DataLoader with ``num_workers`` workers, and keep the first N samples. Each worker gets shards
``worker::num_workers`` and its own copy of the seeded generator; the loader takes whole batches
from the workers in turn, skipping a worker once it is exhausted. This module replays that with
webdataset's own tar reader and shuffle over sample keys, then reads only the chosen samples.
Which samples are chosen therefore depends on the seed, the batch size and the worker count
(RobustVLM: 50 and 4; the paper: 8 and 4), and nothing else.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import webdataset as wds
from torch.utils.data import Dataset
from webdataset.tariterators import tarfile_samples

from dvd.data.image_text import CorruptSample, _first_image
from dvd.data.transforms import ImageTransform, decode_image, plain_tensor

SHUFFLE_BUFFER = 10000  # CLIP_benchmark: dataset.shuffle(10000, initial=10000, rng=Random(seed))
IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's to_tuple order


@dataclass(frozen=True)
class Selection:
    """How CLIP_benchmark picked its subset: seed, DataLoader batch size and worker count."""

    samples: int
    seed: int = 0
    batch_size: int = 50
    workers: int = 4


def _keys(urls: Sequence[str]) -> Iterator[tuple[str, str]]:
    """``(url, key)`` of every sample of ``urls``, in webdataset's reading order."""
    for sample in tarfile_samples(iter({"url": url} for url in urls)):
        yield sample["__url__"], sample["__key__"]


def selected_keys(urls: Sequence[str], selection: Selection) -> list[tuple[str, str]]:
    """The first ``selection.samples`` ``(url, key)`` pairs the CLIP_benchmark loader yields."""
    streams, workers = [], max(1, selection.workers)  # num_workers=0 reads like one worker
    for worker in range(workers):
        rng = random.Random(selection.seed)  # each DataLoader worker unpickles its own copy
        shuffle = wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER, rng=rng)
        streams.append(iter(shuffle(_keys(urls[worker::workers]))))
    chosen: list[tuple[str, str]] = []
    active = list(streams)
    while active and len(chosen) < selection.samples:
        for stream in list(active):
            batch = list(itertools.islice(stream, selection.batch_size))
            if not batch:
                active.remove(stream)
                continue
            chosen += batch
            if len(chosen) >= selection.samples:
                break
    return chosen[: selection.samples]


class SelectedSamples(Dataset):
    """Map-style (image, label) of the selected samples, in selection order; corrupt ones give None."""

    def __init__(
        self,
        urls: Sequence[str],
        selection: Selection,
        *,
        transform: ImageTransform | None,
        target: Callable[[dict[str, Any]], Any],
    ) -> None:
        self.keys = selected_keys(urls, selection)
        wanted = set(self.keys)
        shards = sorted({url for url, _ in self.keys}, key=list(urls).index)
        self._samples: dict[tuple[str, str], dict[str, Any]] = {}
        for sample in tarfile_samples(iter({"url": url} for url in shards)):
            if (sample["__url__"], sample["__key__"]) in wanted:
                self._samples[sample["__url__"], sample["__key__"]] = sample
        self.transform = transform or plain_tensor()
        self.target = target

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[Any, Any] | None:
        sample = self._samples[self.keys[index]]
        try:
            image = decode_image(_first_image(sample, IMAGE_KEYS))
            label = self.target(sample)
        except (CorruptSample, OSError, ValueError):
            return None
        return self.transform(image), label
