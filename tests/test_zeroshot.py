"""dvd eval zeroshot: text classifier, clean/robust accuracy rows, resume, datasets and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dvd.attacks
from _photos import PHOTOS, TEMPLATES
from dvd.cli import main
from dvd.data.transforms import image_transform
from dvd.data.zeroshot import load_zeroshot
from dvd.eval.results import ROW_KEYS
from dvd.eval.zeroshot import ZeroShotClassifier, build_text_classifier, evaluate_zeroshot
from dvd.models.clip import DvdCLIP, create_clip, load_clip, save_clip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_clip(create_clip("dvd-tiny-vit"), tmp_path_factory.mktemp("zs") / "tiny")


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> DvdCLIP:
    return load_clip(checkpoint)


def test_cli_evaluates_real_photos_end_to_end_and_writes_design_rows(
    photos: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "results.json"
    args = ["eval", "zeroshot", "--model", "dvd-tiny-vit", "--dataset", str(photos), "--eps", "1/255,32/255"]
    args += ["--steps", "3", "--batch-size", "4", "--out", str(out), "--model-name", "tiny"]
    assert main(args) == 0
    rows = json.loads(out.read_text())
    assert [tuple(row) for row in rows] == [ROW_KEYS, ROW_KEYS]
    assert [row["eps"] for row in rows] == pytest.approx([1 / 255, 32 / 255])
    for row in rows:
        assert (row["model"], row["task"], row["dataset"], row["metric"]) == (
            "tiny",
            "zeroshot",
            "photos",
            "accuracy",
        )
        assert (row["attack"], row["steps"], row["n"], row["seed"]) == ("apgd-ce", 3, 10, 0)
        assert 0 <= row["adversarial"] <= row["clean"] <= 1
        assert row["seconds"] > 0 and torch.__version__.startswith(row["versions"]["torch"])
    assert rows[0]["clean"] == rows[1]["clean"] > 0
    assert rows[1]["adversarial"] < rows[1]["clean"]  # a large budget breaks even this random model
    captured = capsys.readouterr()
    assert "accuracy" in captured.out and "32/255" in captured.out  # the printed table
    assert "32x32" in captured.err  # the photos were resized to the model, not refused
    assert not (tmp_path / "results.json.partial").exists()  # resume state is cleaned up after success


def test_text_classifier_is_the_renormalised_mean_of_template_embeddings(
    model: DvdCLIP, photos: Path
) -> None:
    classnames = ["cat", "space"]
    weights = build_text_classifier(model, classnames, TEMPLATES)
    assert weights.shape == (64, 2)
    for column, name in enumerate(classnames):
        texts = [t.replace("{c}", name) for t in TEMPLATES]
        expected = F.normalize(F.normalize(model.encode_text(model.tokenize(texts)), dim=-1).mean(0), dim=0)
        assert torch.allclose(weights[:, column], expected, atol=1e-6)
    classifier = ZeroShotClassifier(model, classnames, TEMPLATES)
    x = torch.rand(2, 3, 32, 32)
    logits = classifier(x)
    assert torch.allclose(logits, model.logit_scale.item() * model.encode_image(x) @ weights, atol=1e-5)


def test_text_classifier_is_computed_once_per_dataset(model: DvdCLIP, photos: Path, monkeypatch) -> None:
    calls = []
    encode_text = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda tokens: calls.append(len(tokens)) or encode_text(tokens))
    data = load_zeroshot(photos, transform=image_transform(model.image_size))
    rows = evaluate_zeroshot(
        model, data, eps_list=[1 / 255, 2 / 255], steps=1, batch_size=3, limit=6, check=False, progress=False
    )  # two budgets x two batches of images
    assert len(rows) == 2 and all(row.n == 6 and row.flags == ["masking_checks_skipped"] for row in rows)
    assert calls == [len(PHOTOS) * len(TEMPLATES)]


def test_evaluation_leaves_the_model_as_it_found_it(model: DvdCLIP, photos: Path) -> None:
    model.train()
    data = load_zeroshot(photos, transform=image_transform(model.image_size))
    evaluate_zeroshot(
        model, data, eps_list=[1 / 255], steps=1, batch_size=5, limit=5, check=False, progress=False
    )
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    model.eval()


def test_interrupted_evaluation_resumes_and_gives_the_same_rows(
    model: DvdCLIP, photos: Path, tmp_path: Path, monkeypatch
) -> None:
    data = load_zeroshot(photos, transform=image_transform(model.image_size))
    settings = dict(eps_list=[2 / 255, 8 / 255], steps=2, batch_size=4, seed=3, check=False, progress=False)
    settings["carry_over"] = False  # every budget attacks every batch: the calls below count them
    real = dvd.attacks.evaluate_robustness
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["seed"])
        if interrupt and len(calls) == 2:
            raise KeyboardInterrupt  # the second batch never finishes
        return real(*args, **kwargs)

    monkeypatch.setattr(dvd.attacks, "evaluate_robustness", counted)
    interrupt = False
    reference = evaluate_zeroshot(model, data, state_dir=tmp_path / "reference", **settings)
    assert len(calls) == 6  # 3 batches (4 + 4 + 2 photos) x 2 budgets

    calls.clear()
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        evaluate_zeroshot(model, data, state_dir=tmp_path / "run", **settings)
    (state_file,) = (tmp_path / "run").glob("*eps0.00784314.json")
    state = json.loads(state_file.read_text())
    assert state["position"] == 4 and len(state["clean"]) == 4 and not state["finished"]

    calls.clear()
    interrupt = False
    resumed = evaluate_zeroshot(model, data, state_dir=tmp_path / "run", **settings)
    assert calls == [3 + 4, 3 + 8, 3, 3 + 4, 3 + 8]  # the first batch is not attacked again
    same = ("clean", "adversarial", "n", "eps", "flags")
    assert [[getattr(r, k) for k in same] for r in resumed] == [
        [getattr(r, k) for k in same] for r in reference
    ]


def test_shapesworld_root_gives_every_task_and_wds_names_resolve(
    tmp_path: Path, checkpoint: Path, capsys
) -> None:
    from dvd.data.shapesworld import generate

    world = tmp_path / "world"
    generate(world, size=8, eval_size=6, instruct_size=2, shard_size=8)
    out = tmp_path / "results.json"
    args = ["eval", "zeroshot", "--model", str(checkpoint), "--attack", "none", "--out", str(out)]
    args += ["--dataset", str(world), "--dataset", "wds/color", "--dataset-root", str(world / "zeroshot")]
    assert main(args) == 0
    rows = json.loads(out.read_text())
    tasks = sorted(p.name for p in (world / "zeroshot").iterdir())
    assert [r["dataset"] for r in rows] == [f"shapesworld/{t}" for t in tasks] + ["color"]
    for row in rows:
        assert (row["attack"], row["eps"], row["steps"], row["adversarial"], row["n"]) == (
            "none",
            0.0,
            0,
            None,
            6,
        )
    color = [r["clean"] for r in rows if r["dataset"] in ("shapesworld/color", "color")]
    assert color[0] == color[1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attack", "apgd-cee"], "unknown attack 'apgd-cee' (did you mean 'apgd-ce'"),
        (["--eps", "4"], "pass --eps-unit 255"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--dataset", "PHOTOS/../photoz"], "did you mean 'photos'"),
        (["--dataset", "wds/photoz", "--dataset-root", "PHOTOS/.."], "wds/photoz not found under"),
        (["--model", "dvd-tiny-vitt"], "did you mean 'dvd-tiny-vit'"),
    ],
)
def test_bad_input_is_a_one_line_error_with_a_suggestion(
    extra, message, photos: Path, tmp_path, capsys
) -> None:
    extra = [e.replace("PHOTOS", str(photos)) for e in extra]
    base = {"--model": "dvd-tiny-vit", "--dataset": str(photos), "--attack": "none"}
    for key, value in zip(extra[::2], extra[1::2], strict=True):
        base[key] = value
    args = [
        "eval",
        "zeroshot",
        *[item for pair in base.items() for item in pair],
        "--out",
        str(tmp_path / "r.json"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dvd: error: ") and message in err[-1]
