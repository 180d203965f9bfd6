"""``dvd demo`` on the tiny ``test`` preset, real stages: outputs, reuse on a re-run, resume after Ctrl-C."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dvd import demo as demo_module
from dvd.config import ConfigError
from dvd.demo import cli
from dvd.demo_preset import (
    CLIP_MODELS,
    VISION_TOWER,
    VLM_EVAL_ATTACKS,
    VLM_EVALS,
    VLM_MODELS,
    DemoPreset,
    ZeroShotBudget,
    load_preset,
)
from dvd.eval.results import read_rows

TASKS = {f"shapesworld/{t}" for t in ("color", "count", "shape", "size", "texture")}
FIGURES = ("zeroshot_headline.png", "zeroshot_vs_eps.png", "retrieval_vs_eps.png", "examples.png",
           "examples_vlm.png")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert cli(["--out", str(out), "--preset", "test"]) == 0
    return out


def test_demo_writes_results_for_every_model_task_and_budget(demo_dir: Path) -> None:
    rows = json.loads((demo_dir / "results.json").read_text())
    names = {"clean-clip", "delta-clip", "tecoa", "fare"}
    names |= {"clean-llava", "fare-llava", "delta-llava", "delta2-llava"}  # issue 17's model names
    assert {r["model"] for r in rows} == names
    assert {r["seed"] for r in rows} == {0}
    assert len(read_rows(demo_dir / "results.json")) == len(rows)  # average rows are complete rows too
    (color,) = [r for r in rows if r["model"] == "fare" and r["dataset"] == "shapesworld/color"]
    (average,) = [r for r in rows if r["model"] == "fare" and r["dataset"] == "average"]
    tasks = [r for r in rows if r["model"] == "fare" and r["dataset"] in TASKS]
    assert average["clean"] == pytest.approx(sum(r["clean"] for r in tasks) / len(TASKS))
    assert average["n"] == sum(r["n"] for r in tasks) and average["attack"] == color["attack"]
    for model in CLIP_MODELS:
        zeroshot = [r for r in rows if r["model"] == model and r["task"] == "zeroshot"]
        assert {r["dataset"] for r in zeroshot} == TASKS | {"average"}
        assert all(r["eps"] == pytest.approx(4 / 255) and r["adversarial"] is not None for r in zeroshot)
        assert any(r["task"] == "retrieval" and r["model"] == model for r in rows)
    for model in VLM_MODELS:
        mine = {(r["task"], r["metric"]) for r in rows if r["model"] == model}
        assert {("caption", "cider"), ("vqa", "vqa_accuracy"), ("pope", "f1")} <= mine
        assert ("targeted", "success_rate") in mine


def test_every_vlm_is_evaluated_on_scienceqa_clean_and_attacked_and_on_mme(demo_dir: Path) -> None:
    rows = json.loads((demo_dir / "results.json").read_text())
    for model in VLM_MODELS:
        scienceqa = [r for r in rows if r["model"] == model and r["task"] == "scienceqa"]
        assert {r["metric"] for r in scienceqa} == {"accuracy", "image_accuracy"}
        assert all(r["eps"] == pytest.approx(4 / 255) and r["adversarial"] is not None for r in scienceqa)
        mme = {(r["dataset"], r["metric"]) for r in rows if r["model"] == model and r["task"] == "mme"}
        assert ("shapesworld/mme", "perception") in mme
        for subtask in ("existence", "count", "position", "color"):  # what the world writes
            assert {(f"shapesworld/mme/{subtask}", m) for m in ("accuracy", "acc_plus", "score")} <= mme
        asked = {r["n"] for r in rows if (r["model"], r["task"], r["metric"]) == (model, "mme", "accuracy")}
        assert asked == {4}  # the test preset's mme_images: 2 images of each subtask, two questions each
    report = (demo_dir / "report.md").read_text()
    assert "MME on the questions of the first 2 images of each subtask (two each)." in report
    scienceqa = report[report.index("### ScienceQA"):]
    mme = report[report.index("### MME"):]
    for model in VLM_MODELS:
        assert f"| {model} | shapesworld/scienceqa | image_accuracy | apgd |" in scienceqa
        assert f"| {model} | " in mme


def test_the_report_checks_the_five_claims_with_target_measured_margin_and_verdict(demo_dir: Path) -> None:
    report = (demo_dir / "report.md").read_text()
    claims = report[report.index("## The paper's claims"):report.index("## Zero-shot classification")]
    lines = [line for line in claims.splitlines() if line.startswith("| ") and not line.startswith("| claim")]
    assert {line.split(" | ")[0] for line in lines} == {"| 1", "| 2", "| 3", "| 4", "| 5", "| world"}
    world = [line for line in lines if line.startswith("| world")]  # one learnability check per task
    assert [line.split("shapesworld/")[1].split(":")[0] for line in world] == [
        "shape", "color", "count", "size", "texture"]
    assert "| claim | check | target | measured | margin | verdict | from |" in claims
    for line in lines:  # every VLM of the claims was trained and evaluated: each check is measured
        # a relative drop from zero is undefined (tiny models may say nothing right): named so, no verdict
        if "drop" in line and "vs delta-llava 0.0 CIDEr" in line:
            assert "| not measured |" in line
            continue
        assert "**holds**" in line or "**does not hold**" in line, line
    # the VLM gains (claims 4 and 5) come with their standard error over the test samples: the caption and
    # VQA evaluations saved their per-sample records for it
    gains = [line for line in lines if line.startswith(("| 4", "| 5")) and "gain" in line.split(" | ")[1]]
    assert len(gains) == 4 and all(" ± " in line.split(" | ")[3] for line in gains), gains
    for task in ("caption", "vqa"):
        assert all((demo_dir / "samples" / f"{task}-{m}").is_dir() for m in VLM_MODELS)


def test_the_vlms_use_their_towers_and_only_delta2_llava_is_tuned_adversarially(demo_dir: Path) -> None:
    from dvd.config import load_config
    from dvd.train.vlm_config import VlmTrainConfig

    for model, tower in VISION_TOWER.items():
        stage2 = load_config(VlmTrainConfig, demo_dir / "configs" / f"{model}-stage2.yaml")
        assert stage2.adversarial == (model == "delta2-llava")
        if model == "delta2-llava":  # the test preset branches it off delta-llava's stage 2 at step 1
            assert not (demo_dir / "configs" / f"{model}-stage1.yaml").exists()
            assert Path(stage2.init) == demo_dir / "models" / "delta-llava-stage1" / "final"
            assert Path(stage2.branch_from) == demo_dir / "models" / "delta-llava-stage2" / "checkpoints" / (
                "step-000000001"
            )
            summary = json.loads((demo_dir / "models" / f"{model}-stage2" / "summary.json").read_text())
            assert (summary["resumed_from"], summary["step"]) == (1, 2)
            continue
        stage1 = load_config(VlmTrainConfig, demo_dir / "configs" / f"{model}-stage1.yaml")
        assert Path(stage1.vision) == demo_dir / "models" / tower / "final"
        assert isinstance(stage1.lm, dict)  # a fresh LM: the preset trains none for them to share
        assert Path(stage2.init) == demo_dir / "models" / f"{model}-stage1" / "final"
        assert not stage1.adversarial and stage2.branch_from is None


def test_demo_report_names_every_model_and_shows_its_plots(demo_dir: Path) -> None:
    report = (demo_dir / "report.md").read_text()
    for model in CLIP_MODELS + VLM_MODELS:
        assert f"| {model} |" in report
    for figure in FIGURES:
        path = demo_dir / "figures" / figure
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(figures/{figure})" in report
    assert "| **all stages** |" in report
    ran = [line.split(" | ")[1] for line in report.splitlines() if line.startswith("| train ")]
    assert set(ran) == {"1", "2"}  # the two workers (--jobs 2, the default) shared the trainings
    assert "{" not in report and "}" not in report  # every template field was filled in
    counts = sorted({r.n for r in read_rows(demo_dir / "results.json") if r.task == "caption"})
    assert f"images: {'/'.join(map(str, counts))} for captioning" in report  # as evaluated, not the limit


def test_the_example_grids_are_stages_of_their_own_after_every_model_they_show(demo_dir: Path) -> None:
    plan = {s.name: s for s in demo_module.Demo(demo_dir, load_preset("test"), vlm=True).stages()}
    assert set(plan["examples clip"].needs) == {f"train {m}" for m in CLIP_MODELS}
    assert set(plan["examples vlm"].needs) == {f"train {m} stage2" for m in VLM_MODELS}
    ledger = json.loads((demo_dir / "stages.json").read_text())
    assert ledger["examples clip"]["worker"] in (1, 2) and ledger["examples vlm"]["worker"] in (1, 2)
    assert all(ledger[f"examples {half}"]["status"] == "done" for half in ("clip", "vlm"))


def test_demo_writes_each_stage_config_as_a_rerunnable_yaml(demo_dir: Path) -> None:
    from dvd.config import load_config
    from dvd.train.clip_config import ClipTrainConfig

    cfg = load_config(ClipTrainConfig, demo_dir / "configs" / "tecoa.yaml")
    assert cfg.recipe == "tecoa"
    assert Path(cfg.pretrained) == demo_dir / "models" / "clean-clip" / "final"


def test_rerun_reuses_every_finished_stage(demo_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    weights = demo_dir / "models" / "delta-clip" / "final" / "open_clip_model.safetensors"
    before = weights.stat().st_mtime_ns
    rows_before = json.loads((demo_dir / "results.json").read_text())
    assert cli(["--out", str(demo_dir), "--preset", "test"]) == 0
    log = capfd.readouterr().err  # the workers are child processes: capture at the fd level
    stages = demo_module.Demo(demo_dir, load_preset("test")).stages()
    assert log.count("finished earlier, reused") == len(stages)
    assert " ...\n" not in log  # nothing started again
    assert weights.stat().st_mtime_ns == before
    rows_after = json.loads((demo_dir / "results.json").read_text())
    assert [(r["model"], r["dataset"], r["metric"], r["clean"], r["adversarial"]) for r in rows_after] == [
        (r["model"], r["dataset"], r["metric"], r["clean"], r["adversarial"]) for r in rows_before
    ]


def test_a_demo_folder_refuses_the_outputs_of_another_preset(demo_dir: Path) -> None:
    with pytest.raises(ConfigError, match="other settings"):
        cli(["--out", str(demo_dir), "--preset", "quick"])


def test_unknown_preset_is_a_one_line_error_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="quick"):
        cli(["--out", str(tmp_path), "--preset", "quik"])


def _preset(tmp_path: Path, text: str) -> Path:
    (tmp_path / "mine.yaml").write_text(text)
    return tmp_path


def test_a_preset_groups_the_evaluation_and_world_settings_in_sections_that_keep_their_defaults(
    tmp_path: Path,
) -> None:
    folder = _preset(tmp_path, "world:\n  size: 64\nvlm_eval:\n  eps:\n  - 4/255\nscienceqa: {steps: 3}\n")
    p = load_preset("mine", folder)
    assert (p.world.size, p.world.image_size) == (64, 32)
    assert p.vlm_eval.eps == ("4/255",) and p.vlm_eval.references == 5  # YAML lists become tuples
    assert (p.scienceqa.limit, p.scienceqa.steps) == (50, 3)
    assert (p.retrieval.limit, p.targeted.limit) == (100, 5)  # one Budget class, a default per use
    assert p.fingerprint()["scienceqa"] == {"limit": 50, "steps": 3}
    quick = load_preset("quick")
    assert (quick.zeroshot.escalation_queries, quick.retrieval.limit) == (1000, 50)
    assert quick.vlm_eval.eps == ("4/255",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("zeroshot_steps: 2\n", r"unknown key 'zeroshot_steps' in .*mine.yaml \(did you mean 'zeroshot'"),
        ("zeroshot:\n  step: 2\n", r"unknown key 'zeroshot.step' in .*mine.yaml \(did you mean 'steps'"),
        ("world: 64\n",
         r"world in .*mine.yaml must be a mapping of size, image_size, eval_size, instruct_size, spec, "
         r"got 64"),
        ("world:\n  spec: {shape_weight: [1]}\n",
         r"unknown ShapesWorld spec key 'shape_weight' in world.spec of .*mine.yaml \(did you mean "
         r"'shape_weights'"),
        ("world:\n  spec: {textures: [solid, wavy]}\n",
         r"textures in world.spec of .*mine.yaml: category names are fixed"),
        ("targeted: [1, 2]\n", r"targeted in .*mine.yaml must be a mapping of limit, steps, got \[1, 2\]"),
        ("vlm_eval: {attack: ensembel}\n",
         r"vlm_eval.attack in .*mine.yaml must be one of ensemble, references, apgd, got 'ensembel' "
         r"\(did you mean 'ensemble'"),
        ("vlm_eval: {precision: bf61}\n",
         r"vlm_eval.precision in .*mine.yaml must be one of auto, fp32, fp16, bf16, got 'bf61' "
         r"\(did you mean 'bf16'"),
        ("vlm_eval: {batch_size: 0}\n",
         r"vlm_eval.batch_size in .*mine.yaml must be a positive integer, got 0"),
        ("mme_images: all\n",
         r"mme_images in .*mine.yaml must be a positive number of images per MME subtask, or null for every "
         r"question, got 'all'"),
    ],
)
def test_an_unknown_key_or_a_bad_value_or_a_section_that_is_no_mapping_is_a_one_line_error(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load_preset("mine", _preset(tmp_path, text))
    assert "\n" not in str(error.value)


def test_a_preset_may_be_a_file_of_ones_own_named_by_its_path(tmp_path: Path) -> None:
    own = tmp_path / "mine.yaml"
    own.write_text("seed: 3\nzeroshot: {steps: 7}\n")
    preset = load_preset(str(own))
    assert preset.name == str(own) and preset.seed == 3 and preset.zeroshot.steps == 7
    with pytest.raises(FileNotFoundError, match="preset file .*missing.yaml does not exist"):
        load_preset(str(tmp_path / "missing.yaml"))


def test_the_world_stage_writes_the_presets_spec_overrides_and_passes_them(tmp_path: Path) -> None:
    test = load_preset("test")
    assert "spec" not in test.fingerprint()["world"]  # no overrides: the fingerprint of earlier demo folders
    spec = {"sizes": {"small": 0.14, "large": 0.24}, "hard_caption_prob": 0.5}
    preset = dataclasses.replace(test, world=dataclasses.replace(test.world, spec=spec))
    assert preset.fingerprint()["world"]["spec"] == spec  # another world: a folder of the other is not reused
    demo = demo_module.Demo(tmp_path, preset, vlm=False)
    demo._world()
    assert yaml.safe_load((tmp_path / "configs" / "world_spec.yaml").read_text()) == spec
    summary = json.loads((tmp_path / "world" / "summary.json").read_text())
    assert summary["spec"]["sizes"] == spec["sizes"] and summary["spec"]["hard_caption_prob"] == 0.5
    assert summary["size"] == test.world.size


def test_vqa_may_take_more_questions_than_the_other_vlm_evaluations(tmp_path: Path) -> None:
    test = load_preset("test")
    assert "vqa_limit" not in test.fingerprint()["vlm_eval"]  # unset: the fingerprint of earlier folders
    preset = dataclasses.replace(test, vlm_eval=dataclasses.replace(test.vlm_eval, limit=3, vqa_limit=7))
    assert preset.fingerprint()["vlm_eval"]["vqa_limit"] == 7
    def limits(p: DemoPreset) -> tuple[int, ...]:  # the --limit of the VQA, caption and POPE stages
        demo = demo_module.Demo(tmp_path, p, vlm=True)
        argvs = [demo.vlm_eval_argv(task, "delta2-llava") for task in ("vqa", "caption", "pope")]
        return tuple(int(argv[argv.index("--limit") + 1]) for argv in argvs)

    assert limits(preset) == (7, 3, 3)
    assert limits(test) == (test.vlm_eval.limit,) * 3
    assert load_preset("quick").vlm_eval.questions() == 200


def test_mme_asks_the_presets_images_of_each_subtask_or_every_question_when_it_names_none(
    tmp_path: Path,
) -> None:
    test = load_preset("test")
    every = dataclasses.replace(test, mme_images=None)
    assert "mme_images" not in every.fingerprint()  # unset: the fingerprint of earlier folders
    assert test.fingerprint()["mme_images"] == 2

    def argv(p: DemoPreset) -> list[str]:
        return demo_module.Demo(tmp_path, p, vlm=True).vlm_eval_argv("mme", "delta2-llava")

    assert argv(test)[argv(test).index("--images-per-subtask") + 1] == "2"
    assert "--images-per-subtask" not in argv(every)
    assert load_preset("quick").mme_images == 50


def test_a_preset_chooses_the_caption_and_vqa_attack_and_the_vlm_evaluations_batch_size(
    tmp_path: Path,
) -> None:
    test = load_preset("test")
    fingerprint = test.fingerprint()["vlm_eval"]
    assert "attack" not in fingerprint and "batch_size" not in fingerprint  # defaults: earlier folders resume
    assert (test.vlm_eval.attack, test.vlm_eval.batch_size) == ("ensemble", 8)
    lean = dataclasses.replace(test, vlm_eval=dataclasses.replace(test.vlm_eval, attack="references",
                                                                   batch_size=50))
    assert lean.fingerprint()["vlm_eval"]["attack"] == "references"  # a folder of the other is not reused
    demo = demo_module.Demo(tmp_path, lean, vlm=True)
    for task in VLM_EVALS:
        argv = demo.vlm_eval_argv(task, "delta2-llava")
        assert argv[argv.index("--batch-size") + 1] == "50"
        assert (argv[argv.index("--attack") + 1] if "--attack" in argv else None) == {
            "caption": "references", "vqa": "references", "scienceqa": "apgd"}.get(task)
    quick = load_preset("quick").vlm_eval
    assert (quick.attack, quick.batch_size) == ("references", 50)
    from dvd.attacks.robustness import CHECK_QUERIES
    from dvd.eval.spec import VLM_DEFAULTS
    from dvd.eval.vlm_attack import REFERENCE_ATTACKS

    # the preset module's import-light copies of the evaluations' own choices and default
    assert VLM_EVAL_ATTACKS == tuple(a for a in REFERENCE_ATTACKS if a != "none")
    from dvd.demo_preset import VLM_EVAL_PRECISIONS
    from dvd.eval.vlm_objective import PRECISIONS

    assert set(VLM_EVAL_PRECISIONS) == set(PRECISIONS)
    assert ZeroShotBudget().check_queries == CHECK_QUERIES
    assert test.vlm_eval.batch_size == VLM_DEFAULTS["batch_size"]


def test_only_delta2_llavas_stage_configs_carry_the_training_attack_and_its_eps_ramp(tmp_path: Path) -> None:
    from dvd.demo_report import _delta2_ramp

    quick = load_preset("quick")
    assert quick.vlm_stages["stage2"]["eps_warmup_steps"] > 0
    demo = demo_module.Demo(tmp_path, quick, vlm=True)
    attack_keys = {"eps", "attack_steps", "attack_step_size", "eps_warmup_steps"}
    for model, tower in VISION_TOWER.items():
        stage2 = demo.vlm_config(model, tower, "stage2")
        kept = attack_keys & set(stage2)
        assert kept == (attack_keys if model == "delta2-llava" else set()), model
        assert stage2["steps"] == quick.vlm_stages["stage2"]["steps"]  # otherwise the same recipe
    assert _delta2_ramp(quick) == "; eps ramped up from 0 in stage 2 over its first 50 steps"  # the report
    assert _delta2_ramp(load_preset("test")) == ""


def test_a_branched_delta2_llava_trains_only_a_stage_2_that_starts_from_delta_llavas_checkpoint(
    tmp_path: Path,
) -> None:
    quick = load_preset("quick")
    assert "delta2_branch_step" not in dataclasses.replace(quick, delta2_branch_step=None).fingerprint()
    branched = dataclasses.replace(quick, delta2_branch_step=500)
    assert branched.fingerprint()["delta2_branch_step"] == 500  # a folder made without it is not reused
    demo = demo_module.Demo(tmp_path, branched, vlm=True)
    stages = {s.name: s for s in demo.stages()}
    assert "train delta2-llava stage1" not in stages
    assert stages["train delta2-llava stage2"].needs == ("train delta-llava stage2",)
    for model in ("clean-llava", "fare-llava", "delta-llava"):  # the others as before
        assert stages[f"train {model} stage2"].needs == (f"train {model} stage1",)
    delta2 = demo.vlm_config("delta2-llava", "delta-clip", "stage2")
    point = tmp_path / "models" / "delta-llava-stage2" / "checkpoints" / "step-000000500"
    assert delta2["branch_from"] == str(point) and delta2["adversarial"] is True
    assert delta2["init"] == str(tmp_path / "models" / "delta-llava-stage1" / "final")
    parent = demo.vlm_config("delta-llava", "delta-clip", "stage2")
    assert "branch_from" not in parent and parent["adversarial"] is False
    every = parent["checkpoint_every"]
    assert (parent["steps"] - 500) // every < parent["keep_last"]  # step 500 is kept to the end
    own_run = dataclasses.replace(quick, delta2_branch_step=None)
    plain = demo_module.Demo(tmp_path / "plain", own_run, vlm=True)
    assert "branch_from" not in plain.vlm_config("delta2-llava", "delta-clip", "stage2")
    assert "train delta2-llava stage1" in {s.name for s in plain.stages()}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("delta2_branch_step: 300\n",
         r"delta2_branch_step in .*mine.yaml \(300\) must be a multiple of stage 2.s checkpoint_every"),
        ("delta2_branch_step: 1000\n", r"delta2_branch_step in .*mine.yaml \(1000\) must be below "
                                       r"vlm_stages.stage2.steps \(1000\)"),
        ("delta2_branch_step: 0\n", r"delta2_branch_step in .*mine.yaml must be a positive step of stage 2, "
                                    "got 0"),
    ],
)
def test_a_branch_step_outside_stage_2s_checkpoints_is_a_one_line_error(
    tmp_path: Path, text: str, message: str
) -> None:
    quick = (Path(demo_module.__file__).parents[2] / "configs" / "demo" / "quick.yaml").read_text()
    quick = "\n".join(line for line in quick.splitlines() if not line.startswith("delta2_branch_step"))
    with pytest.raises(ConfigError, match=message) as error:
        load_preset("mine", _preset(tmp_path, quick + "\n" + text))
    assert "\n" not in str(error.value)


def test_a_preset_without_world_spec_writes_no_spec_file(tmp_path: Path) -> None:
    demo_module.Demo(tmp_path, load_preset("test"), vlm=False)._world()
    assert (tmp_path / "world" / "summary.json").is_file()
    assert not (tmp_path / "configs" / "world_spec.yaml").exists()


def test_interrupted_training_resumes_from_its_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dvd.train.clip as train_clip

    def ctrl_c(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # after the last checkpoint, before the final export

    only = ["--only", "world", "--only", "train clean-clip"]
    argv = ["--out", str(tmp_path), "--preset", "test", "--no-vlm", *only]
    monkeypatch.setattr(train_clip, "export_final", ctrl_c)
    assert cli(argv) == 130
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert stages["world"]["status"] == "done"
    assert stages["train clean-clip"]["status"] == "running"
    model = tmp_path / "models" / "clean-clip"
    assert not (model / "final").exists() and (model / "checkpoints" / "latest").is_file()

    monkeypatch.undo()
    assert cli(argv) == 0
    summary = json.loads((model / "summary.json").read_text())
    steps = load_preset("test").clip_recipes["clean-clip"]["steps"]
    assert summary["resumed_from"] == steps and summary["step"] == steps
    assert (model / "final" / "open_clip_config.json").is_file()
    assert json.loads((tmp_path / "stages.json").read_text())["train clean-clip"]["status"] == "done"
    assert (tmp_path / "report.md").is_file()  # a partial demo still gets its report


def test_an_interrupted_world_is_generated_again_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dvd.data import shapesworld

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # half-way: shards and images written, VQA not yet

    argv = ["--out", str(tmp_path), "--preset", "test", "--no-vlm", "--only", "world"]
    monkeypatch.setattr(shapesworld, "write_vqa", interrupted)
    assert cli(argv) == 130
    assert not (tmp_path / "world").exists()
    monkeypatch.undo()
    assert cli(argv) == 0
    assert (tmp_path / "world" / "summary.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries


def test_the_schedule_takes_up_every_stage_after_the_stages_it_reads_and_the_trainings_first(
    tmp_path: Path,
) -> None:
    demo = demo_module.Demo(tmp_path, load_preset("test"), vlm=True)
    order = [s.name for s in demo.schedule()]
    assert sorted(order) == sorted(s.name for s in demo.stages())
    trainings = [i for i, name in enumerate(order) if name.startswith(("world", "train "))]
    assert trainings == list(range(len(trainings)))  # each unlocks work: they come first
    stages = {s.name: s for s in demo.stages()}
    # every stage names what it reads: FARE's evaluations need its training, which needs the clean CLIP
    assert (
        stages["zeroshot fare"].needs == ("train fare",)
        and stages["train fare"].needs[-1] == "train clean-clip"
    )
    assert stages["train fare-llava stage1"].needs == ("train fare",)  # its tower (and no shared LM)
    for position, name in enumerate(order):
        assert all(order.index(need) < position for need in stages[name].needs), name


def _workers(tmp_path: Path, run: str = "run") -> tuple[demo_module.Demo, demo_module.Demo]:
    """Two workers of one run of the test preset's demo, in this process; the world is done."""
    one, two = (demo_module.Demo(tmp_path, load_preset("test")) for _ in range(2))
    one.run_id = two.run_id = run
    one.worker, two.worker = 1, 2
    one.ledger.record("world", status="done", run=run, worker=1)  # written before the workers start
    return one, two


def test_workers_take_up_different_stages_and_wait_for_the_ones_a_stage_reads(tmp_path: Path) -> None:
    one, two = _workers(tmp_path)
    first, waiting = one._claim()
    second, _ = two._claim()
    assert (first.name, second.name) == ("train clean-clip", "train delta-clip") and not waiting
    assert one._claim() == (None, True)  # every stage left reads one of the two still running
    one.ledger.record("train clean-clip", status="done")
    third, _ = two._claim()
    fourth, _ = one._claim()
    fifth, _ = one._claim()
    assert (third.name, fourth.name, fifth.name) == ("train tecoa", "train fare", "train clean-llava stage1")
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert stages["train tecoa"] == {**stages["train tecoa"], "status": "running", "run": "run", "worker": 2}


def test_a_stage_whose_input_failed_is_failed_and_a_killed_runs_leftovers_are_taken_up_again(
    tmp_path: Path,
) -> None:
    one, two = _workers(tmp_path, run="new")
    one.ledger.record("train clean-clip", status="running", run="old", worker=1)  # a killed run's claim
    first, _ = one._claim()
    assert first.name == "train clean-clip"
    two._claim()  # train delta-clip
    two.ledger.record("train delta-clip", status="failed", error="boom")
    while (stage := one._claim()[0]) is not None:
        assert "delta" not in stage.name  # nothing that reads ΔCLIP runs
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert stages["zeroshot delta-clip"]["status"] == "failed"
    assert stages["zeroshot delta-clip"]["error"] == "needs 'train delta-clip', which failed"
    assert "zeroshot delta-clip" in one.failed


def test_a_failing_stage_is_recorded_and_reported_and_the_others_still_run(tmp_path: Path) -> None:
    # the retrieval stage runs before its model is trained: the evaluation raises FileNotFoundError
    argv = [
        "--out",
        str(tmp_path),
        "--preset",
        "test",
        "--no-vlm",
        "--only",
        "retrieval clean-clip",
        "--only",
        "world",
    ]
    assert cli(argv) == 1
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert stages["retrieval clean-clip"]["status"] == "failed"
    assert stages["world"]["status"] == "done"
    assert stages["world"]["run"] == stages["retrieval clean-clip"]["run"]  # stages run in turn carry the run
    report = (tmp_path / "report.md").read_text()
    assert "| retrieval clean-clip | – | **failed** |" in report  # run in turn (--only): no worker
    assert "- `retrieval clean-clip`: " in report


def test_the_workers_of_a_seed_run_with_that_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[list[str]] = []

    class Child:
        def __init__(self, argv: list[str]) -> None:
            started.append(argv)

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(demo_module.subprocess, "Popen", Child)
    demo = demo_module.Demo(tmp_path, dataclasses.replace(load_preset("test"), seed=3))
    demo._run_workers(3)
    assert len(started) == 3
    for argv in started:  # each child checks the folder's settings against the seed-3 preset
        assert argv[argv.index("--seeds") + 1] == "3" and argv[argv.index("--out") + 1] == str(tmp_path)
    workers = [argv[argv.index("--worker") + 1].rpartition("/") for argv in started]
    assert len({run for run, _, _ in workers}) == 1 and [k for _, _, k in workers] == ["1", "2", "3"]


def test_a_stage_that_fails_in_a_worker_is_counted_as_failed_by_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = demo_module.Demo(tmp_path, load_preset("test"))

    class Child:  # worker 1 runs every stage and one of them raises; both workers exit normally
        def __init__(self, argv: list[str]) -> None:
            self.run, _, worker = argv[argv.index("--worker") + 1].rpartition("/")
            self.worker = int(worker)

        def wait(self) -> int:
            if self.worker == 1:
                ledger = demo_module.Ledger.load(tmp_path / "stages.json")
                for stage in demo.schedule():
                    status = "failed" if stage.name == "zeroshot fare" else "done"
                    ledger.record(stage.name, status=status, run=self.run, worker=1)
            return 0

    monkeypatch.setattr(demo_module.subprocess, "Popen", Child)
    demo._run_workers(2)
    assert demo.failed == ["zeroshot fare"]


def test_a_worker_that_dies_leaves_its_stage_and_the_stages_left_failed_not_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = demo_module.Demo(tmp_path, load_preset("test"))
    names = [s.name for s in demo.schedule()]
    finished = names[: len(names) // 2]

    class Child:  # worker 1 finishes half the stages; worker 2 dies while training ΔCLIP
        def __init__(self, argv: list[str]) -> None:
            self.run, _, worker = argv[argv.index("--worker") + 1].rpartition("/")
            self.worker = int(worker)

        def wait(self) -> int:
            ledger = demo_module.Ledger.load(tmp_path / "stages.json")
            if self.worker == 1:
                for name in finished:
                    if name != "train delta-clip":
                        ledger.record(name, status="done", run=self.run, worker=1)
                return 0
            ledger.record("train delta-clip", status="running", run=self.run, worker=2)
            return 1

    monkeypatch.setattr(demo_module.subprocess, "Popen", Child)
    demo._run_workers(2)
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert stages["train delta-clip"]["error"] == "its worker process exited with status 1"
    left = [name for name in names if name not in finished]
    assert all(stages[name]["error"] == "not run: a worker process exited with status 1" for name in left)
    assert all(stages[name]["status"] == "done" for name in finished if name != "train delta-clip")
    assert {"train delta-clip", *left} == set(demo.failed)


def test_seeds_write_one_demo_layout_per_seed_and_one_report(tmp_path: Path) -> None:
    argv = ["--out", str(tmp_path), "--preset", "test", "--no-vlm", "--seeds", "0,1", "--only", "world"]
    assert cli(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json", "seed-0", "seed-1"]
    for seed in (0, 1):
        layout = tmp_path / f"seed-{seed}"
        assert (layout / "world" / "summary.json").is_file() and (layout / "report.md").is_file()
        assert json.loads((layout / "demo.json").read_text())["preset"]["seed"] == seed
    captions = [(tmp_path / f"seed-{s}/world/captions/annotations.json").read_text() for s in (0, 1)]
    assert captions[0] != captions[1]  # each seed draws its own world
    report = (tmp_path / "report.md").read_text()
    assert "demo report over seeds 0, 1" in report and "| seed 0 | seed 1 | min | max |" in report


def test_seeds_must_be_distinct_integers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="comma-separated integers"):
        cli(["--out", str(tmp_path), "--preset", "test", "--seeds", "0,x"])
    with pytest.raises(ConfigError, match="twice"):
        cli(["--out", str(tmp_path), "--preset", "test", "--seeds", "1,1"])


@pytest.mark.slow
def test_a_two_seed_demo_reports_each_seeds_claims_and_their_spread(tmp_path: Path) -> None:
    assert cli(["--out", str(tmp_path), "--preset", "test", "--no-vlm", "--seeds", "0,1"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {r["seed"] for r in rows} == {0, 1}
    for seed in (0, 1):
        mine = json.loads((tmp_path / f"seed-{seed}" / "results.json").read_text())
        assert {r["model"] for r in mine} == set(CLIP_MODELS) and {r["seed"] for r in mine} == {seed}
    report = (tmp_path / "report.md").read_text()
    first = "| 1 | ΔCLIP vs clean CLIP: zero-shot"
    (gain,) = [line for line in report.splitlines() if line.startswith(first)]
    cells = gain.split(" | ")
    assert cells[2] == "≥ +30.0 pt" and all(c.endswith(" pt") for c in cells[3:8])  # seeds, min, max, margin


def test_a_preset_may_train_one_lm_for_every_vlm_first_from_text_alone(tmp_path: Path) -> None:
    from dvd.config import load_config
    from dvd.train.lm import LmTrainConfig

    assert "lm_training" not in load_preset("test").fingerprint()  # none: the fingerprint of older folders
    shared = {"steps": 2, "batch_size": 4, "checkpoint_every": 1, "progress": False}
    preset = dataclasses.replace(load_preset("test"), lm_training=shared)
    assert preset.fingerprint()["lm_training"] == shared  # a folder made without it is not reused
    demo = demo_module.Demo(tmp_path, preset)
    stages = {s.name: s for s in demo.stages()}
    assert stages["train lm"].needs == ("world",)
    for model, tower in VISION_TOWER.items():  # each VLM's stage 1 reads its tower and the shared LM
        if model != "delta2-llava":  # branched off delta-llava's stage 2 in the test preset
            assert stages[f"train {model} stage1"].needs == (f"train {tower}", "train lm")
    demo.run(only=["world", "train lm"], report=False)
    lm = load_config(LmTrainConfig, tmp_path / "configs" / "lm.yaml")  # the VLMs' tokenizer and template
    assert (lm.tokenizer, lm.template, lm.max_length, lm.steps) == ("shapesworld", "vicuna_v1_short", 256, 2)
    assert (tmp_path / "models" / "lm" / "final" / "model.safetensors").is_file()
    final = str(tmp_path / "models" / "lm" / "final")
    assert all(demo.vlm_config(m, t, "stage1")["lm"] == final for m, t in VISION_TOWER.items())
    plain = demo_module.Demo(tmp_path / "plain", load_preset("test"))
    assert "train lm" not in {s.name for s in plain.stages()}
    assert "lm" not in plain.vlm_config("clean-llava", "clean-clip", "stage1")


def test_a_worker_ends_when_its_demo_is_killed_outright(tmp_path: Path) -> None:
    """A real parent process starts a worker-like child (watching its parent as ``dvd demo --worker`` does),
    then dies by SIGKILL; the child must not run on."""
    ready = tmp_path / "ready"  # the child's pid, written once it watches its parent
    child_code = (
        "import os, time; from dvd.demo_stages import exit_with_parent; exit_with_parent(0.1); "
        f"open({str(ready)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    parent_code = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {child_code!r}]); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    deadline = time.monotonic() + 60
    while not (ready.is_file() and ready.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(ready.read_text())
    time.sleep(0.5)
    assert _running(child)  # alive while its parent is
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _running(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the worker kept running after its parent was killed")


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan is reaped by whoever adopts it, maybe late)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "State:\tZ" in status.read_text())


def test_the_presets_bf16_is_fp32_on_a_cpu_without_bf16_instructions(tmp_path: Path, monkeypatch) -> None:
    import io

    from dvd.train import precision

    quick = load_preset("quick")
    assert quick.vlm_common["precision"] == quick.clip_common["precision"] == "bf16"
    log = io.StringIO()
    demo = demo_module.Demo(tmp_path, quick, vlm=True, log=log)

    def vlm_precisions() -> set[str]:
        stages = ("stage1", "stage2")
        return {demo.vlm_config(m, t, s)["precision"] for m, t in VISION_TOWER.items() for s in stages}

    def clip_precisions() -> set[str]:
        return {demo.clip_config(m)["precision"] for m in ("clean-clip", "delta-clip", "tecoa", "fare")}

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert vlm_precisions() == clip_precisions() == {"bf16"}
    demo._say_precision()
    assert log.getvalue() == ""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # emulated bf16: 8-10x slower
    assert vlm_precisions() == clip_precisions() == {"fp32"}
    demo._say_precision()
    said = log.getvalue()
    assert said.count("\n") == 2 and "the CLIPs train in fp32" in said and "the VLMs train in fp32" in said
    cuda = demo_module.Demo(tmp_path, quick, vlm=True, device="cuda")
    assert cuda.vlm_config("delta2-llava", "delta-clip", "stage2")["precision"] == "bf16"


def test_the_caption_vqa_and_scienceqa_attacks_run_in_a_presets_precision_where_the_device_has_it(
    tmp_path: Path, monkeypatch
) -> None:
    from dvd.train import precision

    def attack_precision(demo: demo_module.Demo, task: str) -> str | None:
        argv = demo.vlm_eval_argv(task, "delta2-llava")
        return argv[argv.index("--attack-precision") + 1] if "--attack-precision" in argv else None

    quick = load_preset("quick")
    assert quick.vlm_eval.precision == "auto"  # fp32 on a CPU: bf16 attacks were not adopted (benchmarks/)
    bf16 = dataclasses.replace(quick, vlm_eval=dataclasses.replace(quick.vlm_eval, precision="bf16"))
    demo = demo_module.Demo(tmp_path, bf16, vlm=True)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert [attack_precision(demo, t) for t in VLM_EVALS] == ["bf16", "bf16", None, None, "bf16", None]
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert {attack_precision(demo, t) for t in ("caption", "vqa", "scienceqa")} == {"fp32"}
    assert attack_precision(demo_module.Demo(tmp_path, quick, vlm=True), "vqa") == "auto"
    assert "precision" not in quick.fingerprint()["vlm_eval"]  # the default: earlier folders still resume


def test_the_demos_own_process_imports_no_trainer_evaluation_or_plotting_library() -> None:
    # it starts the workers and writes the world right away; each stage imports what it needs
    heavy = ("open_clip", "transformers", "matplotlib", "peft")
    code = f"import sys, dvd.demo; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # its workers import the trainers' and evaluations' up front, while the world is written
    code = ("import sys; from dvd import demo; [__import__(m) for m in demo.WORKER_IMPORTS]; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sorted(set(heavy) - {"matplotlib"}))


def test_an_evaluation_started_afresh_drops_the_records_an_earlier_run_left(tmp_path: Path) -> None:
    demo = demo_module.Demo(tmp_path, load_preset("test"), vlm=True)
    stale = demo.layout.samples_dir("caption", "delta2-llava") / "caption-old.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"id": 0, "clean": "an earlier model caption"}\n')
    partial = Path(f"{demo.results_file('caption', 'delta2-llava')}.partial")
    partial.mkdir(parents=True)  # a resumable evaluation keeps the records it has written so far
    demo.clear_stale_samples("caption", "delta2-llava")
    assert stale.is_file()
    partial.rmdir()  # afresh: the writer would skip the new records whose ids the old ones have
    demo.clear_stale_samples("caption", "delta2-llava")
    assert not stale.parent.exists()
