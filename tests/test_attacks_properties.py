"""Properties every attack must hold, whatever the model, budget, norm or seed (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dvd.attacks import (
    Objective,
    ObjectiveOutput,
    apgd_attack,
    cross_entropy,
    evaluate_robustness,
    from_callable,
    margin,
    pgd_attack,
    square_attack,
)
from dvd.attacks.norms import l2_norm, linf_norm, project

TOL = 1e-6
ATTACKS = ["apgd", "pgd", "square"]
PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tiny_classifier(seed: int, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, classes)).eval()


def batch(seed: int, n: int, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 4, 4, generator=g)
    x[0].fill_(0.0)  # samples at the corners of the box
    x[-1].fill_(1.0)
    return x, torch.randint(0, classes, (n,), generator=g)


def assert_inside(adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> None:
    size = linf_norm(adv - x) if norm == "linf" else l2_norm(adv - x)
    assert float(size.max()) <= eps + TOL
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


budgets = st.sampled_from(["linf", "l2"]).flatmap(
    lambda norm: st.tuples(st.just(norm), st.floats(0.0, 0.3 if norm == "linf" else 2.0))
)


@PROPERTY
@given(budget=budgets, seed=st.integers(0, 2**16), n=st.integers(2, 9), steps=st.integers(1, 12))
def test_apgd_and_pgd_stay_inside_the_eps_ball_and_the_image_box(budget, seed, n, steps):
    norm, eps = budget
    model = tiny_classifier(seed)
    x, y = batch(seed, n)
    g = torch.Generator().manual_seed(seed)
    for early_stop in (False, True):
        result = apgd_attack(cross_entropy(model, y), x, eps=eps, steps=steps, norm=norm, generator=g,
                             early_stop=early_stop)
        assert_inside(result.adversarial, x, eps, norm)
        result = pgd_attack(cross_entropy(model, y), x, eps=eps, steps=steps, norm=norm, generator=g,
                            early_stop=early_stop)
        assert_inside(result.adversarial, x, eps, norm)


@PROPERTY
@given(eps=st.floats(0.0, 0.5), seed=st.integers(0, 2**16), n=st.integers(1, 6))
def test_square_stays_inside_the_linf_ball_and_the_image_box(eps, seed, n):
    model = tiny_classifier(seed)
    x, y = batch(seed, n)
    g = torch.Generator().manual_seed(seed)
    result = square_attack(margin(model, y), x, eps=eps, queries=30, generator=g)
    assert_inside(result.adversarial, x, eps, "linf")


@PROPERTY
@given(budget=budgets, seed=st.integers(0, 2**16), batch_size=st.sampled_from([None, 3, 5]))
def test_robust_correct_implies_clean_correct_and_adversarials_are_real(budget, seed, batch_size):
    norm, eps = budget
    model = tiny_classifier(seed)
    x, _ = batch(seed, 10)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % 5  # some samples start misclassified
    result = evaluate_robustness(model, x, y, eps=eps, norm=norm, steps=5, seed=seed, batch_size=batch_size,
                                 check_queries=10)
    assert not bool((result.robust_correct & ~result.clean_correct).any())
    assert_inside(result.adversarial, x, eps, norm)
    with torch.no_grad():
        logits = model(result.adversarial)
    adversarial_correct = logits.argmax(1) == y
    # Verified in fp32 on sub-batches: only a point on the decision boundary may read differently here.
    top2 = logits.topk(2, dim=1).values
    on_boundary = (top2[:, 0] - top2[:, 1]) < 1e-5
    assert torch.equal(adversarial_correct[~on_boundary], result.robust_correct[~on_boundary])
    kept_clean = ~(result.clean_correct & ~result.robust_correct)
    assert torch.equal(result.adversarial[kept_clean], x[kept_clean])
    assert result.robust_accuracy <= result.clean_accuracy


@PROPERTY
@given(budget=budgets, seed=st.integers(0, 2**16))
def test_one_seed_gives_one_result(budget, seed):
    norm, eps = budget
    model = tiny_classifier(seed)
    x, _ = batch(seed, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    runs = [
        evaluate_robustness(model, x, y, eps=eps, norm=norm, steps=4, seed=seed, check_queries=10)
        for _ in range(2)
    ]
    assert torch.equal(runs[0].adversarial, runs[1].adversarial)
    assert torch.equal(runs[0].robust_correct, runs[1].robust_correct)
    assert runs[0].flags == runs[1].flags


@PROPERTY
@given(budget=budgets, seed=st.integers(0, 2**16))
def test_no_parameter_gets_a_gradient_and_requires_grad_is_restored(budget, seed):
    norm, eps = budget
    model = tiny_classifier(seed)
    model[1].bias.requires_grad_(False)  # a frozen parameter must stay frozen
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    x, y = batch(seed, 6)
    apgd_attack(cross_entropy(model, y), x, eps=eps, steps=3, norm=norm)
    pgd_attack(cross_entropy(model.forward, y), x, eps=eps, steps=3, norm=norm)  # a bound method
    evaluate_robustness(model, x, y, eps=eps, norm=norm, steps=3, check_queries=5)
    for name, p in model.named_parameters():
        assert p.grad is None, name
        assert p.requires_grad == before[name], name


class Spy(nn.Module):
    """Records, at every forward, whether any parameter still requires a gradient."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(any(p.requires_grad for p in self.parameters()))
        return self.model(x)


def test_parameters_are_frozen_during_the_attack_and_restored_after():
    spy = Spy(tiny_classifier(0))
    x, y = batch(0, 4)
    apgd_attack(cross_entropy(spy, y), x, eps=0.1, steps=3)
    assert spy.seen and not any(spy.seen)
    assert all(p.requires_grad for p in spy.parameters())


def test_a_model_captured_by_a_lambda_is_frozen_too():
    spy = Spy(tiny_classifier(0))
    x, y = batch(0, 4)
    evaluate_robustness(lambda z: 2 * spy(z), x, y, eps=0.1, steps=2, check=False)
    assert spy.seen and not any(spy.seen)
    assert all(p.requires_grad and p.grad is None for p in spy.parameters())


class CountingObjective(Objective):
    """Sample i reports success from its ``breaks_at[i] + 1``-th evaluation on; every evaluation is logged."""

    def __init__(self, breaks_at: torch.Tensor, ids: torch.Tensor | None = None, log: list | None = None):
        self.breaks_at = breaks_at
        self.ids = torch.arange(len(breaks_at)) if ids is None else ids
        self.log = [] if log is None else log

    def evaluations(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([sum((logged == i).sum() for logged in self.log) for i in ids])

    def __call__(self, x: torch.Tensor) -> ObjectiveOutput:
        self.log.append(self.ids)
        return ObjectiveOutput((x * x).flatten(1).sum(1), self.evaluations(self.ids) > self.breaks_at)

    def subset(self, index: torch.Tensor) -> CountingObjective:
        return CountingObjective(self.breaks_at[index], self.ids[index], self.log)


@PROPERTY
@given(seed=st.integers(0, 2**16), steps=st.integers(2, 15), attack=st.sampled_from(ATTACKS))
def test_early_stop_only_attacks_unbroken_samples(seed, steps, attack):
    g = torch.Generator().manual_seed(seed)
    n = 7
    breaks_at = torch.randint(0, steps + 2, (n,), generator=g)
    objective = CountingObjective(breaks_at)
    x = torch.rand(n, 3, 4, 4, generator=g)
    if attack == "apgd":
        result = apgd_attack(objective, x, eps=0.1, steps=steps, generator=g)
    elif attack == "pgd":
        result = pgd_attack(objective, x, eps=0.1, steps=steps, generator=g, early_stop=True)
    else:
        result = square_attack(objective, x, eps=0.1, queries=steps, generator=g)
    budget = steps + 1  # the start point (or PGD's final check) plus one evaluation per step
    assert torch.equal(objective.evaluations(torch.arange(n)), torch.clamp(breaks_at + 1, max=budget))
    assert torch.equal(result.success, breaks_at + 1 <= budget)
    sizes = [len(ids) for ids in objective.log]
    assert sizes == sorted(sizes, reverse=True)


@PROPERTY
@given(budget=budgets, seed=st.integers(0, 2**16), n=st.integers(2, 6))
def test_apgd_from_a_given_start_stays_in_the_ball_and_never_ends_below_its_start(budget, seed, n):
    norm, eps = budget
    model = tiny_classifier(seed)
    x, y = batch(seed, n)
    far = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed + 1))  # outside the ball
    objective = from_callable(lambda z: torch.nn.functional.cross_entropy(model(z), y, reduction="none"))
    result = apgd_attack(objective, x, eps=eps, steps=3, norm=norm, x_init=far)  # no success: best loss
    assert_inside(result.adversarial, x, eps, norm)
    start = project(far, x, eps, norm)
    with torch.no_grad():
        assert bool((objective(result.adversarial).loss >= objective(start).loss - 1e-5).all())
