"""VQAv2: a questions JSON and an annotations JSON (10 human answers per question).

Items are ``dict(image, question_id, question, answers: list[str], answer_type, image_id)``.
VQAv2 files name images only by id, so the file is found with a pattern: COCO's
``COCO_{subtype}_{image_id:012d}.jpg`` (``subtype`` = the questions file's ``data_subtype``), the
COCO-2017 ``{image_id:012d}.jpg``, or ``{image_id}.jpg`` (each also as ``.png``), whichever exists
for the first question; pass ``image_pattern`` (``dvd eval vqa --image-pattern``) to fix it. A question
entry with an ``image`` or ``file_name`` field (LLaVA's VQAv2 files have one) uses that name instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dvd.data.image_text import ImageRecords, existing_dir, field, load_json, need
from dvd.data.transforms import ImageTransform

IMAGE_PATTERNS = tuple(
    f"{stem}.{ext}"
    for stem in ("COCO_{subtype}_{image_id:012d}", "{image_id:012d}", "{image_id}")
    for ext in ("jpg", "png")
)


def _name(pattern: str, subtype: str, image_id: Any) -> str | None:
    try:
        return pattern.format(subtype=subtype, image_id=image_id)
    except (KeyError, IndexError, ValueError):  # e.g. a string id with a {:012d} pattern
        return None


def _answers(annotations: Path | None) -> dict[Any, tuple[list[str], str]]:
    if annotations is None:
        return {}
    doc = need(
        load_json(annotations, "VQAv2 annotations (annotations with answers)"),
        dict,
        annotations,
        "the top level",
    )
    out = {}
    for index, entry in enumerate(field(doc, "annotations", list, annotations, "the top level")):
        where = f"annotations[{index}]"
        entry = need(entry, dict, annotations, where)
        answers = [
            field(
                need(a, dict, annotations, f"{where} answers[{j}]"),
                "answer",
                str,
                annotations,
                f"{where} answers[{j}]",
            )
            for j, a in enumerate(field(entry, "answers", list, annotations, where))
        ]
        if not answers:
            raise ValueError(f"{annotations}: {where} has an empty answers list")
        answer_type = field(entry, "answer_type", str, annotations, where)
        out[field(entry, "question_id", (int, str), annotations, where)] = (answers, answer_type)
    return out


class VQAv2(ImageRecords):
    """VQAv2 questions (+ annotations) as map-style dict items; ``annotations_json=None`` for test sets.

    Without annotations ``answers`` is empty and ``answer_type`` None. Corrupt or missing images give
    None; batch with :func:`dvd.data.image_text.collate_dicts`.
    """

    def __init__(
        self,
        questions_json: str | Path,
        annotations_json: str | Path | None,
        image_root: str | Path,
        *,
        transform: ImageTransform | None,
        image_pattern: str | None = None,
    ) -> None:
        root = existing_dir(image_root, "VQA image root")
        path = Path(questions_json)
        doc = need(load_json(path, "VQAv2 questions (questions with image_id)"), dict, path, "the top level")
        subtype = need(doc.get("data_subtype", ""), str, path, "'data_subtype'")
        questions = field(doc, "questions", list, path, "the top level")
        answers = _answers(Path(annotations_json) if annotations_json is not None else None)
        records = []
        for index, entry in enumerate(questions):
            where = f"questions[{index}]"
            entry = need(entry, dict, path, where)
            question_id = field(entry, "question_id", (int, str), path, where)
            image_id = field(entry, "image_id", (int, str), path, where)
            given = next(
                (field(entry, k, str, path, where) for k in ("image", "file_name") if k in entry), None
            )
            if answers and question_id not in answers:
                raise ValueError(
                    f"{annotations_json}: no annotation for question_id {question_id!r} of {path}"
                )
            answer_list, answer_type = answers.get(question_id, ([], None))
            fields = {
                "question_id": question_id,
                "question": field(entry, "question", str, path, where),
                "answers": answer_list,
                "answer_type": answer_type,
                "image_id": image_id,
            }
            records.append({"key": str(question_id), "given": given, "image_id": image_id, "fields": fields})
        pattern = self._find_pattern(records, root, subtype, [image_pattern] if image_pattern else None)
        for record in records:
            name = record.pop("given") or _name(pattern, subtype, record.pop("image_id"))
            record.pop("image_id", None)
            record["paths"] = (str(root / name),) if name else (str(root / f"<no {pattern} for this id>"),)
        super().__init__(records, source=str(path), transform=transform)

    @staticmethod
    def _find_pattern(
        records: list[dict[str, Any]], root: Path, subtype: str, patterns: list[str] | None = None
    ) -> str:
        """The first of ``patterns`` (default IMAGE_PATTERNS) naming an existing file for the first
        id-only question."""
        patterns = patterns or list(IMAGE_PATTERNS)
        first = next((r for r in records if r["given"] is None), None)
        if first is None:
            return patterns[0]
        tried = [n for n in (_name(p, subtype, first["image_id"]) for p in patterns) if n]
        for pattern in patterns:
            name = _name(pattern, subtype, first["image_id"])
            if name and (root / name).is_file():
                return pattern
        raise FileNotFoundError(
            f"{root}: no file for image_id {first['image_id']!r}; tried {', '.join(tried)}; give the file "
            "name pattern with --image-pattern, e.g. 'COCO_test2015_{image_id:012d}.jpg'"
        )
