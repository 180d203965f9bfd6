"""PGD (Madry et al. 2018) over any objective: fixed step size, optional random start, L-inf or L2.

The attack of adversarial training (Delta-CLIP, TeCoA, FARE, Delta^2-LLaVA): it returns the last
iterate, and with ``early_stop`` a sample stops at its first successful point instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gradients import frozen_parameters, value_and_grad
from .norms import ascent_direction, check_budget, check_images, check_norm, make_generator, project
from .norms import random_start as random_point
from .objectives import Objective
from .tracking import AttackResult, broadcast, compaction_interval, images_only


def pgd_attack(
    objective: Objective,
    x: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float | None = None,
    norm: str = "linf",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    early_stop: bool = False,
) -> AttackResult:
    """PGD with ``steps`` gradient steps of ``step_size`` (default 2.5 eps / steps) around ``x`` in [0, 1].

    ``early_stop`` (when the objective reports success) freezes each sample at its first successful
    point, attacks only the others, and checks the final iterate with one extra forward. Without it,
    ``adversarial`` is the last iterate, ``success`` is all False (not evaluated) and ``loss`` is the
    loss at the last evaluated iterate.
    Models must be in eval mode unless a training recipe says otherwise.
    """
    norm = check_norm(norm)
    check_budget(eps, steps)
    check_images(x)
    if step_size is None:
        step_size = 2.5 * eps / steps
    elif not step_size >= 0:
        raise ValueError(f"step_size must be >= 0, got {step_size!r}")
    x = x.detach()
    generator = make_generator(generator, x)
    cur = random_point(x, eps, norm, generator, on_sphere=False) if random_start and eps > 0 else x
    adversarial, success = x.clone(), torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
    index, x_found = torch.arange(x.shape[0], device=x.device), cur
    found = torch.zeros_like(success)
    every = compaction_interval(x)

    with frozen_parameters(objective.modules()):
        for i in range(steps):
            out, grad = value_and_grad(objective, cur)
            loss_cur = out.loss
            if early_stop and out.success is not None:
                newly = out.success & ~found
                x_found = torch.where(broadcast(newly, x), cur, x_found)
                found = found | newly
                if i % every == 0 and not bool((~found).all()):
                    done = found.nonzero()[:, 0]
                    adversarial[index[done]], success[index[done]] = x_found[done], True
                    loss[index[done]] = loss_cur[done]
                    keep = (~found).nonzero()[:, 0]
                    if keep.numel() == 0:
                        return AttackResult(adversarial, success, loss)
                    index, x, cur, grad, x_found, found, loss_cur = (
                        t[keep] for t in (index, x, cur, grad, x_found, found, loss_cur)
                    )
                    objective = objective.subset(keep)
            cur = project(cur + step_size * ascent_direction(grad, norm), x, eps, norm)
            loss[index] = loss_cur
        if early_stop:
            with torch.no_grad():
                out = objective(cur)
            loss[index] = out.loss.detach()
            if out.success is not None:
                newly = out.success.detach() & ~found
                x_found = torch.where(broadcast(newly, x), cur, x_found)
                found = found | newly
    adversarial[index] = torch.where(broadcast(found, x), x_found, cur)
    success[index] = found
    return AttackResult(adversarial, success, loss)


pgd = images_only(pgd_attack, "PGD adversarial images (see :func:`pgd_attack`).")
