"""Image-text pairs in open_clip's formats: webdataset shards (streaming) and CSV files (map-style).

Also the pieces every reader in ``dvd.data`` shares: skip-and-count for corrupt images (a
corrupt sample is skipped, counted and reported at the end of the pass, never a crash and never
silent), map-style records with one image file each, one-line JSON errors, and collate helpers.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import multiprocessing
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import Dataset, IterableDataset
from webdataset.tariterators import group_by_keys, url_opener
from webdataset.utils import make_seed, pytorch_worker_info

from dvd.config import suggest
from dvd.data.transforms import ImageTransform, decode_image, plain_tensor
from dvd.io import read_json

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # open_clip's "jpg;png;jpeg;webp", CLIP_benchmark's webp/png/jpg


class CorruptSample(Exception):
    """One sample cannot be used (bad image bytes, missing field, bad label): skip it and count it."""


def _reason(error: BaseException) -> str:
    """A short one-line description of why a sample was skipped."""
    text = str(error.args[0]) if error.args else ""
    text = text.split(" @ ")[0].strip()  # webdataset appends " @ <stream object>"
    first = text.splitlines()[0] if text else ""
    return (f"{type(error).__name__}: {first}" if first else type(error).__name__)[:200]


class SkipLog:
    """What one pass over a source skipped; reported once, as one warning, at the end of the pass.

    Every skip is counted; the first ``KEEP`` are also listed (an endless resampled stream must not
    grow a list without bound).
    """

    KEEP = 1000

    def __init__(self, source: str) -> None:
        self.source = source
        self.seen = 0
        self.count = 0
        self.skipped: list[tuple[str, str]] = []

    def skip(self, key: str, reason: str) -> None:
        self.count += 1
        if len(self.skipped) < self.KEEP:
            self.skipped.append((key, reason))

    def report(self) -> None:
        if self.count:
            key, reason = self.skipped[0]
            log.warning(
                "skipped %d corrupt samples of %d in %s: first: %s (%s)",
                *(self.count, self.seen, self.source, key, reason),
            )


def _local_path(url: str) -> str | None:
    """The file behind a local shard url, or None for pipe:/remote urls (checked when opened)."""
    if url.startswith("file:"):
        return url[len("file:") :]
    if url.startswith("pipe:") or "://" in url:
        return None
    return url


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """open_clip-style shard lists: "::"-joined, brace-expanded, ``pipe:`` allowed; local files must exist."""
    items = [urls] if isinstance(urls, str | os.PathLike) else list(urls)
    expanded: list[str] = []
    for item in items:
        if not isinstance(item, str | os.PathLike):
            raise ValueError(
                f"shard url {item!r} is not a string; pass paths like data/{{000000..000009}}.tar"
            )
        expanded.extend(u.strip() for u in wds.shardlists.expand_urls(str(item)) if u.strip())
    if not expanded:
        raise ValueError(f"no shards in {urls!r}; pass paths like data/shard-{{000000..000009}}.tar")
    for url in expanded:
        path = _local_path(url)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(
                f"shard {url} does not exist; check the path or brace pattern in {urls!r}"
            )
    return expanded


def _describe(urls: str | Sequence[str], expanded: list[str]) -> str:
    if isinstance(urls, str | os.PathLike):
        return str(urls)
    return expanded[0] if len(expanded) == 1 else f"{expanded[0]} ... ({len(expanded)} shards)"


def _first_image(sample: dict[str, Any], keys: Sequence[str]) -> bytes:
    for key in keys:
        if key in sample:
            return sample[key]
    raise CorruptSample(
        f"no image ({', '.join(keys)}) in sample with fields {sorted(k for k in sample if k[:2] != '__')}"
    )


def caption_field(sample: dict[str, Any]) -> str:
    """The caption of an open_clip sample (``KEY.txt``)."""
    if "txt" not in sample:
        raise CorruptSample("no .txt caption")
    return sample["txt"].decode("utf-8").strip()


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, not sample fields


def _tar_files(shards: Iterator[dict[str, Any]], handler: Callable) -> Iterator[dict[str, Any]]:
    """webdataset's tar expansion, plus the check it lacks: a shard cut short is an error.

    ``tarfile`` ends a stream quietly at a missing or garbled header, so a truncated shard would
    lose its last samples silently. A well-formed tar ends with two zero blocks; we check that the
    block after the one that stopped the iteration is zero too.
    """
    for shard in shards:
        stream = shard["stream"]
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
            for info in tar:
                if info.isreg() and not _META.match(info.name):
                    data = tar.extractfile(info).read()  # type: ignore[union-attr]
                    yield {"fname": info.name, "data": data, "__url__": shard["url"]}
                tar.members = []
            tail = tar.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
            if len(tail) < tarfile.BLOCKSIZE or tail.count(0) < tarfile.BLOCKSIZE:
                raise tarfile.ReadError("tar ends without its end-of-archive blocks (truncated or corrupt)")
            stream.close()
        except Exception as error:  # unreadable shard: the handler counts it
            if not handler(error):
                break
        finally:
            try:
                stream.close()
            except Exception:  # already reported, or a pipe whose failure the handler saw
                pass
        yield {}  # end of shard: group_by_keys never joins samples across shards


def tar_samples(shards: Iterator[dict[str, Any]], handler: Callable) -> Iterator[dict[str, Any]]:
    """Shard urls -> samples ``{"__key__", "__url__", ext: bytes}``, errors passed to ``handler``."""
    return group_by_keys(_tar_files(url_opener(shards, handler=handler), handler), handler=handler)


class ShardStream(IterableDataset):
    """Streams (image, target) pairs from webdataset tar shards.

    Shards are split across torchrun ranks (``split_by_node``) and DataLoader workers; with
    ``shuffle > 0`` the shard order is shuffled identically on every rank (seed + epoch, then split,
    so ranks stay disjoint) and samples go through a shuffle buffer of that size. ``resampled``
    draws shards with replacement forever (``wds.ResampledShards``, seeded per rank and worker).
    Corrupt samples and unreadable shards are skipped, counted in ``.skipped`` (the last pass, for
    single-process use) and reported in one warning when the pass ends. With ``yield_skipped`` a corrupt
    sample is also yielded as ``None``, so that a consumer in another process (DataLoader workers) can
    count it.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        transform: ImageTransform | None,
        target: Callable[[dict[str, Any]], Any],
        image_keys: Sequence[str] = IMAGE_KEYS,
        resampled: bool = False,
        seed: int = 0,
        shuffle: int = 0,
        split_by_node: bool = True,
        yield_skipped: bool = False,
    ) -> None:
        super().__init__()
        self.urls = expand_shards(urls)
        self.yield_skipped = yield_skipped
        self.source = _describe(urls, self.urls)
        self.transform = transform or plain_tensor()
        self.target = target
        self.image_keys = tuple(image_keys)
        self.resampled, self.seed, self.split_by_node = resampled, seed, split_by_node
        self.shuffle = int(shuffle)
        self._epoch = multiprocessing.Value("i", 0, lock=False)  # shared memory: reaches DataLoader workers
        self._pass = SkipLog(self.source)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(key, reason) of the samples the current or last pass skipped (this process only)."""
        return self._pass.skipped

    @property
    def skipped_count(self) -> int:
        return self._pass.count

    @property
    def seen(self) -> int:
        """Samples (and unreadable shards) met by the current or last pass, skipped ones included."""
        return self._pass.seen

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle deterministically for ``epoch`` (call before iterating; reaches persistent workers)."""
        self._epoch.value = epoch

    def _stages(self, epoch: int, track: Callable, handler: Callable) -> list[Any]:
        if self.resampled:
            stages: list[Any] = [
                wds.ResampledShards(self.urls, seed=make_seed(self.seed, epoch), deterministic=True)
            ]
        else:
            order_seed = make_seed(self.seed, epoch) if self.shuffle > 0 else None
            stages = [wds.SimpleShardList(self.urls, seed=order_seed)]
            if self.split_by_node:
                stages.append(wds.split_by_node)
            stages.append(wds.split_by_worker)
        stages += [track, functools.partial(tar_samples, handler=handler)]
        if self.shuffle > 0:
            rank, _, worker, _ = pytorch_worker_info()
            rng = random.Random(make_seed(self.seed, epoch, rank, worker))
            stages.append(wds.shuffle(self.shuffle, initial=max(1, self.shuffle // 5), rng=rng))
        return stages

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        epoch = self._epoch.value
        pass_log = self._pass = SkipLog(self.source)
        state = {"url": "?", "shards": 0, "good": 0}
        limit = max(20, 3 * len(self.urls))

        def handler(error: BaseException) -> bool:  # unreadable shard or tar member: count it, go on
            pass_log.seen += 1
            pass_log.skip(state["url"], _reason(error))
            return True

        def track(shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            for shard in shards:
                if self.resampled and state["good"] == 0 and state["shards"] >= limit:
                    raise ValueError(f"no readable samples in {self.source} after {limit} resampled shards")
                state["url"] = shard["url"]
                state["shards"] += 1
                yield shard

        finished = False
        try:
            for sample in wds.DataPipeline(*self._stages(epoch, track, handler)):
                pass_log.seen += 1
                try:
                    image = decode_image(_first_image(sample, self.image_keys))
                    target = self.target(sample)
                except Exception as error:  # corrupt bytes of any kind: skip and count
                    pass_log.skip(str(sample.get("__key__")), _reason(error))
                    if self.yield_skipped:
                        yield None
                    continue
                state["good"] += 1
                yield self.transform(image), target
            finished = True
        finally:
            pass_log.report()
        if finished and state["shards"] == 0:
            rank, world, worker, workers = pytorch_worker_info()
            log.warning(
                "rank %d/%d worker %d/%d got no shards of %s (%d shards); use >= ranks x workers shards",
                *(rank, world, worker, workers, self.source, len(self.urls)),
            )
        elif finished and state["good"] == 0:
            raise ValueError(
                f"no readable samples in {self.source} ({pass_log.seen} read, {pass_log.count} corrupt)"
            )


def image_text_shards(
    urls: str | Sequence[str],
    *,
    transform: ImageTransform | None,
    resampled: bool = False,
    seed: int = 0,
    shuffle: int = 0,
) -> ShardStream:
    """open_clip's webdataset pairs (``KEY.jpg|png|webp`` + ``KEY.txt``) as (image [0,1] (3,H,W), caption)."""
    return ShardStream(
        urls, transform=transform, target=caption_field, resampled=resampled, seed=seed, shuffle=shuffle
    )


# ------------------------------------------------------------------------------- map-style records


class ImageRecords(Dataset):
    """Map-style records with (at most) one image file each; subclasses build the items.

    Each record is ``{"key": str, "paths": tuple of candidate files | None, "fields": dict}``.
    ``ds[i]`` is None when the image is missing or corrupt (warned once, listed in ``.skipped``);
    iterating the dataset, or a DataLoader with :func:`collate_dicts` / :func:`collate_pairs`,
    leaves such samples out, and a pass over the dataset ends with one summary warning.
    """

    def __init__(
        self, records: list[dict[str, Any]], *, source: str, transform: ImageTransform | None
    ) -> None:
        if not records:
            raise ValueError(f"{source}: no samples; check that the file lists any")
        self.records = records
        self.source = source
        self.transform = transform or plain_tensor()
        self.skipped: list[tuple[str, str]] = []
        self._skipped_keys: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def _item(self, record: dict[str, Any], image: torch.Tensor | None) -> Any:
        return {"image": image, **record["fields"]}

    def _build(self, index: int) -> Any:
        record = self.records[index]
        if record["paths"] is None:  # a text-only record (LLaVA instruction data has them)
            return self._item(record, None)
        path = next((p for p in record["paths"] if os.path.isfile(p)), None)
        if path is None:
            raise CorruptSample(f"missing image file {record['paths'][0]}")
        try:
            image = decode_image(Path(path))
        except Exception as error:  # corrupt bytes of any kind
            raise CorruptSample(f"{path}: {_reason(error)}") from None
        return self._item(record, self.transform(image))

    def _remember(self, key: str, error: CorruptSample) -> bool:
        """List a skipped sample once; True the first time."""
        if key in self._skipped_keys:
            return False
        self._skipped_keys.add(key)
        self.skipped.append((key, str(error)))
        return True

    def __getitem__(self, index: int) -> Any:
        try:
            return self._build(index)
        except CorruptSample as error:
            key = self.records[index]["key"]
            if self._remember(key, error):
                log.warning("skipping sample %s of %s: %s", key, self.source, error)
            return None

    def __iter__(self) -> Iterator[Any]:
        pass_log = SkipLog(self.source)
        try:
            for index in range(len(self.records)):
                pass_log.seen += 1
                try:
                    item = self._build(index)
                except CorruptSample as error:
                    pass_log.skip(self.records[index]["key"], str(error))
                    self._remember(self.records[index]["key"], error)
                    continue
                yield item
        finally:
            pass_log.report()


def collate_dicts(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Batch dict items: equal-shaped tensors are stacked, everything else listed; skipped (None) dropped.

    Returns None when every sample of the batch was skipped.
    """
    items = [item for item in batch if item is not None]
    if not items:
        return None
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        tensors = all(isinstance(v, torch.Tensor) for v in values)
        out[key] = torch.stack(values) if tensors and len({v.shape for v in values}) == 1 else values
    return out


def collate_pairs(batch: Sequence[tuple[torch.Tensor, Any] | None]) -> tuple[torch.Tensor, Any] | None:
    """Batch (image, target) pairs: images stacked, int targets as a LongTensor; None items dropped."""
    items = [item for item in batch if item is not None]
    if not items:
        return None
    images = torch.stack([image for image, _ in items])
    targets = [target for _, target in items]
    if all(isinstance(t, int) for t in targets):
        return images, torch.tensor(targets, dtype=torch.long)
    return images, targets


# ------------------------------------------------------------------------- files and JSON checks


def existing_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what})")
    return path


def existing_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory ({what})")
    return path


def load_json(path: str | Path, what: str) -> Any:
    """``dvd.io.read_json`` plus one-line errors for non-UTF-8 bytes and other decoding failures."""
    path = existing_file(path, what)
    try:
        return read_json(path)
    except (ValueError, RecursionError) as error:
        if str(error).startswith(str(path)):
            raise
        raise ValueError(f"{path}: malformed JSON, expected {what} ({_reason(error)})") from None


def read_jsonl(path: str | Path, what: str) -> list[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSON-lines file; one-line errors."""
    path = existing_file(path, what)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not UTF-8 text, expected {what} ({error.reason} at byte {error.start})"
        ) from None
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except (ValueError, RecursionError) as error:
            reason = error.msg if isinstance(error, json.JSONDecodeError) else _reason(error)
            raise ValueError(f"{path}: line {number}: malformed JSON ({reason})") from None
    return rows


_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return _JSON_NAMES.get(type(value), type(value).__name__)


def need(value: Any, kind: type | tuple[type, ...], path: str | Path, where: str) -> Any:
    """``value`` if it has JSON type ``kind`` (booleans are not numbers), else a one-line ValueError."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return value
    wanted = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
    raise ValueError(f"{path}: {where} must be {wanted}, got {_json_type(value)}")


def field(
    entry: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str | Path, where: str
) -> Any:
    """``entry[key]`` checked with :func:`need`; a missing key is a one-line ValueError."""
    if key not in entry:
        raise ValueError(f"{path}: {where} has no {key!r} field")
    return need(entry[key], kind, path, f"{where} {key!r}")


# --------------------------------------------------------------------------------------- CSV


class CsvImageText(ImageRecords):
    """open_clip's CSV pairs (tab-separated ``filepath`` / ``title`` columns) as (image, caption).

    Relative image paths are resolved against ``image_root`` when given, else against the current
    directory (open_clip's behaviour). Corrupt or missing images give None (see :class:`ImageRecords`);
    batch with :func:`collate_pairs`.
    """

    def __init__(
        self,
        csv_path: str | Path,
        *,
        transform: ImageTransform | None,
        img_key: str = "filepath",
        caption_key: str = "title",
        sep: str = "\t",
        image_root: str | Path | None = None,
    ) -> None:
        path = existing_file(csv_path, "an image-text CSV")
        if len(sep) != 1:
            raise ValueError(f"CSV separator {sep!r} must be one character, e.g. a tab")
        root = existing_dir(image_root, "image root for the CSV") if image_root is not None else Path()
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle, delimiter=sep)
                columns = reader.fieldnames or []
                for key in (img_key, caption_key):
                    if key not in columns:
                        raise ValueError(
                            f"{path}: no column {key!r} (columns: {columns}){suggest(key, columns)}"
                        )
                rows = [(row.get(img_key), row.get(caption_key)) for row in reader]
        except (UnicodeDecodeError, csv.Error) as error:
            raise ValueError(f"{path}: unreadable CSV ({_reason(error)})") from None
        records = []
        for number, (image, caption) in enumerate(rows, start=2):
            if not image or caption is None:
                raise ValueError(f"{path}: line {number}: empty {img_key!r} or {caption_key!r}")
            records.append({"key": image, "paths": (str(root / image),), "fields": {"caption": caption}})
        super().__init__(records, source=str(path), transform=transform)

    def _item(self, record: dict[str, Any], image: torch.Tensor | None) -> tuple[torch.Tensor | None, str]:
        return image, record["fields"]["caption"]
