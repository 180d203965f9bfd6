"""``dvd demo`` on the tiny ``test`` preset, real stages: outputs, reuse on a re-run, resume after Ctrl-C."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dvd import demo as demo_module
from dvd.config import ConfigError
from dvd.demo import cli
from dvd.demo_preset import CLIP_MODELS, load_preset

TASKS = {f"shapesworld/{t}" for t in ("color", "count", "shape", "size", "texture")}
FIGURES = ("zeroshot_headline.png", "zeroshot_vs_eps.png", "retrieval_vs_eps.png", "examples.png")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert cli(["--out", str(out), "--preset", "test", "--no-vlm"]) == 0
    return out


def test_demo_writes_results_for_every_clip_model_task_and_budget(demo_dir: Path) -> None:
    rows = json.loads((demo_dir / "results.json").read_text())
    assert {r["model"] for r in rows} == set(CLIP_MODELS)
    for model in CLIP_MODELS:
        zeroshot = [r for r in rows if r["model"] == model and r["task"] == "zeroshot"]
        assert {r["dataset"] for r in zeroshot} == TASKS
        assert all(r["eps"] == pytest.approx(4 / 255) and r["adversarial"] is not None for r in zeroshot)
        assert any(r["task"] == "retrieval" and r["model"] == model for r in rows)


def test_demo_report_names_every_model_and_shows_its_plots(demo_dir: Path) -> None:
    report = (demo_dir / "report.md").read_text()
    for model in CLIP_MODELS:
        assert f"| {model} |" in report
    for figure in FIGURES:
        path = demo_dir / "figures" / figure
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(figures/{figure})" in report
    assert "**Not run**" in report  # the VLM half was switched off and the report says so
    assert "| train delta-clip | Δ | " in report and "| **all stages** |" in report


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
    assert cli(["--out", str(demo_dir), "--preset", "test", "--no-vlm"]) == 0
    log = capfd.readouterr().err  # the two lanes are child processes: capture at the fd level
    assert log.count("finished earlier, reused") == 1 + 3 * len(CLIP_MODELS)
    assert " ...\n" not in log  # nothing started again
    assert weights.stat().st_mtime_ns == before
    rows_after = json.loads((demo_dir / "results.json").read_text())
    assert [(r["model"], r["dataset"], r["metric"], r["clean"], r["adversarial"]) for r in rows_after] == [
        (r["model"], r["dataset"], r["metric"], r["clean"], r["adversarial"]) for r in rows_before
    ]


def test_a_demo_folder_refuses_the_outputs_of_another_preset(demo_dir: Path) -> None:
    with pytest.raises(ConfigError, match="other settings"):
        cli(["--out", str(demo_dir), "--preset", "quick", "--no-vlm"])


def test_unknown_preset_is_a_one_line_error_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="quick"):
        cli(["--out", str(tmp_path), "--preset", "quik"])


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


def test_the_two_lanes_split_the_stages_into_the_clean_and_the_delta_chain(tmp_path: Path) -> None:
    demo = demo_module.Demo(tmp_path, load_preset("test"), vlm=True)
    clean, delta = demo.lanes()
    names = [s.name for s in demo.stages()]
    assert sorted(clean + delta + ["world"]) == sorted(names)
    assert "train delta-clip" in delta and "train tecoa" in clean and "train fare" in clean
    assert not any("delta" in name for name in clean)
    assert all("delta" in name for name in delta)
    stages = {s.name: s for s in demo.stages()}
    # every stage names what it reads: FARE's evaluations need its training, which needs the clean CLIP
    assert (
        stages["zeroshot fare"].needs == ("train fare",)
        and stages["train fare"].needs[-1] == "train clean-clip"
    )
    assert "train delta2-llava stage2" in delta and "train clean-llava stage1" in clean


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
    report = (tmp_path / "report.md").read_text()
    assert "| retrieval clean-clip | clean | **failed** |" in report
    assert "- `retrieval clean-clip`: " in report
