"""``dvd train clip``: ΔCLIP adversarial pre-training, clean CLIP, and the TeCoA / FARE fine-tuning baselines.

Recipes (``recipe=``):

- ``clean``  open_clip's contrastive training.
- ``delta``  ΔCLIP: per batch the texts are encoded once (their detached features serve the attack),
  PGD-K maximises each image's contrastive loss against them in pixel space with the parameters
  frozen (gradients w.r.t. the images only; no text-tower re-runs, no weight-gradient work), then
  the training step runs on the adversarial images with their clean captions.
- ``tecoa``  fine-tunes a pre-trained CLIP's image tower with cross-entropy over class-name text
  embeddings on adversarial images (Mao et al., ICLR 2023).
- ``fare``   fine-tunes the image tower so that embeddings of adversarial images stay close (squared
  L2) to the frozen original tower's clean embeddings (Schlarmann et al., ICML 2024).

Choices worth knowing:

- The attack runs with the model in eval mode (``attack_mode=eval``); for ViTs without dropout or
  batch norm this is the same function as train mode.
- Under DDP every rank attacks its own images against its own batch's texts (the local B x B
  contrastive loss): no communication inside the attack. The training loss gathers features
  across ranks (open_clip's ``ClipLoss``, ``local_loss`` + ``gather_with_grad`` by default).
- ``distributed=fsdp`` (FSDP2) shards the transformer blocks of both towers; the 0-d ``logit_scale``
  stays replicated with its gradient averaged by hand, and the root's parameters are gathered again
  after the attack's backward (FSDP reshards after every backward). It matches DDP to ~1e-7.
- A CLIPA/AdvXL-style ``phases`` schedule trains most steps at low resolution: images are loaded
  at the model's size and downsampled on the device; the positional embedding stays a full-size
  parameter and is bilinearly interpolated in the forward (a ``torch.nn.utils.parametrize``
  parametrization); each phase sets its own number of attack steps.
- Resume (``resume=latest``) restores weights, optimizer, schedule, grad scaler, every rank's RNG
  states and data position: an epoch-mode stream re-reads and drops the batches already consumed in
  the current epoch (costs reading them again); a resampled stream is re-seeded at every checkpoint,
  so nothing is re-read. A killed run resumed this way ends with the uninterrupted run's weights.
- Checkpoints are folders in open_clip's layout (``open_clip_model.safetensors`` +
  ``open_clip_config.json``): ``open_clip.create_model("local-dir:DIR")`` loads any of them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn
from torch.nn.utils import parametrize

from dvd.attacks.objectives import clip_contrastive, cross_entropy, embedding_distance
from dvd.config import ConfigError, parse_eps, positive_int, suggest, to_dict
from dvd.io import versions, write_json
from dvd.models.clip import CONFIG_NAME, DVD_NAME, WEIGHTS_NAME, DvdCLIP, create_clip
from dvd.train.attack import AttackSettings, run_pgd
from dvd.train.clip_data import build_dataset, check_shard_count, detect_format, make_loader_factory
from dvd.train.command import training_cli
from dvd.train.loop import (
    CheckpointManager,
    CosineSchedule,
    DataStream,
    DistEnv,
    LoopSettings,
    MetricLogger,
    NonFiniteGuard,
    StepInfo,
    TrainingDiverged,
    adamw,
    barrier,
    fit,
    full_model_state,
    gathered,
    grad_scaler,
    is_fsdp,
    module_mode,
    non_finite_tensors,
    resolve_precision,
    restore,
    seed_everything,
    setup_distributed,
    teardown_distributed,
    unwrap,
    wrap_model,
)
from dvd.train.output import claim_output_dir
from dvd.train.scratch import random_init_expected

RECIPES = ("clean", "delta", "tecoa", "fare")
# per-channel mean/std a recipe may normalise with (open_clip's constants); "model" keeps the model's own
NORMALIZATIONS = {
    "openai": (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}
DATA_FORMATS = ("auto", "shapesworld", "webdataset", "csv", "zeroshot")
SHAPESWORLD_TASKS = ("shape", "color", "count", "size", "texture")


@dataclass
class ClipTrainConfig:
    """Everything ``dvd train clip`` takes (YAML file + ``key=value`` overrides)."""

    recipe: str = "delta"
    model: str = "dvd-tiny-vit"  # open_clip name, model-config JSON, hf-hub: tag or checkpoint folder
    pretrained: str | None = None  # tecoa/fare start: checkpoint folder, open_clip tag or weights file
    normalization: str = "model"  # mean/std inside the model: model (its config's), openai or imagenet
    output_dir: str = "runs/clip"
    # data
    data: str = ""  # ShapesWorld root, webdataset shards (brace lists, '::', pipe:), CSV/TSV, zero-shot root
    data_format: str = "auto"
    resampled: bool = False
    shuffle_buffer: int = 1000
    augment: bool = True  # open_clip's RandomResizedCrop(scale 0.9-1); false: images as they are, resized
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = "\t"
    csv_image_root: str | None = None  # relative CSV image paths resolve here (default: the working dir)
    task: str = "shape"  # tecoa on ShapesWorld: the attribute whose labels are learned
    split: str = "train"  # tecoa on a zero-shot layout: which split holds the training images
    workers: int = 0
    # optimisation
    steps: int = 100
    batch_size: int = 32  # per process and micro-batch
    accum_steps: int = 1
    lr: float = 5e-4
    min_lr_ratio: float = 0.0
    warmup_steps: int = 10
    weight_decay: float = 0.2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    grad_clip: float | None = 1.0
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    distributed: str = "ddp"  # ddp | fsdp
    grad_checkpointing: bool = False
    local_loss: bool = True
    gather_with_grad: bool = True
    seed: int = 0
    # attack
    eps: str = "4/255"
    attack_steps: int | None = None  # default: 2 for delta, 10 for tecoa/fare, 0 for clean
    attack_step_size: str | None = None  # default: 2.5 eps / max(K, 2) for delta, 1/255 for tecoa/fare
    random_start: bool = True
    eps_warmup_steps: int = 0
    clean_loss_weight: float = 0.0
    attack_mode: str = "eval"  # eval | train
    phases: list[dict[str, int]] = field(default_factory=list)  # [{steps, image_size, attack_steps}]
    # bookkeeping
    checkpoint_every: int = 50
    keep_last: int = 3
    resume: str | None = None  # "latest" or a checkpoint folder
    stop_at: int | None = None  # end this invocation at this step, checkpointed (time-limited jobs)
    log_every: int = 10
    max_nonfinite_in_a_row: int = 10
    progress: bool = True
    # periodic zero-shot evaluation on ShapesWorld tasks (clean + short PGD)
    eval_every: int = 0
    eval_data: str | None = None  # ShapesWorld root; default: ``data`` when it is one
    eval_tasks: list[str] = field(default_factory=lambda: list(SHAPESWORLD_TASKS))
    eval_samples: int = 100
    eval_eps: str = "4/255"
    eval_attack_steps: int = 10
    eval_batch_size: int = 100


# ---------------------------------------------------------------------------------------------
# configuration checks


def check_config(cfg: ClipTrainConfig) -> ClipTrainConfig:
    """Validate and fill recipe-dependent defaults; one-line errors naming the fix."""
    if cfg.recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {cfg.recipe!r}{suggest(cfg.recipe, RECIPES)}")
    if cfg.data_format not in DATA_FORMATS:
        raise ConfigError(f"unknown data_format {cfg.data_format!r}{suggest(cfg.data_format, DATA_FORMATS)}")
    if cfg.attack_mode not in ("eval", "train"):
        raise ConfigError(f"attack_mode {cfg.attack_mode!r} is not one of eval, train")
    if cfg.normalization != "model" and cfg.normalization not in NORMALIZATIONS:
        choices = ("model", *NORMALIZATIONS)
        raise ConfigError(f"unknown normalization {cfg.normalization!r}{suggest(cfg.normalization, choices)}")
    if not cfg.data:
        raise ConfigError("no training data; set data=DIR (ShapesWorld root), shard urls or a CSV file")
    for name in (
        "steps",
        "batch_size",
        "accum_steps",
        "checkpoint_every",
        "keep_last",
        "max_nonfinite_in_a_row",
    ):
        positive_int(getattr(cfg, name), name)
    for name in ("workers", "warmup_steps", "eps_warmup_steps", "log_every", "eval_every", "shuffle_buffer"):
        if int(getattr(cfg, name)) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or not math.isfinite(cfg.lr):
        raise ConfigError(f"lr must be a positive number, got {cfg.lr}")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        raise ConfigError(f"weight_decay must be a number >= 0, got {cfg.weight_decay}")
    if cfg.clean_loss_weight < 0:
        raise ConfigError(f"clean_loss_weight must be >= 0, got {cfg.clean_loss_weight}")
    if cfg.recipe in ("tecoa", "fare") and cfg.pretrained is None and not Path(cfg.model).is_dir():
        raise ConfigError(
            f"recipe {cfg.recipe} fine-tunes a pre-trained CLIP; set pretrained=DIR (a dvd checkpoint "
            "folder), an open_clip tag or a weights file"
        )
    parse_eps(cfg.eps)
    parse_eps(cfg.eval_eps)
    if cfg.attack_steps is None:
        cfg.attack_steps = {"clean": 0, "delta": 2, "tecoa": 10, "fare": 10}[cfg.recipe]
    if cfg.attack_steps < 0:
        raise ConfigError(f"attack_steps must be >= 0, got {cfg.attack_steps}")
    if cfg.recipe == "clean" and cfg.attack_steps > 0:
        raise ConfigError("recipe clean does not attack; use recipe=delta for adversarial training")
    if cfg.recipe != "clean" and cfg.attack_steps == 0 and not cfg.phases:
        raise ConfigError(f"recipe {cfg.recipe} needs attack_steps >= 1 (0 is clean training: recipe=clean)")
    for task in cfg.eval_tasks:
        if task not in SHAPESWORLD_TASKS:
            raise ConfigError(f"unknown ShapesWorld task {task!r}{suggest(task, SHAPESWORLD_TASKS)}")
    return cfg


# ---------------------------------------------------------------------------------------------
# resolution schedule (CLIPA / AdvXL): low-res phases with interpolated positional embeddings


@dataclass(frozen=True)
class Phase:
    """``steps`` optimizer steps from ``start`` at ``image_size`` px with PGD-``attack_steps``."""

    start: int
    steps: int
    image_size: int
    attack_steps: int


def build_phases(cfg: ClipTrainConfig, clip: DvdCLIP) -> list[Phase]:
    """The schedule from ``cfg.phases`` (or one phase at the model's size); steps must add up."""
    native = clip.image_size
    if not cfg.phases:
        return [Phase(0, cfg.steps, native, int(cfg.attack_steps or 0))]
    patch = _patch_size(clip)
    phases, start = [], 0
    for i, item in enumerate(cfg.phases):
        if not isinstance(item, dict):
            raise ConfigError(
                f"phases[{i}] must be a mapping like {{steps: 100, image_size: 112, attack_steps: 1}}"
            )
        unknown = set(item) - {"steps", "image_size", "attack_steps"}
        if unknown:
            raise ConfigError(
                f"phases[{i}] has unknown key {sorted(unknown)[0]!r} (use steps, image_size, attack_steps)"
            )
        steps = positive_int(item.get("steps"), f"phases[{i}].steps")
        size = positive_int(item.get("image_size", native), f"phases[{i}].image_size")
        attack = int(item.get("attack_steps", cfg.attack_steps or 0))
        if size > native or size % patch:
            raise ConfigError(
                f"phases[{i}].image_size={size} must be a multiple of the patch size {patch} and at most the "
                f"model's {native} px"
            )
        if attack < 0 or (cfg.recipe == "clean" and attack > 0):
            raise ConfigError(f"phases[{i}].attack_steps={attack} is invalid for recipe {cfg.recipe}")
        if size != native and cfg.recipe not in ("clean", "delta"):
            raise ConfigError(f"low-resolution phases are for pre-training (clean, delta), not {cfg.recipe}")
        phases.append(Phase(start, steps, size, attack))
        start += steps
    if start != cfg.steps:
        raise ConfigError(f"phases add up to {start} steps but steps={cfg.steps}; make them equal")
    return phases


def phase_at(phases: Sequence[Phase], step: int) -> Phase:
    for phase in phases:
        if step < phase.start + phase.steps:
            return phase
    return phases[-1]


def _patch_size(clip: DvdCLIP) -> int:
    patch = getattr(clip.model.visual, "patch_size", None)
    if patch is None:
        raise ConfigError(
            f"{clip.model_name} has no ViT patch grid; resolution phases need a ViT image tower"
        )
    return int(patch[0] if isinstance(patch, tuple) else patch)


class InterpolatedPositions(nn.Module):
    """Parametrization: the full-size (1 + g*g, D) positional embedding resized to the current grid.

    The class-token row is kept; the grid rows are bilinearly interpolated. At the native grid it is
    the identity, so the parameter (and what is saved) always has the model's full size.
    """

    def __init__(self, native_grid: tuple[int, int]) -> None:
        super().__init__()
        self.native = tuple(native_grid)
        self.grid = tuple(native_grid)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        if self.grid == self.native:
            return pos
        extra = pos.shape[0] - self.native[0] * self.native[1]
        tokens, grid = pos[:extra], pos[extra:]
        grid = grid.reshape(1, *self.native, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=self.grid, mode="bilinear", align_corners=False, antialias=True)
        return torch.cat([tokens, grid.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1])])


class Resolution:
    """Switches a CLIP's image tower between its native and lower resolutions."""

    def __init__(self, clip: DvdCLIP, phases: Sequence[Phase]) -> None:
        self.clip = clip
        self.native = clip.image_size
        self.current = clip.image_size
        self.positions: InterpolatedPositions | None = None
        if any(p.image_size != self.native for p in phases):
            visual = clip.model.visual
            self.patch = _patch_size(clip)
            self.positions = InterpolatedPositions(tuple(visual.grid_size))
            parametrize.register_parametrization(visual, "positional_embedding", self.positions, unsafe=True)

    def set(self, image_size: int) -> None:
        if self.positions is not None:
            self.positions.grid = (image_size // self.patch, image_size // self.patch)
        self.current = image_size

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """Downsample [0, 1] images loaded at the native size to the current one."""
        if images.shape[-1] == self.current and images.shape[-2] == self.current:
            return images
        resized = F.interpolate(
            images, size=(self.current, self.current), mode="bilinear", align_corners=False, antialias=True
        )
        return resized.clamp(0, 1)


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


class ContrastiveLoss:
    """clean / delta: ``ClipLoss`` on (adversarial) images with clean captions (+ weighted clean loss)."""

    def __init__(
        self,
        *,
        model: nn.Module,
        clip: DvdCLIP,
        env: DistEnv,
        phases: Sequence[Phase],
        resolution: Resolution,
        attack: AttackSettings | None,
        clean_loss_weight: float,
        local_loss: bool,
        gather_with_grad: bool,
    ) -> None:
        from open_clip.loss import ClipLoss

        self.model, self.clip, self.env = model, clip, env
        self.phases, self.resolution, self.attack = phases, resolution, attack
        self.clean_loss_weight = clean_loss_weight
        self.encoder = PixelEncoder(clip, sharded_root=model)
        self.clip_loss = ClipLoss(
            local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
            rank=env.rank, world_size=env.world_size,
        )  # fmt: skip

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
                result.update(self._attack_stats(images, out["images"], out["text_features"].detach(), info))
        return result

    def _attack(
        self, images: torch.Tensor, text: torch.Tensor, *, steps: int, info: StepInfo
    ) -> torch.Tensor:
        objective = clip_contrastive(self.encoder, text, self.clip.logit_scale.detach())
        return run_pgd(
            objective,
            images,
            model=self.clip,
            settings=self.attack,
            steps=steps,
            rank=self.env.rank,
            info=info,
        )

    @torch.no_grad()
    def _attack_stats(
        self, clean: torch.Tensor, adversarial: torch.Tensor, text: torch.Tensor, info: StepInfo
    ) -> dict[str, float]:
        """Loss gain and success of this batch's attack (two extra no-grad forwards, logging steps only)."""
        objective = clip_contrastive(self.encoder, text, self.clip.logit_scale.detach())
        with module_mode(self.clip, self.attack.train_mode):
            before, after = objective(clean), objective(adversarial)
        return _attack_summary(
            before.loss, after.loss, before.success, after.success, self.attack.eps_at(info.step)
        )


class TecoaLoss:
    """TeCoA: cross-entropy of zero-shot logits (fixed class-name embeddings) on adversarial images."""

    def __init__(
        self,
        *,
        model: nn.Module,
        clip: DvdCLIP,
        env: DistEnv,
        phases: Sequence[Phase],
        attack: AttackSettings,
        class_weights: torch.Tensor,
    ) -> None:
        self.model, self.clip, self.env, self.phases, self.attack = model, clip, env, phases, attack
        self.scale = float(clip.logit_scale.detach())
        self.head = ZeroShotHead(PixelEncoder(clip, sharded_root=model), class_weights, self.scale)

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor], info: StepInfo) -> dict[str, Any]:
        images, labels = (t.to(self.env.device, non_blocking=True) for t in batch)
        steps = phase_at(self.phases, info.step).attack_steps

        def attack(x: torch.Tensor) -> torch.Tensor:
            return run_pgd(
                cross_entropy(self.head, labels),
                x,
                model=self.clip,
                settings=self.attack,
                steps=steps,
                rank=self.env.rank,
                info=info,
            )

        out = self.model(images, attack=attack)
        logits = self.scale * out["features"] @ self.head.weights
        loss = F.cross_entropy(logits.float(), labels)
        result: dict[str, Any] = {
            "loss": loss,
            "cross_entropy": loss.detach(),
            "adversarial_accuracy": (logits.argmax(1) == labels).float().mean().detach(),
        }
        if info.log:
            with gathered(self.model), torch.no_grad(), module_mode(self.clip, self.attack.train_mode):
                objective = cross_entropy(self.head, labels)
                before, after = objective(images), objective(out["images"])
            result.update(
                _attack_summary(
                    before.loss, after.loss, before.success, after.success, self.attack.eps_at(info.step)
                )
            )
        return result


class FareLoss:
    """FARE: squared L2 between adversarial embeddings and the frozen original's clean embeddings."""

    def __init__(
        self,
        *,
        model: nn.Module,
        clip: DvdCLIP,
        reference: DvdCLIP,
        env: DistEnv,
        phases: Sequence[Phase],
        attack: AttackSettings,
    ) -> None:
        self.model, self.clip, self.env, self.phases, self.attack = model, clip, env, phases, attack
        self.reference = PixelEncoder(reference, normalize=False)
        self.encoder = PixelEncoder(clip, normalize=False, sharded_root=model)

    def __call__(self, batch: Any, info: StepInfo) -> dict[str, Any]:
        images = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(
            self.env.device, non_blocking=True
        )
        steps = phase_at(self.phases, info.step).attack_steps
        with torch.no_grad():
            target = self.reference(images)

        def attack(x: torch.Tensor) -> torch.Tensor:
            return run_pgd(
                embedding_distance(self.encoder, target),
                x,
                model=self.clip,
                settings=self.attack,
                steps=steps,
                rank=self.env.rank,
                info=info,
            )

        out = self.model(images, attack=attack)
        loss = (out["features"].float() - target).pow(2).sum(dim=1).mean()
        result: dict[str, Any] = {"loss": loss, "embedding_distance": loss.detach()}
        if info.log:
            with gathered(self.model), torch.no_grad(), module_mode(self.clip, self.attack.train_mode):
                objective = embedding_distance(self.encoder, target)
                before, after = objective(images), objective(out["images"])
            result.update(_attack_summary(before.loss, after.loss, None, None, self.attack.eps_at(info.step)))
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


# ---------------------------------------------------------------------------------------------
# weights in open_clip's layout


def _export_key(key: str) -> str | None:
    """A wrapper state-dict key -> open_clip's key (None for keys that are not the CLIP's)."""
    if not key.startswith("clip.model."):
        return None
    key = key[len("clip.model.") :]
    return key.replace("parametrizations.positional_embedding.original", "positional_embedding")


class OpenClipWeights:
    """Writes and reads checkpoint weights as an open_clip hub folder (loads with ``local-dir:DIR``)."""

    def __init__(self, clip: DvdCLIP, wrapper_keys: Iterable[str], metadata: dict[str, Any]) -> None:
        self.model_cfg = clip.model_cfg
        self.preprocess_cfg = {k: v for k, v in clip.preprocess_cfg.items() if k != "size"}
        self.model_name = clip.model_name
        self.tokenizer = clip.tokenizer
        self.metadata = metadata
        self.to_wrapper = {}
        for key in wrapper_keys:
            exported = _export_key(key)
            if exported is not None:
                self.to_wrapper[exported] = key

    def save(self, state: dict[str, torch.Tensor], directory: Path) -> None:
        from safetensors.torch import save_file

        exported = {}
        for key, value in state.items():
            name = _export_key(key)
            if name is not None:
                exported[name] = value.detach().to("cpu").contiguous()
        save_file(exported, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(
            directory / CONFIG_NAME, {"model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg}
        )
        if hasattr(self.tokenizer, "save_pretrained"):  # HF tokenizers travel with the weights
            self.tokenizer.save_pretrained(str(directory))
        write_json(
            directory / DVD_NAME,
            {
                "model_name": self.model_name,
                "format": "open_clip",
                "metadata": self.metadata,
                "versions": versions(),
            },
        )

    def load(self, directory: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = directory / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint has no weights; it is incomplete")
        loaded = load_file(str(path))
        missing = sorted(set(self.to_wrapper) - set(loaded))
        if missing:
            raise ConfigError(
                f"checkpoint {directory} does not match the model: it lacks {missing[0]}; "
                "use the model it was trained with or a fresh output_dir"
            )
        return {self.to_wrapper[k]: v for k, v in loaded.items() if k in self.to_wrapper}


def export_final(weights: OpenClipWeights, state: dict[str, torch.Tensor], directory: Path) -> Path:
    """The final model as an open_clip folder, written to a temp folder and renamed into place."""
    bad = non_finite_tensors(state)
    if bad:
        raise TrainingDiverged(f"refusing to export non-finite weights ({bad[0]})")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    try:
        weights.save(state, tmp)
        old = directory.with_name(f".old-{directory.name}")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


# ---------------------------------------------------------------------------------------------
# periodic zero-shot evaluation


def make_evaluator(
    cfg: ClipTrainConfig, clip: DvdCLIP, resolution: Resolution, env: DistEnv, model: nn.Module
) -> Callable[[int], dict[str, float]] | None:
    """Clean and short-PGD zero-shot accuracy on ShapesWorld tasks, via :mod:`dvd.eval.zeroshot`."""
    root = cfg.eval_data or (cfg.data if detect_format(cfg) == "shapesworld" else None)
    if cfg.eval_every <= 0 or root is None:
        return None
    from dvd.data.transforms import image_transform
    from dvd.data.zeroshot import load_zeroshot
    from dvd.eval.results import write_rows
    from dvd.eval.zeroshot import evaluate_zeroshot

    eps = parse_eps(cfg.eval_eps)

    def evaluated_model() -> DvdCLIP | None:
        """The CLIP to evaluate on rank 0: itself, or under FSDP an unsharded copy (collective)."""
        if not is_fsdp(model):
            return clip if env.is_main else None
        state = full_model_state(model)
        if not env.is_main:
            return None
        name = clip.model_name if not Path(cfg.model).is_dir() else cfg.model
        with random_init_expected():  # the trained weights are loaded next
            copy = create_clip(name, device=env.device)
        copy.model.load_state_dict({_export_key(k): v for k, v in state.items() if _export_key(k)})
        copy.set_normalization(clip.mean.flatten().tolist(), clip.std.flatten().tolist())
        return copy

    def evaluate(step: int) -> dict[str, float]:
        scores: dict[str, float] = {}
        resolution.set(resolution.native)
        subject = evaluated_model()
        if subject is not None:
            rows = []
            for task in cfg.eval_tasks:
                folder = Path(root) / "zeroshot" / task
                data = load_zeroshot(folder, transform=image_transform(clip.image_size))
                rows += evaluate_zeroshot(
                    subject, data, eps_list=[eps], attack="pgd", steps=cfg.eval_attack_steps,
                    limit=cfg.eval_samples, batch_size=cfg.eval_batch_size, seed=cfg.seed,
                    model_name=f"{cfg.recipe}@step{step}", dataset_name=f"shapesworld/{task}", progress=False,
                )  # fmt: skip
            for row in rows:
                task = row.dataset.split("/")[-1]
                scores[f"eval/{task}/clean"] = row.clean
                scores[f"eval/{task}/robust"] = row.adversarial
            scores["eval/mean_clean"] = sum(r.clean for r in rows) / len(rows)
            scores["eval/mean_robust"] = sum(r.adversarial for r in rows) / len(rows)
            write_rows(Path(cfg.output_dir) / "eval.json", rows)
        barrier(env)
        return scores

    return evaluate


# ---------------------------------------------------------------------------------------------
# the job


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on gains, biases, embeddings' scale or the temperature)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bias" in name or "ln" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_start_model(cfg: ClipTrainConfig, device: torch.device) -> DvdCLIP:
    """Random init for clean/delta (unless ``pretrained``); the pre-trained CLIP for tecoa/fare.

    ``normalization`` other than ``model`` replaces the model's mean/std (saved with its weights).
    """
    if cfg.pretrained is not None and Path(cfg.pretrained).is_dir():
        clip = create_clip(cfg.pretrained, device=device)
    else:
        with random_init_expected() if cfg.pretrained is None else contextlib.nullcontext():
            clip = create_clip(cfg.model, pretrained=cfg.pretrained, device=device)
    if cfg.normalization in NORMALIZATIONS:
        clip.set_normalization(*NORMALIZATIONS[cfg.normalization])
    return clip


def train_clip(cfg: ClipTrainConfig) -> dict[str, Any]:
    """Run one ``dvd train clip`` job (single process or under torchrun); returns a summary."""
    cfg = check_config(cfg)
    env = setup_distributed(cfg.device)
    try:
        with claim_output_dir(cfg.output_dir, env):
            return _train(cfg, env)
    finally:
        teardown_distributed()


def _train(cfg: ClipTrainConfig, env: DistEnv) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    precision = resolve_precision(cfg.precision, env.device)
    seed_everything(cfg.seed)  # identical initial weights on every rank
    clip = load_start_model(cfg, env.device)
    phases = build_phases(cfg, clip)
    resolution = Resolution(clip, phases)
    if cfg.grad_checkpointing:
        clip.model.set_grad_checkpointing(True)
    seed_everything(cfg.seed, env.rank)

    eps = parse_eps(cfg.eps)
    step_size = parse_eps(cfg.attack_step_size) if cfg.attack_step_size is not None else None
    attack = AttackSettings(
        eps=eps, step_size=step_size, random_start=cfg.random_start, warmup_steps=cfg.eps_warmup_steps,
        train_mode=cfg.attack_mode == "train", seed=cfg.seed,
        default_step_rule="delta" if cfg.recipe == "delta" else "fixed",
    )  # fmt: skip
    dataset, collate, info = build_dataset(cfg, clip)
    check_shard_count(dataset, cfg, env)

    if cfg.recipe in ("tecoa", "fare"):  # only the image tower trains
        clip.requires_grad_(False)
        clip.model.visual.requires_grad_(True)
        core: nn.Module = ImageTowerStep(clip, normalize=cfg.recipe == "tecoa")
    else:
        core = ContrastiveStep(clip)
    core.train()
    shard = _fsdp_units(clip) if cfg.distributed == "fsdp" else ()
    model = wrap_model(core, env, strategy=cfg.distributed, shard=shard)

    if cfg.recipe == "tecoa":
        from dvd.eval.zeroshot import build_text_classifier

        with torch.no_grad(), module_mode(clip, False):
            weights = build_text_classifier(clip, info["classnames"], info["templates"])
        loss_fn: Any = TecoaLoss(
            model=model, clip=clip, env=env, phases=phases, attack=attack, class_weights=weights
        )
    elif cfg.recipe == "fare":
        reference = load_start_model(cfg, env.device).eval().requires_grad_(False)
        loss_fn = FareLoss(model=model, clip=clip, reference=reference, env=env, phases=phases, attack=attack)
    else:
        loss_fn = ContrastiveLoss(
            model=model, clip=clip, env=env, phases=phases, resolution=resolution,
            attack=attack if cfg.recipe == "delta" else None, clean_loss_weight=cfg.clean_loss_weight,
            local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
        )  # fmt: skip

    optimizer = adamw(
        model,
        parameter_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
    )
    schedule = CosineSchedule(
        optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio
    )
    guard = NonFiniteGuard(cfg.max_nonfinite_in_a_row)
    scaler = grad_scaler(precision, env.device)
    segment = cfg.checkpoint_every * cfg.accum_steps if cfg.resampled else None
    stream = DataStream(
        make_loader_factory(dataset, cfg=cfg, env=env, collate=collate),
        env,
        segment_length=segment,
        name=cfg.data,
        seed=cfg.seed,
    )
    weights_io = OpenClipWeights(
        clip, unwrap(model).state_dict().keys(), {"recipe": cfg.recipe, "config": to_dict(cfg)}
    )
    checkpoints = CheckpointManager(
        out / "checkpoints", env, keep_last=cfg.keep_last, config=to_dict(cfg),
        fingerprint={"recipe": cfg.recipe, "model": clip.model_name, "steps": cfg.steps},
        save_weights=weights_io.save, load_weights=weights_io.load,
    )  # fmt: skip

    start = 0
    resume_from = checkpoints.resolve(cfg.resume)
    if resume_from is not None:
        start, _ = restore(
            checkpoints,
            resume_from,
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            stream=stream,
            guard=guard,
            scaler=scaler,
        )
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(
            out / "config.json",
            {
                "config": to_dict(cfg),
                "precision": precision,
                "world_size": env.world_size,
                "versions": versions(),
            },
        )
    logger = MetricLogger(
        out / "tensorboard",
        env,
        total=cfg.steps,
        start=start,
        progress=cfg.progress,
        description=f"{cfg.recipe} clip",
    )
    try:
        result = fit(
            model=model, optimizer=optimizer, schedule=schedule, stream=stream, loss_fn=loss_fn,
            settings=LoopSettings(steps=cfg.steps, accum_steps=cfg.accum_steps, grad_clip=cfg.grad_clip,
                                  precision=precision, checkpoint_every=cfg.checkpoint_every,
                                  log_every=cfg.log_every, eval_every=cfg.eval_every, stop_at=cfg.stop_at),
            env=env, checkpoints=checkpoints, logger=logger, guard=guard, scaler=scaler, start_step=start,
            evaluate=make_evaluator(cfg, clip, resolution, env, model),
        )  # fmt: skip
    finally:
        logger.close()
    resolution.set(resolution.native)
    finished = result.step >= cfg.steps
    final = out / "final"
    if finished:  # a stopped (stop_at) run leaves only its checkpoint; the export waits for the end
        state = full_model_state(model)
        if env.is_main:
            export_final(weights_io, state, final)
    summary = {"step": result.step, "skipped_steps": result.skipped,
               "final": str(final) if finished else None, "resumed_from": start,
               "seconds": round(result.seconds, 3), "last": result.last}
    if env.is_main:
        write_json(out / "summary.json", summary)
    barrier(env)
    return summary


def _fsdp_units(clip: DvdCLIP) -> list[nn.Module]:
    """Transformer blocks of both towers: FSDP shards each as a unit."""
    units = []
    for tower in (getattr(clip.model.visual, "transformer", None), getattr(clip.model, "transformer", None)):
        blocks = getattr(tower, "resblocks", None)
        if blocks is not None:
            units.extend(blocks)
    return units


def cli(argv: Sequence[str]) -> int:
    """``dvd train clip --config FILE.yaml [key=value ...]``"""
    return training_cli(
        argv,
        prog="dvd train clip",
        description="ΔCLIP adversarial pre-training, clean CLIP, TeCoA and FARE fine-tuning; torchrun-ready.",
        config_cls=ClipTrainConfig,
        train=train_clip,
        summary_keys=("step", "skipped_steps", "final", "resumed_from"),
        recipes="configs/clip_*.yaml",
    )


if __name__ == "__main__":
    raise SystemExit(cli(sys.argv[1:]))
