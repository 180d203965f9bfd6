"""FAB (Croce & Hein, ICML 2020): the Fast Adaptive Boundary attack, over an objective.

FAB looks for the *smallest* perturbation that crosses a decision boundary. The boundary is the zero
level set of the objective's loss (for FAB-T, :func:`~dvd.attacks.objectives.targeted_margin`:
``z_t - z_y``). Each step linearises the loss at the current point, projects both the current point
and the original image onto that hyperplane (inside the [0, 1] box), and moves to a convex
combination of the two projections (overshooting by ``eta``), biased towards the original image by
at most ``alpha_max``; a point that crossed is pulled back towards the original by ``beta``. A
sample is broken when a crossing point within ``eps`` of the original was found.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gradients import frozen_parameters, value_and_grad
from .norms import check_budget, check_images, check_norm
from .objectives import Objective
from .tracking import AttackResult, Tracker, broadcast, images_only


def _norm(d: Tensor, norm: str) -> Tensor:
    return d.abs().amax(dim=1) if norm == "linf" else d.norm(dim=1)


def project_onto_hyperplane(p: Tensor, w: Tensor, c: Tensor, norm: str) -> Tensor:
    """The smallest ``d`` (L-inf or L2) with ``w . (p + d) = c`` and ``p + d`` in [0, 1], rows (B, D).

    The minimiser has the form ``clamp(s * v, -p, 1 - p)`` with ``v = sign(w)`` (L-inf) or ``w`` (L2),
    oriented towards the plane. Coordinate i then moves the plane's value by ``a_i min(s, t_i)`` (``t_i``:
    where it reaches the box), a piecewise-linear, increasing function of ``s``: sorting the ``t_i`` gives
    the exact smallest ``s`` that reaches the plane. When the box cannot reach it, the box corner closest
    to it is returned, as in the reference implementation.
    """
    p64, w64, c64 = p.double(), w.double(), c.double()
    need = c64 - (w64 * p64).sum(dim=1)
    side = torch.where(need >= 0, 1.0, -1.0).to(p64)[:, None]
    v = side * (w64.sign() if norm == "linf" else w64)
    low, high = -p64, 1.0 - p64
    rate = side * w64 * v  # >= 0: how fast coordinate i moves the plane's value while unsaturated
    safe = torch.where(v == 0, 1.0, v)
    limit = torch.where(v > 0, high / safe, torch.where(v < 0, low / safe, torch.zeros_like(v)))
    limit, order = limit.clamp_min(0).sort(dim=1)
    rate = rate.gather(1, order)
    saturated = (rate * limit).cumsum(dim=1) - rate * limit  # sum over the coordinates saturated before k
    moving = rate.flip(1).cumsum(dim=1).flip(1)  # sum of the rates still moving from k on
    reached = saturated + limit * moving  # the value reached at s = limit_k
    target = need.abs()[:, None]
    feasible = (reached >= target).any(dim=1)
    k = (reached >= target).int().argmax(dim=1, keepdim=True)
    exact = ((target - saturated.gather(1, k)) / moving.gather(1, k).clamp_min(1e-300))[:, 0]
    s = torch.where(feasible, exact.clamp_min(0), limit[:, -1])
    d = torch.minimum(torch.maximum(s[:, None] * v, low), high)
    return d.to(p.dtype)


def fab_attack(
    objective: Objective,
    x: Tensor,
    *,
    eps: float,
    steps: int = 100,
    norm: str = "linf",
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
) -> AttackResult:
    """FAB from the clean images ``x`` (no random start, as AutoAttack's FAB-T with one restart).

    ``objective`` must report success (e.g. a logit objective); its loss is linearised towards its
    zero level set. Returns, per sample, the smallest crossing point found when it lies within ``eps``
    (``success``), else the clean image; ``loss`` is minus the distance of the best crossing found.
    Models must be in eval mode.
    """
    norm = check_norm(norm)
    check_budget(eps, steps)
    check_images(x)
    x = x.detach()
    n = x.shape[0]
    shape = x.shape
    tracker = Tracker(x)
    best = x.clone()
    distance = torch.full((n,), float("inf"), device=x.device)
    index = torch.arange(n, device=x.device)
    x0 = x.flatten(1)
    current = x0.clone()
    with frozen_parameters(objective.modules()):
        with torch.no_grad():
            reports = objective(x).success is not None
        if not reports:
            raise ValueError("fab needs an objective that reports success (e.g. targeted_margin)")
        for _ in range(steps):
            out, grad = value_and_grad(objective, current.view(-1, *shape[1:]))
            w = grad.flatten(1)
            c = (w * current).sum(dim=1) - out.loss  # the linearised loss is 0 on {z: w . z = c}
            d1 = project_onto_hyperplane(current, w, c, norm)
            d2 = project_onto_hyperplane(x0[index], w, c, norm)
            a1 = _norm(d1, norm).clamp_min(1e-8)
            a2 = _norm(d2, norm).clamp_min(1e-8)
            alpha = (a1 / (a1 + a2)).clamp(0.0, alpha_max)[:, None]
            current = ((current + eta * d1) * (1 - alpha) + (x0[index] + eta * d2) * alpha).clamp(0.0, 1.0)
            with torch.no_grad():
                crossed = objective(current.view(-1, *shape[1:])).success
            gap = _norm(current - x0[index], norm)
            closer = crossed & (gap < distance[index])
            best[index[closer]] = current[closer].view(-1, *shape[1:])
            distance[index[closer]] = gap[closer]
            origin = x0[index]
            current = torch.where(broadcast(crossed, current), origin + beta * (current - origin), current)
            alive = distance[index] > eps  # broken within eps: shrinking it further changes nothing
            if not bool(alive.all()):
                keep = alive.nonzero()[:, 0]
                if keep.numel() == 0:
                    break
                index, current = index[keep], current[keep]
                objective = objective.subset(keep)
    found = distance <= eps
    all_index = torch.arange(n, device=x.device)
    tracker.merge(all_index, found, best, x, -distance)
    return tracker.result()


fab = images_only(fab_attack, "FAB adversarial images (see :func:`fab_attack`).")
