"""COCO captions (``images`` + ``annotations``), optionally restricted to a Karpathy split.

Items are ``dict(image, image_id, captions)``: one image with all of its reference captions, the
shape captioning evaluation (CIDEr) and retrieval need. The Karpathy file is the
``dataset_coco.json`` style (``images[].filepath/filename/split/sentences[].raw/cocoid``);
``split="train"`` includes ``restval``, as the Karpathy training set usually does.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from dvd.data.image_text import ImageRecords, existing_dir, field, load_json, need
from dvd.data.transforms import ImageTransform

log = logging.getLogger(__name__)

_SPLIT_ALIASES = {"train": ("train", "restval")}


def _coco(path: Path) -> tuple[list[tuple[Any, str]], dict[Any, list[str]]]:
    """[(image id, file name)] in file order and {image id: captions} from a COCO captions file."""
    doc = need(load_json(path, "COCO captions (images, annotations)"), dict, path, "the top level")
    images = []
    for index, image in enumerate(field(doc, "images", list, path, "the top level")):
        image = need(image, dict, path, f"images[{index}]")
        images.append(
            (
                field(image, "id", (int, str), path, f"images[{index}]"),
                field(image, "file_name", str, path, f"images[{index}]"),
            )
        )
    known = {image_id for image_id, _ in images}
    captions: dict[Any, list[str]] = defaultdict(list)
    for index, annotation in enumerate(field(doc, "annotations", list, path, "the top level")):
        annotation = need(annotation, dict, path, f"annotations[{index}]")
        image_id = field(annotation, "image_id", (int, str), path, f"annotations[{index}]")
        if image_id not in known:
            raise ValueError(
                f"{path}: annotations[{index}] refers to image_id {image_id!r}, which is not in images"
            )
        captions[image_id].append(field(annotation, "caption", str, path, f"annotations[{index}]").strip())
    return images, captions


def _karpathy(path: Path, split: str | None) -> list[dict[str, Any]]:
    """The entries of a Karpathy split file in ``split`` (all when None), checked."""
    doc = need(
        load_json(path, "a Karpathy split file (images with split and sentences)"),
        dict,
        path,
        "the top level",
    )
    wanted = _SPLIT_ALIASES.get(split, (split,)) if split is not None else None
    entries, splits = [], set()
    for index, entry in enumerate(field(doc, "images", list, path, "the top level")):
        where = f"images[{index}]"
        entry = need(entry, dict, path, where)
        name = field(entry, "split", str, path, where)
        splits.add(name)
        sentences = [
            field(
                need(s, dict, path, f"{where} sentences[{j}]"), "raw", str, path, f"{where} sentences[{j}]"
            ).strip()
            for j, s in enumerate(field(entry, "sentences", list, path, where))
        ]
        checked = {
            "filename": field(entry, "filename", str, path, where),
            "filepath": field(entry, "filepath", str, path, where) if "filepath" in entry else "",
            "id": next(
                (field(entry, k, (int, str), path, where) for k in ("cocoid", "imgid") if k in entry), None
            ),
            "sentences": sentences,
        }
        if wanted is None or name in wanted:
            entries.append(checked)
    if not entries:
        raise ValueError(f"{path}: no images in split {split!r} (splits in the file: {sorted(splits)})")
    return entries


class CocoCaptions(ImageRecords):
    """COCO-format captions as ``dict(image, image_id, captions: list[str])``, map-style.

    ``annotations_json`` gives the reference captions; with ``karpathy_json`` + ``split`` only that
    split's images are kept (captions still come from the annotations when they list the image, else
    from the Karpathy sentences; ``annotations_json`` may then be None). Images are looked up under
    ``image_root`` (``image_root/filepath/filename`` or ``image_root/filename`` for Karpathy entries).
    Corrupt or missing images give None; batch with :func:`dvd.data.image_text.collate_dicts`.
    """

    def __init__(
        self,
        annotations_json: str | Path | None,
        image_root: str | Path,
        *,
        transform: ImageTransform | None,
        karpathy_json: str | Path | None = None,
        split: str | None = None,
    ) -> None:
        root = existing_dir(image_root, "COCO image root")
        if annotations_json is None and karpathy_json is None:
            raise ValueError("CocoCaptions needs annotations_json, karpathy_json or both")
        if split is not None and karpathy_json is None:
            raise ValueError(f"split={split!r} needs karpathy_json (a dataset_coco.json-style split file)")
        images, captions = _coco(Path(annotations_json)) if annotations_json is not None else ([], {})
        records = []
        if karpathy_json is None:
            without = 0
            for image_id, file_name in images:
                if not captions.get(image_id):
                    without += 1
                    continue
                fields = {"image_id": image_id, "captions": captions[image_id]}
                records.append({"key": file_name, "paths": (str(root / file_name),), "fields": fields})
            if without:
                log.info("%s: %d images without captions left out", annotations_json, without)
        else:
            by_file = {file_name: image_id for image_id, file_name in images}
            for entry in _karpathy(Path(karpathy_json), split):
                image_id = (
                    entry["id"] if entry["id"] in captions else by_file.get(entry["filename"], entry["id"])
                )
                refs = captions.get(image_id) or entry["sentences"]
                if not refs:
                    raise ValueError(
                        f"{karpathy_json}: image {entry['filename']} has no sentences and no annotations"
                    )
                if image_id is None:
                    image_id = entry["filename"]
                paths = [str(root / entry["filename"])]
                if entry["filepath"]:
                    paths.insert(0, str(root / entry["filepath"] / entry["filename"]))
                fields = {"image_id": image_id, "captions": refs}
                records.append({"key": entry["filename"], "paths": tuple(paths), "fields": fields})
        source = str(karpathy_json if karpathy_json is not None else annotations_json)
        super().__init__(
            records, source=f"{source} (split {split})" if split else source, transform=transform
        )
