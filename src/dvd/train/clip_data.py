"""Training data of ``dvd train clip``: image-text pairs, labelled images (TeCoA) or images (FARE).

Sources: a ShapesWorld root (its pre-training shards; TeCoA labels from each sample's ``KEY.json``),
webdataset shards (local paths, brace lists, ``::``-joined lists, ``pipe:`` commands), an image-text
CSV/TSV, or a zero-shot layout (CLIP_benchmark webdataset or ImageFolder + classnames.txt). Every
source is read through :class:`dvd.train.loop.DataStream` segments: an epoch (reshuffled with
seed + epoch) or, for resampled shards, a block of batches between checkpoints.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dvd.config import ConfigError, suggest
from dvd.data.image_text import CorruptSample, CsvImageText, ShardStream, image_text_shards
from dvd.data.in_memory import InMemory
from dvd.data.shapesworld_formats import ZEROSHOT_TASKS
from dvd.data.transforms import image_transform
from dvd.data.zeroshot import load_zeroshot
from dvd.models.clip import DvdCLIP
from dvd.train.clip_config import ClipTrainConfig
from dvd.train.clip_groups import grouped_pairs
from dvd.train.distributed import DistEnv
from dvd.train.length_groups import length_grouped, rank_share
from dvd.train.rng import derived_seed


def detect_format(cfg: ClipTrainConfig) -> str:
    """``auto``: a ShapesWorld root, a zero-shot layout (classnames.txt), a CSV/TSV file or shards."""
    if cfg.data_format != "auto":
        return cfg.data_format
    path = Path(cfg.data)
    if path.is_dir():
        if (path / "pretrain" / "shards.txt").is_file():
            return "shapesworld"
        if (path / "classnames.txt").is_file():
            return "zeroshot"
        raise FileNotFoundError(
            f"{path} is neither a ShapesWorld root (pretrain/shards.txt) nor a zero-shot dataset "
            "(classnames.txt)"
        )
    if path.suffix.lower() in (".csv", ".tsv"):
        return "csv"
    return "webdataset"


def shapesworld_shards(root: str | Path) -> list[str]:
    """The pre-training shard paths of a ShapesWorld root."""
    root = Path(root)
    listing = root / "pretrain" / "shards.txt"
    if not listing.is_file():
        raise FileNotFoundError(
            f"{listing}: not a ShapesWorld root; generate one with `dvd data shapesworld --out DIR`"
        )
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{listing} lists no shards; regenerate the world")
    return [str(root / "pretrain" / name) for name in names]


def _shapesworld_label(sample: dict[str, Any], *, attribute: str, values: tuple[Any, ...]) -> int:
    try:
        value = json.loads(sample["json"])[attribute]
        return values.index(value)
    except (KeyError, ValueError, TypeError) as error:
        raise CorruptSample(f"no usable {attribute!r} in KEY.json ({type(error).__name__})") from None


def shapesworld_task(
    root: str | Path, task: str
) -> tuple[list[str], list[str], Callable[[dict[str, Any]], int]]:
    """(class names, templates, label function over a pre-training sample) for a ShapesWorld task.

    TeCoA on ShapesWorld learns from the pre-training images' attribute labels (``KEY.json``), never
    from the zero-shot test images it is evaluated on.
    """
    if task not in ZEROSHOT_TASKS:
        raise ConfigError(f"unknown ShapesWorld task {task!r}{suggest(task, ZEROSHOT_TASKS)}")
    attribute, classnames, values, _, templates = ZEROSHOT_TASKS[task]
    label = functools.partial(_shapesworld_label, attribute=attribute, values=tuple(values))
    return list(classnames), list(templates), label


class PairCollate:
    """(image, caption) items -> (images (B,3,H,W), token ids (B, L)); skipped (None) items dropped.

    ``memo``: keep each caption's token ids, so a caption seen before is not tokenised again (for a finite
    set read every epoch; the tokenizer pads every text to its context length on its own, so a row does not
    depend on the batch it came in).
    """

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor], *, memo: bool = False) -> None:
        self.tokenizer = tokenizer
        self.memo: dict[str, torch.Tensor] | None = {} if memo else None

    def __call__(self, items: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        items = [item for item in items if item is not None]
        images = torch.stack([image for image, _ in items])
        return images, self.tokens([str(text) for _, text in items])

    def tokens(self, texts: list[str]) -> torch.Tensor:
        """Token ids (B, L) of ``texts``, from the memo where it has them."""
        if self.memo is None:
            return self.tokenizer(texts)
        new = list(dict.fromkeys(text for text in texts if text not in self.memo))
        if new:
            self.memo.update(zip(new, self.tokenizer(new).unbind(0), strict=True))
        return torch.stack([self.memo[text] for text in texts])


def collate_labelled(items: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [item for item in items if item is not None]
    return torch.stack([image for image, _ in items]), torch.tensor([int(label) for _, label in items])


class IndexedStream(IterableDataset):
    """A map-style dataset read in a seeded order, this rank's share, split over workers.

    Items that come back ``None`` (corrupt images) are skipped, so every batch is full.
    """

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        super().__init__()
        self.dataset = dataset
        self.indices = list(indices)

    def __iter__(self) -> Iterator[Any]:
        worker = get_worker_info()
        mine = self.indices if worker is None else self.indices[worker.id :: worker.num_workers]
        for index in mine:
            item = self.dataset[index]
            if item is not None:
                yield item


def make_loader_factory(
    dataset: Any, *, cfg: ClipTrainConfig, env: DistEnv, collate: Callable[[Sequence[Any]], Any],
    lengths: Sequence[int] | None = None,
) -> Callable[[int], Iterable[Any]]:
    """``segment -> DataLoader``: segment = epoch (reshuffled with seed + epoch) or resampled block.
    ``lengths`` (one per sample of a map-style ``dataset``): batches of similar length
    (:mod:`dvd.train.length_groups`)."""

    def make(segment: int) -> Iterable[Any]:
        if isinstance(dataset, IterableDataset):
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(segment)
            source: Any = dataset
        else:
            generator = torch.Generator().manual_seed(derived_seed(cfg.seed, segment))
            order = torch.randperm(len(dataset), generator=generator)  # the same on every rank, then split
            if lengths is not None:
                layout = {"batch_size": cfg.batch_size, "world_size": env.world_size}
                order = length_grouped(order, lengths, generator=generator, **layout)
                mine = rank_share(order, rank=env.rank, **layout)
            else:
                share = len(order) // env.world_size
                mine = order[env.rank * share : (env.rank + 1) * share]
            source = IndexedStream(dataset, mine.tolist())
        return DataLoader(
            source, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=collate, drop_last=True,
            persistent_workers=False, pin_memory=env.device.type == "cuda",
        )

    return make


def build_dataset(
    cfg: ClipTrainConfig, clip: DvdCLIP
) -> tuple[Any, Callable[[Sequence[Any]], Any], dict[str, Any]]:
    """(dataset, collate, info) for the recipe: pairs for clean/delta, labels for tecoa, images for fare.

    ``info`` carries ``classnames``/``templates`` for tecoa. With ``in_memory`` the whole set is read
    and decoded here, once (every rank reads all of it; the loader splits each epoch's order).
    """
    data, collate, info = _stream_dataset(cfg, clip)
    if cfg.in_memory:
        if isinstance(data, ShardStream):
            data.split_by_node, data.shuffle = False, 0
        data = InMemory(data, name=str(cfg.data))
        if isinstance(collate, PairCollate):  # every epoch reads the same captions: tokenise each once
            collate = PairCollate(collate.tokenizer, memo=True)
    return data, collate, info


def _stream_dataset(
    cfg: ClipTrainConfig, clip: DvdCLIP
) -> tuple[Any, Callable[[Sequence[Any]], Any], dict[str, Any]]:
    kind = detect_format(cfg)
    transform = image_transform(clip.image_size, train=cfg.augment)
    shuffle = cfg.shuffle_buffer
    info: dict[str, Any] = {"format": kind}
    if cfg.recipe == "tecoa":
        if kind == "shapesworld":
            classnames, templates, label = shapesworld_task(cfg.data, cfg.task)
            data = ShardStream(
                shapesworld_shards(cfg.data),
                transform=transform,
                target=label,
                resampled=cfg.resampled,
                seed=cfg.seed,
                shuffle=shuffle,
            )
            info.update(classnames=classnames, templates=templates, name=f"shapesworld/{cfg.task}")
            return data, collate_labelled, info
        if kind == "zeroshot":
            task = load_zeroshot(cfg.data, transform=transform, split=cfg.split, split_by_node=True)
            if isinstance(task.dataset, ShardStream):
                task.dataset.shuffle, task.dataset.seed = shuffle, cfg.seed
                task.dataset.resampled = cfg.resampled
            info.update(classnames=task.classnames, templates=task.templates, name=task.name)
            return task.dataset, collate_labelled, info
        raise ConfigError(
            f"recipe tecoa needs labelled data (a ShapesWorld root or a zero-shot layout), not {kind}"
        )
    if kind == "zeroshot":
        if cfg.recipe != "fare":
            raise ConfigError(
                f"{cfg.data} is a zero-shot (labelled) dataset; recipe {cfg.recipe} needs image-text pairs"
            )
        task = load_zeroshot(cfg.data, transform=transform, split=cfg.split, split_by_node=True)
        return task.dataset, collate_labelled, info
    if kind == "csv":
        if cfg.batch_group_by:
            raise ConfigError("batch_group_by needs webdataset shards with KEY.json, not a CSV file")
        data: Any = CsvImageText(
            cfg.data,
            transform=transform,
            img_key=cfg.csv_img_key,
            caption_key=cfg.csv_caption_key,
            sep=cfg.csv_separator,
            image_root=cfg.csv_image_root,
        )
    else:
        urls = shapesworld_shards(cfg.data) if kind == "shapesworld" else cfg.data
        if cfg.batch_group_by and cfg.recipe in ("clean", "delta"):
            data = grouped_pairs(
                urls, keys=cfg.batch_group_by, prob=cfg.batch_group_prob, batch_size=cfg.batch_size,
                group_size=cfg.batch_group_size or None, free=cfg.batch_group_free,
                transform=transform, resampled=cfg.resampled, seed=cfg.seed, shuffle=shuffle,
            )
        elif cfg.recipe == "fare":  # captions are not needed, but a sample without one is still an image
            data = ShardStream(
                urls,
                transform=transform,
                target=_sample_key,
                resampled=cfg.resampled,
                seed=cfg.seed,
                shuffle=shuffle,
            )
        else:
            data = image_text_shards(
                urls, transform=transform, resampled=cfg.resampled, seed=cfg.seed, shuffle=shuffle
            )
    if cfg.recipe == "fare":
        return data, _collate_images, info
    return data, PairCollate(clip.tokenizer), info


def _sample_key(sample: dict[str, Any]) -> str:
    return str(sample.get("__key__", ""))


def _collate_images(items: Sequence[Any]) -> torch.Tensor:
    items = [item for item in items if item is not None]
    return torch.stack([item[0] if isinstance(item, (tuple, list)) else item["image"] for item in items])


def check_shard_count(dataset: Any, cfg: ClipTrainConfig, env: DistEnv) -> None:
    """Epoch mode splits shards over ranks x workers: fewer shards than that leaves some idle."""
    urls = getattr(dataset, "urls", None)
    if urls is None or cfg.resampled:
        return
    needed = env.world_size * max(1, cfg.workers)
    if len(urls) < needed:
        raise ConfigError(
            f"{len(urls)} shard(s) for {env.world_size} process(es) x {max(1, cfg.workers)} worker(s); "
            f"use resampled=true, fewer workers, or write at least {needed} shards"
        )
