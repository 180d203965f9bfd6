"""Two models on the same samples: the mean of their per-sample score differences (or the ratio of their
means) and its standard error.

A gain between two VLMs evaluated on the same images (claim 4's attacked CIDEr, say) is the mean of the
per-image differences; how far it could move on another draw of test images is the standard error of
that mean (the sample standard deviation of the differences over sqrt(n)); a ratio of the two means
``B / A`` gets the delta method's, the standard error of the mean of ``b - (B / A) a`` over ``A``. The
per-sample scores come from the evaluations' ``--save-samples`` records (:mod:`dvd.eval.samples`): CIDEr
of each caption against its image's references with the corpus idf of the evaluated images (the rows' own
metric, so the mean of the per-image scores is the row's value), VQA accuracy of each answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvd.eval.cider import clean_and_worst

Scores = dict[str, tuple[float, float]]  # sample id -> (clean score, worst-case score)


@dataclass(frozen=True)
class PairedDifference:
    """``mean`` of ``b - a`` over ``n`` shared samples and its standard error ``se`` (scores' units)."""

    mean: float
    se: float
    n: int

    def sigmas(self, bound: float = 0.0) -> float | None:
        """How many standard errors ``mean`` lies above ``bound``; None when the differences do not vary."""
        return (self.mean - bound) / self.se if self.se > 0 else None


def paired_difference(a: Mapping[str, float], b: Mapping[str, float]) -> PairedDifference:
    """The mean of ``b[k] - a[k]`` and its standard error; ``a`` and ``b`` must score the same samples."""
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())
        raise ValueError(
            f"the two evaluations scored different samples ({len(only)} in one only, e.g. {only[0]!r}); "
            "evaluate both models with the same --data, --limit and --seed"
        )
    if not a:
        raise ValueError("no samples to compare: both evaluations are empty")
    diffs = [b[k] - a[k] for k in a]
    n = len(diffs)
    mean = math.fsum(diffs) / n
    var = math.fsum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return PairedDifference(mean, math.sqrt(var / n), n)


@dataclass(frozen=True)
class PairedRatio:
    """``ratio`` = mean(b) / mean(a) over ``n`` shared samples and its standard error ``se``."""

    ratio: float
    se: float
    n: int


def paired_ratio(a: Mapping[str, float], b: Mapping[str, float]) -> PairedRatio | None:
    """``mean(b) / mean(a)`` and its delta-method standard error; None when ``mean(a)`` is not positive
    (the ratio is then unbounded or undefined)."""
    paired_difference(a, b)  # the same checks: the same samples, at least one
    n = len(a)
    mean_a, mean_b = math.fsum(a.values()) / n, math.fsum(b.values()) / n
    if mean_a <= 0:
        return None
    ratio = mean_b / mean_a
    residuals = paired_difference({k: ratio * a[k] for k in a}, b)  # b - ratio a: mean 0, its spread
    return PairedRatio(ratio, residuals.se / mean_a, n)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of one ``--save-samples`` JSONL file."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _outputs(record: Mapping[str, Any]) -> Sequence[str]:
    """The clean output first, then every attacked one (a clean-only record: the clean output alone)."""
    return record.get("outputs") or [record["clean"]]


def caption_scores(records: Sequence[Mapping[str, Any]]) -> Scores:
    """Each image's CIDEr, clean and worst case, with the idf of the records' own references (the corpus
    :func:`dvd.eval.captioning.caption_scores` scores, so the means are the caption rows' values)."""
    references = {str(r["id"]): list(r["references"]) for r in records}
    return clean_and_worst(references, {str(r["id"]): _outputs(r) for r in records})


def vqa_scores(records: Sequence[Mapping[str, Any]]) -> Scores:
    """Each question's VQA accuracy, clean and worst case (over the human ``answers`` of the record)."""
    from dvd.eval.vqa import answer_scores

    return {str(r["id"]): answer_scores(_outputs(r), r["answers"]) for r in records}


SCORERS = {"caption": caption_scores, "vqa": vqa_scores}


def _columns(task: str, a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]],
             which: str) -> tuple[dict[str, float], dict[str, float]]:
    column = {"clean": 0, "adversarial": 1}[which]
    scores_a, scores_b = SCORERS[task](a), SCORERS[task](b)
    return {k: v[column] for k, v in scores_a.items()}, {k: v[column] for k, v in scores_b.items()}


def compare(task: str, a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], *,
            which: str = "adversarial") -> PairedDifference:
    """``b`` minus ``a`` on ``task`` ("caption" or "vqa") from two models' records, ``which`` score
    ("clean" or "adversarial": the worst case)."""
    return paired_difference(*_columns(task, a, b, which))


def compare_ratio(task: str, a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], *,
                  which: str = "adversarial") -> PairedRatio | None:
    """``b``'s mean score over ``a``'s on ``task``, as :func:`compare`, with its standard error."""
    return paired_ratio(*_columns(task, a, b, which))
