"""ShapesWorld in ScienceQA's (LLaVA's format) and MME's layouts: questions whose answers the scene decides.

``write_reasoning_sets(root, seed, test_scenes)`` (called by the world writer with the held-out images)
writes::

  DIR/scienceqa/llava_test_CQM-A.json      multiple choice, "Context/Question/Options", answer letter;
                                           image entries name files under DIR/images; about one in five
                                           questions is text-only (the context decides it)
  DIR/mme/{existence,count,position,color}/<id>.png + <id>.txt   two yes/no questions per image (Yes, No)

Draws come from ``scene_rng(seed, stream, image_id)`` (streams of their own), so the files are
byte-identical for a seed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dvd.data.scienceqa import OPTIONS
from dvd.data.shapesworld_captions import plural
from dvd.data.shapesworld_scenes import NUMBER_WORDS, POSITION_PHRASES, SPEC, Scene, scene_rng
from dvd.io import atomic_write

SCIENCEQA, MME = 60, 61
SCIENCEQA_FILE = "scienceqa/llava_test_CQM-A.json"
MME_SUBTASKS = ("existence", "count", "position", "color")
N_OPTIONS = 3


def _options(rng: np.random.Generator, right: str, pool: Sequence[str]) -> tuple[list[str], str]:
    """``N_OPTIONS`` shuffled choices including ``right``, and the right one's letter."""
    wrong = [p for p in pool if p != right]
    picked = [right] + [wrong[i] for i in rng.choice(len(wrong), size=N_OPTIONS - 1, replace=False)]
    order = rng.permutation(len(picked))
    choices = [picked[i] for i in order]
    return choices, OPTIONS[choices.index(right)]


def _count_word(count: int) -> str:
    return NUMBER_WORDS[count]


def scienceqa_entry(image_id: int, file_name: str, scene: Scene, seed: int) -> dict[str, Any]:
    """One LLaVA-format ScienceQA question about ``scene`` (text-only for about one image in five)."""
    rng = scene_rng(seed, SCIENCEQA, image_id)
    kind = ["shape", "color", "count"][int(rng.integers(3))]
    noun = scene.shape if scene.count == 1 else plural(scene.shape)
    if kind == "shape":
        question, right, pool = "Which shape appears in the image?", scene.shape, list(SPEC.shapes)
        pool = [s for s in pool if s not in scene.present_shapes or s == scene.shape]
    elif kind == "color":
        question, right, pool = f"What color is the {noun}?", scene.color, list(SPEC.colors)
    else:
        question = f"How many {plural(scene.shape)} are there?"
        right, pool = _count_word(scene.count), [_count_word(c) for c in SPEC.counts]
    choices, letter = _options(rng, right, pool)
    text_only = bool(rng.random() < 0.2)
    context = "N/A"
    if text_only:
        context = f"A picture shows {_count_word(scene.count)} {scene.color} {noun}."
    options = " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(choices))
    human = f"Context: {context}\nQuestion: {question}\nOptions: {options}"
    entry: dict[str, Any] = {"id": str(image_id)}
    if not text_only:
        entry["image"] = file_name
        human += "\n<image>"
    entry["conversations"] = [
        {"from": "human", "value": human},
        {"from": "gpt", "value": f"The answer is {letter}."},
    ]
    return entry


def mme_questions(image_id: int, scene: Scene, seed: int) -> dict[str, list[tuple[str, str]]]:
    """Per MME subtask, the (question, Yes|No) pair for ``scene`` (position only for single objects)."""
    rng = scene_rng(seed, MME, image_id)
    suffix = " Please answer yes or no."
    absent = [s for s in SPEC.shapes if s not in scene.present_shapes]
    colours = [c for c in SPEC.colors if c not in {o.color for o in scene.objects}]
    counts = [c for c in SPEC.counts if c != scene.count]
    no_shape = absent[int(rng.integers(len(absent)))]
    no_count = _count_word(counts[int(rng.integers(len(counts)))])
    no_colour = colours[int(rng.integers(len(colours)))]
    many = plural(scene.shape)
    out = {
        "existence": [
            (f"Is there a {scene.shape} in this image?{suffix}", "Yes"),
            (f"Is there a {no_shape} in this image?{suffix}", "No"),
        ],
        "count": [
            (f"Are there {_count_word(scene.count)} {many} in this image?{suffix}", "Yes"),
            (f"Are there {no_count} {many} in this image?{suffix}", "No"),
        ],
        "color": [
            (f"Is there a {scene.color} {scene.shape} in this image?{suffix}", "Yes"),
            (f"Is there a {no_colour} {scene.shape} in this image?{suffix}", "No"),
        ],
    }
    if scene.count == 1 and scene.position is not None:
        others = [p for p in POSITION_PHRASES if p != scene.position]
        wrong = others[int(rng.integers(len(others)))]
        out["position"] = [
            (f"Is the {scene.shape} {POSITION_PHRASES[scene.position]}?{suffix}", "Yes"),
            (f"Is the {scene.shape} {POSITION_PHRASES[wrong]}?{suffix}", "No"),
        ]
    return out


def write_bytes(path: Path, data: bytes) -> None:
    """``data`` to ``path`` atomically (not the world writer's helper: that module imports this one)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_reasoning_sets(
    root: str | Path, seed: int, test_scenes: Sequence[tuple[int, str, Scene]]
) -> dict[str, int]:
    """Write the ScienceQA and MME sets for the held-out images (files under ``root/images``); returns
    ``{file: records}`` for the world's summary (the ScienceQA file; MME's folders hold a pair of files per
    image and subtask)."""
    root = Path(root)
    entries = [scienceqa_entry(i, name, scene, seed) for i, name, scene in test_scenes]
    write_bytes(root / SCIENCEQA_FILE, (json.dumps(entries, indent=1, sort_keys=True) + "\n").encode())
    records = {SCIENCEQA_FILE: len(entries)}
    for image_id, name, scene in test_scenes:
        image = (root / "images" / name).read_bytes()
        for subtask, pairs in mme_questions(image_id, scene, seed).items():
            folder = root / "mme" / subtask
            write_bytes(folder / f"{image_id:012d}.png", image)
            text = "".join(f"{q}\t{a}\n" for q, a in pairs)
            write_bytes(folder / f"{image_id:012d}.txt", text.encode())
    return records
