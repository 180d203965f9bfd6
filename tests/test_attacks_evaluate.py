"""evaluate_robustness: the AutoAttack protocol, its checks, low precision and bad input."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import dvd.attacks.ensemble as ensemble_module
from dvd.attacks import evaluate_robustness, not_falling


def classifier(classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, classes)).eval()


def images(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def predicted(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def test_eps_zero_reports_clean_accuracy_only():
    model, x = classifier(), images()
    y = predicted(model, x)
    y[:3] = (y[:3] + 1) % 5
    result = evaluate_robustness(model, x, y, eps=0)
    assert torch.equal(result.robust_correct, result.clean_correct)
    assert result.clean_accuracy == pytest.approx(9 / 12)
    assert torch.equal(result.adversarial, x)
    assert result.broken_by == {}


def test_batches_cover_every_sample_and_report_per_attack_counts():
    model, x = classifier(), images(10)
    y = predicted(model, x)
    result = evaluate_robustness(model, x, y, eps=0.3, steps=10, batch_size=4, check=False)
    assert result.clean_accuracy == 1.0
    assert result.robust_accuracy < 1.0
    assert set(result.broken_by) == {"apgd-ce", "apgd-t"}
    assert sum(result.broken_by.values()) == int((~result.robust_correct).sum())
    assert result.n == 10 and result.seconds > 0


def test_apgd_t_targets_the_nine_highest_scoring_wrong_classes_in_order(monkeypatch):
    model, x = classifier(classes=12), images(4)
    y = predicted(model, x)
    seen, original = [], ensemble_module.targeted_dlr

    def spy(classifier, labels, targets):
        seen.append(targets.clone())
        return original(classifier, labels, targets)

    monkeypatch.setattr(ensemble_module, "targeted_dlr", spy)
    evaluate_robustness(model, x, y, eps=1e-6, attacks=("apgd-t",), steps=2, check=False)  # breaks nothing
    assert len(seen) == 9
    with torch.no_grad():
        logits = model(x)
    ranking = logits.argsort(1, descending=True)[:, 1:10]  # rank 0 is the (correct) label
    assert torch.equal(torch.stack(seen, 1), ranking)


def test_square_in_the_ensemble_runs_after_the_gradient_attacks():
    model, x = classifier(), images(8)
    y = predicted(model, x)
    result = evaluate_robustness(model, x, y, eps=0.2, attacks=("apgd-ce", "square"), steps=5,
                                 square_queries=50)
    assert set(result.broken_by) == {"apgd-ce", "square"}
    assert sum(result.broken_by.values()) == int((result.clean_correct & ~result.robust_correct).sum())
    assert "black_box_beats_white_box" in result.flags


class FlipsUnderAutocast(nn.Module):
    """A model whose low-precision forward is wrong in a way fp32 is not: every claim must be refuted."""

    def __init__(self):
        super().__init__()
        self.inner = classifier()

    def forward(self, x):
        logits = self.inner(x)
        if torch.is_autocast_enabled("cpu"):
            return logits.flip(1)
        return logits


def test_low_precision_successes_that_do_not_hold_in_fp32_are_dropped(caplog):
    model, x = FlipsUnderAutocast().eval(), images(6)
    y = predicted(model, x)  # fp32 predictions: every sample is clean-correct
    with caplog.at_level(logging.WARNING, logger="dvd.attacks"):
        result = evaluate_robustness(model, x, y, eps=1e-4, steps=3, precision="bf16", check=False,
                                     attacks=("apgd-ce",))
    assert result.low_precision_dropped > 0
    assert result.flags["low_precision_dropped"]
    assert "did not hold" in caplog.text
    assert torch.equal(result.robust_correct, result.clean_correct)


def test_bf16_attack_counts_only_fp32_verified_adversarials():
    model, x = classifier(), images(10)
    y = predicted(model, x)
    result = evaluate_robustness(model, x, y, eps=0.3, steps=10, precision="bf16", check=False)
    broken = result.clean_correct & ~result.robust_correct
    assert bool(broken.any())
    assert not bool((predicted(model, result.adversarial[broken]) == y[broken]).any())


def test_checks_flag_probability_outputs_randomness_and_saturation():
    model, x = classifier(), images(8)
    y = predicted(model, x)
    quick = {"eps": 0.01, "steps": 2, "check_queries": 5}
    assert evaluate_robustness(lambda z: model(z).softmax(1), x, y, **quick).flags["probability_outputs"]

    noisy = nn.Sequential(nn.Dropout(0.5), model).train()  # forgot eval(): a randomised classifier
    assert evaluate_robustness(noisy, x, y, **quick).flags["randomized"]

    saturated = evaluate_robustness(lambda z: 1000 * model(z), x, y, **quick)
    assert saturated.flags["saturated_softmax"]

    healthy = evaluate_robustness(model, x, y, **quick)
    assert not any(healthy.flags.values()), healthy.flags


def test_few_classes_are_flagged_for_dlr_attacks():
    model, x = classifier(classes=3), images(6)
    result = evaluate_robustness(model, x, predicted(model, x), eps=0.05, steps=3, check_queries=5)
    assert result.flags["few_classes"]


def test_not_falling_flags_robust_accuracy_that_rises_with_the_budget():
    assert not not_falling({1 / 255: 0.6, 2 / 255: 0.4, 4 / 255: 0.1})
    assert "rises" in not_falling({1 / 255: 0.4, 2 / 255: 0.5})
    assert "steps" in not_falling({10: 0.3, 100: 0.35}, what="steps")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": -0.1}, "eps must be"),
        ({"eps": 0.1, "steps": 0}, "steps must be"),
        ({"eps": 0.1, "attacks": ("apgd-cee",)}, "did you mean 'apgd-ce'"),
        ({"eps": 0.1, "attacks": ()}, "at least one"),
        ({"eps": 0.1, "norm": "l1"}, "norm"),
        ({"eps": 0.1, "batch_size": 0}, "batch_size"),
        ({"eps": 0.1, "precision": "fp8"}, "precision"),
        ({"eps": 0.1, "norm": "l2", "attacks": ("apgd-ce", "square")}, "L-inf only"),
    ],
)
def test_bad_arguments_fail_with_one_clear_line(kwargs, message):
    model, x = classifier(), images(4)
    with pytest.raises(ValueError, match=message):
        evaluate_robustness(model, x, predicted(model, x), **kwargs)


def test_images_outside_the_unit_box_or_mismatched_labels_are_refused():
    model = classifier()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate_robustness(model, images(4) * 255, torch.zeros(4, dtype=torch.long), eps=0.1)
    with pytest.raises(ValueError, match="labels"):
        evaluate_robustness(model, images(4), torch.zeros(3, dtype=torch.long), eps=0.1)
    with pytest.raises(ValueError, match="labels"):
        evaluate_robustness(model, images(4), torch.zeros(4), eps=0.1)
