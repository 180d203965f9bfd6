"""Carrying samples over from a smaller budget: what is broken at eps stays broken at any larger eps.

An adversarial image inside the L-inf ball of radius eps is inside every larger ball, so a sample that
is misclassified at a smaller budget (clean-wrong, or broken by an attack) needs no attack at a larger
one: it counts as not robust there, with the adversarial image and the attack that broke it. The
zero-shot evaluation goes through its budgets in ascending order and attacks only the samples still
standing, so the robust accuracy can only fall with eps, and never rises above a from-scratch run's
by anything but the attacks' own randomness on the samples still attacked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Outcome:
    """One batch at one budget: per-sample clean and robust scores (0/1, or a fraction over draws for a
    randomised model), the attack that broke each sample (None: not broken by an attack), the fired
    checks; for ``--save-samples`` also the clean and adversarial predictions, losses and images."""

    clean: Tensor
    robust: Tensor
    flags: set[str]
    broken_by: list[str | None]
    predicted: Tensor | None = None
    attacked: Tensor | None = None
    loss: Tensor | None = None
    adversarial: Tensor | None = None


@dataclass
class Carry:
    """Per sample (numbered in evaluation order) of the budget just evaluated: its label, clean score and
    whether it stayed robust, and, when per-sample records are written, what they need to be written
    again (clean and adversarial prediction, loss, adversarial image on the CPU)."""

    labels: list[int] = field(default_factory=list)
    clean: list[float] = field(default_factory=list)
    robust: list[float] = field(default_factory=list)
    broken_by: list[str | None] = field(default_factory=list)
    records: dict[int, tuple[int, int, float, Tensor]] = field(default_factory=dict)

    def carried(self, index: list[int], labels: Tensor, *, need_records: bool) -> list[bool]:
        """Which samples of a batch (numbers ``index``, ``labels``) are already not robust: carried over.
        A sample the previous pass did not see, or saw with another label, is attacked again."""
        found = []
        for i, label in zip(index, labels.tolist(), strict=True):
            seen = i < len(self.robust) and i < len(self.labels) and self.labels[i] == label
            ok = seen and float(self.robust[i]) == 0.0
            found.append(ok and (i in self.records or not need_records))
        return found

    def remember(self, index: list[int], labels: Tensor, outcome: Outcome) -> None:
        """Record a batch's outcome (samples in order, so ``index`` continues the lists)."""
        self.labels += labels.tolist()
        self.clean += outcome.clean.tolist()
        self.robust += outcome.robust.tolist()
        self.broken_by += outcome.broken_by
        if outcome.adversarial is not None:
            assert outcome.predicted is not None and outcome.attacked is not None and outcome.loss is not None
            for j, i in enumerate(index):
                self.records[i] = (
                    int(outcome.predicted[j]),
                    int(outcome.attacked[j]),
                    float(outcome.loss[j]),
                    outcome.adversarial[j].detach().cpu(),
                )


def merge(
    carry: Carry, index: list[int], keep: list[bool], attacked: Outcome | None, device: torch.device
) -> Outcome:
    """The whole batch's outcome: carried samples (``keep``) from ``carry``, the others from ``attacked``."""
    todo = [j for j, k in enumerate(keep) if not k]
    clean = torch.tensor([float(carry.clean[i]) for i in index])
    robust = torch.zeros(len(index))
    broken_by = [carry.broken_by[i] for i in index]
    flags: set[str] = set()
    if attacked is not None:
        clean[todo], robust[todo] = attacked.clean.float(), attacked.robust.float()
        for j, name in zip(todo, attacked.broken_by, strict=True):
            broken_by[j] = name
        flags = attacked.flags
    outcome = Outcome(clean, robust, flags, broken_by)
    if all(i in carry.records for i, k in zip(index, keep, strict=True) if k) and (
        attacked is None or attacked.adversarial is not None
    ):
        outcome.predicted, outcome.attacked, outcome.loss, outcome.adversarial = _records(
            carry, index, keep, attacked, device
        )
    return outcome


def _records(
    carry: Carry, index: list[int], keep: list[bool], attacked: Outcome | None, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    todo = [j for j, k in enumerate(keep) if not k]
    first = next(carry.records[i] for i, k in zip(index, keep, strict=True) if k)
    predicted = torch.zeros(len(index), dtype=torch.long)
    after = torch.zeros(len(index), dtype=torch.long)
    loss = torch.full((len(index),), float("nan"))
    images = torch.zeros((len(index), *first[3].shape), dtype=first[3].dtype)
    for j, (i, k) in enumerate(zip(index, keep, strict=True)):
        if k:
            predicted[j], after[j], loss[j], images[j] = carry.records[i]
    if attacked is not None and todo:
        assert attacked.predicted is not None and attacked.attacked is not None
        assert attacked.loss is not None and attacked.adversarial is not None
        predicted[todo], after[todo] = attacked.predicted.cpu(), attacked.attacked.cpu()
        loss[todo], images[todo] = attacked.loss.float().cpu(), attacked.adversarial.cpu().to(images.dtype)
    return predicted.to(device), after.to(device), loss.to(device), images.to(device)
