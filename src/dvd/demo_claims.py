"""The paper's claims as the demo checks them (issue 17's list): each a target, the measured value, the
margin and a verdict, for one seed or over several (a claim holds only if it holds for every seed).
A gain or ratio between two VLMs also gets its standard error over the test samples
(:mod:`dvd.eval.paired`, from the evaluations' ``--save-samples`` records) where they are at hand: how far
another draw of test images could move it.

The margin is in the check's unit and says how far the measured value lies on the holding side of the
target: measured − target for a lower bound (``≥``, ``>``), target − measured for an upper bound (``≤``);
negative: short of the target by that much.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dvd.data.shapesworld_formats import ZEROSHOT_TASKS
from dvd.eval.report import average_rows, eps_label

Row = dict[str, Any]
# (task, model, eps) -> that evaluation's per-sample records (``--save-samples``), None where not saved
SampleSource = Callable[[str, str, float], Sequence[Mapping[str, Any]] | None]
HEADLINE_EPS = 4 / 255
METRIC = {"zeroshot": "accuracy", "caption": "cider", "vqa": "vqa_accuracy"}
ROBUST_VLMS = ("fare-llava", "delta-llava", "delta2-llava")  # clean-llava is the undefended reference
BOUNDS = {">=": "≥", ">": ">", "<=": "≤"}
LEARNABLE = 20.0  # pt above chance the clean CLIP must reach on every zero-shot task (issue 17)
WORLD = "world"  # the claim label of the learnability checks: a property of the world, not of a defence
MARGIN_NOTE = (
    "Margin: how far the measured value lies on the holding side of the target, in the check's unit "
    "(measured − target for ≥ / >, target − measured for ≤; negative: short of the target). "
    "± SE: a VLM gain's or ratio's standard error over the test images / questions (the per-sample "
    "differences' standard deviation / √n; a ratio's by the delta method; the margin in SE in brackets): "
    "how far another draw of test samples could move it."
)


@dataclass(frozen=True)
class Check:
    """One measured part of a claim: ``target`` is ``(bound, value)`` with bound ``>=``, ``>`` or ``<=``."""

    claim: int | str  # the number in issue 17's list, or WORLD
    what: str
    bound: str
    target: float
    unit: str  # "pt" (percentage points), "x" (ratio), "%" (relative change), "CIDEr"
    measured: float | None  # None: not measured (a model or budget missing)
    detail: str = ""
    se: float | None = None  # the standard error of ``measured`` over the test samples, where known

    @property
    def measured_text(self) -> str:
        text = fmt(self.measured, self.unit)
        if self.se is None or self.measured is None or math.isinf(self.measured):
            return text
        return f"{text} ± {self.se:.{2 if self.unit == 'x' else 1}f}"

    @property
    def margin_text(self) -> str:
        text, margin = fmt(self.margin, self.unit, signed=True), self.margin
        return text if not self.se or margin is None else f"{text} ({margin / self.se:.1f} SE)"

    @property
    def margin(self) -> float | None:
        if self.measured is None:
            return None
        return self.target - self.measured if self.bound == "<=" else self.measured - self.target

    @property
    def holds(self) -> bool:
        margin = self.margin
        return margin is not None and (margin > 0 if self.bound == ">" else margin >= 0)

    @property
    def target_text(self) -> str:
        signed = self.unit != "x" and self.bound != "<="  # a gain: "≥ +30.0 pt"; a cost: "≤ 5.0 pt"
        return f"{BOUNDS[self.bound]} {fmt(self.target, self.unit, signed=signed)}"


def fmt(value: float | None, unit: str, *, signed: bool = False) -> str:
    """``value`` in ``unit`` for the report (``–`` when not measured, ``∞`` for an unbounded ratio)."""
    if value is None:
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    digits = 2 if unit == "x" else 1
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return f"{text}×" if unit == "x" else f"{text} {unit}"


def headline(
    rows: Sequence[Row], *, task: str = "zeroshot", eps: float = HEADLINE_EPS
) -> dict[str, dict[str, float]]:
    """Per model: the clean and attacked metric at ``eps``, averaged over the task's datasets."""
    out: dict[str, dict[str, float]] = {}
    metric = METRIC.get(task)
    for r in average_rows(rows, task=task):
        if metric is not None and r["metric"] != metric:
            continue
        if abs(float(r["eps"]) - eps) < 1e-9 and r["adversarial"] is not None:
            out[r["model"]] = {"clean": r["clean"], "adversarial": r["adversarial"], "n": r["n"]}
    return out


def claim_eps(rows: Sequence[Row], tasks: Sequence[str]) -> float | None:
    """4/255 when ``tasks`` were attacked there, else the largest budget they were attacked at."""
    budgets = {float(r["eps"]) for r in rows if r["task"] in tasks and float(r["eps"]) > 0}
    if not budgets:
        return None
    return next((e for e in budgets if abs(e - HEADLINE_EPS) < 1e-9), max(budgets))


def _ratio(num: float, den: float) -> float:
    """``num / den``; against 0: unbounded when ``num`` is not 0, else 1 (equal: both broken)."""
    if den > 0:
        return num / den
    return math.inf if num > 0 else 1.0


def check_claims(rows: Sequence[Row], samples: SampleSource | None = None) -> list[Check]:
    """The checks of claims 1-5 on one seed's result rows (``results.json``), in the list's order, then
    whether the world makes every ShapesWorld zero-shot task learnable (:func:`learnable_checks`).
    ``samples``: where the VLM evaluations' per-sample records are, for the gains' standard errors."""
    return _clip_checks(rows) + _vlm_checks(rows, samples) + learnable_checks(rows)


def sample_se(
    samples: SampleSource | None, task: str, a: str, b: str, eps: float, measured: float, *,
    ratio: bool = False,
) -> float | None:
    """The standard error of ``b``'s attacked-score gain over ``a`` (×100: the claims' CIDEr and pt) or,
    with ``ratio``, of its ratio to ``a``'s, from their per-sample records (:mod:`dvd.eval.paired`); None
    without records, or when they do not give the rows' ``measured`` value (another run's records)."""
    if samples is None or math.isinf(measured):
        return None
    records_a, records_b = samples(task, a, eps), samples(task, b, eps)
    if not records_a or not records_b:
        return None
    from dvd.eval.paired import compare, compare_ratio

    try:
        if ratio:
            paired = compare_ratio(task, records_a, records_b)
            if paired is None:
                return None
            value, se = paired.ratio, paired.se
        else:
            difference = compare(task, records_a, records_b)
            value, se = 100 * difference.mean, 100 * difference.se
    except ValueError:
        return None
    return se if abs(value - measured) < 1e-6 * max(1.0, abs(measured)) else None


def learnable_checks(rows: Sequence[Row]) -> list[Check]:
    """Per ShapesWorld zero-shot task in ``rows``: the clean CLIP's clean accuracy above chance (1 / the
    number of classes), against :data:`LEARNABLE`. A task below it measures nothing: every model's
    attacked accuracy there is near chance whatever its robustness."""
    clean: dict[str, float] = {}
    tasks: set[str] = set()
    for r in rows:
        name = str(r["dataset"]).removeprefix("shapesworld/")
        if r["task"] == "zeroshot" and name in ZEROSHOT_TASKS and r["metric"] == "accuracy":
            tasks.add(name)
            if r["model"] == "clean-clip":
                clean[name] = 100 * float(r["clean"])
    checks = []
    for task in (t for t in ZEROSHOT_TASKS if t in tasks):
        chance = 100 / len(ZEROSHOT_TASKS[task][1])
        got = clean.get(task)
        if got is None:
            measured, detail = None, "clean-clip not evaluated"
        else:
            measured, detail = got - chance, f"clean-clip {got:.1f}% clean, chance {chance:.1f}%"
        what = f"clean CLIP learns shapesworld/{task}: clean accuracy above chance"
        checks.append(Check(WORLD, what, ">=", LEARNABLE, "pt", measured, detail))
    return checks


def _clip_checks(rows: Sequence[Row]) -> list[Check]:
    eps = claim_eps(rows, ("zeroshot",))
    at = eps_label(eps) if eps is not None else "4/255"
    zs = {m: {k: 100 * v for k, v in vals.items() if k != "n"}
          for m, vals in (headline(rows, eps=eps) if eps is not None else {}).items()}
    clean, delta = zs.get("clean-clip"), zs.get("delta-clip")
    gain = cost = None
    detail = "clean-clip or delta-clip not evaluated"
    if clean and delta:
        gain, cost = delta["adversarial"] - clean["adversarial"], clean["clean"] - delta["clean"]
        detail = (f"delta-clip {delta['adversarial']:.1f}% vs clean-clip {clean['adversarial']:.1f}% "
                  f"attacked; clean {delta['clean']:.1f}% vs {clean['clean']:.1f}%")
    what = f"ΔCLIP vs clean CLIP: zero-shot average attacked at {at}, gain"
    checks = [
        Check(1, what, ">=", 30.0, "pt", gain, detail),
        Check(1, "ΔCLIP vs clean CLIP: clean zero-shot cost", "<=", 5.0, "pt", cost, detail),
    ]
    tuned = {m: zs[m]["adversarial"] for m in ("tecoa", "fare") if m in zs}
    lead, detail = None, "delta-clip, tecoa or fare not evaluated"
    if delta and len(tuned) == 2:
        best = max(tuned, key=lambda m: tuned[m])
        lead = delta["adversarial"] - tuned[best]
        detail = f"delta-clip {delta['adversarial']:.1f}% vs {best} {tuned[best]:.1f}% attacked"
    checks.append(Check(2, f"ΔCLIP vs the best of TeCoA / FARE: zero-shot average attacked at {at}, gain",
                        ">=", 15.0, "pt", lead, detail))
    return checks


def _vlm_checks(rows: Sequence[Row], samples: SampleSource | None = None) -> list[Check]:
    eps = claim_eps(rows, ("caption", "vqa"))
    at = eps_label(eps) if eps is not None else "4/255"
    unit = {"caption": "CIDEr", "vqa": "pt"}  # CIDEr x100 as in the captioning papers; VQA accuracy in %
    names = {"caption": "attacked CIDEr", "vqa": "attacked VQA accuracy"}
    scores = {task: headline(rows, task=task, eps=eps) if eps is not None else {} for task in unit}

    def get(task: str, model: str, which: str = "adversarial") -> float | None:
        value = scores[task].get(model, {}).get(which)
        return None if value is None else 100 * value

    def pair(task: str, a: str, b: str, which: str = "adversarial") -> tuple[float, float, str] | None:
        x, y = get(task, a, which), get(task, b, which)
        if x is None or y is None:
            return None
        return x, y, f"{a} {fmt(x, unit[task])} vs {b} {fmt(y, unit[task])}"

    def missing(*models: str) -> str:
        return f"{' or '.join(models)} not evaluated"

    checks = []
    for task, target in (("caption", 1.3), ("vqa", 1.2)):
        got = pair(task, "delta2-llava", "fare-llava")
        what = f"Δ²LLaVA vs fare-llava (prior art): {names[task]} at {at}, ratio"
        ratio = _ratio(got[0], got[1]) if got else None
        se = None if ratio is None else sample_se(samples, task, "fare-llava", "delta2-llava", eps, ratio,
                                                  ratio=True)
        checks.append(Check(3, what, ">=", target, "x", ratio, got[2] if got else missing("fare-llava"), se))
    for task in unit:
        got = pair(task, "delta2-llava", "delta-llava")
        what = f"Δ²LLaVA vs delta-llava (single defence): {names[task]} at {at}, gain"
        gain = got[0] - got[1] if got else None
        se = None if gain is None else sample_se(samples, task, "delta-llava", "delta2-llava", eps, gain)
        checks.append(Check(4, what, ">", 0.0, unit[task], gain,
                            got[2] if got else missing("delta2-llava", "delta-llava"), se))
    got = pair("caption", "delta2-llava", "delta-llava", "clean")
    drop = 100 * (got[1] - got[0]) / got[1] if got and got[1] > 0 else None
    checks.append(Check(4, "Δ²LLaVA vs delta-llava: clean CIDEr drop (relative)", "<=", 10.0, "%", drop,
                        f"clean {got[2]}" if got else missing("delta2-llava", "delta-llava")))
    for task in unit:
        reference = get(task, "clean-llava")
        robust = {m: v for m in ROBUST_VLMS if (v := get(task, m)) is not None}
        gain, detail, se = None, missing("clean-llava", "a robust VLM"), None
        if reference is not None and len(robust) == len(ROBUST_VLMS):
            weakest = min(robust, key=lambda m: robust[m])
            gain = robust[weakest] - reference
            se = sample_se(samples, task, "clean-llava", weakest, eps, gain)
            detail = (f"clean-llava {fmt(get(task, 'clean-llava', 'clean'), unit[task])} clean → "
                      f"{fmt(reference, unit[task])} attacked; the weakest robust VLM, {weakest}: "
                      f"{fmt(robust[weakest], unit[task])} attacked")
        what = f"every robust VLM vs clean-llava (undefended): {names[task]} at {at}, gain of the weakest"
        checks.append(Check(5, what, ">", 0.0, unit[task], gain, detail, se))
    return checks


def verdict(holds: bool, measured: Any) -> str:
    return "not measured" if measured is None else "**holds**" if holds else "**does not hold**"


def claims_table(checks: Sequence[Check]) -> str:
    """The report's claims table for one seed."""
    lines = ["| claim | check | target | measured | margin | verdict | from |", "|" + "---|" * 7]
    for c in checks:
        lines.append(
            f"| {c.claim} | {c.what} | {c.target_text} | {c.measured_text} | "
            f"{c.margin_text} | {verdict(c.holds, c.measured)} | {c.detail} |"
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SeedSpread:
    """One check over several seeds: per-seed values, their range, the smallest margin."""

    check: Check  # the first seed's (its claim, wording and target)
    measured: dict[int, float | None]
    margins: dict[int, float | None]
    holds_per_seed: dict[int, bool]
    texts: dict[int, str] = field(default_factory=dict)  # per seed: the value as shown (with its SE)

    @property
    def holds(self) -> bool:
        return all(self.holds_per_seed.values())

    def known(self) -> list[float]:
        return [v for v in self.measured.values() if v is not None]

    @property
    def worst_margin(self) -> float | None:
        margins = [m for m in self.margins.values() if m is not None]
        return min(margins) if len(margins) == len(self.margins) else None


def claims_over_seeds(per_seed: Mapping[int, Sequence[Check]]) -> list[SeedSpread]:
    """Each check of :func:`check_claims` across seeds (the same checks, in the same order, per seed)."""
    seeds = list(per_seed)
    first = list(per_seed[seeds[0]])
    spreads = []
    for i, check in enumerate(first):
        at = {s: per_seed[s][i] for s in seeds}
        spreads.append(SeedSpread(check, {s: c.measured for s, c in at.items()},
                                  {s: c.margin for s, c in at.items()}, {s: c.holds for s, c in at.items()},
                                  {s: c.measured_text for s, c in at.items()}))
    return spreads


def seeds_claims_table(spreads: Sequence[SeedSpread]) -> str:
    """The claims table over seeds: each seed's value, min, max, the worst margin; a check holds if it
    holds for every seed."""
    seeds = list(spreads[0].measured) if spreads else []
    header = ["claim", "check", "target", *(f"seed {s}" for s in seeds), "min", "max", "worst margin"]
    header.append("verdict")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for sp in spreads:
        c, known = sp.check, sp.known()
        failing = [s for s, ok in sp.holds_per_seed.items() if not ok]
        word = verdict(sp.holds, known or None)
        if known and failing:
            word += f" (seed {', '.join(map(str, failing))})"
        cells = [str(c.claim), c.what, c.target_text,
                 *(sp.texts.get(s) or fmt(sp.measured[s], c.unit) for s in seeds),
                 fmt(min(known), c.unit) if known else "–", fmt(max(known), c.unit) if known else "–",
                 fmt(sp.worst_margin, c.unit, signed=True), word]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
