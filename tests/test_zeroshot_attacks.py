"""dvd eval zeroshot --attack: AutoAttack's standard set, comma lists of dvd's attacks, --eot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dvd.cli import main
from dvd.config import ConfigError
from dvd.eval.zeroshot import resolve_attacks


def test_attack_names_resolve_to_ensembles():
    assert resolve_attacks("aa") == ("apgd-ce", "apgd-t")
    assert resolve_attacks("aa-standard") == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert resolve_attacks("apgd-ce,fab-t") == ("apgd-ce", "fab-t")
    with pytest.raises(ConfigError, match="unknown attack 'fab' \\(did you mean"):
        resolve_attacks("apgd-ce,fab")


def test_cli_runs_a_comma_list_of_attacks_and_names_it_in_the_rows(photos: Path, tmp_path: Path):
    out = tmp_path / "results.json"
    args = ["eval", "zeroshot", "--model", "dvd-tiny-vit", "--dataset", str(photos), "--eps", "8/255",
            "--attack", "apgd-ce,fab-t", "--steps", "3", "--limit", "4", "--eot", "1", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    (row,) = json.loads(out.read_text())
    assert row["attack"] == "apgd-ce,fab-t" and row["n"] == 4
    assert 0 <= row["adversarial"] <= row["clean"]


def test_cli_refuses_a_bad_eot(photos: Path, tmp_path: Path, capsys):
    args = ["eval", "zeroshot", "--model", "dvd-tiny-vit", "--dataset", str(photos), "--eot", "0",
            "--out", str(tmp_path / "r.json")]
    assert main(args) != 0
    assert "--eot must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("attack", ["aa", "pgd"])
def test_save_samples_keeps_every_prediction_and_adversarial_image(
    photos: Path, tmp_path: Path, attack: str
):
    import torch

    from dvd.eval.samples import load_image

    samples = tmp_path / "samples"
    args = ["eval", "zeroshot", "--model", "dvd-tiny-vit", "--dataset", str(photos), "--eps", "0,32/255",
            "--attack", attack, "--steps", "3", "--limit", "4", "--out", str(tmp_path / "r.json"),
            "--save-samples", str(samples), "--no-progress"]
    assert main(args) == 0
    (clean_file,) = samples.glob("*-none-eps0of255.jsonl")
    (attacked_file,) = samples.glob(f"*-{attack}-eps32of255.jsonl")
    clean = [json.loads(line) for line in clean_file.read_text().splitlines()]
    attacked = [json.loads(line) for line in attacked_file.read_text().splitlines()]
    assert [r["id"] for r in clean] == [r["id"] for r in attacked] == [0, 1, 2, 3]
    assert [r["clean"] for r in clean] == [r["clean"] for r in attacked]
    (row,) = [r for r in json.loads((tmp_path / "r.json").read_text()) if r["eps"] > 0]
    robust = [r["adversarial"] == r["label"] for r in attacked]
    assert sum(robust) / 4 == pytest.approx(row["adversarial"]) and row["adversarial"] < row["clean"]
    for record in attacked:
        broken = record["clean"] == record["label"] != record["adversarial"]
        assert (record["broken_by"] is not None) == broken
        image = load_image(attacked_file.with_suffix("") / record["image"])
        assert image.shape == (3, 32, 32) and 0 <= float(image.min()) and float(image.max()) <= 1
    assert torch.is_tensor(image)


class QuantisedCLIP(torch.nn.Module):
    """A CLIP whose image encoder rounds its input to 8 bits: a zero input gradient everywhere."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.logit_scale, self.image_size, self.tokenize = model.logit_scale, model.image_size, model.tokenize

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(torch.round(images * 255) / 255)


@pytest.mark.slow  # Square's 5000 queries on the survivors: about 20 s here
def test_a_row_records_that_masked_gradients_were_escalated(photos: Path):
    from dvd.data.transforms import image_transform
    from dvd.data.zeroshot import load_zeroshot
    from dvd.eval.zeroshot import evaluate_zeroshot
    from dvd.models.clip import create_clip

    torch.manual_seed(0)
    model = QuantisedCLIP(create_clip("dvd-tiny-vit"))
    data = load_zeroshot(photos, transform=image_transform(model.image_size), split="test")
    (row,) = evaluate_zeroshot(model, data, eps_list=[8 / 255], attack="apgd-ce", steps=2,
                                 limit=3, progress=False)
    assert "zero_gradients" in row.flags and "escalated" in row.flags


def test_the_escalation_budget_is_a_setting(photos: Path, monkeypatch: pytest.MonkeyPatch):
    """--escalation-queries sets the Square budget that runs when a masking check fires (default 5000)."""
    from dvd.attacks import escalation
    from dvd.data.transforms import image_transform
    from dvd.data.zeroshot import load_zeroshot
    from dvd.eval.zeroshot import evaluate_zeroshot
    from dvd.models.clip import create_clip

    budgets = []

    def recording_square(*args, queries, **kwargs):
        budgets.append(queries)
        return square_attack(*args, queries=queries, **kwargs)

    square_attack = escalation.square_attack
    monkeypatch.setattr(escalation, "square_attack", recording_square)
    torch.manual_seed(0)
    model = QuantisedCLIP(create_clip("dvd-tiny-vit"))
    data = load_zeroshot(photos, transform=image_transform(model.image_size), split="test")
    (row,) = evaluate_zeroshot(model, data, eps_list=[8 / 255], attack="apgd-ce", steps=2, limit=3,
                               progress=False, escalation_queries=30)
    assert "escalated" in row.flags and budgets and set(budgets) == {30}


def test_the_check_budget_is_a_setting(photos: Path, monkeypatch: pytest.MonkeyPatch):
    """--check-queries sets the gradient-free check's Square budget on the samples APGD left standing
    (default 200); the check runs on the survivors only, with that budget."""
    from dvd.attacks import robustness
    from dvd.data.transforms import image_transform
    from dvd.data.zeroshot import load_zeroshot
    from dvd.eval.zeroshot import evaluate_zeroshot
    from dvd.models.clip import create_clip

    calls = []

    def recording_square(objective, x, *, queries, **kwargs):
        calls.append((queries, x.shape[0]))
        return square_attack(objective, x, queries=queries, **kwargs)

    square_attack = robustness.square_attack
    monkeypatch.setattr(robustness, "square_attack", recording_square)
    torch.manual_seed(0)
    model = create_clip("dvd-tiny-vit")
    data = load_zeroshot(photos, transform=image_transform(model.image_size), split="test")
    for queries in (robustness.CHECK_QUERIES, 7):
        calls.clear()
        settings = {} if queries == robustness.CHECK_QUERIES else {"check_queries": queries}
        (row,) = evaluate_zeroshot(model, data, eps_list=[1 / 255], attack="apgd-ce", steps=2, limit=6,
                                   progress=False, **settings)
        survivors = round(row.adversarial * row.n)
        assert survivors > 0 and {q for q, _ in calls} == {queries}  # APGD left some standing: checked
        assert sum(n for _, n in calls) >= survivors


@pytest.mark.parametrize("flag", ["--escalation-queries", "--check-queries"])
@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_a_bad_square_budget_is_a_one_line_error(flag: str, value: str, photos: Path):
    from dvd.config import ConfigError
    from dvd.eval.zeroshot import cli

    with pytest.raises(ConfigError, match=flag):
        cli(["--model", "dvd-tiny-vit", "--dataset", str(photos), flag, value])
