"""MME: yes/no accuracy and acc+ per subtask, and the perception and cognition scores, as MME's
``eval_tool/calculation.py`` computes them (clean).

An answer is read as MME reads it: lower-cased, "yes"/"no" as is, else "yes" (then "no") if it occurs in
the first four characters, else neither (wrong). Per subtask: ``accuracy`` over questions, ``acc_plus``
over images (both questions right), ``score`` = 100 x (accuracy + acc+); perception (10 subtasks, at most
2000) and cognition (4 subtasks, at most 800) are the sums of their subtasks' scores.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dvd.config import ConfigError, positive_int
from dvd.data.mme import COGNITION, MME, PERCEPTION
from dvd.eval import vlm_attack as va
from dvd.eval import vlm_protocols as vp
from dvd.eval.results import ResultRow
from dvd.eval.spec import VLM_DEFAULTS, EvalSpec
from dvd.models.llava_preprocess import model_transform
from dvd.models.vlm_base import VisionLanguageModel

__all__ = ["evaluate_mme", "mme_answer", "mme_scores"]

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's MME prompt suffix


def mme_answer(text: str) -> str:
    """"yes", "no" or "other", as MME's ``parse_pred_ans`` reads a (lower-cased) answer."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def mme_scores(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per subtask ``accuracy``, ``acc_plus`` (fractions), ``score`` (x100) and ``n``, plus the
    ``perception`` / ``cognition`` totals (records: subtask, image_name, label, output)."""
    by_subtask: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_subtask[r["subtask"]][r["image_name"]].append(mme_answer(r["output"]) == r["label"])
    out: dict[str, dict[str, float]] = {}
    for subtask, images in by_subtask.items():
        answers = [ok for oks in images.values() for ok in oks]
        accuracy = sum(answers) / len(answers)
        acc_plus = sum(all(oks) for oks in images.values()) / len(images)
        out[subtask] = {
            "accuracy": accuracy,
            "acc_plus": acc_plus,
            "score": 100 * (accuracy + acc_plus),
            "n": len(answers),
        }
    for total, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
        present = [s for s in members if s in out]
        if present:
            score = sum(out[s]["score"] for s in present)
            out[total] = {"score": score, "n": sum(out[s]["n"] for s in present)}
    return out


class _MME(va.QuestionTask):
    """The task for :func:`dvd.eval.vlm_attack.evaluate_outputs` (clean only)."""

    def references(self, position: int, item: dict[str, Any]) -> list[str]:
        return ["Yes" if item["label"] == "yes" else "No"]

    def score(self, position: int, item: dict[str, Any], text: str) -> float:
        return float(mme_answer(text) == item["label"])

    def record(self, position: int, item: dict[str, Any]) -> dict[str, Any]:
        return {k: item[k] for k in ("question_id", "subtask", "image_name", "label")}


def evaluate_mme(
    model: VisionLanguageModel,
    data: Any,
    spec: EvalSpec | None = None,
    *,
    suffix: str = SHORT_ANSWER,
    **settings: Any,
) -> list[ResultRow]:
    """Clean MME rows: ``{dataset}/{subtask}`` accuracy, acc_plus, score; ``{dataset}`` perception and
    cognition (metric names), each the sum of its subtasks' scores."""
    spec = EvalSpec.of(spec, settings, **VLM_DEFAULTS, attack="none", dataset_name="mme", max_new_tokens=10)
    (budget,) = va.evaluate_outputs(
        model,
        data,
        _MME(suffix),
        spec=spec.replace(steps=0),
        task_name="mme",
        attack="none",
        stages=[],
        settings={"suffix": suffix},
    )
    scores = mme_scores([{**s, "output": s["outputs"][0]} for s in budget.samples])
    rows = []
    for name, values in sorted(scores.items()):
        total = name in ("perception", "cognition")
        dataset = spec.dataset_name if total else f"{spec.dataset_name}/{name}"
        for metric, value in values.items():
            if metric != "n":
                row = spec.row(
                    task="mme",
                    dataset=dataset,
                    metric=name if total else metric,
                    attack="none",
                    eps=0.0,
                    steps=0,
                    clean=value,
                    adversarial=None,
                    n=int(values["n"]),
                    seconds=budget.seconds,
                    skipped=budget.skipped,
                )
                rows.append(row)
    return rows


def cli(argv: Sequence[str]) -> int:
    """``dvd eval mme``: MME accuracy and acc+ per subtask, perception and cognition scores (clean)."""
    parser = argparse.ArgumentParser(prog="dvd eval mme", description=cli.__doc__)
    va.add_vlm_arguments(parser, attacks=("none",), attack="none")
    parser.add_argument("--data", default=None, help="a ShapesWorld root (mme/)")
    parser.add_argument("--mme", default=None, help="MME_Benchmark_release_version (subtask folders)")
    parser.add_argument("--subtasks", default=None, help="comma-separated subtask folders (default: all)")
    parser.add_argument(
        "--images-per-subtask", default=None,
        help="only the questions of each subtask's first N images, by file name (default: every image)",
    )
    parser.add_argument("--suffix", default=SHORT_ANSWER, help="appended to every question")
    vp.add_protocol_arguments(parser)
    args = parser.parse_args(list(argv))
    protocol = vp.apply_protocol(parser, args, "mme")
    common = va.parse_vlm(args, ("none",))
    if args.data is not None:
        root, name = Path(args.data) / "mme", "shapesworld/mme"
    elif args.mme is not None:
        root, name = Path(args.mme), "mme"
    else:
        raise ConfigError("give --data SHAPESWORLD_ROOT or --mme MME_Benchmark_release_version")
    subtasks = tuple(s.strip() for s in args.subtasks.split(",") if s.strip()) if args.subtasks else None
    images = args.images_per_subtask
    images = None if images is None else positive_int(images, "--images-per-subtask")
    model = va.load_from_args(args)
    vp.use_template(model, args.template)
    data = MME(root, transform=model_transform(model), subtasks=subtasks, images_per_subtask=images)
    spec = common.spec.replace(dataset_name=args.dataset_name or name)
    rows = evaluate_mme(model, data, spec, suffix=args.suffix)
    return va.finish(vp.stamp(rows, protocol, model), common.out, common.state_dir, common.checkpoint)
