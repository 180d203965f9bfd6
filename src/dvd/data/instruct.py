"""LLaVA instruction data: a JSON list of ``{"id", "image", "conversations": [{"from", "value"}]}``.

Items are ``dict(image, conversations, id)``. ``conversations`` alternate ``human`` / ``gpt`` turns;
the first human turn carries the ``<image>`` token where the image goes. Entries without an
``image`` (LLaVA's text-only ShareGPT turns) are kept with ``image`` None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dvd.data.image_text import ImageRecords, existing_dir, field, load_json, need
from dvd.data.transforms import ImageTransform


def _conversation(path: Path, where: str, turns: list[Any]) -> list[dict[str, str]]:
    if not turns:
        raise ValueError(f"{path}: {where} has an empty conversations list")
    out = []
    for index, turn in enumerate(turns):
        spot = f"{where} conversations[{index}]"
        turn = need(turn, dict, path, spot)
        out.append(
            {"from": field(turn, "from", str, path, spot), "value": field(turn, "value", str, path, spot)}
        )
    return out


class LlavaInstruct(ImageRecords):
    """LLaVA's stage-1 (caption) or stage-2 (instruction) JSON as map-style dict items.

    Image paths are relative to ``image_root`` (LLaVA's ``image_folder``). Corrupt or missing images
    give None; batch with :func:`dvd.data.image_text.collate_dicts`.
    """

    def __init__(self, json: str | Path, image_root: str | Path, *, transform: ImageTransform | None) -> None:
        root = existing_dir(image_root, "LLaVA image folder")
        path = Path(json)
        entries = need(
            load_json(path, "LLaVA conversations (a list of id, image, conversations)"),
            list,
            path,
            "the top level",
        )
        records = []
        for index, entry in enumerate(entries):
            where = f"entry {index}"
            entry = need(entry, dict, path, where)
            entry_id = field(entry, "id", (int, str), path, where) if "id" in entry else str(index)
            image = field(entry, "image", str, path, where) if "image" in entry else None
            fields = {
                "conversations": _conversation(path, where, field(entry, "conversations", list, path, where)),
                "id": entry_id,
            }
            paths = (str(root / image),) if image is not None else None
            records.append({"key": str(entry_id), "paths": paths, "fields": fields})
        super().__init__(records, source=str(path), transform=transform)
