"""ShapesWorld: a small procedurally generated image-text world written in the field's real formats.

The scenes (:mod:`dvd.data.shapesworld_scenes`), their captions (:mod:`dvd.data.shapesworld_captions`)
and the files in each format (:mod:`dvd.data.shapesworld_formats`) have their own modules; this one
writes the whole world (:func:`generate`) and is the command line.

``dvd data shapesworld --out DIR`` writes (file names in every JSON are relative to ``DIR/images``)::

  DIR/summary.json                    seed, image size, spec, per-file counts and bytes
  DIR/pretrain/shard-000000.tar ...   webdataset pairs KEY.png, KEY.txt (caption), KEY.json (attributes)
  DIR/pretrain/shards.txt             one shard name per line (brace pattern in summary.json)
  DIR/zeroshot/{shape,color,count,size,texture}/
      classnames.txt, zeroshot_classification_templates.txt, test/0.tar (KEY.png, KEY.cls),
      test/nshards.txt                CLIP_benchmark's webdataset layout; no distractors
  DIR/images/train/<id:012d>.png      training images of the LLaVA sets (and Karpathy "train")
  DIR/images/test/<id:012d>.png       held-out images of the COCO / VQAv2 / POPE sets
  DIR/images/scenes.json              every train/test image's attributes and objects (ground truth)
  DIR/captions/annotations.json       COCO captions (images + annotations, 5 references per image)
  DIR/captions/karpathy_split.json    dataset_coco.json style; test images split into "val" and "test"
  DIR/vqa/questions.json, annotations.json   VQAv2 (10 answers each; entries also carry "image")
  DIR/pope/pope_{random,popular,adversarial}.jsonl
  DIR/llava/stage1_captions.json, stage2_instruct.json

Same seed -> byte-identical files (fixed PNG settings, sorted JSON keys, fixed tar headers); all
randomness comes from ``numpy.random.Generator(PCG64([seed, stream, index]))``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvd.config import ConfigError
from dvd.data.shapesworld_captions import captions
from dvd.data.shapesworld_formats import (
    TEST_IMAGES,
    TRAIN_IMAGES,
    ZEROSHOT_TASKS,
    brace_pattern,
    json_bytes,
    llava_sets,
    png_bytes,
    pope_files,
    pretrain_samples,
    scene_and_image,
    write_bytes,
    write_captions,
    write_tar,
    write_vqa,
    zeroshot_samples,
)
from dvd.data.shapesworld_reasoning import write_reasoning_sets
from dvd.data.shapesworld_scenes import SPEC, Scene, ShapesWorldSpec
from dvd.data.shapesworld_spec import load_spec


def generate(
    out: str | Path,
    *,
    seed: int = 0,
    size: int = 20000,
    image_size: int = 32,
    eval_size: int = 300,
    instruct_size: int | None = None,
    shard_size: int = 5000,
    spec: ShapesWorldSpec = SPEC,
    workers: int = 1,
) -> dict[str, Any]:
    """Write the whole world under ``out`` and return the summary (also written as summary.json).

    ``size`` pre-training pairs; ``eval_size`` held-out images (COCO/VQA/POPE) and zero-shot test images
    per task; ``instruct_size`` LLaVA training images (default ``max(eval_size, size // 10)``); ``spec``
    the priors, radii and captions scenes are drawn with (:mod:`dvd.data.shapesworld_spec`); ``workers``
    processes write the pre-training shards (the same bytes for any number).
    """
    settings = WorldSettings(seed=seed, size=size, image_size=image_size, eval_size=eval_size,
                             instruct_size=instruct_size, shard_size=shard_size, spec=spec)
    return write_world(Path(out), settings, workers=workers)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def cli(argv: list[str]) -> int:
    """``dvd data shapesworld --out DIR [--seed S] [--size N] [--image-size PX] [--eval-size M] [--spec F]``.

    A re-run into an earlier world rewrites it whole with the new settings, the spec included."""
    parser = argparse.ArgumentParser(prog="dvd data shapesworld", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory: new, empty or an earlier ShapesWorld")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=20000, help="pre-training image-text pairs")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels (>= 16)")
    parser.add_argument("--eval-size", type=int, default=300, help="held-out and per-task test images")
    parser.add_argument("--instruct-size", type=int, default=None, help="LLaVA training images")
    parser.add_argument("--shard-size", type=int, default=5000, help="pairs per pre-training shard")
    parser.add_argument(
        "--spec", help="YAML mapping of ShapesWorldSpec overrides (priors, radii, hard captions)"
    )
    parser.add_argument("--workers", type=int, default=1,
                        help="processes writing the pre-training shards (same files for any number)")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec) if args.spec is not None else SPEC
    start = time.perf_counter()
    summary = generate(
        args.out,
        seed=args.seed,
        size=args.size,
        image_size=args.image_size,
        eval_size=args.eval_size,
        instruct_size=args.instruct_size,
        shard_size=args.shard_size,
        spec=spec,
        workers=args.workers,
    )
    seconds = time.perf_counter() - start
    out = Path(args.out)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    pre = summary["pretrain"]
    print(
        f"ShapesWorld (seed {summary['seed']}, {summary['image_size']} px) written to {out} "
        f"in {seconds:.1f} s, {_human_bytes(total)} on disk"
    )
    print(f"  pretrain   {pre['samples']} pairs in {len(pre['shards'])} shard(s): {out / pre['urls']}")
    for task, info in summary["zeroshot"].items():
        print(f"  zeroshot   {task:<8} {info['samples']} images, {len(info['classnames'])} classes")
    images = summary["images"]
    print(f"  images     {images['train']} train (LLaVA), {images['test']} held-out test: {out / 'images'}")
    for name in (
        "captions/annotations.json",
        "vqa/questions.json",
        "pope/pope_random.jsonl",
        "pope/pope_popular.jsonl",
        "pope/pope_adversarial.jsonl",
        "llava/stage1_captions.json",
        "llava/stage2_instruct.json",
    ):
        info = summary["files"][name]
        print(f"  {name:<29} {info['records']:>6} records  {_human_bytes(info['bytes'])}")
    return 0


@dataclass(frozen=True)
class WorldSettings:
    """The sizes, seed and spec of a world (``dvd data shapesworld``'s options)."""

    seed: int = 0
    size: int = 20000  # pre-training pairs
    image_size: int = 32
    eval_size: int = 300  # held-out images (COCO / VQA / POPE) and zero-shot test images per task
    instruct_size: int | None = None  # LLaVA training images; default max(eval_size, size // 10)
    shard_size: int = 5000
    spec: ShapesWorldSpec = SPEC  # priors, radii and captions (``--spec`` overrides)

    @property
    def n_train(self) -> int:
        return self.instruct_size if self.instruct_size is not None else max(self.eval_size, self.size // 10)

    def check(self, out: Path) -> None:
        """One-line errors for settings that cannot make a world in ``out``."""
        if self.seed < 0:
            raise ConfigError(f"--seed must be a non-negative integer, got {self.seed}")
        if self.size < 1:
            raise ConfigError(f"--size must be >= 1 pre-training pairs, got {self.size}")
        if self.image_size < 16:
            raise ConfigError(f"--image-size must be >= 16 pixels, got {self.image_size}")
        if self.eval_size < 2:
            raise ConfigError(f"--eval-size must be >= 2 held-out images, got {self.eval_size}")
        if self.instruct_size is not None and self.instruct_size < 1:
            raise ConfigError(f"--instruct-size must be >= 1 images, got {self.instruct_size}")
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be >= 1 pairs per shard, got {self.shard_size}")
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a directory path")
        for parent in out.parents:
            if parent.exists() and not parent.is_dir():
                raise ConfigError(f"--out {out}: {parent} is a file, not a directory; give another path")
        if out.is_dir() and any(out.iterdir()) and not (out / "summary.json").is_file():
            raise ConfigError(
                f"--out {out} holds other files (no ShapesWorld summary.json); use a new directory"
            )


def _write_images(
    root: Path,
    seed: int,
    stream: int,
    split: str,
    first_id: int,
    n: int,
    image_size: int,
    spec: ShapesWorldSpec,
) -> list[tuple[int, str, Scene, list[str]]]:
    """``n`` images with ids from ``first_id``; the i-th depends only on (seed, stream, i)."""
    rows = []
    for index in range(n):
        image_id = first_id + index
        scene, image, rng = scene_and_image(seed, stream, index, image_size, spec)
        file_name = f"{split}/{image_id:012d}.png"
        path = root / "images" / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(image))
        rows.append((image_id, file_name, scene, captions(scene, rng, 5)))
    return rows


def write_world(root: Path, settings: WorldSettings, workers: int = 1) -> dict[str, Any]:
    """Write every ShapesWorld file under ``root``; returns the summary written to summary.json.

    The world is written into a temporary sibling folder and renamed onto ``root`` at the end, so a
    run killed part-way leaves ``root`` as it was (absent, empty or the previous world), and the next
    run removes the dead run's temporary folder.
    """
    settings.check(root)
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (processes writing the shards), got {workers}")
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_temporaries(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-{os.getpid()}-", dir=root.parent))
    except OSError as error:
        raise ConfigError(f"--out {root}: cannot write there ({error.strerror}); pick another path") from None
    try:
        summary = _write_files(tmp, settings, workers)
        _replace_folder(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _remove_dead_temporaries(root: Path) -> None:
    """Delete ``.NAME.tmp-PID-*`` folders next to ``root`` whose writing process is gone."""
    for folder in root.parent.glob(f".{root.name}.tmp-*"):
        pid = folder.name[len(f".{root.name}.tmp-") :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _replace_folder(new: Path, root: Path) -> None:
    """Rename ``new`` onto ``root``; a previous ``root`` is moved aside first, then deleted."""
    old = None
    if root.exists():
        old = root.with_name(f".{root.name}.old-{os.getpid()}")
        os.replace(root, old)
    os.replace(new, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_shard(root: Path, name: str, settings: WorldSettings, start: int) -> int:
    """Write pre-training shard ``name`` (pairs ``start`` on); returns its sample count."""
    end = min(start + settings.shard_size, settings.size)
    samples = pretrain_samples(settings.seed, start, end, settings.image_size, settings.spec)
    return write_tar(root / "pretrain" / name, samples)


def _write_shards(root: Path, settings: WorldSettings, workers: int) -> dict[str, int]:
    """Every pre-training shard, by ``workers`` forked processes (each shard depends only on the seed and
    its pair indices, so the bytes are the same for any number); shard name -> sample count."""
    offsets = range(0, settings.size, settings.shard_size)
    starts = {f"shard-{k:06d}.tar": start for k, start in enumerate(offsets)}
    workers = min(workers, len(starts))
    if workers <= 1:
        return {name: _write_shard(root, name, settings, start) for name, start in starts.items()}
    # fork: the children need no imports of their own (spawn would import torch again in each)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = {name: pool.submit(_write_shard, root, name, settings, start)
                   for name, start in starts.items()}
        return {name: future.result() for name, future in futures.items()}


def _write_files(root: Path, settings: WorldSettings, workers: int = 1) -> dict[str, Any]:
    """Every file of the world under the fresh folder ``root``; returns the summary."""
    seed, size, image_size, eval_size = settings.seed, settings.size, settings.image_size, settings.eval_size
    shard_size, n_train, spec = settings.shard_size, settings.n_train, settings.spec
    records: dict[str, int] = {}

    counts = _write_shards(root, settings, workers)
    shards = list(counts)
    records.update({f"pretrain/{name}": n for name, n in counts.items()})
    write_bytes(root / "pretrain" / "shards.txt", "".join(f"{s}\n" for s in shards).encode())

    zeroshot = {}
    for task_index, (task, (_, classnames, _, fixed, templates)) in enumerate(ZEROSHOT_TASKS.items()):
        task_dir = root / "zeroshot" / task
        write_bytes(task_dir / "classnames.txt", "".join(f"{c}\n" for c in classnames).encode())
        write_bytes(
            task_dir / "zeroshot_classification_templates.txt", "".join(f"{t}\n" for t in templates).encode()
        )
        write_bytes(task_dir / "test" / "nshards.txt", b"1\n")
        records[f"zeroshot/{task}/test/0.tar"] = write_tar(
            task_dir / "test" / "0.tar", zeroshot_samples(seed, task_index, task, eval_size, image_size, spec)
        )
        zeroshot[task] = {
            "classnames": list(classnames),
            "samples": eval_size,
            "fixed": fixed,
            "shards": [f"zeroshot/{task}/test/0.tar"],
        }

    test = _write_images(root, seed, TEST_IMAGES, "test", 1, eval_size, image_size, spec)
    train = _write_images(root, seed, TRAIN_IMAGES, "train", eval_size + 1, n_train, image_size, spec)
    n_val = max(1, eval_size // 5)
    split_rows = [(*row, "train") for row in train] + [
        (*row, "val" if i < n_val else "test") for i, row in enumerate(test)
    ]
    scenes = [
        {"image_id": image_id, "file_name": file_name, "split": split, **scene.to_json()}
        for image_id, file_name, scene, _, split in split_rows
    ]
    write_bytes(root / "images" / "scenes.json", json_bytes(scenes))
    records["images/scenes.json"] = len(scenes)
    records.update(write_captions(root, split_rows, image_size))
    test_scenes = [(image_id, file_name, scene) for image_id, file_name, scene, _ in test]
    records.update(write_vqa(root, seed, test_scenes, spec))
    records.update(write_reasoning_sets(root, seed, test_scenes))
    for setting, rows in pope_files(seed, test_scenes, spec).items():
        name = f"pope/pope_{setting}.jsonl"
        write_bytes(root / name, b"".join(json_bytes(row) for row in rows))
        records[name] = len(rows)
    stage1, stage2 = llava_sets(seed, train, spec)
    for name, rows in (("llava/stage1_captions.json", stage1), ("llava/stage2_instruct.json", stage2)):
        write_bytes(root / name, json_bytes(rows, indent=1))
        records[name] = len(rows)

    summary = {
        "name": "shapesworld",
        "format_version": 1,
        "seed": seed,
        "image_size": image_size,
        "size": size,
        "eval_size": eval_size,
        "instruct_size": n_train,
        "shard_size": shard_size,
        "spec": spec.to_json(),
        "pretrain": {
            "samples": size,
            "shards": [f"pretrain/{s}" for s in shards],
            "urls": "pretrain/" + brace_pattern(shards),
        },
        "zeroshot": zeroshot,
        "images": {
            "train": len(train),
            "test": len(test),
            "root": "images",
            "splits": {"train": len(train), "val": n_val, "test": len(test) - n_val},
        },
        "files": {
            name: {"records": n, "bytes": (root / name).stat().st_size} for name, n in sorted(records.items())
        },
    }
    text = json_bytes(summary, indent=2)
    write_bytes(root / "summary.json", text)
    return json.loads(text)
