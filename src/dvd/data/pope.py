"""POPE (object hallucination): JSON lines ``{"question_id", "image", "text", "label"}``.

Items are ``dict(image, question, label, question_id)`` with ``label`` "yes" or "no" and
``question`` the yes/no question ("Is there a X in the image?").
"""

from __future__ import annotations

from pathlib import Path

from dvd.data.image_text import ImageRecords, existing_dir, field, need, read_jsonl
from dvd.data.transforms import ImageTransform


class Pope(ImageRecords):
    """One POPE file (random, popular or adversarial sampling) as map-style dict items.

    Corrupt or missing images give None; batch with :func:`dvd.data.image_text.collate_dicts`.
    """

    def __init__(
        self, jsonl: str | Path, image_root: str | Path, *, transform: ImageTransform | None
    ) -> None:
        root = existing_dir(image_root, "POPE image root")
        path = Path(jsonl)
        records = []
        for number, row in read_jsonl(path, "POPE questions (question_id, image, text, label)"):
            where = f"line {number}"
            row = need(row, dict, path, where)
            label = field(row, "label", str, path, where).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"{path}: {where} label {row['label'][:20]!r} must be 'yes' or 'no'")
            image = field(row, "image", str, path, where)
            fields = {
                "question": field(row, "text", str, path, where),
                "label": label,
                "question_id": field(row, "question_id", (int, str), path, where),
            }
            records.append(
                {"key": f"{fields['question_id']}", "paths": (str(root / image),), "fields": fields}
            )
        super().__init__(records, source=str(path), transform=transform)
