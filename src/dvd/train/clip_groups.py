"""Hard-negative batches for contrastive training: batches whose samples share chosen attributes.

A contrastive loss is satisfied by whatever tells a batch's captions apart most easily; on ShapesWorld
that is the colour, and the shape is never needed (benchmarks/shapesworld_learnability.md). With
``batch_group_by: [color]`` a share ``batch_group_prob`` of the batches hold samples of one colour only,
so inside them only the other attributes separate the captions. The attributes come from each sample's
``KEY.json``; the images and captions are unchanged, only which samples share a batch.

Groups may be smaller than a batch (``batch_group_size``): a batch is then several groups of that size,
told apart by the grouped attributes and, inside each group, by the rest. With ``batch_group_free`` each
grouped sample leaves one of those attributes (drawn at random) out of its group's key, so a group holds
minimal pairs, e.g. scenes of one colour, count, size and texture that differ in the shape alone.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from dvd.data.image_text import CorruptSample, ShardStream, caption_field


def caption_and_group(sample: dict[str, Any], *, keys: Sequence[str]) -> tuple[str, tuple[Any, ...]]:
    """(caption, values of ``keys`` in the sample's ``KEY.json``): the target of a grouped pair stream."""
    try:
        meta = json.loads(sample["json"])
        group = tuple(json.dumps(meta[key], sort_keys=True) for key in keys)
    except (KeyError, ValueError, TypeError) as error:
        raise CorruptSample(f"no usable {list(keys)} in KEY.json ({type(error).__name__})") from None
    return caption_field(sample), group


class GroupedBatches(IterableDataset):
    """Reorder a stream of ``(image, (caption, group))`` into runs of ``batch_size`` for the DataLoader.

    Each sample goes, with probability ``prob``, to the bucket of its group, otherwise to a shared
    bucket; a bucket that reaches ``batch_size`` is emitted as one run, so every batch the DataLoader
    cuts (``drop_last``, the same ``batch_size``, per worker) is either one group or a random mix.
    What is left when the stream ends comes out group by group, then the mixed rest. Items are
    ``(image, caption)``. The routing is seeded by (seed, epoch, worker): the same batches for the same
    segment.

    ``group_size`` (a divisor of ``batch_size``; default the batch size) is the length of a group's run:
    the mixed bucket still emits whole batches, so runs never straddle a batch boundary. ``free`` (indices
    into the group tuple): each grouped sample drops one of them, drawn at random, from its key.
    """

    def __init__(
        self,
        source: ShardStream,
        *,
        batch_size: int,
        prob: float,
        seed: int = 0,
        group_size: int | None = None,
        free: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"batch_group_prob must be in [0, 1], got {prob}")
        self.source = source
        self.batch_size = int(batch_size)
        self.group_size = int(group_size or batch_size)
        if self.group_size < 1 or self.batch_size % self.group_size:
            raise ValueError(
                f"batch_group_size must divide batch_size {self.batch_size}, got {self.group_size}"
            )
        self.prob = float(prob)
        self.free = tuple(free)
        self.seed = int(seed)
        self._epoch = 0

    @property
    def urls(self) -> list[str]:
        return self.source.urls

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self.source.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        worker = get_worker_info()
        rng = random.Random(f"{self.seed}/{self._epoch}/{worker.id if worker else 0}")
        buckets: dict[Any, list[Any]] = {}
        mixed: list[Any] = []
        for item in self.source:
            if item is None:
                continue
            image, (text, group) = item
            bucket = mixed
            if rng.random() < self.prob:
                if self.free:
                    left_out = self.free[rng.randrange(len(self.free))]
                    group = (left_out, *(v for i, v in enumerate(group) if i != left_out))
                bucket = buckets.setdefault(group, [])
            bucket.append((image, text))
            if len(bucket) == (self.batch_size if bucket is mixed else self.group_size):
                yield from bucket
                bucket.clear()
        rest = [item for bucket in buckets.values() for item in bucket] + mixed
        yield from rest


def grouped_pairs(
    urls: Any,
    *,
    keys: Sequence[str],
    prob: float,
    batch_size: int,
    transform: Callable | None,
    group_size: int | None = None,
    free: Sequence[str] = (),
    **stream: Any,
) -> GroupedBatches:
    """Image-text shards with ``KEY.json`` as :class:`GroupedBatches` (``stream``: ShardStream options);
    ``free`` names attributes of ``keys``."""
    target = functools.partial(caption_and_group, keys=tuple(keys))  # picklable: reaches workers
    source = ShardStream(urls, transform=transform, target=target, **stream)
    return GroupedBatches(source, batch_size=batch_size, prob=prob, seed=stream.get("seed", 0),
                          group_size=group_size, free=[list(keys).index(k) for k in free])
