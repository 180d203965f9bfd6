"""Defences that mask gradients or draw noise never get a more optimistic number than AutoAttack's.

A digits CNN at 24/255, wrapped three ways: input quantisation inside the forward, a detached middle
layer (no gradient reaches the input), and Gaussian noise on the input (a randomised defence). dvd's
robust accuracy must be at most pyautoattack's + 0.5 pt on each.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from _digits import TOLERANCE, accuracy, digits, train
from dvd.attacks import evaluate_robustness, fab_attack, parse_attacks, targeted_margin
from dvd.attacks.escalation import RANDOM_EOT, fresh_draw_accuracy
from dvd.attacks.fab import project_onto_hyperplane

EPS = 24 / 255
N = 40


class Quantised(nn.Module):
    """Rounds its input to 8 bits inside the forward: a zero gradient almost everywhere."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 255) / 255)


class Detached(nn.Module):
    """Cuts the graph after the first block: the input gradient is exactly zero."""

    def __init__(self, model: nn.Sequential):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model[2:](self.model[:2](x).detach())


class Noisy(nn.Module):
    """Adds fresh Gaussian noise to the input at every forward: a randomised defence."""

    def __init__(self, model: nn.Module, sigma: float = 0.3):
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


@pytest.fixture(scope="module")
def cnn_data():
    x_train, y_train, x, y = digits()
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )
    return train(cnn, x_train, y_train), x[:N], y[:N]


@pytest.fixture(scope="module")
def escalated(cnn_data):
    """dvd's default evaluation of both masked models (computed once for the tests below)."""
    model, x, y = cnn_data
    wrappers = (Quantised, Detached)
    return {wrapper: evaluate_robustness(wrapper(model).eval(), x, y, eps=EPS) for wrapper in wrappers}


def autoattack(model, x, y, attacks, **settings):
    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    aa = AutoAttack(model, attacks=attacks, version="custom", eps=EPS, seed=0)
    aa.apgd.n_restarts = 1
    aa.apgd_targeted.n_restarts, aa.apgd_targeted.n_target_classes = 1, 9
    aa.fab.n_restarts, aa.fab.n_target_classes = 1, 9
    aa.square.n_queries = 5000
    for name, value in settings.items():
        setattr(aa.apgd, name, value)
    adversarial, _ = aa.run_standard_evaluation(x, y, batch_size=len(y))
    return adversarial


def test_aa_standard_is_autoattacks_standard_set():
    assert parse_attacks("aa-standard") == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert parse_attacks("apgd-ce, square") == ("apgd-ce", "square")
    with pytest.raises(ValueError, match="unknown attack 'fab'"):
        parse_attacks("apgd-ce,fab")


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_hyperplane_projection_is_as_short_as_the_reference(norm):
    from pyautoattack.fab_projections import projection_l2, projection_linf

    g = torch.Generator().manual_seed(0)
    p = torch.rand(64, 30, generator=g)
    w = torch.randn(64, 30, generator=g)
    c = (w * p).sum(1) + 0.5 * torch.randn(64, generator=g)
    ours = project_onto_hyperplane(p, w, c, norm)
    theirs = {"linf": projection_linf, "l2": projection_l2}[norm](p, w.clone(), c.clone())
    on_plane = ((w * (p + theirs)).sum(1) - c).abs() < 1e-4
    assert on_plane.sum() > 32  # most targets reachable inside the box
    assert ((w * (p + ours)).sum(1) - c)[on_plane].abs().max() < 1e-4
    assert ((p + ours).min() >= 0) and ((p + ours).max() <= 1)
    length = (lambda d: d.abs().amax(1)) if norm == "linf" else (lambda d: d.norm(dim=1))
    assert torch.allclose(length(ours)[on_plane], length(theirs)[on_plane], atol=1e-4)
    assert torch.allclose(ours[~on_plane], theirs[~on_plane], atol=1e-6)  # out of reach: the nearest corner


def test_fab_t_is_as_strong_as_the_reference(cnn_data):
    model, x, y = cnn_data
    ours = evaluate_robustness(model, x, y, eps=EPS, attacks=("fab-t",), check=False)
    reference = accuracy(model, autoattack(model, x, y, ["fab-t"]), y)
    assert reference < accuracy(model, x, y)  # FAB-T breaks something at this budget
    assert ours.robust_accuracy <= reference + TOLERANCE, (ours.robust_accuracy, reference)
    assert accuracy(model, ours.adversarial, y) == pytest.approx(ours.robust_accuracy)
    assert (ours.adversarial - x).abs().max() <= EPS + 1e-6


def test_fab_finds_a_crossing_inside_the_ball_and_reports_its_distance(cnn_data):
    model, x, y = cnn_data
    with torch.no_grad():
        target = model(x).scatter(1, y[:, None], float("-inf")).argmax(1)
    result = fab_attack(targeted_margin(model, y, target), x, eps=EPS, steps=50)
    assert result.success.any()
    broken = result.success
    assert (model(result.adversarial[broken]).argmax(1) != y[broken]).all()
    distance = (result.adversarial - x).flatten(1).abs().amax(1)
    assert (distance[broken] <= EPS).all()
    assert torch.allclose(-result.loss[broken], distance[broken])


@pytest.mark.parametrize("wrapper", [Quantised, Detached])
def test_masked_gradients_escalate_to_a_full_square_attack(cnn_data, escalated, wrapper):
    model, x, y = cnn_data
    masked = wrapper(model).eval()
    ours = escalated[wrapper]
    assert ours.flags["zero_gradients"]
    assert ours.escalated and ours.flags["escalated"]
    assert ours.broken_by["square-escalation"] > 0
    # AutoAttack's answer for a model without gradients: its Square Attack with the full budget.
    reference = accuracy(masked, autoattack(masked, x, y, ["square"]), y)
    assert ours.robust_accuracy <= reference + TOLERANCE, (ours.robust_accuracy, reference)
    assert accuracy(masked, ours.adversarial, y) == pytest.approx(ours.robust_accuracy)


def test_escalation_can_be_turned_off_and_then_the_number_is_optimistic(cnn_data, escalated):
    model, x, y = cnn_data
    flagged_only = evaluate_robustness(Quantised(model).eval(), x, y, eps=EPS, escalate=False)
    assert flagged_only.flags["zero_gradients"] and not flagged_only.flags["escalated"]
    assert escalated[Quantised].robust_accuracy < flagged_only.robust_accuracy


@pytest.mark.slow
def test_masked_model_is_no_better_than_autoattack_standard(cnn_data, escalated):
    model, x, y = cnn_data
    masked = Quantised(model).eval()
    ours = escalated[Quantised]
    adversarial = autoattack(masked, x, y, ["apgd-ce", "apgd-t", "fab-t", "square"])
    assert ours.robust_accuracy <= accuracy(masked, adversarial, y) + TOLERANCE


def test_a_randomised_model_is_detected_and_scored_over_fresh_draws(cnn_data):
    model, x, y = cnn_data
    noisy = Noisy(model).eval()
    result = evaluate_robustness(noisy, x[:8], y[:8], eps=EPS, steps=2, check=False)
    assert result.randomized and result.eot == RANDOM_EOT
    assert "randomised" in result.flags["randomized"]
    deterministic = evaluate_robustness(model, x[:8], y[:8], eps=EPS, steps=2, check=False)
    assert not deterministic.randomized and deterministic.eot == 1 and not deterministic.flags["randomized"]


def test_a_randomised_model_is_no_better_than_autoattack_rand(cnn_data):
    model, x, y = cnn_data
    noisy = Noisy(model).eval()
    torch.manual_seed(0)
    ours = evaluate_robustness(noisy, x, y, eps=EPS, attacks=("apgd-ce", "apgd-dlr"), eot=5, check=False)
    # AutoAttack's rand version (APGD-CE + APGD-DLR with EOT), scored over the same fresh draws.
    adversarial = autoattack(noisy, x, y, ["apgd-ce", "apgd-dlr"], eot_iter=5)
    reference = float(fresh_draw_accuracy(noisy, adversarial, y, draws=10, batch_size=N).mean())
    assert ours.robust_accuracy <= reference + TOLERANCE, (ours.robust_accuracy, reference)
    assert 0 < ours.robust_accuracy < ours.clean_accuracy


def test_every_broken_sample_names_the_attack_that_broke_it(escalated):
    result = escalated[Quantised]
    names = [name for name in result.attack_of if name is not None]
    assert len(names) == int((result.clean_correct & ~result.robust_correct).sum())
    counts = {name: names.count(name) for name in set(names)}
    assert counts == {k: v for k, v in result.broken_by.items() if v}
    broken = torch.tensor([name is not None for name in result.attack_of])
    assert torch.isfinite(result.loss[broken]).all()
