"""dvd eval caption / vqa / pope / targeted end to end on a tiny ShapesWorld and tiny VLMs (ours, HF)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _eval_helpers import FAST, run, world_tokenizer
from dvd.cli import main
from dvd.data.shapesworld_formats import DETAIL_PROMPTS
from dvd.eval import vlm_attack as va
from dvd.eval.captioning import cli as caption_cli
from dvd.eval.captioning import instruct_caption_prompt
from dvd.eval.results import read_rows
from dvd.models.vlm_io import save_vlm
from tiny_models import tiny_hf_llava


@pytest.fixture(scope="module")
def hf_checkpoint(shapesworld: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HF LLaVA adapter over a tiny random LlavaForConditionalGeneration, ``tiny_vlm``'s tokenizer."""
    model = tiny_hf_llava(0, tokenizer=world_tokenizer(shapesworld))
    return save_vlm(model.eval(), tmp_path_factory.mktemp("hf_llava") / "tiny-hf-llava")


def check_attacked(rows: list, *, task: str, metric: str, n: int) -> None:
    for row in rows:
        assert (row.task, row.metric, row.n, row.seed) == (task, metric, n, 0)
        assert row.eps > 0 and row.steps == 2 and row.adversarial is not None
        assert row.adversarial <= row.clean
        assert row.versions and row.seconds > 0


def test_caption_writes_one_row_per_budget_with_robust_cider_at_most_clean(shapesworld, tiny_vlm, tmp_path):
    rows = run(
        ["eval", "caption"],
        tmp_path / "r.json",
        "--model",
        str(tiny_vlm),
        "--data",
        str(shapesworld),
        "--broken-at",
        "-1",
        "--references",
        "2",
        "--model-name",
        "clean-llava",
    )
    assert [(r.model, r.dataset, r.attack) for r in rows] == [
        ("clean-llava", "shapesworld/captions", "apgd-ensemble")
    ] * 2
    assert [r.eps for r in rows] == [2 / 255, 4 / 255]
    check_attacked(rows, task="caption", metric="cider", n=4)


def test_caption_clean_only_is_an_eps_zero_row(shapesworld, tiny_vlm, tmp_path):
    (row,) = run(
        ["eval", "caption"],
        tmp_path / "r.json",
        "--model",
        str(tiny_vlm),
        "--data",
        str(shapesworld),
        "--attack",
        "none",
    )
    assert (row.eps, row.steps, row.attack, row.adversarial, row.n) == (0.0, 0, "none", None, 4)


def test_the_hf_llava_adapter_goes_through_the_same_command(shapesworld, hf_checkpoint, tmp_path):
    (row,) = run(
        ["eval", "caption"],
        tmp_path / "r.json",
        "--model",
        str(hf_checkpoint),
        "--data",
        str(shapesworld),
        "--eps",
        "4/255",
        "--attack",
        "apgd",
        "--broken-at",
        "-1",
    )
    check_attacked([row], task="caption", metric="cider", n=4)
    assert (row.model, row.attack) == ("tiny-hf-llava", "apgd")


def test_vqa_writes_vqa_accuracy_rows(shapesworld, tiny_vlm, tmp_path):
    rows = run(
        ["eval", "vqa"],
        tmp_path / "r.json",
        "--model",
        str(tiny_vlm),
        "--data",
        str(shapesworld),
        "--broken-at",
        "-1",
        "--references",
        "1",
        "--targets",
        "maybe",
    )
    assert [r.dataset for r in rows] == ["shapesworld/vqa"] * 2
    check_attacked(rows, task="vqa", metric="vqa_accuracy", n=4)


def test_the_references_attack_is_one_apgd_per_reference_without_the_ensembles_rerun_and_targets(
    shapesworld, tiny_vlm, tmp_path, monkeypatch
):
    stages = []
    evaluate = va.evaluate_outputs

    def spy(*args, **kwargs):
        stages.append([stage.name for stage in kwargs["stages"]])
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(va, "evaluate_outputs", spy)
    common = ["--model", str(tiny_vlm), "--data", str(shapesworld), "--broken-at", "-1", "--references", "2",
              "--eps", "4/255"]
    rows = run(["eval", "vqa"], tmp_path / "r.json", *common, "--attack", "references")
    assert stages == [["ref0-fp32", "ref1-fp32"]]  # on a CPU the runs are fp32 already
    assert [r.attack for r in rows] == ["apgd-references"]
    check_attacked(rows, task="vqa", metric="vqa_accuracy", n=4)
    run(["eval", "vqa"], tmp_path / "e.json", *common)  # the ensemble: the rerun on the best, the targets
    assert stages[1] == ["ref0-fp32", "ref1-fp32", "best-fp32", "target-maybe", "target-Word"]


def test_pope_writes_every_metric_for_every_split(shapesworld, tiny_vlm, tmp_path):
    rows = run(
        ["eval", "pope"],
        tmp_path / "r.json",
        "--model",
        str(tiny_vlm),
        "--data",
        str(shapesworld),
        "--attack",
        "apgd",
        "--eps",
        "4/255",
    )
    splits = [f"shapesworld/pope_{s}" for s in ("random", "popular", "adversarial")]
    metrics = ["f1", "accuracy", "precision", "recall", "yes_ratio"]
    assert [(r.dataset, r.metric) for r in rows] == [(s, m) for s in splits for m in metrics]
    for row in rows:
        assert (row.task, row.n, row.eps, row.attack) == ("pope", 4, 4 / 255, "apgd")
        assert row.metric == "yes_ratio" or row.adversarial <= row.clean


def test_targeted_writes_success_and_exact_match_rows_per_target(shapesworld, tiny_vlm, tmp_path):
    rows = run(
        ["eval", "targeted"],
        tmp_path / "r.json",
        "--model",
        str(tiny_vlm),
        "--data",
        str(shapesworld),
        "--target",
        "a red circle.",
        "--target",
        "two blue squares.",
        "--eps",
        "8/255",
    )
    assert [(r.attack, r.metric) for r in rows] == [
        (f"apgd-targeted:{t}", m)
        for t in ("a red circle.", "two blue squares.")
        for m in ("success_rate", "exact_match_rate")
    ]
    for row in rows:
        assert (row.task, row.n, row.eps, row.steps) == ("targeted", 4, 8 / 255, 2)
        assert 0 <= row.clean <= 1 and 0 <= row.adversarial <= 1


def test_an_interrupted_evaluation_resumes_and_gives_the_same_rows(
    shapesworld, tiny_vlm, tmp_path, monkeypatch
):
    args = [
        "--model",
        str(tiny_vlm),
        "--data",
        str(shapesworld),
        "--eps",
        "4/255",
        "--references",
        "1",
        "--broken-at",
        "-1",
        *FAST,
    ]
    assert caption_cli([*args, "--out", str(tmp_path / "whole.json")]) == 0
    calls = []
    attack = va.worst_case_attack

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return attack(*a, **k)

    monkeypatch.setattr(va, "worst_case_attack", interrupted)
    out = tmp_path / "resumed.json"
    with pytest.raises(KeyboardInterrupt):
        caption_cli([*args, "--out", str(out)])
    (state,) = Path(f"{out}.partial").iterdir()
    assert json.loads(state.read_text())["position"] == 2  # the first batch is saved
    assert caption_cli([*args, "--out", str(out)]) == 0
    assert len(calls) == 3  # only the second batch ran again
    (whole,), (resumed,) = read_rows(tmp_path / "whole.json"), read_rows(out)
    assert (resumed.clean, resumed.adversarial, resumed.n) == (whole.clean, whole.adversarial, whole.n)


def test_shapesworld_caption_prompt_is_the_instruction_datas_own(shapesworld):
    assert instruct_caption_prompt(shapesworld / "llava" / "stage2_instruct.json") in DETAIL_PROMPTS


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        (["eval", "caption"], ["--data", "/nonexistent"], "ShapesWorld root"),
        (["eval", "caption"], ["--eps", "4"], "above 1"),
        (["eval", "caption"], ["--attack", "ensemble2"], "did you mean 'ensemble'"),
        (["eval", "caption"], ["--steps", "0"], "--steps must be >= 1"),
        (["eval", "vqa"], ["--data", None], "give --data"),
        (["eval", "pope"], ["--attack-precision", "fp8"], "unknown attack precision"),
        (["eval", "targeted"], [], "--target"),
        (["eval", "caption"], ["--model", "/nonexistent/dir"], "no such checkpoint"),
        (["eval", "caption"], ["--device", "gpu0"], "not a torch device"),
        (["eval", "vqa"], ["--limit", "many"], "--limit"),
    ],
)
def test_bad_input_is_a_one_line_error(shapesworld, tiny_vlm, capsys, command, extra, message):
    args = ["--model", str(tiny_vlm), "--data", str(shapesworld), *extra]
    if None in args:  # drop "--data WORLD" and the None marker
        args = [a for a in args if a not in ("--data", str(shapesworld), None)]
    assert main([*command, *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dvd: error:") and message in err[-1]
