"""The command-line side of the CLIP evaluations (``dvd eval zeroshot`` / ``retrieval``): their options on
top of the common ones, the model they load, the datasets they name, the rows they write."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dvd.config import ConfigError, suggest
from dvd.data.transforms import image_transform
from dvd.data.zeroshot import load_zeroshot
from dvd.eval.arguments import add_common_arguments
from dvd.eval.options import mark_rows
from dvd.eval.results import ResultRow, format_table, remove_states, write_rows
from dvd.eval.zeroshot_classifier import ZeroShotData
from dvd.models.clip import create_clip

DEFAULT_EPS = "1/255,2/255,4/255"


def add_clip_arguments(parser: argparse.ArgumentParser, *, attack: str, attack_help: str) -> None:
    """The options of every CLIP evaluation: the common ones (``--model`` as :func:`create_from_args` reads
    it), the model's pretrained weights and precision."""
    add_common_arguments(
        parser,
        model_help="open_clip name, hf-hub:org/name, config .json or checkpoint dir",
        eps=DEFAULT_EPS,
        attack=attack,
        attack_help=attack_help,
        batch_size="64",
    )
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local weights file")
    parser.add_argument("--precision", default="fp32", help="model weights precision (open_clip's names)")
    parser.add_argument(
        "--dataset-root", default=None, help="root for wds/<name> ({dataset} placeholders allowed)"
    )


def create_from_args(args: argparse.Namespace) -> nn.Module:
    """The CLIP named by ``--model`` / ``--pretrained`` (/ ``--vision-weights``) on ``--device``."""
    torch.manual_seed(args.seed)  # a randomly initialised model (config JSON) is the same on every rerun
    return create_clip(
        args.model,
        pretrained=args.pretrained,
        device=args.device,
        precision=args.precision,
        vision_weights=getattr(args, "vision_weights", None),
    )


def load_clip(args: argparse.Namespace, model_name: str) -> tuple[nn.Module, Any]:
    """The CLIP of :func:`create_from_args` and its image transform."""
    model = create_from_args(args)
    print(
        f"{model_name}: images are resized (shortest side) and centre-cropped to the model's "
        f"{model.image_size}x{model.image_size} input",
        file=sys.stderr,
    )
    return model, image_transform(model.image_size)


def finish(rows: list[ResultRow], out: Path, state_dir: Path, *, suffix: str = ".json") -> int:
    """Drop the resumable states of ``rows`` (already in ``out``), print them."""
    remove_states(state_dir, rows, suffix=suffix)
    print(format_table(rows))
    print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)
    return 0


def write_marked(out: Path, rows: list[ResultRow], checkpoint: str) -> list[ResultRow]:
    """Merge ``rows`` of the model loaded from ``checkpoint`` into ``out``."""
    write_rows(out, mark_rows(rows, checkpoint))
    return rows


def resolve_datasets(
    spec: str, *, transform: Any, root: str | None = None, split: str = "test"
) -> list[tuple[str, ZeroShotData]]:
    """``(name, data)`` per dataset: a directory, a ShapesWorld root (every task) or ``wds/<name>``."""
    if spec.startswith("wds/"):
        name = spec[len("wds/") :]
        path = wds_path(name, root)
        return [(name, load_zeroshot(path, transform=transform, split=split))]
    path = Path(spec)
    if path.is_dir() and (path / "zeroshot").is_dir():  # a ShapesWorld root: every zero-shot task
        tasks = sorted(p for p in (path / "zeroshot").iterdir() if (p / "classnames.txt").is_file())
        if not tasks:
            raise FileNotFoundError(f"{path}/zeroshot has no task directories with classnames.txt")
        return [(f"shapesworld/{t.name}", load_zeroshot(t, transform=transform, split=split)) for t in tasks]
    if path.is_dir():
        data = load_zeroshot(path, transform=transform, split=split)
        return [(data.name, data)]
    siblings = [p.name for p in path.parent.iterdir() if p.is_dir()] if path.parent.is_dir() else []
    hint = suggest(path.name, siblings) if siblings else ""
    raise FileNotFoundError(
        f"dataset {spec!r} is not a directory{hint}; give a CLIP_benchmark webdataset dir, an ImageFolder "
        "with classnames.txt, a ShapesWorld root, or wds/<name> with --dataset-root"
    )


def wds_path(name: str, root: str | None) -> Path:
    """CLIP_benchmark style: ``--dataset-root`` with ``{dataset}``/``{dataset_cleaned}``, or a parent dir."""
    if root is None:
        raise ConfigError(
            f"wds/{name} needs --dataset-root (the directory holding the CLIP_benchmark wds dirs)"
        )
    cleaned = name.replace("/", "-")
    if "{" in root:
        candidates = [Path(root.format(dataset=name, dataset_cleaned=cleaned))]
    else:
        candidates = [Path(root) / name, Path(root) / f"wds_{cleaned}", Path(root) / cleaned]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    parent = candidates[0].parent
    known = [p.name.removeprefix("wds_") for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
    hint = suggest(cleaned, known) if known else f" ({parent} does not exist)"
    raise ConfigError(f"dataset wds/{name} not found under {root}{hint}")
