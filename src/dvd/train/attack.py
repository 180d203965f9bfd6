"""The PGD of the adversarial training recipes (ΔCLIP, TeCoA, FARE, Δ²LLaVA): budget warm-up, step-size
rule, per-step seeded noise, the model in the recipe's attack mode — shared by the CLIP and VLM trainers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dvd.attacks.pgd import pgd
from dvd.train.loop import StepInfo
from dvd.train.precision import module_mode
from dvd.train.rng import derived_seed


@dataclass
class AttackSettings:
    """PGD of the training recipes: L-inf ``eps`` (warmed up linearly over ``warmup_steps`` from step
    ``warmup_start``, where a branched run's own recipe begins), step size, random start."""

    eps: float
    step_size: float | None
    random_start: bool
    warmup_steps: int
    train_mode: bool
    seed: int
    default_step_rule: str = "delta"  # delta: 2.5 eps / max(K, 2); fixed: 1/255 (TeCoA / FARE)
    warmup_start: int = 0

    def eps_at(self, step: int) -> float:
        done = step - self.warmup_start
        if self.warmup_steps and done < self.warmup_steps:
            return self.eps * max(done + 1, 0) / self.warmup_steps
        return self.eps

    def step_size_for(self, eps: float, steps: int) -> float:
        if self.step_size is not None:
            return self.step_size
        if self.default_step_rule == "fixed":
            return 1 / 255
        return 2.5 * eps / max(steps, 2)  # K=1: 1.25 eps from a random start (fast adversarial training)

    def generator(self, device: torch.device, rank: int, info: StepInfo) -> torch.Generator:
        """A per-(rank, step, micro-batch) generator: attack noise never touches the global RNG."""
        return torch.Generator(device=device).manual_seed(
            derived_seed(self.seed, rank, info.step, info.micro)
        )


def run_pgd(
    objective: Any,
    images: torch.Tensor,
    *,
    model: nn.Module,
    settings: AttackSettings,
    steps: int,
    rank: int,
    info: StepInfo,
) -> torch.Tensor:
    """PGD-``steps`` on ``images`` with the model in the recipe's attack mode; returns detached images."""
    eps = settings.eps_at(info.step)
    if steps == 0 or eps == 0:
        return images
    with module_mode(model, settings.train_mode):
        adversarial = pgd(
            objective, images.detach().float(), eps=eps, steps=steps,
            step_size=settings.step_size_for(eps, steps),
            random_start=settings.random_start, generator=settings.generator(images.device, rank, info),
        )
    return adversarial.detach()
