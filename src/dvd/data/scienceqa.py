"""ScienceQA in LLaVA's format (``llava_test_CQM-A.json``): a JSON list of
``{"id", "image"?, "conversations": [{"from": "human", "value": "Context: ...\\nQuestion: ...\\nOptions:
(A) ... (B) ...\\n<image>"}, {"from": "gpt", "value": "B"}]}``, images under ``images/test/<id>/``.

Items are ``dict(image, id, question, answer, n_choices, has_image)``: ``question`` is the human turn
with ``<image>`` removed (as LLaVA's ``model_vqa_science`` does), ``answer`` the correct letter (the gpt
turn is a bare letter or LLaVA's "The answer is B."), ``n_choices`` the number of lettered options.
:func:`scienceqa_split` separates the image questions (an :class:`ImageRecords`) from the text-only ones.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dvd.data.image_text import ImageRecords, existing_dir, field, load_json, need
from dvd.data.transforms import ImageTransform

OPTIONS = "ABCDE"
_OPTION = re.compile(r"\(([A-E])\)")
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_letter(text: str) -> str | None:
    """The option letter of an answer, read as LLaVA's ``eval_science_qa.py`` reads it: the whole text is a
    letter, or it starts with "X. ", or it says "The answer is X." exactly once; else None."""
    if text in OPTIONS:
        return text or None
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def is_correct(text: str, answer: str, n_choices: int) -> bool:
    """Whether a generated ``text`` picks ``answer`` among the first ``n_choices`` letters."""
    letter = parse_letter(text.strip())
    return letter is not None and letter == answer and OPTIONS.index(letter) < n_choices


def read_scienceqa(path: str | Path) -> list[dict[str, Any]]:
    """The questions of a LLaVA-format ScienceQA file, checked (one-line errors naming the entry)."""
    path = Path(path)
    doc = load_json(path, "ScienceQA questions (LLaVA's llava_test_CQM-A.json)")
    doc = need(doc, list, path, "the top level")
    out = []
    for index, entry in enumerate(doc):
        where = f"entry {index}"
        entry = need(entry, dict, path, where)
        turns = field(entry, "conversations", list, path, where)
        if len(turns) < 2:
            raise ValueError(f"{path}: {where} needs a human question and a gpt answer")
        human = need(turns[0], dict, path, f"{where} conversations[0]")
        gpt = need(turns[1], dict, path, f"{where} conversations[1]")
        question = field(human, "value", str, path, where).replace("<image>", "").strip()
        answer = parse_letter(field(gpt, "value", str, path, where).strip())
        if answer is None:
            raise ValueError(f"{path}: {where} answer {gpt['value'][:30]!r} is not an option letter")
        choices = len(set(_OPTION.findall(question.split("Options:", 1)[-1])))
        image = entry.get("image")
        out.append(
            {
                "id": str(field(entry, "id", (str, int), path, where)),
                "image_file": need(image, str, path, f"{where} image") if image is not None else None,
                "question": question,
                "answer": answer,
                "n_choices": choices or len(OPTIONS),
            }
        )
    if not out:
        raise ValueError(f"{path}: no questions")
    return out


class ScienceQAImages(ImageRecords):
    """The ScienceQA questions that have an image, as map-style dict items (missing images give None)."""

    def __init__(
        self,
        questions: list[dict[str, Any]],
        image_root: str | Path,
        *,
        source: str,
        transform: ImageTransform,
    ) -> None:
        root = existing_dir(image_root, "ScienceQA image folder (images/test)")
        records = []
        for q in questions:
            fields = {k: q[k] for k in ("id", "question", "answer", "n_choices")} | {"has_image": True}
            records.append({"key": q["id"], "paths": (str(root / q["image_file"]),), "fields": fields})
        super().__init__(records, source=source, transform=transform)


def scienceqa_split(
    questions_json: str | Path, image_root: str | Path, *, transform: ImageTransform
) -> tuple[ScienceQAImages | None, list[dict[str, Any]]]:
    """(image questions as a dataset or None if there are none, text-only questions as dicts)."""
    questions = read_scienceqa(questions_json)
    with_image = [q for q in questions if q["image_file"] is not None]
    text_only = [
        {k: q[k] for k in ("id", "question", "answer", "n_choices")} | {"has_image": False}
        for q in questions
        if q["image_file"] is None
    ]
    images = (
        ScienceQAImages(with_image, image_root, source=str(questions_json), transform=transform)
        if with_image
        else None
    )
    return images, text_only
