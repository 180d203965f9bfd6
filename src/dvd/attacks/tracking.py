"""Per-sample bookkeeping shared by the attacks: the best adversarial found so far for every sample."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AttackResult:
    """What an attack found, per sample.

    ``adversarial`` holds the first point where the objective reported success or, for samples never
    broken, the highest-loss point; ``success`` (bool, B) says which samples were broken (all False
    when the objective reports no success); ``loss`` is the best loss seen.
    """

    adversarial: Tensor
    success: Tensor
    loss: Tensor


def images_only(attack: Callable[..., AttackResult], doc: str) -> Callable[..., Tensor]:
    """The public form of ``attack`` (``name_attack`` -> ``name``): same arguments, returns only the
    adversarial images. Its signature, for help and introspection, is the attack's."""

    @functools.wraps(attack)
    def images(objective, x: Tensor, **settings) -> Tensor:
        return attack(objective, x, **settings).adversarial

    images.__name__ = images.__qualname__ = attack.__name__.removesuffix("_attack")
    images.__doc__ = doc
    images.__signature__ = inspect.signature(attack).replace(return_annotation=Tensor)
    return images


def broadcast(mask: Tensor, like: Tensor) -> Tensor:
    """A per-sample mask (B,) viewed to broadcast against ``like`` (B, ...)."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def compaction_interval(x: Tensor) -> int:
    """How often (in steps) an early-stopping attack drops its broken samples.

    Dropping needs one device->host sync to learn how many samples are left. On CPU that is free, so
    the batch shrinks after every step; on accelerators it is amortised over a few steps.
    """
    return 1 if x.device.type == "cpu" else 4


class Tracker:
    """The full-batch outputs of an attack, merged from runs over subsets of the samples."""

    def __init__(self, x: Tensor):
        self.adversarial = x.detach().clone()
        self.success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self.loss = torch.full((x.shape[0],), float("-inf"), device=x.device)

    def merge(self, index: Tensor, found: Tensor, x_found: Tensor, x_best: Tensor, loss_best: Tensor) -> None:
        """Merge a run's results for the samples ``index``.

        A success point is kept once found; otherwise a higher best loss replaces the stored point.
        """
        already = self.success[index]
        old_loss = self.loss[index]
        take_found = found & ~already
        take_best = ~found & ~already & (loss_best > old_loss)
        current = self.adversarial[index]
        current = torch.where(broadcast(take_best, current), x_best, current)
        current = torch.where(broadcast(take_found, current), x_found, current)
        self.adversarial[index] = current
        self.success[index] = already | found
        self.loss[index] = torch.maximum(old_loss, loss_best)

    def result(self) -> AttackResult:
        return AttackResult(self.adversarial, self.success, self.loss)
