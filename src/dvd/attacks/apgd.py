"""APGD (Croce & Hein, ICML 2020): step-size-free PGD with momentum, over any objective.

Per sample: step size (2 eps at first), best loss and best point. At the checkpoints
p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (fractions of the steps) a
sample's step size is halved, and its iterate restarted from its best point, when fewer than a
fraction ``rho`` of the steps since the last checkpoint increased its loss, or when neither its step
size nor its best loss changed since the last checkpoint. Each step costs one forward and one
input-gradient backward; the objective's success flags come from that same forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gradients import frozen_parameters, value_and_grad
from .norms import (
    ascent_direction,
    check_budget,
    check_images,
    check_norm,
    make_generator,
    project,
    random_start,
)
from .objectives import Objective
from .tracking import AttackResult, Tracker, broadcast, compaction_interval, images_only

MOMENTUM = 0.75  # alpha in the paper: weight of the new gradient step against the previous update


def checkpoint_lengths(steps: int) -> list[int]:
    """Lengths (in steps) of the windows between APGD's checkpoints, covering ``steps``.

    In iterations: the first window is 22% of the budget, each next one 3% shorter, never below 6%.
    """
    first, shrink, shortest = (max(int(f * steps), 1) for f in (0.22, 0.03, 0.06))
    lengths, length, total = [], first, 0
    while total < steps:
        lengths.append(length)
        total += length
        length = max(length - shrink, shortest)
    return lengths


class _Active:
    """The per-sample state of the samples still being attacked, sliceable as a whole."""

    def __init__(self, **tensors: Tensor):
        self.__dict__.update(tensors)

    def keep(self, index: Tensor) -> None:
        for name, value in list(self.__dict__.items()):
            self.__dict__[name] = value[index]


def _single_run(
    objective: Objective,
    x: Tensor,
    index: Tensor,
    tracker: Tracker,
    *,
    eps: float,
    steps: int,
    norm: str,
    rho: float,
    generator: torch.Generator,
    early_stop: bool,
    x_init: Tensor | None = None,
) -> None:
    """One APGD run on the samples ``index`` of the batch, from ``x_init`` (projected into the ball) or a
    random start; results go to ``tracker``."""
    if x_init is None:
        start = random_start(x, eps, norm, generator, on_sphere=True)
    else:
        start = project(x_init.detach().to(x.dtype), x, eps, norm)
    out, grad = value_and_grad(objective, start)
    reports = out.success is not None
    found = out.success if reports else torch.zeros_like(out.loss, dtype=torch.bool)
    s = _Active(x=x, index=index, found=found, step=torch.full_like(out.loss, 2.0 * eps))
    s.cur = s.prev = s.best = s.x_found = start  # every point of the run starts at the start
    s.grad = s.grad_best = grad
    s.loss = s.loss_best = s.loss_best_at_check = out.loss
    s.n_increase, s.reduced_at_check = torch.zeros_like(out.loss), torch.ones_like(found)
    windows = iter(checkpoint_lengths(steps))
    window, since_check = next(windows), 0
    every = compaction_interval(x)
    stop_early = early_stop and reports

    for i in range(steps):
        if stop_early and i % every == 0:
            alive = ~s.found
            if not bool(alive.all()):
                tracker.merge(s.index[~alive], s.found[~alive], s.x_found[~alive], s.best[~alive],
                              s.loss_best[~alive])
                keep = alive.nonzero()[:, 0]
                if keep.numel() == 0:
                    return
                s.keep(keep)
                objective = objective.subset(keep)

        step = broadcast(s.step, s.x)
        z = project(s.cur + step * ascent_direction(s.grad, norm), s.x, eps, norm)
        if i > 0:  # heavy-ball step: x + a (z - x) + (1 - a) (x - x_prev)
            z = project(s.cur + MOMENTUM * (z - s.cur) + (1 - MOMENTUM) * (s.cur - s.prev), s.x, eps, norm)
        s.prev, s.cur = s.cur, z

        out, s.grad = value_and_grad(objective, s.cur)
        s.n_increase = s.n_increase + (out.loss > s.loss)
        s.loss = out.loss
        improved = out.loss > s.loss_best
        mask = broadcast(improved, s.x)
        s.best = torch.where(mask, s.cur, s.best)
        s.grad_best = torch.where(mask, s.grad, s.grad_best)
        s.loss_best = torch.where(improved, out.loss, s.loss_best)
        if reports:
            newly = out.success & ~s.found
            s.x_found = torch.where(broadcast(newly, s.x), s.cur, s.x_found)
            s.found = s.found | newly

        since_check += 1
        if since_check == window and i + 1 < steps:
            oscillating = s.n_increase <= rho * window
            stalled = ~s.reduced_at_check & (s.loss_best <= s.loss_best_at_check)
            reduce = oscillating | stalled
            s.step = torch.where(reduce, 0.5 * s.step, s.step)
            mask = broadcast(reduce, s.x)
            s.cur = torch.where(mask, s.best, s.cur)
            s.grad = torch.where(mask, s.grad_best, s.grad)
            s.reduced_at_check, s.loss_best_at_check = reduce, s.loss_best
            s.n_increase = torch.zeros_like(s.n_increase)
            window, since_check = next(windows, window), 0

    tracker.merge(s.index, s.found, s.x_found, s.best, s.loss_best)


def apgd_attack(
    objective: Objective,
    x: Tensor,
    *,
    eps: float,
    steps: int = 100,
    norm: str = "linf",
    n_restarts: int = 1,
    rho: float = 0.75,
    generator: torch.Generator | None = None,
    early_stop: bool = True,
    x_init: Tensor | None = None,
) -> AttackResult:
    """APGD on ``objective`` around the images ``x`` in [0, 1]; returns the per-sample :class:`AttackResult`.

    ``early_stop`` drops a sample as soon as the objective reports success (its first successful
    point is kept); restarts only attack samples not yet broken. ``x_init`` starts the first run from
    given points (e.g. the best adversarial of an earlier attack), later restarts start at random.
    Models must be in eval mode.
    """
    if x_init is not None and x_init.shape != x.shape:
        raise ValueError(f"x_init has shape {tuple(x_init.shape)} but the images have {tuple(x.shape)}")
    norm = check_norm(norm)
    check_budget(eps, steps)
    check_images(x)
    if isinstance(n_restarts, bool) or not isinstance(n_restarts, int) or n_restarts < 1:
        raise ValueError(f"n_restarts must be an integer >= 1, got {n_restarts!r}")
    if not 0 < rho < 1:
        raise ValueError(f"rho must be in (0, 1), got {rho!r}")
    x = x.detach()
    generator = make_generator(generator, x)
    tracker = Tracker(x)
    if eps == 0:
        with torch.no_grad(), frozen_parameters(objective.modules()):
            out = objective(x)
        found = out.success if out.success is not None else torch.zeros_like(out.loss, dtype=torch.bool)
        tracker.merge(torch.arange(x.shape[0], device=x.device), found.detach(), x, x, out.loss.detach())
        return tracker.result()
    with frozen_parameters(objective.modules()):
        index = torch.arange(x.shape[0], device=x.device)
        for restart in range(n_restarts):
            if restart > 0:
                index = (~tracker.success).nonzero()[:, 0]
                if index.numel() == 0:
                    break
            sub = objective if index.numel() == x.shape[0] else objective.subset(index)
            init = x_init[index] if x_init is not None and restart == 0 else None
            _single_run(sub, x[index], index, tracker, eps=eps, steps=steps, norm=norm, rho=rho,
                        generator=generator, early_stop=early_stop, x_init=init)
    return tracker.result()


apgd = images_only(
    apgd_attack,
    "APGD adversarial images: the first successful point per sample, else its highest-loss point.",
)
