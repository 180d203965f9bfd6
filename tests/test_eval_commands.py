"""What every evaluation command shares: rows named after the model (never `final`), two models in one
--out, options checked with one-line errors before any work (budget units, workers, model arguments)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dvd.cli import main
from dvd.eval.options import model_row_name
from dvd.eval.results import read_rows
from dvd.models.clip import create_clip, save_clip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two trained-looking CLIPs in the demo's layout (runs/models/NAME/final), the way the trainer saves."""
    root = tmp_path_factory.mktemp("cmd") / "runs"
    for seed, name in enumerate(("delta-clip", "clean-clip")):
        torch.manual_seed(seed)
        metadata = {"recipe": name.split("-")[0], "config": {"output_dir": f"runs/demo/models/{name}"}}
        save_clip(create_clip("dvd-tiny-vit"), root / "models" / name / "final", metadata=metadata)
    return root


def zeroshot(model: str, photos: Path, out: Path, *extra: str) -> int:
    return main(["eval", "zeroshot", "--model", model, "--dataset", str(photos), "--attack", "none",
                 "--out", str(out), "--no-progress", *extra])


def test_two_models_into_one_out_keep_a_row_each_named_after_the_model(runs, photos, tmp_path) -> None:
    out = tmp_path / "r.json"
    for name in ("delta-clip", "clean-clip"):
        assert zeroshot(str(runs / "models" / name / "final"), photos, out) == 0
    rows = read_rows(out)
    assert [r.model for r in rows] == ["delta-clip", "clean-clip"]
    assert [Path(r.checkpoint) for r in rows] == [(runs / "models" / n / "final").resolve() for n in
                                                  ("delta-clip", "clean-clip")]


def test_a_checkpoint_without_a_recorded_run_is_named_by_its_meaningful_folder(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_clip("dvd-tiny-vit")
    assert model_row_name(str(save_clip(model, tmp_path / "my-clip" / "final"))) == "my-clip"
    step = save_clip(model, tmp_path / "other" / "checkpoints" / "step-000000024")
    assert model_row_name(str(step)) == "other@step24"
    assert model_row_name("ViT-B-32", "openai") == "ViT-B-32-openai"


def test_another_model_under_a_name_already_in_the_file_is_refused_before_any_work(
    runs, photos, tmp_path, capsys
) -> None:
    out = tmp_path / "r.json"
    assert zeroshot(str(runs / "models" / "delta-clip" / "final"), photos, out, "--model-name", "m") == 0
    capsys.readouterr()
    assert zeroshot(str(runs / "models" / "clean-clip" / "final"), photos, out, "--model-name", "m") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already has rows of model 'm'" in err and "--model-name" in err
    assert [r.model for r in read_rows(out)] == ["m"]


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        ("zeroshot", ["--eps", "4", "--eps-unit", "inf"], "--eps-unit 'inf' must be a positive finite"),
        ("zeroshot", ["--eps", "4", "--eps-unit", "0"], "--eps-unit '0' must be a positive finite number"),
        ("zeroshot", ["--eps", "4", "--eps-unit", "nan"], "--eps-unit 'nan' must be a positive finite"),
        ("retrieval", ["--eps", "4", "--eps-unit", "-255"], "--eps-unit '-255' must be a positive"),
        ("zeroshot", ["--workers", "abc"], "--workers 'abc' is not a whole number"),
        ("zeroshot", ["--model", "EVIL"], "weights file as --pretrained"),
        ("retrieval", ["--model", "EVIL"], "(e.g. --model ViT-B-32 --pretrained"),
        ("zeroshot", ["--out", "DIR"], "is a directory; give a file path"),
        ("retrieval", ["--out", "DIR"], "is a directory; give a file path"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_flag(command, extra, message, photos, tmp_path, capsys):
    (tmp_path / "evil.pt").write_bytes(b"not loaded")
    extra = [e.replace("EVIL", str(tmp_path / "evil.pt")).replace("DIR", str(tmp_path)) for e in extra]
    args = {"--model": "dvd-tiny-vit", "--dataset": str(photos), "--attack": "pgd"}
    args["--out"] = str(tmp_path / "r.json")
    args.update(zip(extra[::2], extra[1::2], strict=True))
    assert main(["eval", command, *[item for pair in args.items() for item in pair]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dvd: error: ") and message in err, err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("command", ["caption", "vqa", "pope", "targeted"])
def test_a_clip_checkpoint_given_to_a_vlm_evaluation_says_what_it_is(command, runs, tmp_path, capsys):
    model = runs / "models" / "delta-clip" / "final"
    args = ["eval", command, "--model", str(model), "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    if command == "targeted":
        args += ["--target", "a red star"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a CLIP checkpoint" in err and "not a VLM" in err, err


def test_a_weights_file_as_a_vlm_model_says_what_a_model_may_be(tmp_path, capsys) -> None:
    (tmp_path / "evil.pt").write_bytes(b"x")
    assert main(["eval", "caption", "--model", str(tmp_path / "evil.pt"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err and "dvd checkpoint directory" in err
    assert "Hugging Face LLaVA name or directory" in err
