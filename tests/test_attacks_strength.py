"""Our attacks are at least as strong as the reference (pyautoattack) on classifiers trained here."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from _digits import TOLERANCE, accuracy, digits, train
from dvd.attacks import apgd, cross_entropy, evaluate_robustness, margin, pgd, square


@pytest.fixture(scope="module")
def data():
    return digits()


@pytest.fixture(scope="module")
def models(data):
    x_train, y_train, _, _ = data
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    mlp = train(mlp, x_train, y_train)
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )
    return {"mlp": mlp, "cnn": train(cnn, x_train, y_train)}


def reference_robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str):
    """pyautoattack's standard APGD-CE + APGD-T (1 restart, 9 target classes, 100 steps)."""
    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    aa = AutoAttack(model, attacks=["apgd-ce", "apgd-t"], version="custom", eps=eps, seed=0,
                    norm={"linf": "Linf", "l2": "L2"}[norm])
    aa.apgd.n_restarts = 1
    aa.apgd_targeted.n_restarts, aa.apgd_targeted.n_target_classes = 1, 9
    adversarial, _ = aa.run_standard_evaluation(x, y, batch_size=len(y))
    return accuracy(model, adversarial, y)


def assert_as_strong_as_reference(model, x, y, eps, norm):
    reference = reference_robust_accuracy(model, x, y, eps, norm)
    assert 0.2 <= reference <= 0.8, f"eps={eps} is outside the informative range (reference {reference:.3f})"
    ours = evaluate_robustness(model, x, y, eps=eps, norm=norm, check=False)
    assert ours.robust_accuracy <= reference + TOLERANCE, (ours.robust_accuracy, reference)
    assert accuracy(model, ours.adversarial, y) == pytest.approx(ours.robust_accuracy)


@pytest.mark.parametrize(
    ("name", "eps", "norm"), [("mlp", 0.1, "linf"), ("cnn", 0.1, "linf"), ("mlp", 0.5, "l2")]
)
def test_ensemble_is_at_least_as_strong_as_autoattack(models, data, name, eps, norm):
    _, _, x, y = data
    assert_as_strong_as_reference(models[name], x, y, eps, norm)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "eps", "norm"),
    [("mlp", 0.06, "linf"), ("cnn", 0.06, "linf"), ("cnn", 0.5, "l2"), ("mlp", 0.35, "l2")],
)
def test_ensemble_is_at_least_as_strong_as_autoattack_at_more_budgets(models, data, name, eps, norm):
    _, _, x, y = data
    assert_as_strong_as_reference(models[name], x, y, eps, norm)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_is_at_least_as_strong_as_pgd_with_the_same_steps(models, data, norm):
    _, _, x, y = data
    model, eps = models["cnn"], {"linf": 0.1, "l2": 0.5}[norm]
    for steps in (10, 50):
        g = torch.Generator().manual_seed(0)
        budget = {"eps": eps, "steps": steps, "norm": norm, "generator": g}
        by_pgd = accuracy(model, pgd(cross_entropy(model, y), x, **budget), y)
        by_apgd = accuracy(model, apgd(cross_entropy(model, y), x, **budget), y)
        assert by_apgd <= by_pgd, (steps, by_apgd, by_pgd)
        assert by_apgd < accuracy(model, x, y)


def test_square_breaks_a_model_that_hides_its_gradients(models, data):
    _, _, x, y = data
    model = models["mlp"]

    def no_gradients(images: torch.Tensor) -> torch.Tensor:  # a black box: outputs, no gradient path
        with torch.no_grad():
            return model(images)

    clean = accuracy(model, x, y)
    white_box = apgd(cross_entropy(no_gradients, y), x, eps=0.1, steps=20)
    g = torch.Generator().manual_seed(0)
    black_box = square(margin(no_gradients, y), x, eps=0.1, queries=300, generator=g)
    # Zero gradients leave APGD at its random start; the score-based search does not need them.
    assert accuracy(model, black_box, y) <= accuracy(model, white_box, y) - 0.2

    result = evaluate_robustness(no_gradients, x, y, eps=0.1, steps=20, check_queries=300)
    assert result.flags["zero_gradients"]
    assert result.flags["black_box_beats_white_box"]
    assert result.broken_by["square-check"] > 0
    assert result.robust_accuracy <= clean - 0.2
