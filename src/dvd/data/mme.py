"""MME (``MME_Benchmark_release_version``): one folder per subtask, two yes/no questions per image.

A subtask folder holds either ``images/`` + ``questions_answers_YN/`` (artwork, celebrity, landmark,
posters, scene) or the images and their ``.txt`` files side by side (the others); each ``<stem>.txt`` has
one ``question<TAB>Yes|No`` line per question about the image ``<stem>.{jpg,png}``. Items are
``dict(image, subtask, image_name, question, label, question_id)`` with ``label`` "yes" or "no".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dvd.data.image_text import ImageRecords, existing_dir
from dvd.data.transforms import ImageTransform

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


def _question_files(folder: Path) -> tuple[list[Path], Path]:
    """The subtask's ``.txt`` files and the folder holding its images."""
    nested = folder / "questions_answers_YN"
    if nested.is_dir():
        return sorted(nested.glob("*.txt")), folder / "images"
    return sorted(folder.glob("*.txt")), folder


def read_subtask(folder: Path, images: int | None = None) -> list[dict[str, Any]]:
    """The questions of one MME subtask folder (one-line errors naming file and line); with ``images``, those
    of its first ``images`` images only (by file name), each with all its questions."""
    files, image_dir = _question_files(folder)
    out = []
    for path in files[:images]:
        candidates = [image_dir / f"{path.stem}{suffix}" for suffix in IMAGE_SUFFIXES]
        image = next((c for c in candidates if c.is_file()), candidates[0])
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for number, line in enumerate(lines, 1):
            if "\t" not in line:
                raise ValueError(f"{path}: line {number} is not 'question<TAB>Yes|No'")
            question, label = line.rsplit("\t", 1)
            label = label.strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"{path}: line {number} answer {label[:20]!r} must be Yes or No")
            out.append(
                {
                    "subtask": folder.name,
                    "image_name": image.name,
                    "question": question.strip(),
                    "label": label,
                    "question_id": f"{folder.name}/{path.stem}/{number}",
                    "path": str(image),
                }
            )
    return out


class MME(ImageRecords):
    """Every subtask folder under ``root`` (or only ``subtasks``), as map-style dict items; with
    ``images_per_subtask``, the questions of each subtask's first that many images (both of an image's
    questions, so that acc+ still reads whole images)."""

    def __init__(
        self,
        root: str | Path,
        *,
        transform: ImageTransform | None,
        subtasks: tuple[str, ...] | None = None,
        images_per_subtask: int | None = None,
    ) -> None:
        if images_per_subtask is not None and images_per_subtask < 1:
            raise ValueError(
                f"images_per_subtask must be >= 1 (or None: every image), got {images_per_subtask}"
            )
        root = existing_dir(root, "MME root (MME_Benchmark_release_version)")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and (subtasks is None or p.name in subtasks))
        if subtasks is not None and (absent := sorted(set(subtasks) - {p.name for p in folders})):
            raise FileNotFoundError(f"{root}: no subtask folder {', '.join(absent)}")
        records = []
        for folder in folders:
            for q in read_subtask(folder, images_per_subtask):
                path = q.pop("path")
                records.append({"key": q["question_id"], "paths": (path,), "fields": q})
        if not records:
            raise ValueError(f"{root}: no MME questions (expected subtask folders with .txt question files)")
        self.subtasks = sorted({r["fields"]["subtask"] for r in records})
        super().__init__(records, source=str(root), transform=transform)
