"""POPE metric: yes/no object-hallucination scores with POPE's own answer parsing.

"yes" (the object is in the image) is the positive class. A free-form model answer is read as the
POPE evaluation script reads it: only the text before the first period counts, commas are removed, and
the answer is "no" when one of its space-separated words is exactly "no", "No" or "not"; otherwise "yes".
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dvd.eval.results import ResultRow
from dvd.io import versions
from dvd.models.llava_preprocess import model_transform

if TYPE_CHECKING:
    from dvd.models.vlm_base import VisionLanguageModel

__all__ = ["evaluate_pope", "pope_answer", "pope_metrics"]

_NEGATIONS = frozenset({"no", "No", "not"})  # case-sensitive, as in the POPE script


def pope_answer(text: str) -> str:
    """Read a model's free-form answer as "yes" or "no" ("No, there is not." -> "no")."""
    first_sentence = text.split(".", 1)[0].replace(",", "")
    return "no" if _NEGATIONS.intersection(first_sentence.split(" ")) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio of free-form answers against "yes"/"no" labels.

    Also returns the confusion counts (tp, fp, tn, fn) and n. Precision (recall, F1) is 0 when nothing is
    predicted (labelled, either is) "yes", where the POPE script would divide by zero.
    """
    if len(predictions) != len(labels):
        raise ValueError(
            f"pope_metrics: {len(predictions)} predictions but {len(labels)} labels; pass one per question"
        )
    if not labels:
        raise ValueError("pope_metrics: no predictions; pass at least one question")
    gold = [label.strip().lower() for label in labels]
    if bad := sorted({g for g in gold if g not in ("yes", "no")}):
        raise ValueError(f"pope_metrics: labels must be 'yes' or 'no', got {bad[:3]}")
    said = [pope_answer(p) for p in predictions]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(said, gold, strict=True))
    fp = sum(p == "yes" and g == "no" for p, g in zip(said, gold, strict=True))
    tn = sum(p == "no" and g == "no" for p, g in zip(said, gold, strict=True))
    fn = len(gold) - tp - fp - tn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(gold),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / len(gold),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": len(gold),
    }


# ------------------------------------------------------------------------------ dvd eval pope

SPLITS = ("random", "popular", "adversarial")
METRICS = ("f1", "accuracy", "precision", "recall", "yes_ratio")
POPE_ATTACKS = ("none", "apgd")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's POPE prompt suffix


@dataclass
class _Pope:
    """The POPE task for :func:`dvd.eval.vlm_attack.evaluate_outputs`: attack the NLL of the right answer."""

    suffix: str

    def prompt(self, item: dict[str, Any]) -> str:
        return item["question"] + self.suffix

    def references(self, position: int, item: dict[str, Any]) -> list[str]:
        return [item["label"]]

    def score(self, position: int, item: dict[str, Any], text: str) -> float:
        return float(pope_answer(text) == item["label"])

    def record(self, position: int, item: dict[str, Any]) -> dict[str, Any]:
        return {"question_id": item["question_id"], "label": item["label"]}


def evaluate_pope(
    model: VisionLanguageModel,
    data: Any,
    *,
    eps_list: Sequence[float] = (),
    attack: str = "none",
    steps: int = 100,
    precision: str = "fp32",
    suffix: str = SHORT_ANSWER,
    max_new_tokens: int = 10,
    batch_size: int = 8,
    limit: int | None = None,
    seed: int = 0,
    model_name: str = "model",
    dataset_name: str = "pope",
    state_dir: str | Path | None = None,
    progress: bool = True,
    save_samples: str | Path | None = None,
) -> list[ResultRow]:
    """POPE accuracy, precision, recall, F1 and yes-ratio of one POPE file, one row per metric and budget.

    ``data`` is a :class:`dvd.data.pope.Pope`. Clean by default; ``attack="apgd"`` runs APGD against the
    NLL of the right answer on the questions answered right, and a question counts as answered by its
    attacked answer where that is wrong (so only right answers turn wrong: every metric but the yes-ratio
    can only fall).
    """
    from dvd.eval import vlm_attack as va

    if attack not in POPE_ATTACKS:
        raise ValueError(f"unknown POPE attack {attack!r}; choose from {', '.join(POPE_ATTACKS)}")
    stages = [va.Stage("label", precision=va.resolve_precision(precision, model.device))]
    budgets = va.evaluate_outputs(
        model,
        data,
        _Pope(suffix),
        task_name="pope",
        eps_list=[0.0] if attack == "none" else eps_list,
        attack=attack,
        stages=stages if attack != "none" else [],
        steps=steps,
        broken_at=0.0,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        limit=limit,
        seed=seed,
        model_name=model_name,
        dataset_name=dataset_name,
        state_dir=state_dir,
        progress=progress,
        settings={"suffix": suffix},
        save_samples=save_samples,
    )
    rows = []
    for budget in budgets:
        labels = [s["label"] for s in budget.samples]
        clean = pope_metrics([s["outputs"][0] for s in budget.samples], labels)
        worst = pope_metrics([_worst(s["outputs"], s["label"]) for s in budget.samples], labels)
        for metric in METRICS:
            rows.append(
                ResultRow(
                    model=model_name,
                    task="pope",
                    dataset=dataset_name,
                    metric=metric,
                    attack=budget.attack,
                    eps=budget.eps,
                    steps=budget.steps,
                    clean=clean[metric],
                    adversarial=worst[metric] if budget.eps > 0 else None,
                    n=len(labels),
                    seconds=round(budget.seconds, 3),
                    seed=seed,
                    flags=[],
                    versions=versions(),
                    skipped=budget.skipped,
                )
            )
    return rows


def _worst(outputs: Sequence[str], label: str) -> str:
    """The first wrong answer among a question's outputs (clean first), else the clean one."""
    return next((o for o in outputs if pope_answer(o) != label), outputs[0])


def cli(argv: Sequence[str]) -> int:
    """``dvd eval pope``: POPE hallucination metrics per split, clean and optionally under attack."""
    from dvd.config import ConfigError
    from dvd.data.pope import Pope
    from dvd.eval import vlm_attack as va

    parser = argparse.ArgumentParser(prog="dvd eval pope", description=cli.__doc__)
    va.add_common_arguments(parser, attacks=POPE_ATTACKS, attack="none")
    parser.add_argument(
        "--data", default=None, help="a ShapesWorld root (pope/pope_{random,popular,adversarial})"
    )
    parser.add_argument("--pope", action="append", default=None, help="a POPE JSON-lines file; repeatable")
    parser.add_argument("--images", default=None, help="image root")
    parser.add_argument("--suffix", default=SHORT_ANSWER, help="appended to every question")
    args = parser.parse_args(list(argv))
    options = va.parse_common(args, POPE_ATTACKS)
    if args.data is not None:
        root = Path(args.data)
        files = [root / "pope" / f"pope_{split}.jsonl" for split in SPLITS]
        images, prefix = Path(args.images) if args.images else root / "images", "shapesworld/"
    elif args.pope and args.images:
        files, images, prefix = [Path(p) for p in args.pope], Path(args.images), ""
    else:
        raise ConfigError("give --data SHAPESWORLD_ROOT, or --pope FILE (repeatable) and --images DIR")
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such POPE file")
    model = va.load_model(args.model, device=args.device, dtype=args.dtype, model_base=args.model_base)
    transform = model_transform(model)
    state_dir = Path(f"{options.out}.partial")
    rows = []
    for path in files:
        name = f"{args.dataset_name}/{path.stem}" if args.dataset_name else prefix + path.stem
        rows += evaluate_pope(
            model,
            Pope(path, images, transform=transform),
            eps_list=options.eps_list,
            attack=options.attack,
            steps=options.steps,
            precision=options.precision,
            suffix=args.suffix,
            max_new_tokens=options.max_new_tokens or 10,
            batch_size=options.batch_size,
            limit=options.limit,
            seed=args.seed,
            model_name=va.model_name_of(args),
            dataset_name=name,
            state_dir=state_dir,
            progress=not args.no_progress,
            save_samples=options.save_samples,
        )
    return va.finish(rows, options.out, state_dir, options.checkpoint)
