"""The claims the demo checks (issue 17's list 1-5) on hand-made result rows: target, measured value,
margin and verdict, for one seed and over several."""

from __future__ import annotations

import math

import pytest

from dvd.demo_claims import check_claims, claims_over_seeds, claims_table, seeds_claims_table

EPS4 = 4 / 255
# zero-shot accuracy, clean and attacked
ZEROSHOT = {"clean-clip": (0.60, 0.05), "delta-clip": (0.58, 0.50), "tecoa": (0.50, 0.20),
            "fare": (0.55, 0.30)}
# caption CIDEr (as stored: 1.0 = 100) and VQA accuracy, clean and attacked
CAPTION = {"clean-llava": (0.80, 0.20), "fare-llava": (0.75, 0.40), "delta-llava": (0.85, 0.50),
           "delta2-llava": (0.80, 0.60)}
VQA = {"clean-llava": (0.60, 0.20), "fare-llava": (0.55, 0.40), "delta-llava": (0.60, 0.45),
       "delta2-llava": (0.60, 0.50)}


def row(model: str, task: str, dataset: str, metric: str, clean: float, adversarial: float,
        eps: float = EPS4) -> dict:
    return {"model": model, "task": task, "dataset": dataset, "metric": metric, "attack": "apgd",
            "eps": eps, "clean": clean, "adversarial": adversarial, "n": 10}


def results(zeroshot=ZEROSHOT, caption=CAPTION, vqa=VQA, eps: float = EPS4) -> list[dict]:
    rows = []
    for model, (clean, robust) in zeroshot.items():  # two tasks with the same numbers: the mean is them
        rows += [row(model, "zeroshot", f"shapesworld/{t}", "accuracy", clean, robust, eps)
                 for t in ("color", "count")]
    rows += [row(m, "caption", "shapesworld/captions", "cider", *v, eps) for m, v in caption.items()]
    rows += [row(m, "vqa", "shapesworld/vqa", "vqa_accuracy", *v, eps) for m, v in vqa.items()]
    return rows


def by_what(checks) -> dict[str, object]:
    return {c.what: c for c in checks}


def test_every_claim_of_the_list_is_checked_with_target_measured_margin_and_verdict() -> None:
    checks = check_claims(results())
    assert [c.claim for c in checks] == [1, 1, 2, 3, 3, 4, 4, 4, 5, 5, "world", "world"]
    assert all(c.holds for c in checks)
    c = by_what(checks)
    gain = c["ΔCLIP vs clean CLIP: zero-shot average attacked at 4/255, gain"]
    assert (gain.target_text, gain.measured, gain.margin) == ("≥ +30.0 pt", pytest.approx(45.0),
                                                              pytest.approx(15.0))
    cost = c["ΔCLIP vs clean CLIP: clean zero-shot cost"]
    assert cost.target_text == "≤ 5.0 pt" and cost.measured == pytest.approx(2.0)
    assert cost.margin == pytest.approx(3.0) and cost.holds
    lead = c["ΔCLIP vs the best of TeCoA / FARE: zero-shot average attacked at 4/255, gain"]
    assert lead.measured == pytest.approx(20.0) and "fare 30.0%" in lead.detail  # FARE is the better one
    ratio = c["Δ²LLaVA vs fare-llava (prior art): attacked CIDEr at 4/255, ratio"]
    assert ratio.target_text == "≥ 1.30×" and ratio.measured == pytest.approx(1.5)
    assert ratio.margin == pytest.approx(0.2)
    drop = c["Δ²LLaVA vs delta-llava: clean CIDEr drop (relative)"]
    assert drop.measured == pytest.approx(100 * 0.05 / 0.85) and drop.holds
    weakest = c["every robust VLM vs clean-llava (undefended): attacked CIDEr at 4/255, gain of the weakest"]
    assert weakest.measured == pytest.approx(20.0) and "fare-llava" in weakest.detail
    table = claims_table(checks)
    assert table.splitlines()[0] == "| claim | check | target | measured | margin | verdict | from |"
    assert "| ≥ 1.30× | 1.50× | +0.20× | **holds** |" in table


def test_a_claim_short_of_its_target_does_not_hold_and_its_margin_is_negative() -> None:
    caption = {**CAPTION, "delta2-llava": (0.80, 0.44)}  # 1.1x fare-llava's attacked CIDEr, not 1.3x
    checks = by_what(check_claims(results(caption=caption)))
    ratio = checks["Δ²LLaVA vs fare-llava (prior art): attacked CIDEr at 4/255, ratio"]
    assert not ratio.holds and ratio.margin == pytest.approx(-0.2)
    gain = checks["Δ²LLaVA vs delta-llava (single defence): attacked CIDEr at 4/255, gain"]
    assert not gain.holds and gain.measured == pytest.approx(-6.0)  # behind the single defence
    assert "| ≥ 1.30× | 1.10× | -0.20× | **does not hold** |" in claims_table(list(checks.values()))


def test_equal_is_not_higher_for_the_double_defence() -> None:
    vqa = {**VQA, "delta2-llava": (0.60, 0.45)}  # the same attacked VQA accuracy as delta-llava
    check = by_what(check_claims(results(vqa=vqa)))[
        "Δ²LLaVA vs delta-llava (single defence): attacked VQA accuracy at 4/255, gain"]
    assert check.measured == 0.0 and not check.holds


def test_a_prior_art_broken_to_zero_gives_an_unbounded_ratio_unless_both_are() -> None:
    caption = {**CAPTION, "fare-llava": (0.75, 0.0)}
    check = by_what(check_claims(results(caption=caption)))[
        "Δ²LLaVA vs fare-llava (prior art): attacked CIDEr at 4/255, ratio"]
    assert math.isinf(check.measured) and check.holds
    assert "| ≥ 1.30× | ∞ | ∞ | **holds** |" in claims_table([check])
    caption = {**CAPTION, "fare-llava": (0.75, 0.0), "delta2-llava": (0.80, 0.0)}  # both broken: equal
    check = by_what(check_claims(results(caption=caption)))[
        "Δ²LLaVA vs fare-llava (prior art): attacked CIDEr at 4/255, ratio"]
    assert check.measured == 1.0 and not check.holds


def test_missing_models_are_not_measured_rather_than_failed_silently() -> None:
    rows = [r for r in results() if r["task"] == "zeroshot"]  # a --no-vlm demo
    checks = check_claims(rows)
    assert [c.holds for c in checks[:3]] == [True, True, True]
    assert all(c.measured is None and not c.holds for c in checks[3:-2])
    assert all(c.holds for c in checks[-2:])  # the world's checks need the clean CLIP only
    assert claims_table(checks).count("| not measured |") == 7


def test_every_shapesworld_task_must_be_learned_by_the_clean_clip_20_pt_above_its_chance() -> None:
    rows = [row("clean-clip", "zeroshot", f"shapesworld/{task}", "accuracy", clean, 0.0)
            for task, clean in (("color", 1.0), ("shape", 0.16), ("count", 0.45), ("size", 0.70))]
    rows += [row("fare", "zeroshot", "shapesworld/texture", "accuracy", 0.9, 0.1)]  # no clean CLIP row
    rows += [row("clean-clip", "zeroshot", "imagenet", "accuracy", 0.1, 0.0)]  # not a ShapesWorld task
    checks = [c for c in check_claims(rows) if c.claim == "world"]
    names = [c.what.split("/")[1].split(":")[0] for c in checks]
    assert names == ["shape", "color", "count", "size", "texture"]
    shape, color, count, size, texture = checks
    assert shape.measured == pytest.approx(16 - 12.5) and shape.margin == pytest.approx(-16.5)
    assert not shape.holds
    assert "chance 12.5%" in shape.detail and color.holds
    assert count.measured == pytest.approx(20.0) and count.holds  # chance 25%: exactly on the target
    assert size.measured == pytest.approx(20.0) and size.holds  # chance 50%
    assert texture.measured is None and "not evaluated" in texture.detail
    line = "| world | clean CLIP learns shapesworld/shape: clean accuracy above chance | ≥ +20.0 pt | 3.5 pt"
    assert line in claims_table(checks)


def test_without_4_over_255_the_largest_budget_is_used_and_named() -> None:
    checks = check_claims(results(eps=2 / 255))
    assert checks[0].what == "ΔCLIP vs clean CLIP: zero-shot average attacked at 2/255, gain"
    assert "at 2/255" in checks[3].what and checks[3].measured == pytest.approx(1.5)


def test_over_seeds_a_claim_holds_only_if_it_holds_for_every_seed() -> None:
    weak = {**ZEROSHOT, "delta-clip": (0.58, 0.30)}  # seed 1: ΔCLIP only +25 pt over the clean CLIP
    spreads = claims_over_seeds({0: check_claims(results()), 1: check_claims(results(zeroshot=weak)),
                                 2: check_claims(results())})
    gain = spreads[0]
    assert gain.measured == {0: pytest.approx(45.0), 1: pytest.approx(25.0), 2: pytest.approx(45.0)}
    assert not gain.holds and gain.worst_margin == pytest.approx(-5.0)
    assert spreads[1].holds  # the clean cost holds for all three
    table = seeds_claims_table(spreads)
    assert table.splitlines()[0] == (
        "| claim | check | target | seed 0 | seed 1 | seed 2 | min | max | worst margin | verdict |"
    )
    assert ("| ≥ +30.0 pt | 45.0 pt | 25.0 pt | 45.0 pt | 25.0 pt | 45.0 pt | -5.0 pt | "
            "**does not hold** (seed 1) |") in table
    assert "| ≤ 5.0 pt | 2.0 pt | 2.0 pt | 2.0 pt | 2.0 pt | 2.0 pt | +3.0 pt | **holds** |" in table


def _vqa_records(outputs: list[list[str]]) -> list[dict]:
    return [{"id": q, "answers": ["yes"] * 10, "clean": o[0], "outputs": o} for q, o in enumerate(outputs)]


# ten questions: delta-llava 60% clean, 40% attacked; Δ²LLaVA keeps its 60% (questions 4 and 5)
VQA_RECORDS = {
    "delta-llava": _vqa_records([["yes", "yes"]] * 4 + [["yes", "no"]] * 2 + [["no", "no"]] * 4),
    "delta2-llava": _vqa_records([["yes", "yes"]] * 6 + [["no", "no"]] * 4),
}


def test_a_gain_gets_its_standard_error_over_the_test_samples_from_the_saved_records() -> None:
    def source(task: str, model: str, eps: float):
        assert eps == pytest.approx(EPS4)
        return VQA_RECORDS.get(model) if task == "vqa" else None

    vqa = {**VQA, "delta-llava": (0.6, 0.4), "delta2-llava": (0.6, 0.6)}
    checks = by_what(check_claims(results(vqa=vqa), source))
    gain = checks["Δ²LLaVA vs delta-llava (single defence): attacked VQA accuracy at 4/255, gain"]
    # per-question differences: two of 1, eight of 0 -> SD sqrt(1.6 / 9), over sqrt(10)
    assert gain.measured == pytest.approx(20.0) and gain.se == pytest.approx(100 * math.sqrt(1.6 / 90))
    assert (gain.measured_text, gain.margin_text) == ("20.0 pt ± 13.3", "+20.0 pt (1.5 SE)")
    assert "| 20.0 pt ± 13.3 | +20.0 pt (1.5 SE) | **holds** |" in claims_table([gain])
    # claim 3's ratio too, where fare-llava's records are at hand: 60% attacked over its 50%
    def with_fare(task: str, model: str, eps: float):
        fare = _vqa_records([["yes", "yes"]] * 5 + [["no", "no"]] * 5)
        return fare if (task, model) == ("vqa", "fare-llava") else source(task, model, eps)

    vqa3 = {**vqa, "fare-llava": (0.5, 0.5)}
    ratio = by_what(check_claims(results(vqa=vqa3), with_fare))[
        "Δ²LLaVA vs fare-llava (prior art): attacked VQA accuracy at 4/255, ratio"]
    # residuals b - 1.2 a: questions 0-4 -0.2, question 5 +1, 6-9 0 -> SD sqrt(1.2 / 9)
    assert ratio.measured == pytest.approx(1.2) and ratio.se == pytest.approx(math.sqrt(1.2 / 90) / 0.5)
    assert ratio.measured_text == f"1.20× ± {ratio.se:.2f}"
    caption = checks["Δ²LLaVA vs delta-llava (single defence): attacked CIDEr at 4/255, gain"]
    assert caption.se is None and caption.measured_text == "10.0 CIDEr"  # no records: no error shown
    # records of another run (they do not give the rows' gain) are not used
    other = by_what(check_claims(results(), source))
    assert other["Δ²LLaVA vs delta-llava (single defence): attacked VQA accuracy at 4/255, gain"].se is None
    spreads = claims_over_seeds({0: list(checks.values()), 1: check_claims(results(vqa=vqa))})
    assert "| 20.0 pt ± 13.3 | 20.0 pt |" in seeds_claims_table(spreads)
