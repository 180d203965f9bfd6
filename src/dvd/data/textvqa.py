"""TextVQA (``TextVQA_0.5.1_val.json``): ``{"data": [{"question_id", "question", "image_id", "answers": [10
human answers], ...}]}``, images ``<image_id>.jpg`` under the image folder (``train_images/`` holds val too).

Items are VQAv2's shape, ``dict(image, question_id, question, answers, answer_type, image_id)`` (no answer
types in TextVQA: None), so ``dvd eval vqa --textvqa FILE --images DIR`` scores them with VQA accuracy.
"""

from __future__ import annotations

from pathlib import Path

from dvd.data.image_text import ImageRecords, existing_dir, field, load_json, need
from dvd.data.transforms import ImageTransform


class TextVQA(ImageRecords):
    """TextVQA questions with their answers, as map-style dict items (missing images give None)."""

    def __init__(
        self, json_path: str | Path, image_root: str | Path, *, transform: ImageTransform | None
    ) -> None:
        root = existing_dir(image_root, "TextVQA image folder (train_images)")
        path = Path(json_path)
        doc = need(load_json(path, "TextVQA questions (a 'data' list)"), dict, path, "the top level")
        records = []
        for index, entry in enumerate(field(doc, "data", list, path, "the top level")):
            where = f"data[{index}]"
            entry = need(entry, dict, path, where)
            raw = field(entry, "answers", list, path, where)
            answers = [need(a, str, path, f"{where} answers") for a in raw]
            image_id = field(entry, "image_id", (str, int), path, where)
            fields = {
                "question_id": field(entry, "question_id", (int, str), path, where),
                "question": field(entry, "question", str, path, where),
                "answers": answers,
                "answer_type": None,
                "image_id": image_id,
            }
            name = f"{image_id}.jpg"
            key = str(fields["question_id"])
            records.append({"key": key, "paths": (str(root / name),), "fields": fields})
        super().__init__(records, source=str(path), transform=transform)
