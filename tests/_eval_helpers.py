"""Helpers for tests that run ``dvd eval`` on the tiny VLM: the fast settings, one command run whose rows
are checked for shape, and the word tokenizer covering a ShapesWorld's texts."""

from __future__ import annotations

import json
from pathlib import Path

from dvd.cli import main
from dvd.eval.results import ROW_KEYS, read_rows
from dvd.models.vlm import build_tokenizer
from dvd.models.vlm_tokenizer import texts_from_files

FAST = ["--limit", "4", "--batch-size", "2", "--steps", "2", "--max-new-tokens", "6", "--no-progress"]


def world_tokenizer(world: Path):
    """A word tokenizer over every caption, question, answer and instruction of the world at ``world``."""
    files = [
        world / "captions" / "annotations.json",
        world / "vqa" / "questions.json",
        world / "vqa" / "annotations.json",
        world / "llava" / "stage2_instruct.json",
        *sorted((world / "pope").glob("*.jsonl")),
    ]
    return build_tokenizer([*texts_from_files(files), "maybe", "Word"])


def run(command: list[str], out: Path, *args: str) -> list:
    """Run ``dvd COMMAND ARGS --out OUT`` with FAST settings; its rows, checked to be complete design rows."""
    assert main([*command, *args, "--out", str(out), *FAST]) == 0
    assert [list(row) for row in json.loads(out.read_text())] == [list(ROW_KEYS)] * len(read_rows(out))
    assert not Path(f"{out}.partial").exists()  # the resumable state is removed once the rows are written
    return read_rows(out)
