"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf: score-based, gradient-free random search.

It only reads the objective's values, so it is AutoAttack's check against gradient masking: if it
breaks samples that the gradient attacks could not, the gradients were lying. Each query changes a
random square window of the perturbation to a fresh +-eps colour per channel and keeps the change if
the loss went up; the window covers a fraction p of the image, halved on the paper's schedule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .gradients import frozen_parameters
from .norms import check_budget, check_images, check_norm, make_generator
from .objectives import Objective
from .tracking import AttackResult, Tracker, broadcast, compaction_interval, images_only

_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # queries after which p is halved


def square_fraction(p_init: float, query: int) -> float:
    """The share of pixels a window covers at ``query`` (the paper's piecewise-constant schedule)."""
    return p_init / 2 ** sum(query > q for q in _HALVINGS)


def _signs(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    draw = torch.randint(0, 2, shape, generator=generator, device=generator.device)
    return (2.0 * draw - 1.0).to(device)


def _positions(high: int, m: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randint(0, high, (m,), generator=generator, device=generator.device).to(device)


def square_attack(
    objective: Objective,
    x: Tensor,
    *,
    eps: float,
    queries: int = 5000,
    p_init: float = 0.8,
    norm: str = "linf",
    generator: torch.Generator | None = None,
    early_stop: bool = True,
) -> AttackResult:
    """Square Attack maximising ``objective`` with ``queries`` forward passes (after one for the start).

    Use the :func:`~dvd.attacks.objectives.margin` objective for classifiers. ``x`` is (B, C, H, W).
    """
    if check_norm(norm) != "linf":
        raise ValueError("square attack supports norm='linf' only; use apgd for L2")
    check_budget(eps)
    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        raise ValueError(f"queries must be an integer >= 1, got {queries!r}")
    check_images(x)
    if x.dim() != 4:
        raise ValueError(f"square attack needs images (B, C, H, W), got shape {tuple(x.shape)}")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
    x = x.detach()
    generator = make_generator(generator, x)
    tracker = Tracker(x)
    n, c, h, w = x.shape
    index = torch.arange(n, device=x.device)
    every = compaction_interval(x)

    with torch.no_grad(), frozen_parameters(objective.modules()):
        # Start: vertical stripes of +-eps, one sign per column and channel.
        best = (x + eps * _signs((n, c, 1, w), generator, x.device)).clamp(0, 1)
        out = objective(best)
        loss = out.loss
        reports = out.success is not None
        found = out.success if reports else torch.zeros_like(loss, dtype=torch.bool)
        x_found = best
        rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        for query in range(queries):
            if early_stop and reports and query % every == 0 and not bool((~found).all()):
                done = found.nonzero()[:, 0]
                tracker.merge(index[done], found[done], x_found[done], best[done], loss[done])
                keep = (~found).nonzero()[:, 0]
                if keep.numel() == 0:
                    return tracker.result()
                state = (index, x, best, loss, found, x_found)
                index, x, best, loss, found, x_found = (t[keep] for t in state)
                objective = objective.subset(keep)
            m = x.shape[0]
            p = square_fraction(p_init, query)
            side = min(max(round(math.sqrt(p * h * w)), 1), max(min(h, w) - 1, 1))
            top = _positions(h - side + 1, m, generator, x.device)
            left = _positions(w - side + 1, m, generator, x.device)
            in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
            in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
            window = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (m, 1, h, w)
            colour = eps * _signs((m, c, 1, 1), generator, x.device)
            candidate = torch.where(window, (x + colour).clamp(0, 1), best)
            # A window that would not change the image is repainted with the opposite colour.
            unchanged = (candidate == best).flatten(1).all(dim=1)
            flipped = torch.where(window, (x - colour).clamp(0, 1), best)
            candidate = torch.where(broadcast(unchanged, x), flipped, candidate)

            out = objective(candidate)
            improved = out.loss > loss
            best = torch.where(broadcast(improved, x), candidate, best)
            loss = torch.where(improved, out.loss, loss)
            if reports:
                newly = out.success & ~found
                x_found = torch.where(broadcast(newly, x), candidate, x_found)
                found = found | newly
    tracker.merge(index, found, x_found, best, loss)
    return tracker.result()


square = images_only(square_attack, "Square Attack adversarial images (see :func:`square_attack`).")
