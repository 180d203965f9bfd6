"""One step of LLaVA-style training: the answer-token NLL, and the Δ² adversarial step.

Δ² (adversarial visual instruction tuning): for every batch, PGD-K on the images maximises each
sample's next-token NLL of its own answer tokens (the training labels, untargeted), with the
parameters frozen (gradients w.r.t. the pixels only, no weight-gradient work); the training step
then sees only the adversarial images. The attack differentiates ``loss_scale`` x NLL (128 by
default, as in the paper): a sign-gradient attack is unchanged by the scale, but small bf16 input
gradients no longer underflow to zero.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dvd.attacks.objectives import lm_nll
from dvd.config import ConfigError
from dvd.models.vlm_base import VisionLanguageModel
from dvd.models.vlm_conversation import VLMBatch
from dvd.train.attack import AttackSettings, run_pgd
from dvd.train.distributed import DistEnv, gathered
from dvd.train.loop import StepInfo

# ---------------------------------------------------------------------------------------------
# what DDP / FSDP wraps


class InstructionStep(nn.Module):
    """One forward of VLM training: the Δ² attack (when given) on the images, then the answer NLL."""

    def __init__(self, vlm: VisionLanguageModel) -> None:
        super().__init__()
        self.vlm = vlm

    def forward(
        self,
        images: torch.Tensor,
        batch: VLMBatch,
        attack: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        adversarial = images if attack is None else attack(images)
        out = self.vlm(adversarial, batch)
        return {"loss": out.loss, "per_sample_nll": out.per_sample_nll, "images": adversarial}


class ScaledNLL(nn.Module):
    """``scale`` x per-sample answer NLL of ``vlm`` (an ``nn.Module``, so attacks freeze the VLM)."""

    def __init__(self, vlm: VisionLanguageModel, scale: float) -> None:
        super().__init__()
        self.vlm = vlm
        self.scale = scale

    def forward(self, images: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scale * self.vlm.per_sample_nll(images, VLMBatch(**tokens))


def batch_fields(batch: VLMBatch) -> dict[str, torch.Tensor]:
    """A batch as a dict of per-sample tensors (what an objective slices per sample)."""
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "labels": batch.labels,
        "image_mask": batch.image_mask,
    }


class InstructionLoss:
    """The ``loss_fn`` of :func:`dvd.train.loop.fit`: answer-token NLL, on PGD images when ``attack`` is set.

    ``attack_steps`` PGD steps per batch with ``attack`` (eps, step size, random start, seeded per
    rank/step/micro-batch). On logging steps, one extra no-grad forward on the clean images gives
    ``attack/loss_gain`` (adversarial minus clean NLL).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        vlm: VisionLanguageModel,
        env: DistEnv,
        attack: AttackSettings | None = None,
        attack_steps: int = 0,
        loss_scale: float = 128.0,
    ) -> None:
        if attack is not None and attack_steps < 1:
            raise ConfigError(f"attack_steps must be >= 1 for adversarial training, got {attack_steps}")
        self.model, self.vlm, self.env = model, vlm, env
        self.attack, self.attack_steps, self.loss_scale = attack, attack_steps, loss_scale
        self.objective_model = ScaledNLL(vlm, loss_scale)

    def adversarial_images(self, images: torch.Tensor, batch: VLMBatch, info: StepInfo) -> torch.Tensor:
        """PGD images for ``batch`` (parameters frozen meanwhile; no ``.grad`` is touched)."""
        if self.attack is None:
            return images
        objective = lm_nll(self.objective_model, batch=batch_fields(batch))
        return run_pgd(
            objective, images, model=self.vlm, settings=self.attack, steps=self.attack_steps,
            rank=self.env.rank, info=info,
        )

    def __call__(self, batch: tuple[torch.Tensor, VLMBatch], info: StepInfo) -> dict[str, Any]:
        images, tokens = batch
        images = images.to(self.env.device, non_blocking=True)
        tokens = tokens.to(self.env.device, non_blocking=True)
        attack = functools.partial(self.adversarial_images, batch=tokens, info=info) if self.attack else None
        out = self.model(images, tokens, attack=attack)
        result: dict[str, Any] = {"loss": out["loss"], "answer_nll": out["loss"].detach()}
        if info.log and attack is not None:
            with gathered(self.model), torch.no_grad():  # the mode of the training forward
                clean = self.vlm.per_sample_nll(images, tokens)
            adversarial = out["per_sample_nll"].detach()
            result["attack/clean_nll"] = float(clean.mean())
            result["attack/loss_gain"] = float((adversarial - clean).mean())
            result["attack/eps"] = self.attack.eps_at(info.step)
        return result
