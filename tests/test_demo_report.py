"""The demo's report and the report helpers, on hand-made result rows (no training)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dvd.demo_preset import DemoLayout, ReportInputs, load_preset
from dvd.demo_report import headline, write_report
from dvd.eval.report import average_rows, markdown_table, plot_clean_vs_robust, plot_metric_vs_eps

EPS4 = 4 / 255


def row(
    model: str, dataset: str, eps: float, clean: float, adversarial: float | None, task: str = "zeroshot"
):
    return {"model": model, "task": task, "dataset": dataset, "metric": "accuracy", "attack": "apgd-ce",
            "eps": eps, "steps": 100, "clean": clean, "adversarial": adversarial, "n": 100, "seconds": 1.0,
            "seed": 0, "flags": [], "versions": {}}


def rows_for(model: str, clean: float, robust: float) -> list[dict]:
    return [row(model, f"shapesworld/{t}", EPS4, clean, robust) for t in ("color", "shape")]


def test_average_rows_is_the_mean_over_datasets_per_model_and_eps() -> None:
    rows = [row("a", "x", EPS4, 0.8, 0.2), row("a", "y", EPS4, 0.6, 0.4), row("b", "x", EPS4, 1.0, 0.0)]
    averaged = {r["model"]: r for r in average_rows(rows, task="zeroshot")}
    assert averaged["a"]["clean"] == pytest.approx(0.7) and averaged["a"]["adversarial"] == pytest.approx(0.3)
    assert averaged["a"]["dataset"] == "average" and averaged["a"]["n"] == 200
    assert averaged["b"]["clean"] == pytest.approx(1.0)


def test_average_rows_skips_a_model_missing_a_dataset_at_some_eps() -> None:
    rows = [row("a", "x", EPS4, 0.8, 0.2), row("a", "y", EPS4, 0.6, 0.4), row("a", "x", 2 / 255, 0.8, 0.5)]
    assert average_rows(rows, task="zeroshot") == []


def test_plots_are_written_as_png_files(tmp_path: Path) -> None:
    rows = rows_for("clean-clip", 0.9, 0.1) + rows_for("delta-clip", 0.8, 0.6)
    rows += [row("delta-clip", "shapesworld/color", 2 / 255, 0.8, 0.7)]
    for path in (
        plot_clean_vs_robust(
            average_rows(rows, task="zeroshot"),
            tmp_path / "bars.png",
            eps=EPS4,
            title="t",
            ylabel="accuracy (%)",
        ),
        plot_metric_vs_eps(rows, tmp_path / "lines.png", task="zeroshot", title="t", ylabel="accuracy (%)"),
    ):
        assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    assert plot_clean_vs_robust([], tmp_path / "none.png", eps=EPS4, title="t", ylabel="y") is None


def test_markdown_table_shows_percent_per_budget() -> None:
    table = markdown_table(rows_for("delta-clip", 0.8, 0.65))
    assert "| delta-clip | shapesworld/color | accuracy | apgd-ce | 80.0 | 65.0 |" in table


def test_headline_averages_the_attacked_accuracy_at_4_over_255() -> None:
    rows = rows_for("clean-clip", 0.9, 0.1)
    rows += [row("clean-clip", f"shapesworld/{t}", 2 / 255, 0.9, 0.5) for t in ("color", "shape")]
    assert headline(rows) == {"clean-clip": {"clean": pytest.approx(0.9), "adversarial": pytest.approx(0.1),
                                             "n": 200}}


@pytest.mark.parametrize(
    ("delta_clean", "cost"),
    [(0.88, "2.0 pt | +3.0 pt | **holds**"), (0.5, "40.0 pt | -35.0 pt | **does not hold**")],
)
def test_report_states_whether_the_delta_clip_claims_hold(
    tmp_path: Path, delta_clean: float, cost: str
) -> None:
    preset = load_preset("test")
    inputs = ReportInputs(DemoLayout(tmp_path), preset, device="cpu", include_vlm=False)
    rows = rows_for("clean-clip", 0.9, 0.1) + rows_for("delta-clip", delta_clean, 0.6)
    rows += rows_for("tecoa", 0.7, 0.3) + rows_for("fare", 0.8, 0.2)
    (tmp_path / "results.json").write_text(json.dumps(rows))
    (tmp_path / "stages.json").write_text(
        json.dumps(
            {"train delta-clip": {"status": "done", "seconds": 12.0, "cpu_seconds": 10.0, "load": 1.0,
                                  "worker": 2}}
        )
    )
    report = write_report(inputs, tmp_path / "results.json").read_text()
    # delta-clip 60% vs clean-clip 10% attacked: +50 pt against the target of +30
    assert "| ≥ +30.0 pt | 50.0 pt | +20.0 pt | **holds** |" in report
    assert f"| ΔCLIP vs clean CLIP: clean zero-shot cost | ≤ 5.0 pt | {cost} |" in report
    lead = "| ≥ +15.0 pt | 30.0 pt | +15.0 pt | **holds** | delta-clip 60.0% vs tecoa 30.0% attacked |"
    assert lead in report
    assert "| train delta-clip | 2 | 12 | 10 | 1.0 |" in report and "worker 2 12 s" in report
    assert "No example grid" in report  # no trained models in this folder
    assert "**Not run**" in report  # the VLM half was switched off and the report says so
    ratio = "| 3 | Δ²LLaVA vs fare-llava (prior art): attacked CIDEr at 4/255, ratio | ≥ 1.30× | – | – |"
    assert f"{ratio} not measured |" in report  # no VLM rows: the VLM claims are not measured
    assert (tmp_path / "figures" / "zeroshot_headline.png").is_file()


@pytest.mark.parametrize("drawn_by_its_stage", [True, False])
def test_the_report_shows_the_example_grid_its_stage_drew_and_draws_none_itself_from_missing_models(
    tmp_path: Path, drawn_by_its_stage: bool
) -> None:
    from PIL import Image

    layout = DemoLayout(tmp_path)
    inputs = ReportInputs(layout, load_preset("test"), device="cpu", include_vlm=False)
    rows = rows_for("clean-clip", 0.9, 0.1) + rows_for("delta-clip", 0.9, 0.6)
    (tmp_path / "results.json").write_text(json.dumps(rows))
    layout.figures.mkdir()
    Image.new("RGB", (8, 8)).save(layout.example_grid("clip"))
    status = "done" if drawn_by_its_stage else "failed"  # a grid no finished stage drew: not shown
    (tmp_path / "stages.json").write_text(json.dumps({"examples clip": {"status": status, "seconds": 3.0}}))
    report = write_report(inputs, tmp_path / "results.json").read_text()
    assert ("![examples](figures/examples.png)" in report) == drawn_by_its_stage
    assert ("No example grid" in report) != drawn_by_its_stage  # no trained models here to draw it from


def test_the_report_names_the_eps_delta2_llava_was_trained_at_wherever_the_preset_sets_it() -> None:
    import dataclasses

    from dvd.demo_report import _delta2_eps, _delta2_recipe

    quick = load_preset("quick")  # Δ²LLaVA branches off delta-llava's stage 2: only stage 2 is attacked
    assert _delta2_recipe(quick) == ("delta-llava's run up to step 500 of stage 2, then PGD-3 at eps 4/255 "
                                     "on every training batch; eps ramped up from 0 over the next 50 steps")
    preset = dataclasses.replace(quick, delta2_branch_step=None)  # its own run, attacked in both stages
    stages = {**preset.vlm_stages, "stage1": {**preset.vlm_stages["stage1"], "eps": "2/255"}}
    preset = dataclasses.replace(preset, vlm_stages=stages)
    assert _delta2_eps(preset) == "2/255 / 4/255"
    assert _delta2_recipe(preset) == ("ΔCLIP, and PGD at eps 2/255 / 4/255 on every training batch of both "
                                      "stages; eps ramped up from 0 in stage 2 over its first 50 steps")
    stages = {name: {k: v for k, v in stage.items() if k != "eps"} for name, stage in
              preset.vlm_stages.items()}
    assert _delta2_eps(dataclasses.replace(preset, vlm_stages=stages)) == "4/255"  # dvd train vlm's default
    common = dataclasses.replace(preset, vlm_stages=stages, vlm_common={**preset.vlm_common, "eps": "8/255"})
    assert _delta2_eps(common) == "8/255"


def test_the_span_of_a_rerun_that_reuses_stages_times_the_last_run_alone() -> None:
    from dvd.demo_report import _elapsed

    def stage(run: str | None, start: str, end: str) -> dict:
        day = "2026-12-01"
        return {"status": "done", "run": run, "started": f"{day} {start}", "finished": f"{day} {end}",
                "seconds": 1.0}

    stages = {
        "world": stage(None, "10:00:00", "10:01:00"),
        "train clean-clip": stage(None, "10:01:00", "10:30:00"),
        "train fare": stage("b", "12:00:00", "12:05:00"),
        "zeroshot fare": stage("b", "12:05:00", "12:12:30"),
        "report": {"status": "done", "run": None, "started": None, "finished": "2026-12-01 12:13:00",
                   "seconds": 5.0},
    }
    assert _elapsed(stages) == (750.0, 2)  # 12:00 to 12:12:30; the two stages of the earlier run left out
    assert _elapsed({k: v for k, v in stages.items() if v["run"] is None}) == (1800.0, 0)


def test_a_vlm_answering_one_word_to_every_pope_question_gets_a_note_naming_why() -> None:
    from dvd.demo_report import _pope_notes

    def pope(model: str, yes_ratio: float) -> list[dict]:
        splits = ("random", "popular", "adversarial")
        return [{**row(model, f"shapesworld/pope_{s}", 0.0, yes_ratio, None, "pope"), "metric": "yes_ratio"}
                for s in splits]

    rows = pope("clean-llava", 0.0) + pope("delta2-llava", 0.48) + rows_for("clean-clip", 0.14, 0.05)
    (note,) = _pope_notes(rows)
    assert 'clean-llava answers "no"' in note and "clean-clip's zero-shot shape accuracy 14.0%" in note
    (note,) = _pope_notes(pope("delta2-llava", 1.0))
    assert note.startswith('- **delta2-llava answers "yes"') and "(yes-ratio 100.0%)" in note


def test_scienceqa_below_guessing_and_mme_alike_answers_get_notes_saying_they_measure_nothing() -> None:
    from dvd.demo_report import _mme_notes, _scienceqa_notes

    def metric(model: str, task: str, dataset: str, name: str, clean: float) -> dict:
        return {**row(model, dataset, 0.0, clean, None, task), "metric": name}

    scienceqa = [metric("fare-llava", "scienceqa", "shapesworld/scienceqa", "accuracy", 0.0),
                 metric("delta2-llava", "scienceqa", "shapesworld/scienceqa", "accuracy", 0.62)]
    (note,) = _scienceqa_notes(scienceqa)
    assert note.startswith("- **fare-llava score below guessing on ScienceQA**") and "delta2" not in note
    assert _scienceqa_notes(scienceqa[1:]) == []

    def mme(model: str, accuracy: float, plus: float) -> list[dict]:
        return [metric(model, "mme", f"shapesworld/mme/{t}", name, value)
                for t in ("color", "count") for name, value in (("accuracy", accuracy), ("acc_plus", plus))]

    (note,) = _mme_notes(mme("clean-llava", 0.5, 0.0) + mme("delta-llava", 0.5, 0.1))
    assert note.startswith("- **clean-llava answer both questions of every MME image alike**")
    assert "delta-llava" not in note
    assert _mme_notes(mme("delta2-llava", 0.75, 0.5)) == []
    (note,) = _mme_notes(mme("fare-llava", 0.0, 0.0) + mme("delta2-llava", 0.75, 0.5))
    assert note.startswith("- **fare-llava answer no MME question right**") and "neither yes nor no" in note


def test_targeted_rows_get_a_note_only_when_no_attack_succeeded_on_any_vlm() -> None:
    from dvd.demo_report import _targeted_notes

    def targeted(model: str, rate: float) -> dict:
        return {**row(model, "shapesworld/captions", EPS4, 0.0, rate, "targeted"), "metric": "success_rate"}

    quick = load_preset("quick")
    (note,) = _targeted_notes([targeted("clean-llava", 0.0), targeted("delta2-llava", 0.0)], quick)
    assert note.startswith("- **No targeted attack succeeded on any VLM**")
    assert f"within {quick.targeted.steps} APGD steps" in note
    assert _targeted_notes([targeted("clean-llava", 0.2), targeted("delta2-llava", 0.0)], quick) == []
    assert _targeted_notes([], quick) == []


def test_the_report_says_in_which_precision_each_half_was_trained(monkeypatch) -> None:
    from dvd.demo_report import _precision_text
    from dvd.train import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    bf16 = _precision_text({"precision": "bf16"}, "cpu")
    assert bf16.startswith("trained under bf16 autocast") and "fp32" in bf16  # the weights stay fp32
    assert _precision_text({}, "cpu") == _precision_text({"precision": "fp32"}, "cuda") == "trained in fp32"
    assert "bf16 autocast" in _precision_text({"precision": "auto"}, "cuda:0")  # auto: bf16 on CUDA
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # as the demo trains there: fp32
    emulated = _precision_text({"precision": "bf16"}, "cpu")
    assert emulated.startswith("trained in fp32 (") and "without bf16 instructions" in emulated
    assert "bf16 autocast" in _precision_text({"precision": "bf16"}, "cuda")


def test_the_reports_precision_is_the_one_in_the_stage_config_the_demo_wrote(tmp_path, monkeypatch) -> None:
    from dvd.demo_report import _precision_text
    from dvd.train import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # the machine writing the report
    written = tmp_path / "delta2-llava-stage2.yaml"
    written.write_text("precision: fp32\ndevice: cpu\n")  # trained where bf16 would have been emulated
    assert _precision_text({"precision": "bf16"}, "cpu", written).startswith("trained in fp32 (")
    written.write_text("device: cuda\n")  # the trainers' auto, on the device it trained on
    assert "bf16 autocast" in _precision_text({}, "cpu", written)
    assert _precision_text({}, "cpu", tmp_path / "missing.yaml") == "trained in fp32"


def test_the_report_says_in_which_precision_the_caption_and_vqa_attacks_ran(monkeypatch) -> None:
    from dvd.demo_report import _vlm_attack_text
    from dvd.train import precision

    quick = load_preset("quick")
    bf16 = dataclasses.replace(quick, vlm_eval=dataclasses.replace(quick.vlm_eval, precision="bf16"))
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert "in turn, under bf16 autocast (RobustVLM's ensemble" in _vlm_attack_text(bf16, "cpu")
    assert "in turn, in fp32 (" in _vlm_attack_text(quick, "cpu")  # auto: fp32 on a CPU
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert "in turn, in fp32 (" in _vlm_attack_text(bf16, "cpu")
    auto = load_preset("test")  # the evaluations' own default: fp16 on CUDA, fp32 on a CPU
    assert "under fp16 autocast" in _vlm_attack_text(auto, "cuda")
    assert "in fp32" in _vlm_attack_text(auto, "cpu")
