"""Objectives compute the losses of the papers, per sample, and slice their per-sample state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvd.attacks import (
    ObjectiveOutput,
    apgd_attack,
    clip_contrastive,
    cross_entropy,
    dlr,
    embedding_distance,
    from_callable,
    lm_nll,
    margin,
    pgd,
    targeted_dlr,
    value_and_grad,
)
from dvd.attacks.apgd import checkpoint_lengths

LOGITS = torch.tensor([[4.0, 1.0, 3.0, 0.0, -1.0], [0.0, 2.0, 5.0, 1.0, 0.5]])
LABELS = torch.tensor([0, 1])


def fixed(logits: torch.Tensor):
    return lambda x: logits + 0 * x.flatten(1).sum(1, keepdim=True)


def test_dlr_is_the_difference_of_logits_ratio():
    out = dlr(fixed(LOGITS), LABELS)(torch.zeros(2, 1))
    # sample 0: correct (4) vs best other (3), scaled by top1 - top3 = 4 - 1
    # sample 1: correct (2) vs best other (5), scaled by 5 - 1
    assert torch.allclose(out.loss, torch.tensor([-(4 - 3) / (4 - 1), -(2 - 5) / (5 - 1)]))
    assert out.success.tolist() == [False, True]


def test_targeted_dlr_pulls_towards_the_target_class():
    targets = torch.tensor([2, 3])
    out = targeted_dlr(fixed(LOGITS), LABELS, targets)(torch.zeros(2, 1))
    # scale: top1 - (top3 + top4) / 2
    expected = torch.tensor([-(4 - 3) / (4 - (1 + 0) / 2), -(2 - 1) / (5 - (1 + 0.5) / 2)])
    assert torch.allclose(out.loss, expected)


def test_cross_entropy_and_margin_match_their_definitions():
    ce = cross_entropy(fixed(LOGITS), LABELS)(torch.zeros(2, 1))
    assert torch.allclose(ce.loss, F.cross_entropy(LOGITS, LABELS, reduction="none"))
    m = margin(fixed(LOGITS), LABELS)(torch.zeros(2, 1))
    assert torch.allclose(m.loss, torch.tensor([3.0 - 4.0, 5.0 - 2.0]))


def test_dlr_degrades_to_a_margin_with_two_classes():
    logits = torch.tensor([[2.0, 1.0]])
    assert torch.allclose(dlr(fixed(logits), torch.tensor([0]))(torch.zeros(1, 1)).loss, torch.tensor([-1.0]))
    loss = targeted_dlr(fixed(logits), torch.tensor([0]), torch.tensor([1]))(torch.zeros(1, 1)).loss
    assert torch.isfinite(loss).all()


def test_logit_objective_subset_slices_labels_and_targets():
    full = targeted_dlr(lambda logits: logits, LABELS, torch.tensor([2, 3]))  # inputs are the logits
    objective = full.subset(torch.tensor([1]))
    assert objective.labels.tolist() == [1] and objective.targets.tolist() == [3]
    assert torch.equal(objective(LOGITS[1:]).loss, full(LOGITS).loss[1:])


def test_clip_contrastive_per_sample_losses_average_to_the_clip_loss():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))

    def encode(x):
        return F.normalize(encoder(x), dim=-1)

    x = torch.rand(5, 3, 2, 2)
    text = F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(10.0)
    out = clip_contrastive(encode, text, scale)(x)
    logits = scale * encode(x) @ text.t()
    labels = torch.arange(5)
    clip_loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert out.loss.shape == (5,)
    assert torch.allclose(out.loss.mean(), clip_loss)
    assert torch.equal(out.success, logits.argmax(1) != labels)
    assert clip_contrastive(encode, text, scale).subset(torch.tensor([0, 2])).text_features.shape == (2, 8)


def test_pgd_on_the_clip_contrastive_loss_raises_it():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 8)).eval()

    def encode(x):
        return F.normalize(encoder(x), dim=-1)

    x = torch.rand(6, 3, 2, 2)
    with torch.no_grad():
        text = encode(x)  # paired texts that match their images
    objective = clip_contrastive(encode, text, 20.0)
    adversarial = pgd(objective, x, eps=8 / 255, steps=5)
    with torch.no_grad():
        assert objective(adversarial).loss.mean() > objective(x).loss.mean()
    assert all(p.grad is None for p in encoder.parameters())


def test_embedding_distance_is_fare_squared_l2():
    torch.manual_seed(0)
    encoder = nn.Linear(4, 3)
    x = torch.rand(2, 4)
    reference = torch.randn(2, 3)
    out = embedding_distance(encoder, reference)(x)
    assert torch.allclose(out.loss, ((encoder(x) - reference) ** 2).sum(1))
    assert out.success is None
    assert embedding_distance(encoder, reference).subset(torch.tensor([1])).reference.shape == (1, 3)


def test_lm_nll_sign_and_batch_slicing():
    def nll(images, batch):
        return images.flatten(1).sum(1) * batch["scale"]

    batch = {"scale": torch.tensor([1.0, 2.0, 3.0]), "ids": [[1], [2, 3], [4]]}
    x = torch.ones(3, 2)
    assert torch.allclose(lm_nll(nll, batch=batch)(x).loss, torch.tensor([2.0, 4.0, 6.0]))
    assert torch.allclose(lm_nll(nll, batch=batch, targeted=True)(x).loss, torch.tensor([-2.0, -4.0, -6.0]))
    sub = lm_nll(nll, batch=batch).subset(torch.tensor([2, 0]))
    assert sub.batch["ids"] == [[4], [1]]
    assert torch.allclose(sub(torch.ones(2, 2)).loss, torch.tensor([6.0, 2.0]))


def test_from_callable_accepts_loss_pairs_and_outputs():
    assert from_callable(lambda x: x.sum(1))(torch.ones(2, 3)).success is None
    out = from_callable(lambda x: (x.sum(1), x.sum(1) > 2))(torch.ones(2, 3))
    assert out.success.tolist() == [True, True]
    out = from_callable(lambda x: ObjectiveOutput(x.sum(1)))(torch.ones(2, 3))
    assert out.loss.tolist() == [3.0, 3.0]
    with pytest.raises(ValueError, match="per-sample loss"):
        from_callable(lambda x: x.sum())(torch.ones(2, 3))


def test_a_loss_without_a_path_to_the_input_has_a_zero_gradient():
    _, grad = value_and_grad(from_callable(lambda x: torch.ones(x.shape[0])), torch.rand(2, 3))
    assert torch.equal(grad, torch.zeros(2, 3))


def test_apgd_checkpoints_follow_the_paper():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    lengths = checkpoint_lengths(100)
    assert lengths[:8] == [22, 19, 16, 13, 10, 7, 6, 6]
    points = torch.tensor(lengths).cumsum(0)[:8] / 100
    assert torch.allclose(points, torch.tensor([0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99]))


def test_apgd_halves_its_step_size_to_converge_on_a_concave_objective():
    # The maximum of -||x - c||^2 lies inside the ball: fixed 2*eps sign steps would oscillate around it.
    x = torch.full((3, 1, 4, 4), 0.5)
    centre = x + 0.03 * torch.tensor([1.0, -1.0, 0.3]).view(3, 1, 1, 1)
    objective = from_callable(lambda z: -((z - centre) ** 2).flatten(1).sum(1))
    result = apgd_attack(objective, x, eps=0.05, steps=100, generator=torch.Generator().manual_seed(0))
    assert (result.adversarial - centre).abs().max() < 0.05 / 20
    assert torch.allclose(result.loss, objective(result.adversarial).loss)


def test_apgd_returns_the_best_point_it_evaluated():
    seen: list[torch.Tensor] = []

    def noisy(z):
        loss = torch.sin(40 * z.flatten(1)).sum(1)
        seen.append(loss.detach())
        return loss

    x = torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    result = apgd_attack(from_callable(noisy), x, eps=0.1, steps=30, generator=g)
    assert torch.allclose(result.loss, torch.stack(seen).amax(0))
    assert torch.allclose(noisy(result.adversarial), result.loss)
