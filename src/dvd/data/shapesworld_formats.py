"""ShapesWorld writers: webdataset shards, CLIP_benchmark tasks, COCO captions, VQAv2, POPE, LLaVA JSON.

Everything is byte-stable: PNGs with fixed encoder settings, JSON with sorted keys, tar members with
fixed mtime/uid/gid/mode and the USTAR format. :mod:`dvd.data.shapesworld` writes them all; the
layout is documented there.
"""

from __future__ import annotations

import io
import json
import re
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dvd.data.shapesworld_captions import plural, pretrain_caption
from dvd.data.shapesworld_scenes import (
    NUMBER_WORDS,
    SPEC,
    Scene,
    ShapesWorldSpec,
    pick,
    render_array,
    sample_scene,
    scene_rng,
)
from dvd.io import atomic_write

TAR_MTIME = 946684800  # 2000-01-01, fixed so that shards are byte-identical across runs
PNG_COMPRESS_LEVEL = 6
FILE_MODE = 0o644
# independent random streams (the second word of every PCG64 seed)
PRETRAIN, TEST_IMAGES, TRAIN_IMAGES, VQA, POPE, LLAVA, ZEROSHOT = 0, 1, 2, 3, 4, 5, 100
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
BRIEF_PROMPTS = (
    "Describe the image briefly.",
    "Give a short description of this picture.",
    "What does this image show? Answer in one sentence.",
    "Write a brief caption for the image.",
    "Summarize the picture in a few words.",
)
DETAIL_PROMPTS = ("Describe the image.", "What is in this picture?", "Tell me what you see in the image.")

# task -> (scene attribute, class names, attribute values, fixed attributes, templates)
ZEROSHOT_TASKS: dict[str, tuple[str, tuple[str, ...], tuple[Any, ...], dict[str, Any], tuple[str, ...]]] = {
    "shape": (
        "shape",
        SPEC.shapes,
        SPEC.shapes,
        {},
        (
            "a photo of a {c}.",
            "a drawing of a {c} shape.",
            "a picture of a {c}.",
            "an image with a {c} in it.",
            "a {c}.",
            "a simple {c} shape.",
        ),
    ),
    "color": (
        "color",
        tuple(SPEC.colors),
        tuple(SPEC.colors),
        {},
        (
            "a photo of a {c} shape.",
            "a drawing of {c} shapes.",
            "something {c}.",
            "an image of {c} objects.",
            "a {c} object.",
        ),
    ),
    "count": (
        "count",
        tuple(NUMBER_WORDS.values()),
        tuple(NUMBER_WORDS),
        {},
        (
            "a picture of {c} objects.",
            "a photo of {c} shapes.",
            "there are {c} shapes in the image.",
            "{c} shapes.",
        ),
    ),
    "size": (
        "size",
        tuple(SPEC.sizes),
        tuple(SPEC.sizes),
        {},
        (
            "a photo of a {c} shape.",
            "a {c} object.",
            "a drawing of {c} shapes.",
            "an image of something {c}.",
        ),
    ),
    # textures are drawn large: at 32 px a small shape shows too few stripes or dots to be named
    "texture": (
        "texture",
        SPEC.textures,
        SPEC.textures,
        {"size": "large"},
        ("a photo of a {c} shape.", "a {c} object.", "a drawing of {c} shapes.", "an image with {c} shapes."),
    ),
}


# ----------------------------------------------------------------------------------------- byte-stable files


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(array: np.ndarray) -> bytes:
    """A minimal PNG (8-bit RGB, no filter, no metadata) of a uint8 (H, W, 3) array.

    Written directly with zlib: four times faster than PIL for 32 px images, and its bytes do not
    depend on the Pillow version.
    """
    height, width, _ = array.shape
    rows = np.zeros((height, width * 3 + 1), dtype=np.uint8)  # each row starts with filter type 0
    rows[:, 1:] = array.reshape(height, width * 3)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(rows.tobytes(), PNG_COMPRESS_LEVEL)
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def json_bytes(data: Any, *, indent: int | None = None) -> bytes:
    text = json.dumps(
        data,
        sort_keys=True,
        ensure_ascii=False,
        indent=indent,
        separators=(",", ": ") if indent else (",", ":"),
    )
    return (text + "\n").encode()


def _publish(path: Path, write: Callable[[Path], None]) -> None:
    """Atomic write, world-readable like any dataset file (a bare temp file would stay 0600)."""

    def write_readable(tmp: Path) -> None:
        write(tmp)
        tmp.chmod(FILE_MODE)

    atomic_write(path, write_readable)


def write_bytes(path: Path, data: bytes) -> None:
    _publish(path, lambda tmp: tmp.write_bytes(data))


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write webdataset samples ``(key, {ext: bytes})`` with fixed headers; returns the sample count."""
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, files in samples:
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), TAR_MTIME, FILE_MODE
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
                count += 1

    _publish(path, write)
    return count


def brace_pattern(names: list[str]) -> str:
    """``shard-{000000..000003}.tar`` for consecutive numbered shards (webdataset/braceexpand style)."""
    if len(names) == 1:
        return names[0]
    first, last = re.fullmatch(r"(.*?)(\d+)(\.tar)", names[0]), re.fullmatch(r"(.*?)(\d+)(\.tar)", names[-1])
    assert first is not None and last is not None
    return f"{first.group(1)}{{{first.group(2)}..{last.group(2)}}}{first.group(3)}"


# ----------------------------------------------------------------------------------------- scenes


def scene_and_image(
    seed: int, stream: int, index: int, image_size: int, spec: ShapesWorldSpec = SPEC, **fixed: Any
) -> tuple[Scene, np.ndarray, np.random.Generator]:
    rng = scene_rng(seed, stream, index)
    scene = sample_scene(rng, spec, **fixed)
    return scene, render_array(scene, image_size, rng, spec), rng


def pretrain_samples(
    seed: int, start: int, stop: int, image_size: int, spec: ShapesWorldSpec = SPEC
) -> Iterator[tuple[str, dict[str, bytes]]]:
    for i in range(start, stop):
        scene, image, rng = scene_and_image(seed, PRETRAIN, i, image_size, spec)
        text = pretrain_caption(scene, rng, spec)
        key = f"{i:08d}"
        meta = {**scene.to_json(), "caption": text, "key": key, "width": image_size, "height": image_size}
        yield key, {"png": png_bytes(image), "txt": text.encode(), "json": json_bytes(meta)}


def zeroshot_samples(
    seed: int, task_index: int, task: str, n: int, image_size: int, spec: ShapesWorldSpec = SPEC
) -> Iterator[tuple[str, dict[str, bytes]]]:
    attribute, _, values, fixed, _ = ZEROSHOT_TASKS[task]
    for i in range(n):
        label = i % len(values)  # balanced classes
        _, image, _ = scene_and_image(
            seed,
            ZEROSHOT + task_index,
            i,
            image_size,
            spec,
            distractor=False,
            **{attribute: values[label]},
            **fixed,
        )
        yield f"{i:06d}", {"png": png_bytes(image), "cls": str(label).encode()}


# ----------------------------------------------------------------------------------------- VQAv2


def others(value: str, choices: Iterable[str]) -> list[str]:
    """The wrong answers an annotator might give instead of ``value``."""
    return [c for c in choices if c != value]


def _question_pool(
    scene: Scene, rng: np.random.Generator, spec: ShapesWorldSpec
) -> dict[str, list[tuple[str, str, str, list[str]]]]:
    """Unambiguous questions by answer type: (question, answer, question_type, confusable answers)."""
    s, d = scene, scene.distractor
    one = s.count == 1
    noun = s.shape if one else plural(s.shape)
    absent = [x for x in spec.shapes if x not in s.present_shapes]
    colors, yes_no = list(spec.colors), ["yes", "no"]
    asked = pick(rng, s.present_shapes) if rng.random() < 0.5 else pick(rng, absent)
    pool: dict[str, list[tuple[str, str, str, list[str]]]] = {
        "yes/no": [
            (f"Is there a {asked}?", "yes" if asked in s.present_shapes else "no", "is there a", yes_no),
            (
                f"{'Is the' if one else 'Are the'} {noun} striped?",
                "yes" if s.texture == "striped" else "no",
                "is the" if one else "are the",
                yes_no,
            ),
        ],
        "number": [
            (
                f"How many {plural(s.shape)} are there?",
                str(s.count),
                "how many",
                [str(c) for c in (s.count - 1, s.count + 1) if c >= 0],
            )
        ],
        "other": [
            (
                f"What color {'is' if one else 'are'} the {noun}?",
                s.color,
                "what color is the" if one else "what color are the",
                others(s.color, colors),
            ),
            (
                f"What shape {'is the' if one else 'are the'} {s.color} {'object' if one else 'objects'}?",
                s.shape,
                "what shape is the",
                others(s.shape, spec.shapes),
            ),
            (
                f"{'Is the' if one else 'Are the'} {noun} small or large?",
                s.size,
                "is the" if one else "are the",
                others(s.size, list(spec.sizes)),
            ),
            (
                f"{'Is the' if one else 'Are the'} {noun} solid, striped or dotted?",
                s.texture,
                "is the" if one else "are the",
                others(s.texture, spec.textures),
            ),
        ],
    }
    if rng.random() < 0.15:  # now and then ask for a shape that is not there
        x = pick(rng, absent)
        pool["number"][0] = (f"How many {plural(x)} are there?", "0", "how many", ["1"])
    if one and s.position:
        pool["other"].append(
            (f"Where is the {s.shape}?", s.position, "where is the", others(s.position, list(spec.positions)))
        )
    if spec.backgrounds.get(s.background) is not None:
        plain = [b for b, v in spec.backgrounds.items() if v is not None]
        pool["other"].append(
            ("What color is the background?", s.background, "what color is the", others(s.background, plain))
        )
    if d is not None:
        pool["other"].append(
            (f"What color is the {d.shape}?", d.color, "what color is the", others(d.color, colors))
        )
        pool["number"].append((f"How many {plural(d.shape)} are there?", "1", "how many", ["2"]))
    return pool


def vqa_questions(
    scene: Scene, rng: np.random.Generator, spec: ShapesWorldSpec = SPEC
) -> list[tuple[str, str, str, str, list[str]]]:
    """Four questions per image, VQAv2's mix: one yes/no, one number, two other.

    Returns (question, answer, question_type, answer_type, confusable answers).
    """
    pool = _question_pool(scene, rng, spec)
    chosen = [
        ("yes/no", pool["yes/no"][int(rng.integers(len(pool["yes/no"])))]),
        ("number", pool["number"][int(rng.integers(len(pool["number"])))]),
    ]
    for i in rng.choice(len(pool["other"]), size=2, replace=False):
        chosen.append(("other", pool["other"][int(i)]))
    return [(q, a, qt, at, alts) for at, (q, a, qt, alts) in chosen]


def annotator_answers(answer: str, confusable: list[str], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Ten human answers: mostly the truth, with a little annotator noise (never a majority)."""
    noisy = set(rng.choice(10, size=min(3, int(rng.binomial(10, 0.08))), replace=False).tolist())
    answers = []
    for i in range(10):
        if i in noisy and confusable:
            text, confidence = pick(rng, confusable), pick(rng, ("maybe", "no"))
        else:
            text, confidence = answer, "yes" if rng.random() < 0.9 else "maybe"
        answers.append({"answer": text, "answer_confidence": confidence, "answer_id": i + 1})
    return answers


def write_vqa(
    root: Path, seed: int, images: list[tuple[int, str, Scene]], spec: ShapesWorldSpec = SPEC
) -> dict[str, int]:
    info = {"description": "ShapesWorld VQA in VQAv2 format", "version": "1.0", "year": 2025}
    questions, annotations = [], []
    for image_id, file_name, scene in images:
        rng = scene_rng(seed, VQA, image_id)
        for k, (question, answer, qtype, atype, alts) in enumerate(vqa_questions(scene, rng, spec)):
            qid = image_id * 1000 + k
            questions.append(
                {"image_id": image_id, "question": question, "question_id": qid, "image": file_name}
            )
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "image": file_name,
                    "question_type": qtype,
                    "answer_type": atype,
                    "multiple_choice_answer": answer,
                    "answers": annotator_answers(answer, alts, rng),
                }
            )
    common = {
        "info": info,
        "license": {"name": "CC0", "url": ""},
        "data_type": "shapesworld",
        "data_subtype": "test",
    }
    write_bytes(
        root / "vqa" / "questions.json",
        json_bytes({**common, "task_type": "Open-Ended", "questions": questions}),
    )
    write_bytes(root / "vqa" / "annotations.json", json_bytes({**common, "annotations": annotations}))
    return {"vqa/questions.json": len(questions), "vqa/annotations.json": len(annotations)}


# ----------------------------------------------------------------------------------------- POPE


def pope_files(
    seed: int, images: list[tuple[int, str, Scene]], spec: ShapesWorldSpec = SPEC
) -> dict[str, list[dict[str, Any]]]:
    """POPE's three negative-sampling settings over the held-out images.

    Every image asks about each shape present (yes) and as many absent shapes (no): drawn at random,
    the most frequent shapes of the set ("popular"), or those most often seen with the present ones
    ("adversarial"), with frequencies and co-occurrences counted over the same images as in POPE.
    """
    frequency: Counter[str] = Counter()
    together: Counter[tuple[str, str]] = Counter()
    for _, _, scene in images:
        present = scene.present_shapes
        frequency.update(present)
        together.update((a, b) for a in present for b in present if a != b)
    order = {s: i for i, s in enumerate(spec.shapes)}
    out: dict[str, list[dict[str, Any]]] = {"random": [], "popular": [], "adversarial": []}
    for image_id, file_name, scene in images:
        rng = scene_rng(seed, POPE, image_id)
        present = scene.present_shapes
        absent = [s for s in spec.shapes if s not in present]
        n = len(present)
        negatives = {
            "random": [absent[int(i)] for i in rng.choice(len(absent), size=n, replace=False)],
            "popular": sorted(absent, key=lambda s: (-frequency[s], order[s]))[:n],
            "adversarial": sorted(
                absent, key=lambda s: (-sum(together[(p, s)] for p in present), -frequency[s], order[s])
            )[:n],
        }
        for setting, rows in out.items():
            pairs = [(s, "yes") for s in present] + [(s, "no") for s in negatives[setting]]
            for i in rng.permutation(len(pairs)):
                shape, label = pairs[int(i)]
                rows.append(
                    {
                        "question_id": len(rows) + 1,
                        "image": file_name,
                        "text": f"Is there a {shape} in the image?",
                        "label": label,
                    }
                )
    return out


# ----------------------------------------------------------------------------------------- COCO + LLaVA


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def write_captions(
    root: Path, images: list[tuple[int, str, Scene, list[str], str]], image_size: int
) -> dict[str, int]:
    """COCO captions (annotations.json) and a Karpathy-style split file over the same images."""
    coco_images, annotations, karpathy = [], [], []
    for imgid, (image_id, file_name, _, refs, split) in enumerate(images):
        coco_images.append(
            {"id": image_id, "file_name": file_name, "height": image_size, "width": image_size}
        )
        sentences = []
        for ref in refs:
            sentid = len(annotations) + 1
            annotations.append({"id": sentid, "image_id": image_id, "caption": ref})
            sentences.append({"raw": ref, "tokens": _tokens(ref), "imgid": imgid, "sentid": sentid})
        karpathy.append(
            {
                "filepath": "",
                "filename": file_name,
                "imgid": imgid,
                "cocoid": image_id,
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
    info = {"description": "ShapesWorld captions in COCO format", "version": "1.0", "year": 2025}
    coco = {
        "info": info,
        "licenses": [],
        "type": "captions",
        "images": coco_images,
        "annotations": annotations,
    }
    write_bytes(root / "captions" / "annotations.json", json_bytes(coco))
    write_bytes(
        root / "captions" / "karpathy_split.json", json_bytes({"images": karpathy, "dataset": "shapesworld"})
    )
    return {"captions/annotations.json": len(annotations), "captions/karpathy_split.json": len(karpathy)}


def llava_sets(
    seed: int, images: list[tuple[int, str, Scene, list[str]]], spec: ShapesWorldSpec = SPEC
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Stage 1 (brief captions) and stage 2 (mixed multi-turn instructions) in LLaVA's JSON format."""
    stage1, stage2 = [], []
    for index, (image_id, file_name, scene, refs) in enumerate(images):
        rng = scene_rng(seed, LLAVA, index)
        key = f"{image_id:012d}"
        stage1.append(
            {
                "id": key,
                "image": file_name,
                "conversations": [
                    {"from": "human", "value": "<image>\n" + pick(rng, BRIEF_PROMPTS)},
                    {"from": "gpt", "value": refs[0]},
                ],
            }
        )
        turns: list[tuple[str, str]] = [
            (question + SHORT_ANSWER, answer) for question, answer, *_ in vqa_questions(scene, rng, spec)
        ]
        # balanced like POPE: half the presence questions ask about a shape that is there
        absent = [x for x in spec.shapes if x not in scene.present_shapes]
        asked = pick(rng, scene.present_shapes) if rng.random() < 0.5 else pick(rng, absent)
        turns.append(
            (
                f"Is there a {asked} in the image?" + SHORT_ANSWER,
                "yes" if asked in scene.present_shapes else "no",
            )
        )
        turns.append((pick(rng, DETAIL_PROMPTS), refs[int(rng.integers(1, len(refs)))]))
        picked = rng.choice(len(turns), size=int(rng.integers(2, 5)), replace=False)
        conversation = []
        for n, i in enumerate(picked):
            question, answer = turns[int(i)]
            conversation.append({"from": "human", "value": ("<image>\n" if n == 0 else "") + question})
            conversation.append({"from": "gpt", "value": answer})
        stage2.append({"id": key, "image": file_name, "conversations": conversation})
    return stage1, stage2
