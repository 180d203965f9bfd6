"""Input gradients without touching the model: frozen parameters, gradients w.r.t. the images only."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .objectives import Objective, ObjectiveOutput


@contextmanager
def frozen_parameters(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter of ``modules`` that has it, restore on exit.

    Autograd then neither records nor computes anything for the weights: no ``.grad`` appears and no
    weight-gradient work or activation saving happens on their behalf. Attack the unwrapped module,
    not a DDP/FSDP wrapper, whose gradient hooks expect every parameter to take part.
    """
    frozen: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in frozen:
                frozen[id(p)] = p
    for p in frozen.values():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen.values():
            p.requires_grad_(True)


def value_and_grad(objective: Objective, x: Tensor) -> tuple[ObjectiveOutput, Tensor]:
    """The objective at ``x`` and the gradient of the summed loss w.r.t. ``x`` (one forward, one backward).

    A loss that does not depend on ``x`` gives a zero gradient (reported by the masking checks)
    rather than an error.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = objective(x)
        loss = out.loss
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
        else:
            grad = None
    if grad is None:
        grad = torch.zeros_like(x)
    success = None if out.success is None else out.success.detach()
    return ObjectiveOutput(loss.detach(), success), grad
