"""The steps and losses of the CLIP recipes: what DDP wraps (one forward, the attack inside) and one
loss per recipe family, each returning a dict of named losses as open_clip's trainer does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from dvd.attacks.objectives import clip_contrastive, cross_entropy, embedding_distance
from dvd.models.clip import DvdCLIP
from dvd.train.attack import AttackSettings, run_pgd
from dvd.train.clip_resolution import Phase, Resolution, phase_at
from dvd.train.distributed import DistEnv, gathered, is_fsdp
from dvd.train.loop import StepInfo
from dvd.train.precision import module_mode


def pixel_features(clip: DvdCLIP, images: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """Image features of [0, 1] images at any resolution the tower is set to (mean/std inside)."""
    dtype = clip.model.visual.conv1.weight.dtype if hasattr(clip.model.visual, "conv1") else images.dtype
    features = clip.model.encode_image(((images - clip.mean) / clip.std).to(dtype)).float()
    return F.normalize(features, dim=-1) if normalize else features


class PixelEncoder(nn.Module):
    """[0, 1] images -> image features: the callable the attacks differentiate (and freeze)."""

    def __init__(
        self, clip: DvdCLIP, *, normalize: bool = True, sharded_root: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.clip = clip
        self.normalize = normalize
        self._root = [sharded_root] if sharded_root is not None and is_fsdp(sharded_root) else []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._root:  # FSDP reshards its root after every backward, the attack's included
            self._root[0].unshard()
        return pixel_features(self.clip, images, normalize=self.normalize)


class ZeroShotHead(nn.Module):
    """[0, 1] images -> class logits over fixed class-name embeddings (TeCoA's classifier)."""

    def __init__(self, encoder: PixelEncoder, weights: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("weights", weights, persistent=False)
        self.scale = scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scale * self.encoder(images) @ self.weights




# ---------------------------------------------------------------------------------------------
# what DDP wraps


class ContrastiveStep(nn.Module):
    """One forward of clean / ΔCLIP training (the module DDP wraps).

    Texts are encoded once, with gradient (the text tower trains); the attack, when given, sees a
    detached copy of these features. Image features of the (adversarial) images follow, and of the
    clean images too (one concatenated forward) when a clean-loss weight is set.
    """

    def __init__(self, clip: DvdCLIP) -> None:
        super().__init__()
        self.clip = clip

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        clean_too: bool = False,
    ) -> dict[str, torch.Tensor]:
        text = self.clip.encode_text(tokens)
        adversarial = images if attack is None else attack(images, text.detach())
        if attack is not None and is_fsdp(self):  # the attack's backward resharded the root
            self.unshard()
        batch = torch.cat([adversarial, images]) if clean_too else adversarial
        features = pixel_features(self.clip, batch)
        out = {
            "image_features": features[: images.shape[0]],
            "text_features": text,
            "logit_scale": self.clip.logit_scale,
            "images": adversarial,
        }
        if clean_too:
            out["clean_image_features"] = features[images.shape[0] :]
        return out


class ImageTowerStep(nn.Module):
    """One forward of TeCoA / FARE (the module DDP wraps): the attack, then image features."""

    def __init__(self, clip: DvdCLIP, *, normalize: bool) -> None:
        super().__init__()
        self.clip = clip
        self.normalize = normalize

    def forward(
        self, images: torch.Tensor, attack: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        adversarial = images if attack is None else attack(images)
        if attack is not None and is_fsdp(self):
            self.unshard()
        return {
            "features": pixel_features(self.clip, adversarial, normalize=self.normalize),
            "images": adversarial,
        }


# ---------------------------------------------------------------------------------------------
# losses (one per recipe family); each returns a dict of named losses, as open_clip's trainer does


@dataclasses.dataclass(kw_only=True, eq=False, repr=False)
class RecipeLoss:
    """What every recipe's loss holds: the module DDP wraps (``model``), the CLIP inside it, the process
    group, the phases (image size and attack steps over the run) and the attack (None: clean training)."""

    model: nn.Module
    clip: DvdCLIP
    env: DistEnv
    phases: Sequence[Phase]
    attack: AttackSettings | None

    def pgd(self, objective: Any, *, steps: int, info: StepInfo) -> Callable[[torch.Tensor], torch.Tensor]:
        """The recipe's PGD-``steps`` on ``objective``, as the function of the images a step module calls."""
        return functools.partial(
            run_pgd, objective, model=self.clip, settings=self.attack, steps=steps, rank=self.env.rank,
            info=info,
        )

    @torch.no_grad()
    def attack_stats(
        self, objective: Any, clean: torch.Tensor, adversarial: torch.Tensor, info: StepInfo
    ) -> dict[str, float]:
        """Loss gain and success of this batch's attack: two extra no-grad forwards in the attack's mode
        (logging steps only; the caller holds the model's parameters gathered)."""
        with module_mode(self.clip, self.attack.train_mode):
            before, after = objective(clean), objective(adversarial)
        return _attack_summary(
            before.loss, after.loss, before.success, after.success, self.attack.eps_at(info.step)
        )


@dataclasses.dataclass(kw_only=True, eq=False, repr=False)
class ContrastiveLoss(RecipeLoss):
    """clean / delta: ``ClipLoss`` on (adversarial) images with clean captions (+ weighted clean loss)."""

    resolution: Resolution
    clean_loss_weight: float
    local_loss: bool
    gather_with_grad: bool

    def __post_init__(self) -> None:
        self.encoder = PixelEncoder(self.clip, sharded_root=self.model)
        self.clip_loss = ClipLoss(
            local_loss=self.local_loss, gather_with_grad=self.gather_with_grad, cache_labels=True,
            rank=self.env.rank, world_size=self.env.world_size,
        )

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor], info: StepInfo) -> dict[str, Any]:
        images, tokens = (t.to(self.env.device, non_blocking=True) for t in batch)
        phase = phase_at(self.phases, info.step)
        self.resolution.set(phase.image_size)
        images = self.resolution.images(images)
        steps = phase.attack_steps if self.attack is not None else 0
        attack = functools.partial(self._attack, steps=steps, info=info) if steps > 0 else None
        weight = self.clean_loss_weight if attack is not None else 0.0
        out = self.model(images, tokens, attack=attack, clean_too=weight > 0)
        loss = self.clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        result: dict[str, Any] = {"contrastive_loss": loss.detach()}
        if weight > 0:
            clean = self.clip_loss(out["clean_image_features"], out["text_features"], out["logit_scale"])
            result["clean_contrastive_loss"] = clean.detach()
            loss = loss + weight * clean
        result["loss"] = loss
        result["logit_scale"] = out["logit_scale"].detach()
        if info.log and attack is not None:
            with gathered(self.model):
                objective = self._objective(out["text_features"].detach())
                result.update(self.attack_stats(objective, images, out["images"], info))
        return result

    def _objective(self, text: torch.Tensor) -> Any:
        return clip_contrastive(self.encoder, text, self.clip.logit_scale.detach())

    def _attack(
        self, images: torch.Tensor, text: torch.Tensor, *, steps: int, info: StepInfo
    ) -> torch.Tensor:
        return self.pgd(self._objective(text), steps=steps, info=info)(images)


@dataclasses.dataclass(kw_only=True, eq=False, repr=False)
class TecoaLoss(RecipeLoss):
    """TeCoA: cross-entropy of zero-shot logits (fixed class-name embeddings) on adversarial images."""

    class_weights: torch.Tensor

    def __post_init__(self) -> None:
        self.scale = float(self.clip.logit_scale.detach())
        encoder = PixelEncoder(self.clip, sharded_root=self.model)
        self.head = ZeroShotHead(encoder, self.class_weights, self.scale)

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor], info: StepInfo) -> dict[str, Any]:
        images, labels = (t.to(self.env.device, non_blocking=True) for t in batch)
        steps = phase_at(self.phases, info.step).attack_steps

        objective = cross_entropy(self.head, labels)
        out = self.model(images, attack=self.pgd(objective, steps=steps, info=info))
        logits = self.scale * out["features"] @ self.head.weights
        loss = F.cross_entropy(logits.float(), labels)
        result: dict[str, Any] = {
            "loss": loss,
            "cross_entropy": loss.detach(),
            "adversarial_accuracy": (logits.argmax(1) == labels).float().mean().detach(),
        }
        if info.log:
            with gathered(self.model):
                result.update(self.attack_stats(objective, images, out["images"], info))
        return result


@dataclasses.dataclass(kw_only=True, eq=False, repr=False)
class FareLoss(RecipeLoss):
    """FARE: squared L2 between adversarial embeddings and the frozen original's clean embeddings."""

    reference: DvdCLIP

    def __post_init__(self) -> None:
        self.reference_encoder = PixelEncoder(self.reference, normalize=False)
        self.encoder = PixelEncoder(self.clip, normalize=False, sharded_root=self.model)

    def __call__(self, batch: Any, info: StepInfo) -> dict[str, Any]:
        images = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(
            self.env.device, non_blocking=True
        )
        steps = phase_at(self.phases, info.step).attack_steps
        with torch.no_grad():
            target = self.reference_encoder(images)

        objective = embedding_distance(self.encoder, target)
        out = self.model(images, attack=self.pgd(objective, steps=steps, info=info))
        loss = (out["features"].float() - target).pow(2).sum(dim=1).mean()
        result: dict[str, Any] = {"loss": loss, "embedding_distance": loss.detach()}
        if info.log:
            with gathered(self.model):
                result.update(self.attack_stats(objective, images, out["images"], info))
        return result


def _attack_summary(
    before: torch.Tensor,
    after: torch.Tensor,
    fooled_before: torch.Tensor | None,
    fooled_after: torch.Tensor | None,
    eps: float,
) -> dict[str, float]:
    """``attack/loss_gain`` and, when the objective knows success, ``attack/success``: the share of
    samples right on the clean image (matching caption or class top-1) and wrong after the attack."""
    stats = {"attack/loss_gain": float((after - before).mean()), "attack/eps": eps}
    if fooled_before is not None and fooled_after is not None:
        right = ~fooled_before
        stats["attack/clean_top1"] = float(right.float().mean())
        stats["attack/adversarial_top1"] = float((~fooled_after).float().mean())
        stats["attack/success"] = float((right & fooled_after).sum()) / max(1, int(right.sum()))
    return stats
