"""Result rows: one per model x task x dataset x metric x attack x eps.

Every evaluation writes these and ``report.py`` reads nothing else. Writing merges into the file
atomically and under a file lock, so evaluations of different models or datasets, run one after the other
or at the same time, can share one ``results.json``. A row names its model (``model``) and records what
was loaded (``checkpoint``): two different checkpoints never share a row key silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dvd.attacks import not_falling
from dvd.eval.output import rows_lock
from dvd.io import read_json, write_json

ROW_KEYS = (
    "model",
    "task",
    "dataset",
    "metric",
    "attack",
    "eps",
    "steps",
    "clean",
    "adversarial",
    "n",
    "seconds",
    "seed",
    "flags",
    "versions",
    "skipped",
    "checkpoint",
    "protocol",
    "template",
)
# rows written before these keys existed read with these values
OPTIONAL_KEYS: dict[str, Any] = {"skipped": 0, "checkpoint": "", "protocol": None, "template": None}


@dataclasses.dataclass
class ResultRow:
    """One evaluated number pair: the metric clean and under ``attack`` at budget ``eps``.

    ``eps`` is in pixel units ([0, 1] images); ``eps == 0`` means clean only (``adversarial`` None).
    ``flags`` are the gradient-masking warnings raised while attacking (empty when none fired).
    ``skipped`` counts the samples left out as unreadable (corrupt or missing images, oversized images);
    ``checkpoint`` is what the model was loaded from (a resolved path, or a name with its pretrained tag).
    """

    model: str
    task: str
    dataset: str
    metric: str
    attack: str
    eps: float
    steps: int
    clean: float
    adversarial: float | None
    n: int
    seconds: float
    seed: int
    flags: list[str] = dataclasses.field(default_factory=list)
    versions: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: int = 0
    checkpoint: str = ""
    protocol: str | None = None  # the named evaluation preset (e.g. "robustvlm"), if any
    template: str | None = None  # a VLM's chat template

    @property
    def key(self) -> tuple[Any, ...]:
        """What makes a row unique in a results file; a newer row with the same key replaces the old."""
        return (self.model, self.task, self.dataset, self.metric, self.attack, round(self.eps, 8), self.steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "row") -> ResultRow:
        missing = [k for k in ROW_KEYS if k not in data and k not in OPTIONAL_KEYS]
        if missing:
            raise ValueError(f"{source} lacks result keys {', '.join(missing)}; was it written by dvd?")
        return cls(**{k: data.get(k, OPTIONAL_KEYS.get(k)) for k in ROW_KEYS})


def read_rows(path: str | Path) -> list[ResultRow]:
    """Rows from a results JSON file (a list of row objects)."""
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of result rows, got {type(data).__name__}")
    return [ResultRow.from_dict(item, source=f"{path} row {i}") for i, item in enumerate(data)]


def write_rows(path: str | Path, rows: Iterable[ResultRow]) -> list[ResultRow]:
    """Merge ``rows`` into the file at ``path`` (replacing rows with the same key), atomically, under a lock.

    A row whose key is already in the file for another checkpoint is refused (:func:`check_model_name`).
    Returns the rows now in the file, in file order (old rows first, new keys appended).
    """
    path = Path(path)
    rows = list(rows)
    with rows_lock(path):
        merged: dict[tuple[Any, ...], ResultRow] = {}
        if path.is_file():
            for row in read_rows(path):
                merged[row.key] = row
        for row in rows:
            old = merged.get(row.key)
            if old is not None:
                _refuse_other_checkpoint(path, old, row.model, row.checkpoint)
            merged[row.key] = row
        write_json(path, [row.to_dict() for row in merged.values()])
    return list(merged.values())


def check_model_name(path: str | Path, model: str, checkpoint: str) -> None:
    """Refuse, before any work, a model name that ``path`` already holds rows of for another checkpoint."""
    path = Path(path)
    if path.is_file():
        for row in read_rows(path):
            _refuse_other_checkpoint(path, row, model, checkpoint)


def _refuse_other_checkpoint(path: Path, row: ResultRow, model: str, checkpoint: str) -> None:
    if row.model == model and row.checkpoint and checkpoint and row.checkpoint != checkpoint:
        raise ValueError(
            f"{path} already has rows of model {model!r} from {row.checkpoint}, not {checkpoint}; "
            "give --model-name another name (or another --out)"
        )


def eps_text(eps: float) -> str:
    """``4/255`` for budgets on the 1/255 grid, else the decimal."""
    if eps == 0:
        return "0"
    k = eps * 255
    return f"{round(k)}/255" if math.isclose(k, round(k), abs_tol=1e-3) else f"{eps:.4g}"


def format_table(rows: Sequence[ResultRow]) -> str:
    """A fixed-width text table of rows (percent for rates), for printing after an evaluation."""
    header = ["model", "dataset", "metric", "attack", "eps", "steps", "clean", "adversarial", "n", "flags"]
    lines = [header]
    for r in rows:
        adversarial = "-" if r.adversarial is None else f"{100 * r.adversarial:.1f}"
        flags = ",".join(r.flags) or "-"
        lines.append(
            [
                r.model,
                r.dataset,
                r.metric,
                r.attack,
                eps_text(r.eps),
                str(r.steps),
                f"{100 * r.clean:.1f}",
                adversarial,
                str(r.n),
                flags,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def state_path(
    state_dir: str | Path,
    *,
    task: str,
    model: str,
    dataset: str,
    attack: str,
    steps: int,
    eps: float,
    suffix: str = ".json",
) -> Path:
    """Where an evaluation keeps the resumable state of one (model, dataset, attack, eps).

    The file itself must hold the full configuration it was written for and be checked on load: two
    names may share a slug.
    """
    slug = "__".join(
        re.sub(r"[^A-Za-z0-9._-]+", "-", str(v)).strip("-") or "x"
        for v in (task, model, dataset, attack, steps)
    )
    return Path(state_dir) / f"{slug}__eps{eps:.8f}{suffix}"


def remove_states(state_dir: str | Path, rows: Iterable[ResultRow], *, suffix: str = ".json") -> None:
    """Delete the resumable states behind ``rows`` (once they are written), and the folder if now empty."""
    for row in rows:
        fields = dict(task=row.task, model=row.model, dataset=row.dataset, attack=row.attack, steps=row.steps)
        state_path(state_dir, **fields, eps=row.eps, suffix=suffix).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        Path(state_dir).rmdir()


# ---------------------------------------------------------------------------------------------
# resumable evaluation state, shared by every evaluation command


def load_state(path: Path | None, key: dict[str, Any]) -> dict[str, Any]:
    """The per-sample progress of an interrupted evaluation written under the same ``key``, or a fresh one.

    ``key`` identifies model, data and settings: a state from another configuration is never mixed in.
    """
    fresh = {
        "key": key,
        "position": 0,
        "skipped": 0,
        "clean": [],
        "robust": [],
        "flags": [],
        "seconds": 0.0,
        "finished": False,
    }
    if path is None or not path.is_file():
        return fresh
    try:
        state = read_json(path)
    except ValueError:
        return fresh  # a half-written file cannot happen (atomic writes); anything else is started over
    if state.get("key") != json.loads(json.dumps(key)):
        print(f"note: {path.name} was written by a different configuration; starting over", file=sys.stderr)
        return fresh
    return state


def save_state(path: Path | None, state: dict[str, Any]) -> None:
    """Write the progress atomically (a kill leaves the previous state, never half a file)."""
    if path is not None:
        write_json(path, state)


def flag_rising_robustness(rows: list[ResultRow]) -> None:
    """AutoAttack-style check: robust accuracy must not rise with a larger budget on the same samples."""
    attacked = [r for r in rows if r.eps > 0 and r.adversarial is not None]
    if len({r.n for r in attacked}) == 1 and not_falling({r.eps: r.adversarial for r in attacked}):
        for row in attacked:
            row.flags = sorted({*row.flags, "robust_accuracy_rises_with_eps"})
