"""Issue 17: a sample broken at a smaller eps is carried over to the larger budgets, not attacked again."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dvd.attacks
from dvd.eval.samples import load_image
from dvd.eval.zeroshot import ZeroShotClassifier, evaluate_zeroshot

CLASSES = ["circle", "square", "triangle", "star"]
SMALL, LARGE = 4 / 255, 16 / 255


@dataclass
class Images:
    """A ZeroShotData of fixed tensors, labelled with the model's clean predictions (all clean-correct)."""

    dataset: list[tuple[torch.Tensor, int]]
    classnames: list[str] = field(default_factory=lambda: list(CLASSES))
    templates: list[str] = field(default_factory=lambda: ["a photo of a {c}."])
    name: str = "tiles"


class LinearCLIP(nn.Module):
    """A CLIP-shaped linear model on 8x8 images: its margins vary, so attacks break some samples at a small
    budget and more at a large one (a random tiny ViT predicts one class whatever the image)."""

    image_size = 8

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(3 * 8 * 8, 16)
        self.text = nn.Embedding(len(CLASSES), 16)
        self.logit_scale = torch.tensor(10.0)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([next(i for i, c in enumerate(CLASSES) if c in text) for text in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images.flatten(1)), dim=-1)


@pytest.fixture(scope="module")
def model() -> LinearCLIP:
    return LinearCLIP().eval()


@pytest.fixture(scope="module")
def data(model: LinearCLIP) -> Images:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(12, 3, model.image_size, model.image_size, generator=generator)
    with torch.no_grad():
        labels = ZeroShotClassifier(model, CLASSES, ["a photo of a {c}."])(images).argmax(dim=1)
    return Images([(image, int(label)) for image, label in zip(images, labels, strict=True)])


def count_attacked(monkeypatch) -> list[tuple[float, int]]:
    """(eps, images) of every call of the attack ensemble: the images whose objective is evaluated."""
    calls: list[tuple[float, int]] = []
    real = dvd.attacks.evaluate_robustness

    def counted(classifier, images, labels, **kwargs):
        calls.append((kwargs["eps"], images.shape[0]))
        return real(classifier, images, labels, **kwargs)

    monkeypatch.setattr(dvd.attacks, "evaluate_robustness", counted)
    return calls


SETTINGS = dict(attack="apgd-ce", steps=5, batch_size=4, seed=0, check=False, progress=False)


def test_broken_samples_are_not_attacked_again_and_robustness_is_never_above_a_fresh_run(
    model, data, monkeypatch
):
    calls = count_attacked(monkeypatch)
    small, large = evaluate_zeroshot(model, data, eps_list=[LARGE, SMALL], **SETTINGS)  # ascending
    assert (small.eps, large.eps) == (SMALL, LARGE)
    n = len(data.dataset)
    standing = round(small.adversarial * n)  # robust at the small budget: the only ones attacked again
    assert 0 < standing < n  # the test needs both kinds
    assert sum(k for eps, k in calls if eps == SMALL) == n
    assert sum(k for eps, k in calls if eps == LARGE) == standing

    calls.clear()
    (fresh,) = evaluate_zeroshot(model, data, eps_list=[LARGE], **SETTINGS)
    assert sum(k for _, k in calls) == n  # from scratch: every (clean-correct) sample attacked
    assert large.adversarial <= fresh.adversarial
    assert large.adversarial <= small.adversarial and large.clean == small.clean == fresh.clean == 1.0


def test_carried_samples_keep_the_image_and_attack_that_broke_them(model, data, tmp_path):
    out = tmp_path / "samples"
    settings = {**SETTINGS, "attack": "pgd"}
    evaluate_zeroshot(model, data, eps_list=[SMALL, LARGE], save_samples=out, **settings)
    small_file, large_file = (out / f"zeroshot-model-tiles-pgd-eps{k}of255.jsonl" for k in (4, 16))
    read = [
        {r["id"]: r for r in map(json.loads, f.read_text().splitlines())} for f in (small_file, large_file)
    ]
    broken = [i for i, r in read[0].items() if r["broken_by"] == "pgd"]
    assert broken
    clean = torch.stack([data.dataset[i][0] for i in broken])
    for i, image in zip(broken, clean, strict=True):
        carried = read[1][i]
        assert carried["broken_by"] == "pgd" and carried["adversarial"] == read[0][i]["adversarial"]
        stored = load_image(large_file.with_suffix("") / carried["image"])
        assert (stored - image).abs().amax() <= SMALL + 1e-6  # the small budget's image, inside its ball


def test_without_carry_over_every_budget_attacks_every_sample(model, data, monkeypatch):
    calls = count_attacked(monkeypatch)
    evaluate_zeroshot(model, data, eps_list=[SMALL, LARGE], carry_over=False, **SETTINGS)
    assert [k for _, k in calls] == [4, 4, 4, 4, 4, 4]


def test_a_resumed_run_carries_over_from_the_saved_state(model, data, tmp_path, monkeypatch):
    reference = evaluate_zeroshot(model, data, eps_list=[SMALL, LARGE], **SETTINGS)
    calls = count_attacked(monkeypatch)
    real = dvd.attacks.evaluate_robustness  # the counting one

    def interrupted(*args, **kwargs):
        if kwargs["eps"] == LARGE:
            raise KeyboardInterrupt  # the small budget finished, the large one never starts
        return real(*args, **kwargs)

    monkeypatch.setattr(dvd.attacks, "evaluate_robustness", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_zeroshot(model, data, eps_list=[SMALL, LARGE], state_dir=tmp_path, **SETTINGS)
    monkeypatch.setattr(dvd.attacks, "evaluate_robustness", real)
    calls.clear()
    resumed = evaluate_zeroshot(model, data, eps_list=[SMALL, LARGE], state_dir=tmp_path, **SETTINGS)
    assert sum(k for eps, k in calls if eps == SMALL) == 0  # read from its state
    assert sum(k for eps, k in calls if eps == LARGE) == round(reference[0].adversarial * len(data.dataset))
    assert [r.adversarial for r in resumed] == [r.adversarial for r in reference]
