"""Command-line pieces every evaluation shares: the model's row name and identity, checked option values.

A row's ``model`` is the model's own name, never a folder such as ``final``: ``--model-name`` if given, else
the name of the training run that wrote the checkpoint (its ``output_dir``, recorded in ``dvd_model.json`` /
``dvd_vlm.json``), else the nearest meaningful folder above ``final``/``latest``/``checkpoints``/``step-N``.
A checkpoint of an intermediate step is named ``RUN@stepN``. ``checkpoint`` (the resolved path, or the name
with its pretrained tag) tells two models with one name apart.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from dvd.config import ConfigError

CHECKPOINT_FILES = ("dvd_model.json", "dvd_vlm.json")
CLIP_CHECKPOINT_FILES = ("open_clip_config.json", "dvd_model.json")
GENERIC_FOLDERS = ("final", "latest", "checkpoints", "checkpoint", "best", "export")
STEP_FOLDER = re.compile(r"^step[-_]?0*(\d+)$")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def model_row_name(model: str, pretrained: str | None = None, vision_weights: str | None = None) -> str:
    """The ``model`` of the result rows for a ``--model`` argument (see the module docstring); a vision-tower
    weights file is appended (``ViT-L-14-openai+fare_eps_4``)."""
    path = Path(model.removeprefix("local-dir:"))
    suffix = f"+{Path(vision_weights).stem}" if vision_weights else ""
    if path.is_dir():
        return _checkpoint_name(path) + suffix
    base = model.rstrip("/").split("/")[-1]
    base = base[: -len(".json")] if base.endswith(".json") else base
    if pretrained:
        base += "-" + Path(pretrained).stem if Path(pretrained).exists() else f"-{pretrained}"
    return base + suffix


def model_checkpoint(model: str, pretrained: str | None = None, vision_weights: str | None = None) -> str:
    """What the model is loaded from, as recorded in the rows: a resolved path, or name + pretrained tag
    (+ the vision-tower weights file)."""
    path = Path(model.removeprefix("local-dir:"))
    source = str(path.resolve()) if path.exists() else model
    if pretrained:
        source += f"+{Path(pretrained).resolve() if Path(pretrained).exists() else pretrained}"
    if vision_weights:
        source += f"+{Path(vision_weights).resolve()}"
    return source


def _checkpoint_name(path: Path) -> str:
    path = path.resolve()
    step = STEP_FOLDER.match(path.name)
    run = _recorded_run_name(path)
    if run is None:
        folder = path
        while folder.name and (folder.name in GENERIC_FOLDERS or STEP_FOLDER.match(folder.name)):
            folder = folder.parent
        run = folder.name or path.name
    return f"{run}@step{int(step.group(1))}" if step else run


def _recorded_run_name(path: Path) -> str | None:
    """The training run's name (its ``output_dir``) recorded in the checkpoint's own JSON, if any."""
    for name in CHECKPOINT_FILES:
        try:
            info = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        config = info.get("metadata", {}).get("config", {}) if isinstance(info, dict) else {}
        output_dir = config.get("output_dir") if isinstance(config, dict) else None
        if isinstance(output_dir, str) and Path(output_dir).name:
            return Path(output_dir).name
    return None


def check_model_argument(model: str, *, kind: str = "CLIP") -> None:
    """Refuse, before anything loads, a weights file as ``--model`` (it goes to ``--pretrained``) and a CLIP
    checkpoint given to a VLM evaluation."""
    path = Path(model)
    if kind == "VLM" and path.is_dir() and any((path / n).is_file() for n in CLIP_CHECKPOINT_FILES):
        raise ConfigError(
            f"{model} is a CLIP checkpoint (open_clip_config.json), not a VLM; give a dvd VLM checkpoint "
            "(dvd_vlm.json, from dvd train vlm) or an HF LLaVA; a CLIP goes to dvd eval zeroshot/retrieval"
        )
    if path.is_file() and path.suffix != ".json":
        where = (
            "an open_clip name with its weights file as --pretrained, "
            if kind == "CLIP"
            else "a Hugging Face LLaVA name or directory, "
        )
        raise ConfigError(
            f"--model {model} is a file; a {kind} --model is a dvd checkpoint directory, {where}"
            + ("an hf-hub:org/name tag or a model-config .json" if kind == "CLIP" else "not a weights file")
            + (f" (e.g. --model ViT-B-32 --pretrained {model})" if path.suffix in WEIGHT_SUFFIXES else "")
        )


def eps_unit(value: str | None) -> float | None:
    """``--eps-unit``: None, or a positive finite number (255 for budgets written as 4)."""
    if value is None:
        return None
    try:
        unit = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--eps-unit {value!r} is not a number; use e.g. --eps-unit 255") from None
    if not math.isfinite(unit) or unit <= 0:
        raise ConfigError(f"--eps-unit {value!r} must be a positive finite number, e.g. 255")
    return unit


def workers(value: str) -> int:
    """``--workers``: a whole number >= 0 of DataLoader worker processes."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--workers {value!r} is not a whole number; give 0 or more processes") from None
    if number < 0:
        raise ConfigError(f"--workers must be >= 0 (0 loads in the main process), got {number}")
    return number


def mark_rows(rows: list[Any], checkpoint: str) -> list[Any]:
    """Record what the model was loaded from in every row (two checkpoints never share a row key)."""
    for row in rows:
        row.checkpoint = checkpoint
    return rows
