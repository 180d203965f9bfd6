"""POPE metric: yes/no object-hallucination scores with POPE's own answer parsing.

"yes" (the object is in the image) is the positive class. A free-form model answer is read as the
POPE evaluation script reads it: only the text before the first period counts, commas are removed, and
the answer is "no" when one of its space-separated words is exactly "no", "No" or "not"; otherwise "yes".
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dvd.config import ConfigError
from dvd.data.pope import Pope
from dvd.eval import vlm_attack as va
from dvd.eval.results import ResultRow
from dvd.eval.spec import VLM_DEFAULTS, EvalSpec
from dvd.models.llava_preprocess import model_transform
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


class _Pope(va.QuestionTask):
    """The POPE task for :func:`dvd.eval.vlm_attack.evaluate_outputs`: attack the NLL of the right answer."""

    def references(self, position: int, item: dict[str, Any]) -> list[str]:
        return [item["label"]]

    def score(self, position: int, item: dict[str, Any], text: str) -> float:
        return float(pope_answer(text) == item["label"])

    def record(self, position: int, item: dict[str, Any]) -> dict[str, Any]:
        return {"question_id": item["question_id"], "label": item["label"]}


def evaluate_pope(
    model: VisionLanguageModel,
    data: Any,
    spec: EvalSpec | None = None,
    *,
    suffix: str = SHORT_ANSWER,
    **settings: Any,
) -> list[ResultRow]:
    """POPE accuracy, precision, recall, F1 and yes-ratio of one POPE file, one row per metric and budget.

    ``data`` is a :class:`dvd.data.pope.Pope`. Clean by default; ``attack="apgd"`` runs APGD (in
    ``spec.precision``, default fp32) against the NLL of the right answer on the questions answered right,
    and a question counts as answered by its attacked answer where that is wrong (so only right answers
    turn wrong: every metric but the yes-ratio can only fall).
    """
    defaults = {**VLM_DEFAULTS, "precision": "fp32"}
    spec = EvalSpec.of(spec, settings, **defaults, attack="none", dataset_name="pope", max_new_tokens=10)
    if spec.attack not in POPE_ATTACKS:
        raise ValueError(f"unknown POPE attack {spec.attack!r}; choose from {', '.join(POPE_ATTACKS)}")
    budgets = va.answer_outputs(
        model, data, _Pope(suffix), spec=spec, task_name="pope", stage="label", settings={"suffix": suffix}
    )
    rows = []
    for budget in budgets:
        labels = [s["label"] for s in budget.samples]
        clean = pope_metrics([s["outputs"][0] for s in budget.samples], labels)
        worst = pope_metrics([_worst(s["outputs"], s["label"]) for s in budget.samples], labels)
        values = {metric: (clean[metric], worst[metric]) for metric in METRICS}
        rows += va.budget_rows(spec, budget, "pope", values, len(labels))
    return rows


def _worst(outputs: Sequence[str], label: str) -> str:
    """The first wrong answer among a question's outputs (clean first), else the clean one."""
    return next((o for o in outputs if pope_answer(o) != label), outputs[0])


def cli(argv: Sequence[str]) -> int:
    """``dvd eval pope``: POPE hallucination metrics per split, clean and optionally under attack."""
    parser = argparse.ArgumentParser(prog="dvd eval pope", description=cli.__doc__)
    va.add_vlm_arguments(parser, attacks=POPE_ATTACKS, attack="none")
    parser.add_argument(
        "--data", default=None, help="a ShapesWorld root (pope/pope_{random,popular,adversarial})"
    )
    parser.add_argument("--pope", action="append", default=None, help="a POPE JSON-lines file; repeatable")
    parser.add_argument("--images", default=None, help="image root")
    parser.add_argument("--suffix", default=SHORT_ANSWER, help="appended to every question")
    args = parser.parse_args(list(argv))
    common = va.parse_vlm(args, POPE_ATTACKS)
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
    model = va.load_from_args(args)
    transform = model_transform(model)
    rows = []
    for path in files:
        name = f"{args.dataset_name}/{path.stem}" if args.dataset_name else prefix + path.stem
        data = Pope(path, images, transform=transform)
        rows += evaluate_pope(model, data, common.spec.replace(dataset_name=name), suffix=args.suffix)
    return va.finish(rows, common.out, common.state_dir, common.checkpoint)
