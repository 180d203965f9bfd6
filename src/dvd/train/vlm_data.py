"""Data of ``dvd train vlm``: LLaVA JSON (stage 1 captions, stage 2 instructions), COCO captions or a
Karpathy split file (its ``train`` + ``restval`` captions) as conversations, and the small world's tokenizer.

Every training sample is ``{"image": (3, H, W) in [0, 1], "conversations": LLaVA turns}``; the
model's :class:`dvd.models.vlm_conversation.VLMCollator` turns a list of them into
``(images, VLMBatch)``. Text-only LLaVA entries are left out up front (one image per conversation);
corrupt images and malformed conversations are skipped and counted, never a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from dvd.config import ConfigError, suggest
from dvd.data.captions import CocoCaptions
from dvd.data.in_memory import InMemoryRecords
from dvd.data.instruct import LlavaInstruct
from dvd.data.transforms import image_transform
from dvd.models.vlm_conversation import VLMCollator, conversation_turns, make_conversation
from dvd.models.vlm_tokenizer import build_tokenizer, texts_from_files

log = logging.getLogger(__name__)

DATA_FORMATS = ("auto", "shapesworld", "llava", "coco", "karpathy")
ACCEPTED = "a ShapesWorld root, a LLaVA JSON list, a COCO captions JSON or a Karpathy split JSON"
KARPATHY_TRAIN = "train"  # the Karpathy split trained on (``restval`` comes with it)
SHAPESWORLD_FILES = {1: "llava/stage1_captions.json", 2: "llava/stage2_instruct.json"}
# the small world's text, from which ``tokenizer: shapesworld`` builds its vocabulary
SHAPESWORLD_TEXT = ("llava/*.json", "captions/annotations.json", "vqa/*.json", "pope/*.jsonl")


@dataclass(frozen=True)
class DataSource:
    """What to read: ``kind`` (llava | coco | karpathy), the JSON file and the folder its images are under."""

    kind: str
    path: Path
    image_root: Path
    shapesworld_root: Path | None = None


def is_shapesworld(path: str | Path) -> bool:
    root = Path(path)
    return root.is_dir() and (root / "summary.json").is_file() and (root / "llava").is_dir()


def resolve_source(data: str, data_format: str, image_root: str | None, stage: int) -> DataSource:
    """Where the training conversations of ``stage`` come from (``auto`` looks at ``data``)."""
    if data_format not in DATA_FORMATS:
        raise ConfigError(f"unknown data_format {data_format!r}{suggest(data_format, DATA_FORMATS)}")
    if not data:
        raise ConfigError(f"no training data; set data= to {ACCEPTED}")
    path = Path(data)
    if data_format in ("auto", "shapesworld") and path.is_dir():
        if not is_shapesworld(path):
            raise FileNotFoundError(
                f"{path} is a folder but not a ShapesWorld root (no summary.json + llava/); "
                "give a LLaVA JSON file with image_root=DIR, or generate one with `dvd data shapesworld`"
            )
        json_path = path / SHAPESWORLD_FILES[stage]
        if not json_path.is_file():
            raise FileNotFoundError(f"{json_path}: missing; regenerate the world with `dvd data shapesworld`")
        return DataSource("llava", json_path, Path(image_root) if image_root else path / "images", path)
    if data_format == "shapesworld":
        raise FileNotFoundError(f"{path}: not a ShapesWorld root; generate one with `dvd data shapesworld`")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file or folder")
    kind = data_format if data_format != "auto" else _json_kind(path)
    if image_root is None:
        raise ConfigError(f"set image_root=DIR: the folder the image paths in {path} are relative to")
    return DataSource(kind, path, Path(image_root))


def _json_kind(path: Path) -> str:
    """LLaVA files are a JSON list; COCO caption files and Karpathy split files (whose images carry
    ``sentences``) are JSON objects."""
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):
        return "llava"
    if head.startswith(b"{"):
        return "karpathy" if b'"sentences"' in head or b'"sentids"' in head else "coco"
    raise ValueError(f"{path}: not JSON training data; give {ACCEPTED}")


class Conversations(Dataset):
    """A reader's items as training conversations; ``ds[i]`` is None for an unusable sample.

    LLaVA items keep their conversations; COCO and Karpathy items give one sample per (image, reference
    caption), asked with ``caption_prompt``. A sample whose image is unreadable (the reader returns None) or
    whose conversation the collator cannot encode is skipped, counted once in ``skipped`` however
    often it is read (epochs, resume), and warned about (the first three). Each conversation is tokenised
    once (item ``"encoded"``, which the collator reuses), not again in every epoch.
    """

    def __init__(self, reader: Any, index: Sequence[tuple[int, int]], *, kind: str, collator: VLMCollator,
                 caption_prompt: str) -> None:
        self.reader = reader
        self.index = list(index)
        self.kind = kind
        self.collator = collator
        self.caption_prompt = caption_prompt
        self.skipped_indices: set[int] = set()
        self._encoded: dict[int, tuple[list[int], list[int]]] = {}  # tokenised once, reused every epoch

    @property
    def skipped(self) -> int:
        """How many distinct samples were skipped (in this process)."""
        return len(self.skipped_indices)

    def __len__(self) -> int:
        return len(self.index)

    def _conversation(self, fields: dict[str, Any], caption: int) -> Any:
        if self.kind in ("coco", "karpathy"):
            return make_conversation(self.caption_prompt, fields["captions"][caption])
        return fields["conversations"]

    def _encode(self, i: int, conversation: Any) -> tuple[list[int], list[int]]:
        """Sample ``i``'s token ids and labels, tokenised on first use and kept (errors propagate)."""
        encoded = self._encoded.get(i)
        if encoded is None:
            encoded = self._encoded[i] = self.collator.encode(conversation_turns(conversation))
        return encoded

    def lengths(self) -> list[int]:
        """Each sample's length in tokens, from the text alone (no image is read); 0 for one that cannot be
        encoded (it is skipped when read); a configuration error is raised, as reading the sample would.
        For length-grouped batches."""
        out = []
        for i, (record, caption) in enumerate(self.index):
            try:
                fields = self.reader.records[record]["fields"]
                out.append(len(self._encode(i, self._conversation(fields, caption))[0]))
            except ConfigError:
                raise
            except (ValueError, KeyError, TypeError, IndexError):
                out.append(0)
        return out

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        record, caption = self.index[i]
        item = self.reader[record]
        if item is None or item.get("image") is None:
            self.skipped_indices.add(i)
            return None
        conversation = self._conversation(item, caption)
        try:
            encoded = self._encode(i, conversation)
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError) as error:
            if i not in self.skipped_indices and self.skipped < 3:
                log.warning("skipping sample %d of %s: %s", record, self.reader.source, error)
            self.skipped_indices.add(i)
            return None
        return {"image": item["image"], "conversations": conversation, "encoded": encoded}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            item = self[i]
            if item is not None:
                yield item


def build_conversations(
    source: DataSource, *, image_size: int, collator: VLMCollator, caption_prompt: str, augment: bool = False,
    in_memory: bool = False,
) -> Conversations:
    """The training samples of ``source``: images resized and centre-cropped, a fixed transform as LLaVA's
    preprocessing is (``augment``: RandomResizedCrop, scale 0.9-1, on every read), decoded once and kept
    (``in_memory``, fixed transform only) or on every read."""
    if in_memory and augment:
        raise ConfigError("in_memory=true keeps each image as decoded and resized once, which a random crop "
                          "cannot work with; set augment=false or in_memory=false")
    transform = image_transform(image_size, train=augment)
    if source.kind == "llava":
        reader: Any = LlavaInstruct(source.path, source.image_root, transform=transform)
        index = [(i, 0) for i, record in enumerate(reader.records) if record["paths"] is not None]
        text_only = len(reader) - len(index)
        if text_only:
            log.warning("%s: %d text-only conversations left out (one image per conversation)",
                        source.path, text_only)
    else:
        if source.kind == "karpathy":
            reader = CocoCaptions(
                None, source.image_root, transform=transform, karpathy_json=source.path, split=KARPATHY_TRAIN
            )
        else:
            reader = CocoCaptions(source.path, source.image_root, transform=transform)
        index = [
            (i, k)
            for i, record in enumerate(reader.records)
            for k in range(len(record["fields"]["captions"]))
        ]
    if not index:
        raise ValueError(f"{source.path}: no conversation with an image; check the file")
    if in_memory:
        reader = InMemoryRecords(reader, sorted({record for record, _ in index}), name=str(source.path))
    return Conversations(reader, index, kind=source.kind, collator=collator, caption_prompt=caption_prompt)


def shapesworld_texts(root: str | Path) -> list[Path]:
    """The small world's text files (LLaVA, COCO captions, VQA, POPE), in a fixed order."""
    root = Path(root)
    files = sorted({p for pattern in SHAPESWORLD_TEXT for p in root.glob(pattern) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"{root}: no ShapesWorld text files ({', '.join(SHAPESWORLD_TEXT)})")
    return files


def shapesworld_tokenizer(root: str | Path) -> Any:
    """The small world's word-level tokenizer, built from all of its text (deterministic)."""
    return build_tokenizer(texts_from_files(shapesworld_texts(root)))
