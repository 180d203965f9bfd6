"""Keep what an evaluation saw (``--save-samples DIR``): a JSONL record per sample, its adversarial image.

Each (task, model, dataset, attack, eps) gets ``DIR/<name>.jsonl`` and a folder ``DIR/<name>/`` of images,
so another tool can re-score the outputs and re-run the images. A record holds the sample's ``id``, its
``label`` or ``references``, the ``clean`` and ``adversarial`` prediction (or caption / answer), the attack
that broke it (``broken_by``, None if none did), its ``loss`` and the image's file name. An image is a PNG
when it is exactly representable in 8 bits (so the PNG *is* the attacked input), else a float32 ``.npy``.
A rerun that resumes skips the records already written.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def eps_tag(eps: float) -> str:
    """The budget's part of a sample set's name: ``eps4of255`` for 4/255."""
    return f"eps{eps * 255:g}of255"


def sample_set_name(task: str, model: str, dataset: str, attack: str, eps: float) -> str:
    """A file-system-safe name for one evaluated budget."""
    raw = f"{task}-{model}-{dataset}-{attack}-{eps_tag(eps)}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", raw)


def is_uint8_exact(image: Tensor) -> bool:
    """The 8-bit image read back (``uint8 / 255`` in float32) is exactly ``image``."""
    image = image.detach().float()
    return bool(torch.equal(torch.round(image * 255) / 255, image))


def save_image(image: Tensor, stem: Path) -> Path:
    """``image`` (C, H, W) in [0, 1] as ``stem.png`` if exactly 8-bit, else ``stem.npy`` (float32)."""
    image = image.detach().cpu()
    if is_uint8_exact(image):
        pixels = (image.float() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        path = stem.with_suffix(".png")
        Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(path)
    else:
        path = stem.with_suffix(".npy")
        np.save(path, image.float().numpy())
    return path


def load_image(path: str | Path) -> Tensor:
    """An image saved by :func:`save_image`, back as a float tensor (C, H, W) in [0, 1]."""
    path = Path(path)
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path))
    pixels = np.asarray(Image.open(path))
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class SampleWriter:
    """Appends per-sample records to ``directory/name.jsonl`` and images to ``directory/name/``."""

    def __init__(self, directory: str | Path, name: str) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"--save-samples {self.directory} is a file; give a directory")
        self.images = self.directory / name
        self.images.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"{name}.jsonl"
        self.seen: set[str] = set()
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    self.seen.add(str(json.loads(line)["id"]))

    def write(self, records: list[dict[str, Any]], images: Tensor | None = None) -> None:
        """One record per sample (each with an ``id``); ``images`` (B, C, H, W) saved beside them."""
        lines = []
        for i, record in enumerate(records):
            key = str(record["id"])
            if key in self.seen:
                continue
            record = dict(record)
            if images is not None:
                stem = re.sub(r"[^A-Za-z0-9._-]+", "_", key)
                record["image"] = save_image(images[i], self.images / stem).name
            lines.append(json.dumps(_jsonable(record)))
            self.seen.add(key)
        if lines:
            with self.path.open("a") as handle:
                handle.write("\n".join(lines) + "\n")


def writer_for(
    directory: str | Path | None, *, task: str, model: str, dataset: str, attack: str, eps: float
) -> SampleWriter | None:
    """A :class:`SampleWriter` for one budget, or None without ``--save-samples``."""
    if directory is None:
        return None
    return SampleWriter(directory, sample_set_name(task, model, dataset, attack, eps))


def classification_records(
    start: int,
    labels: Tensor,
    clean: Tensor,
    adversarial: Tensor | None,
    attack_of: list[str | None] | None,
    loss: Tensor | None,
    classnames: list[str],
) -> list[dict[str, Any]]:
    """Records of a classification batch whose first sample is number ``start`` of the dataset."""
    records = []
    for i, label in enumerate(labels.tolist()):
        record: dict[str, Any] = {
            "id": start + i,
            "label": classnames[label],
            "clean": classnames[int(clean[i])],
        }
        if adversarial is not None:
            record["adversarial"] = classnames[int(adversarial[i])]
            record["broken_by"] = attack_of[i] if attack_of else None
            record["loss"] = float(loss[i]) if loss is not None else None
        records.append(record)
    return records


def output_records(
    task: Any, positions: list[int], items: list[dict[str, Any]], outputs: list[list[str]], worst_case: Any
) -> list[dict[str, Any]]:
    """Records of a VLM batch: the task's fields, references, the clean and the worst-case output, the
    stage that produced it (``broken_by``; None when the clean output is the worst) and its task score."""
    records = []
    for k, (position, item, texts) in enumerate(zip(positions, items, outputs, strict=True)):
        record: dict[str, Any] = {"id": position, **task.record(position, item)}
        record["references"] = list(task.references(position, item))
        record["clean"] = texts[0]
        if worst_case is not None:
            worst = worst_case.worst[k]
            record["adversarial"] = texts[worst]
            record["broken_by"] = worst_case.sources[k][worst] if worst > 0 else None
            record["score"] = worst_case.scores[k]
            record["outputs"] = texts
        records.append(record)
    return records


def retrieval_records(
    index: Tensor,
    clean_features: Tensor,
    adversarial_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    captions: list[str],
    attack: str,
) -> list[dict[str, Any]]:
    """Records of a retrieval batch: each image's own captions and its top-1 caption, clean and attacked;
    ``*_correct`` is recall@1's hit as the rows count it (ties with other images' captions count against
    it); ``broken_by`` names the attack when the clean image was a hit and the attacked one is not."""
    own = text_to_image.view(1, -1) == index.view(-1, 1)

    def top_and_hit(features: Tensor) -> tuple[list[int], list[bool]]:
        similarity = features @ text_features.t()
        best_own = similarity.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)
        hit = ((similarity >= best_own) & ~own).sum(dim=1) == 0
        return similarity.argmax(dim=1).tolist(), hit.tolist()

    clean_top, clean_hit = top_and_hit(clean_features)
    attacked_top, attacked_hit = top_and_hit(adversarial_features)
    owner = text_to_image.tolist()
    records = []
    for k, image in enumerate(index.tolist()):
        records.append({
            "id": image,
            "references": [c for c, o in zip(captions, owner, strict=True) if o == image],
            "clean": captions[clean_top[k]],
            "adversarial": captions[attacked_top[k]],
            "clean_correct": clean_hit[k],
            "adversarial_correct": attacked_hit[k],
            "broken_by": attack if clean_hit[k] and not attacked_hit[k] else None,
        })
    return records
